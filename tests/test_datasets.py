"""Tests of atlasfit.datasets: bundled real data and the synthetic atlas generator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from atlasfit import datasets
from atlasfit.datasets import (
    SyntheticParams,
    iter_synthetic_atlas,
    multigedi_real_5k,
    synthetic_mudata,
    synthetic_truth,
)

SMALL = dict(n_cells=3000, n_samples=5, features={"rna": 120, "splicing": 60, "atac": 40},
             n_cell_types=4, K_true=4, seed=3)


def _collect(stream):
    return [(name, mods) for name, mods in stream]


def _assert_same_adata(a, b):
    assert a.shape == b.shape
    assert list(a.obs_names) == list(b.obs_names)
    for key in [None, *a.layers.keys()]:
        x = a.X if key is None else a.layers[key]
        y = b.X if key is None else b.layers[key]
        assert type(x) is type(y)
        if sp.issparse(x):
            assert x.dtype == y.dtype
            assert np.array_equal(x.indptr, y.indptr)
            assert np.array_equal(x.indices, y.indices)
            assert np.array_equal(x.data, y.data)
        else:
            assert np.array_equal(x, y, equal_nan=True)
    assert np.array_equal(a.obsm["latent_true"], b.obsm["latent_true"])
    assert a.obs.equals(b.obs)


# ----------------------------------------------------------------------------- real data


def test_real_loader_matches_bundled_npz():
    path = datasets.real_data_path()
    # the file is package data (inside atlasfit/datasets/data), so it ships in the wheel
    assert path.is_file() and path.parent.name == "data"
    with path.open("rb") as fh, np.load(fh) as npz:
        raw = {k: npz[k] for k in npz.files}
    mdata = multigedi_real_5k()
    rna, spl = mdata["rna"], mdata["splicing"]
    assert rna.shape == raw["expr"].shape == (5000, 500)
    assert spl.shape == raw["M1"].shape == (5000, 1000)
    for x in (rna.X, spl.X, spl.layers["M1"], spl.layers["M2"]):
        assert sp.isspmatrix_csr(x) or isinstance(x, sp.csr_array)
        assert x.dtype == np.int32
    # totals must equal the npz's exactly (same integers)
    assert np.array_equal(rna.X.toarray(), raw["expr"])
    assert np.array_equal(spl.layers["M1"].toarray(), raw["M1"])
    assert np.array_equal(spl.layers["M2"].toarray(), raw["M2"])
    assert np.array_equal(spl.X.toarray(), raw["M1"] + raw["M2"])
    assert int(rna.X.sum()) == int(raw["expr"].sum())
    assert list(rna.obs_names) == list(spl.obs_names) == [f"cell{i}" for i in range(5000)]
    assert list(rna.var_names[:2]) == ["gene0", "gene1"]
    assert list(spl.var_names[-1:]) == ["event999"]
    labels = raw["sample"].astype(str)
    for obs in (rna.obs, spl.obs, mdata.obs):
        assert np.array_equal(obs["sample"].astype(str).to_numpy(), labels)
    assert mdata.obs["sample"].nunique() == 27


# ----------------------------------------------------------------------------- synthetic: shapes


def test_stream_shapes_names_and_types():
    items = _collect(iter_synthetic_atlas(**SMALL))
    truth = synthetic_truth(**SMALL)
    assert [n for n, _ in items] == ["S00", "S01", "S02", "S03", "S04"]
    sizes = [next(iter(m.values())).n_obs for _, m in items]
    assert sizes == truth["sample_sizes"].tolist()
    assert sum(sizes) == SMALL["n_cells"]
    assert len(set(sizes)) > 1  # uneven sample sizes (lognormal proportions)
    all_names = []
    for name, mods in items:
        first = next(iter(mods.values()))
        for mod, a in mods.items():
            assert a.n_vars == SMALL["features"][mod]
            # every modality of a sample holds the same cells in the same order
            assert list(a.obs_names) == list(first.obs_names)
            assert (a.obs["sample"] == name).all()
            assert a.obsm["latent_true"].shape == (a.n_obs, SMALL["K_true"])
            assert set(a.obs["cell_type"].cat.categories) == {f"type{t}" for t in range(4)}
        all_names += list(first.obs_names)
        assert first.obs_names[0] == f"{name}_c0"
        assert sp.issparse(mods["rna"].X) and mods["rna"].X.dtype == np.int32
        assert set(mods["splicing"].layers.keys()) == {"M1", "M2"}
    assert len(set(all_names)) == SMALL["n_cells"]


def test_counts_and_binary_values():
    params = SyntheticParams(atac_missing=0.05)
    for _, mods in iter_synthetic_atlas(**SMALL, params=params):
        for mod in ("rna", "splicing"):
            for x in [mods[mod].X, *mods[mod].layers.values()]:
                assert x.dtype == np.int32 and x.data.min() >= 0
                assert x.nnz > 0
        s = mods["splicing"]
        assert np.array_equal((s.layers["M1"] + s.layers["M2"]).toarray(), s.X.toarray())
        if "atac" in mods:
            x = mods["atac"].X
            assert isinstance(x, np.ndarray) and x.dtype == np.float32
            assert set(np.unique(x[~np.isnan(x)]).tolist()) <= {0.0, 1.0}
            # 5% NaN requested; binomial sd on >= 10^4 entries is < 0.3%
            assert abs(np.isnan(x).mean() - 0.05) < 0.015


def test_partial_overlap():
    kw = dict(SMALL, n_samples=10, n_cells=2000, overlap={"atac": 0.7, "splicing": 0.5})
    truth = synthetic_truth(**kw)
    items = _collect(iter_synthetic_atlas(**kw))
    with_atac = [n for n, m in items if "atac" in m]
    with_spl = [n for n, m in items if "splicing" in m]
    assert len(with_atac) == 7 and len(with_spl) == 5  # round(0.7 * 10), round(0.5 * 10)
    assert with_atac == truth["modalities"]["atac"]["samples"].tolist()
    assert with_spl == truth["modalities"]["splicing"]["samples"].tolist()
    assert all("rna" in m for _, m in items)
    assert truth["modalities"]["atac"]["sample_offset"].shape == (7, 40)


def test_every_sample_gets_a_modality():
    kw = dict(n_cells=400, n_samples=8, features={"a": 10, "b": 10}, obs_types={"a": "M", "b": "X"},
              overlap={"a": 0.25, "b": 0.25}, seed=1, K_true=2)
    items = _collect(iter_synthetic_atlas(**kw))
    assert all(len(m) >= 1 for _, m in items)
    assert list(items[0][1]["a"].var_names[:1]) == ["a_0"]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bits_and_seed_matters():
    a = _collect(iter_synthetic_atlas(**SMALL))
    b = _collect(iter_synthetic_atlas(**SMALL))
    for (na, ma), (nb, mb) in zip(a, b, strict=True):
        assert na == nb and ma.keys() == mb.keys()
        for mod in ma:
            _assert_same_adata(ma[mod], mb[mod])
    c = _collect(iter_synthetic_atlas(**dict(SMALL, seed=4)))
    assert not np.array_equal(a[0][1]["rna"].obsm["latent_true"][:5],
                              c[0][1]["rna"].obsm["latent_true"][:5])


def test_chunking_and_order_do_not_change_bits():
    # samples larger than one 1,024-cell block, generated all together, alone, and reversed
    kw = dict(SMALL, n_cells=5000, n_samples=3)
    full = dict(_collect(iter_synthetic_atlas(**kw)))
    assert max(next(iter(m.values())).n_obs for m in full.values()) > 1024
    alone = dict(_collect(iter_synthetic_atlas(**kw, samples=["S02"])))
    rev = dict(_collect(iter_synthetic_atlas(**kw, samples=[2, 1, 0], n_threads=2)))
    for name, mods in alone.items():
        for mod in mods:
            _assert_same_adata(mods[mod], full[name][mod])
    for name, mods in rev.items():
        for mod in mods:
            _assert_same_adata(mods[mod], full[name][mod])
    # a modality's draws are keyed by its name: dropping another modality leaves it unchanged
    only_rna = dict(_collect(iter_synthetic_atlas(**dict(kw, features={"rna": 120}))))
    for name in full:
        _assert_same_adata(only_rna[name]["rna"], full[name]["rna"])


# ----------------------------------------------------------------------------- ground truth


def _knn_accuracy(P, y, k=10):
    D = ((P[:, None, :] - P[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)
    nn = np.argpartition(D, k, axis=1)[:, :k]
    pred = np.array([np.bincount(y[r], minlength=y.max() + 1).argmax() for r in nn])
    return float((pred == y).mean())


def test_planted_cell_types_are_recoverable():
    # Sanity bound on the ground truth, not a model test: with the default noise levels the
    # planted types must be separable from log1p counts by a plain PCA + 10-NN classifier.
    mdata = synthetic_mudata(n_cells=2500, n_samples=4, features={"rna": 500}, seed=0)
    rna = mdata["rna"]
    L = np.log1p(rna.X.toarray().astype(np.float64))
    L -= L.mean(0)
    U, S, _ = np.linalg.svd(L, full_matrices=False)
    y = rna.obs["cell_type"].cat.codes.to_numpy()
    assert _knn_accuracy(U[:, :10] * S[:10], y) > 0.9


def test_latent_and_offsets_follow_truth():
    kw = dict(n_cells=6000, n_samples=2, features={"rna": 50, "atac": 30}, n_cell_types=3,
              K_true=3, overlap={}, seed=7)
    truth = synthetic_truth(**kw)
    prm = SyntheticParams()
    for i, (name, mods) in enumerate(iter_synthetic_atlas(**kw)):
        rna = mods["rna"]
        lat = rna.obsm["latent_true"].astype(np.float64)
        codes = rna.obs["cell_type"].cat.codes.to_numpy()
        for t in range(3):
            sel = codes == t
            if sel.sum() < 50:
                continue
            expected = truth["type_centres"][t] + truth["sample_shift"][i]
            # mean of n iid N(centre + shift, cell_sd^2): 5 standard errors
            tol = 5 * prm.cell_sd / np.sqrt(sel.sum())
            assert np.abs(lat[sel].mean(0) - expected).max() < tol
        # offset_true of rna is the log library: mean = l_i - sd^2/2 (lognormal mean correction)
        s = rna.obs["offset_true"].to_numpy(np.float64)
        expected = truth["log_library_mean"][i] - prm.library_sd**2 / 2
        assert abs(s.mean() - expected) < 5 * prm.library_sd / np.sqrt(len(s))
        # counts scale with the planted library: correlation of log totals with s is strong
        tot = np.log1p(np.asarray(rna.X.sum(1)).ravel())
        assert np.corrcoef(tot, s)[0, 1] > 0.5


def test_synthetic_mudata_root_and_truth():
    mdata = synthetic_mudata(**SMALL)
    assert mdata.n_obs == SMALL["n_cells"]
    for mod in mdata.mod:
        a = mdata[mod]
        sub = mdata.obs.loc[a.obs_names]
        assert np.array_equal(sub["cell_type"].astype(str), a.obs["cell_type"].astype(str))
        idx = mdata.obs_names.get_indexer(a.obs_names)
        assert np.array_equal(mdata.obsm["latent_true"][idx], a.obsm["latent_true"])
    truth = mdata.uns["synthetic_truth"]
    assert truth["modalities"]["rna"]["loadings"].shape == (120, 4)
    assert truth["modalities"]["splicing"]["obs_type"] == "M_list"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_cells=3, n_samples=5), "n_cells=3 is smaller than n_samples=5"),
        (dict(overlap={"protein": 0.5}), "overlap names modality 'protein'"),
        (dict(overlap={"atac": 1.5}), r"overlap\['atac'\]"),
        (dict(features={"adt": 10}), "modality 'adt' has no default obs type"),
        (dict(features={"rna": 0}), r"features\['rna'\]"),
        (dict(obs_types={"rna": "Y"}), r"obs_types\['rna'\]='Y'"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(samples=["S99"]), "unknown sample 'S99'"),
        (dict(n_threads=0), "n_threads must be an integer >= 1"),
    ],
)
def test_bad_arguments_name_the_input(kwargs, match):
    base = dict(n_cells=100, n_samples=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        next(iter_synthetic_atlas(**base))


def test_bad_params():
    with pytest.raises(ValueError, match="SyntheticParams.cell_sd"):
        SyntheticParams(cell_sd=-1.0)
    with pytest.raises(ValueError, match="atac_rate"):
        SyntheticParams(atac_rate=1.0)


# ----------------------------------------------------------------------------- atlas store


@pytest.mark.filterwarnings("ignore:From 0.4 .update:FutureWarning")
def test_synthetic_atlas_store_roundtrip(tmp_path):
    io = pytest.importorskip("atlasfit.io")
    if not hasattr(io, "write_atlas"):
        pytest.skip("atlasfit.io.write_atlas is not available")
    from atlasfit.datasets import synthetic_atlas

    kw = dict(n_cells=1500, n_samples=4, features={"rna": 60, "splicing": 30, "atac": 20},
              K_true=3, seed=2)
    path = synthetic_atlas(tmp_path / "syn.zarr", **kw)
    atlas = io.open_atlas(path)
    assert list(atlas.samples.index) == ["S00", "S01", "S02", "S03"]
    io.validate(path)
    items = _collect(iter_synthetic_atlas(**kw))
    for mod in ("rna", "splicing", "atac"):
        expected = [m[mod] for _, m in items if mod in m]
        x = atlas.X(mod).compute()
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        ref = np.concatenate(
            [e.X.toarray() if sp.issparse(e.X) else e.X for e in expected], axis=0
        )
        assert np.array_equal(x, ref, equal_nan=True)
        obs = atlas.obs(mod)
        assert list(obs.index) == [c for e in expected for c in e.obs_names]
    m1 = atlas.X("splicing", layer="M1").compute()
    m1 = m1.toarray() if sp.issparse(m1) else np.asarray(m1)
    assert np.array_equal(
        m1, np.concatenate([m["splicing"].layers["M1"].toarray() for _, m in items])
    )
    import mudata as md

    mdata = md.read_zarr(str(path))
    truth = mdata.uns["synthetic_truth"]
    assert np.array_equal(truth["modalities"]["rna"]["loadings"],
                          synthetic_truth(**kw)["modalities"]["rna"]["loadings"])
    with pytest.raises(Exception, match="exist"):
        synthetic_atlas(tmp_path / "syn.zarr", **kw)
    synthetic_atlas(tmp_path / "syn.zarr", **kw, overwrite=True)


def test_planted_topic_store(tmp_path):
    """write_planted_topic_store: a valid store of the training cells (600 cells, 3 samples, 10 %
    held out), the planted parameters of planted_topic_atlas bit for bit, and cells with the planted
    statistics. The cells cannot equal planted_topic_atlas's: that draws a sample label per cell and
    the cells of all samples interleaved from one stream, while the store is drawn sample by sample
    (keys (seed, 7, s)), so the cells are checked against the model instead."""
    from atlasfit import io
    from atlasfit.datasets import planted_topic_atlas, read_planted_side, write_planted_topic_store
    from atlasfit.datasets._planted import planted_per_token_ll

    kw = dict(n_samples=3, n_topics=4, n_genes=200, n_peaks=300, seed=5)
    path = write_planted_topic_store(tmp_path / "p.zarr", 600, held_out_fraction=0.1, **kw)
    io.validate(path)
    atlas = io.open_atlas(path)
    assert atlas.samples["rna"].to_dict() == {"s0": 180, "s1": 180, "s2": 180}
    assert atlas.samples["atac"].to_dict() == atlas.samples["rna"].to_dict()
    side = read_planted_side(path)
    assert side.x_test["rna"].shape == (60, 200) and side.x_test["atac"].shape == (60, 300)
    assert np.bincount(side.sample_test).tolist() == [20, 20, 20]
    ref = planted_topic_atlas(50, 10, **kw)
    for m in ("rna", "atac"):  # the same planted parameters
        assert np.array_equal(side.phi[m], ref.phi[m])
        assert np.array_equal(side.phi_sample[m], ref.phi_sample[m])
    rna = sp.vstack([atlas.read_block("rna", s) for s in ("s0", "s1", "s2")], format="csr")
    atac = sp.vstack([atlas.read_block("atac", s) for s in ("s0", "s1", "s2")], format="csr")
    assert set(np.unique(atac.data)) == {1.0}
    import zarr

    theta = np.asarray(zarr.open_group(str(path), mode="r")["mod/rna/obsm/theta_true"][:], dtype=np.float64)
    assert theta.shape == (540, 4) and np.allclose(theta.sum(1), 1, atol=1e-5)
    # RNA: library LogNormal(log 2000, 0.5) (sd of the mean log: 0.02); counts follow lib * theta phi^(s)
    lib = np.asarray(rna.sum(1)).ravel()
    assert abs(np.log(lib).mean() - np.log(2000)) < 0.1
    s_idx = np.repeat([0, 1, 2], 180)
    expected = np.zeros(200)
    for s in range(3):
        rows = s_idx == s
        expected += (lib[rows, None] * (theta[rows] @ side.phi_sample["rna"][s])).sum(0)
    assert np.corrcoef(expected, np.asarray(rna.sum(0)).ravel())[0, 1] > 0.99
    # peaks: binarised Poisson, P(open) = E_d[1 - exp(-d rho)] with d ~ LogNormal(log 200, 0.5)
    # (expectation over d by 20-point Gauss-Hermite quadrature)
    rho = np.vstack([theta[s_idx == s] @ side.phi_sample["atac"][s] for s in range(3)])
    z, w = np.polynomial.hermite_e.hermegauss(20)
    d = np.exp(np.log(200) + 0.5 * z)
    p_open = sum(wi * (1 - np.exp(-di * rho)) for di, wi in zip(d, w / w.sum()))
    open_per_peak = np.asarray(atac.sum(0)).ravel()
    assert np.corrcoef(p_open.sum(0), open_per_peak)[0, 1] > 0.95
    assert abs(open_per_peak.sum() / p_open.sum() - 1) < 0.05
    # held-out per-token LL under the planted parameters: the same as on planted_topic_atlas's draws
    ll_side = planted_per_token_ll(side, "rna")
    ll_ref = planted_per_token_ll(planted_topic_atlas(50, 300, **kw), "rna")
    assert abs(ll_side - ll_ref) < 0.15, (ll_side, ll_ref)
    with pytest.raises(FileExistsError):
        write_planted_topic_store(tmp_path / "p.zarr", 600, **kw)
