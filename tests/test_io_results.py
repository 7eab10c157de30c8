"""write_results: obsm/varm/uns/model groups readable by mudata, anndata and xarray; atomic; X untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import dask.array as da
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import xarray as xr
import zarr

from atlasfit.io import AtlasValidationError, convert, open_atlas, to_source_order, write_results
from atlasfit.io import _results

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _files(path, sub):
    base = Path(path) / sub
    return {str(q.relative_to(base)): hashlib.sha256(q.read_bytes()).hexdigest()
            for q in sorted(base.rglob("*")) if q.is_file()}


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(3)
    n = 40
    samples = rng.choice(["A", "B", "C"], size=n)
    x = sp.random(n, 6, density=0.5, format="csr", random_state=1)
    x.data = np.ceil(x.data * 4)
    rna = ad.AnnData(x, obs=pd.DataFrame({"sample": samples}, index=[f"c{i}" for i in range(n)]),
                     var=pd.DataFrame(index=[f"g{j}" for j in range(6)]))
    keep = np.flatnonzero(samples != "B")
    prot = ad.AnnData(rng.normal(size=(keep.size, 3)),
                      obs=pd.DataFrame({"sample": samples[keep]}, index=rna.obs_names[keep]),
                      var=pd.DataFrame(index=["p0", "p1", "p2"]))
    return convert({"rna": rna, "prot": prot}, tmp_path / "a.zarr", sample_key="sample",
                   modalities={"rna": "counts", "prot": "continuous"})


def test_results_visible_to_mudata_anndata_xarray(store):
    atlas = open_atlas(store)
    n, k = atlas.n_obs("rna"), 4
    emb = np.arange(n * k, dtype=np.float64).reshape(n, k)
    # a Dask array whose blocks are the samples (not aligned with zarr chunks: rechunked first)
    demb = da.from_array(emb, chunks=(atlas.X("rna").chunks[0], (k,)))
    loadings = np.ones((6, k)) * 2
    ds = xr.Dataset({"Z": (("feature", "factor"), loadings), "sigma2": ((), 0.5)},
                    coords={"feature": [f"g{j}" for j in range(6)], "factor": np.arange(k)},
                    attrs={"model": "multigedi", "K": k})
    x_before = _files(store, "mod/rna/X")
    write_results(store, obsm={"rna": {"X_fit": demb}, "prot": {"X_fit": np.zeros((atlas.n_obs("prot"), 2))}},
                  varm={"rna": {"Z": loadings}}, uns={"fit_info": {"n_iter": 5, "trace": np.arange(3.0),
                                                                   "mode": "Bsphere"}},
                  groups={"multigedi": ds, "plain": {"a": np.ones(3), "b": {"c": np.zeros(2)}}})
    assert _files(store, "mod/rna/X") == x_before  # X never rewritten
    mdata = md.read_zarr(str(store))
    np.testing.assert_array_equal(mdata["rna"].obsm["X_fit"], emb)
    np.testing.assert_array_equal(mdata["prot"].obsm["X_fit"], 0)
    np.testing.assert_array_equal(mdata["rna"].varm["Z"], loadings)
    assert mdata.uns["fit_info"]["n_iter"] == 5 and mdata.uns["fit_info"]["mode"] == "Bsphere"
    np.testing.assert_array_equal(mdata.uns["atlasfit_models"]["multigedi"]["Z"], loadings)
    np.testing.assert_array_equal(mdata.uns["atlasfit_models"]["plain"]["b"]["c"], 0)
    one = ad.read_zarr(f"{store}/mod/rna")
    np.testing.assert_array_equal(one.obsm["X_fit"], emb)
    back = xr.open_zarr(str(store), group="uns/atlasfit_models/multigedi", consolidated=False).load()
    np.testing.assert_array_equal(back["Z"].values, loadings)
    assert back["Z"].dims == ("feature", "factor")
    assert list(back["feature"].values) == list(ds["feature"].values)
    assert float(back["sigma2"]) == 0.5 and back.attrs["model"] == "multigedi"
    # zarr chunks of the written embedding: the Dask write was aligned (one chunk covers all rows here)
    z = zarr.open_array(str(store / "mod/rna/obsm/X_fit"), mode="r")
    assert z.chunks[0] >= n
    # results come back in the user's (source) order
    src_rows = atlas.obs("rna")["atlasfit_source_row"].to_numpy()
    np.testing.assert_array_equal(to_source_order(atlas, "rna", emb)[src_rows], emb)


def test_dask_write_aligned_chunks_on_many_chunks(store, monkeypatch):
    """With small zarr chunks, every Dask task writes whole zarr chunks (no two tasks share one)."""
    monkeypatch.setattr(_results, "dense_row_chunk", lambda ncols: 7)
    atlas = open_atlas(store)
    n = atlas.n_obs("rna")
    emb = np.random.default_rng(0).normal(size=(n, 3))
    demb = da.from_array(emb, chunks=(atlas.X("rna").chunks[0], (3,)))
    written = []
    orig = _results._store_block

    def spy(block, path="", block_info=None):
        written.append(tuple(block_info[0]["array-location"][0]))
        return orig(block, path=path, block_info=block_info)

    monkeypatch.setattr(_results, "_store_block", spy)
    write_results(store, obsm={"rna": {"emb": demb}})
    starts = sorted(a for a, _ in written)
    assert all(a % 7 == 0 for a in starts)  # every task starts on a zarr chunk boundary
    assert all(b % 7 == 0 or b == n for _, b in written)
    np.testing.assert_array_equal(ad.read_zarr(f"{store}/mod/rna").obsm["emb"], emb)


def test_atomic_replace_and_failure_midway(store, monkeypatch):
    atlas = open_atlas(store)
    n = atlas.n_obs("rna")
    write_results(store, obsm={"rna": {"emb": np.ones((n, 2))}})
    write_results(store, obsm={"rna": {"emb": np.full((n, 2), 2.0)}})  # replaced
    np.testing.assert_array_equal(ad.read_zarr(f"{store}/mod/rna").obsm["emb"], 2.0)
    before = _files(store, "")
    calls = []
    orig = _results._write_array

    def boom(parent, name, arr, dims=None):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("killed midway")
        return orig(parent, name, arr, dims=dims)

    monkeypatch.setattr(_results, "_write_array", boom)
    with pytest.raises(RuntimeError, match="killed midway"):
        write_results(store, obsm={"rna": {"emb": np.zeros((n, 2)), "other": np.zeros((n, 1))}})
    assert _files(store, "") == before  # old contents intact, nothing half-written
    assert [p.name for p in store.parent.iterdir()] == ["a.zarr"]
    np.testing.assert_array_equal(ad.read_zarr(f"{store}/mod/rna").obsm["emb"], 2.0)


def test_bad_results_rejected(store):
    atlas = open_atlas(store)
    with pytest.raises(AtlasValidationError, match=r"obsm\['e'\] of modality 'rna' has 3 rows but the modality "
                       rf"has {atlas.n_obs('rna')} cells"):
        write_results(store, obsm={"rna": {"e": np.zeros((3, 2))}})
    with pytest.raises(AtlasValidationError, match="names modality 'atac' not in the atlas"):
        write_results(store, obsm={"atac": {"e": np.zeros((3, 2))}})
    with pytest.raises(AtlasValidationError, match="uns key 'atlasfit' is reserved"):
        write_results(store, uns={"atlasfit": {}})
