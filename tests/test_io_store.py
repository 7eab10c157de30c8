"""Atlas store: layout, ordering rules, lazy Dask view, conversions from every source kind."""

from __future__ import annotations

import pickle
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasfit.io import Atlas, convert, open_atlas, to_source_order, validate, write_atlas

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def make_source(seed=0):
    """Three modalities with samples interleaved in the source rows.

    rna: counts (CSR float32) over samples S3, S1, S2, S4 (first appearance order S3, S1, S2, S4
    because cell 0 is S3); atac: binary with NaN, only samples S1 and S4, its cells listed in a
    shuffled order; spl: paired counts as layers M1/M2 (no X), samples S2 and S5 (S5 only here).
    """
    rng = np.random.default_rng(seed)
    n = 60
    samples = np.array(["S3"] + list(rng.choice(["S1", "S2", "S3", "S4"], size=n - 1)))
    names = np.array([f"cell{i:03d}" for i in range(n)])
    X = sp.random(n, 12, density=0.4, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 9).astype(np.float32)
    rna = ad.AnnData(X, obs=pd.DataFrame({"sample": samples, "qc": rng.normal(size=n),
                                          "ct": rng.choice(["T", "B"], size=n)}, index=names),
                     var=pd.DataFrame(index=[f"g{j}" for j in range(12)]))
    rna.obsm["X_pca"] = rng.normal(size=(n, 3))
    keep = np.flatnonzero(np.isin(samples, ["S1", "S4"]))
    keep = rng.permutation(keep)
    B = (rng.random((keep.size, 7)) < 0.3).astype(np.float64)
    B[rng.random(B.shape) < 0.1] = np.nan
    atac = ad.AnnData(B, obs=pd.DataFrame({"sample": samples[keep]}, index=names[keep]),
                      var=pd.DataFrame(index=[f"p{j}" for j in range(7)]))
    k2 = np.flatnonzero(samples == "S2")
    extra = 5
    snames = np.concatenate([names[k2], [f"x{i}" for i in range(extra)]])
    ssamp = np.concatenate([samples[k2], ["S5"] * extra])
    order = rng.permutation(snames.size)
    m1 = sp.random(snames.size, 4, density=0.5, format="csr", random_state=seed + 1)
    m1.data = np.ceil(m1.data * 5)
    m2 = m1.copy()
    m2.data = m2.data + 1
    spl = ad.AnnData(X=None, obs=pd.DataFrame({"sample": ssamp[order]}, index=snames[order]),
                     var=pd.DataFrame(index=[f"j{j}" for j in range(4)]),
                     layers={"M1": m1[order], "M2": m2[order]}, shape=(snames.size, 4))
    return {"rna": rna, "atac": atac, "spl": spl}


KINDS = {"rna": "counts", "atac": "binary", "spl": "counts"}


def expected_order(mods):
    """Store order from the two ordering rules, computed independently of the package."""
    samples = []
    for a in mods.values():
        for s in a.obs["sample"]:
            if s not in samples:
                samples.append(s)
    first_mod = {}
    for m, a in mods.items():
        for s in pd.unique(a.obs["sample"]):
            first_mod.setdefault(s, m)
    rows = {}
    for m, a in mods.items():
        order = []
        for s in samples:
            if s not in set(a.obs["sample"]):
                continue
            ref = mods[first_mod[s]]
            ref_names = ref.obs_names[ref.obs["sample"].to_numpy() == s]
            order.extend(a.obs_names.get_indexer(ref_names))
        rows[m] = np.asarray(order)
    return samples, rows


def dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


@pytest.fixture(scope="module")
def src():
    return make_source()


@pytest.fixture(scope="module")
def store(src, tmp_path_factory):
    return convert(md.MuData(src), tmp_path_factory.mktemp("s") / "atlas.zarr", sample_key="sample",
                   modalities=KINDS)


def test_layout_and_chunks(src, store):
    atlas = open_atlas(store)
    samples, rows = expected_order(src)
    assert atlas.modalities == ["rna", "atac", "spl"]
    assert list(atlas.samples.index) == samples
    assert samples[0] == "S3" and samples[-1] == "S5" and len(samples) == 5  # cell 0 is S3; S5 only in spl
    for m, a in src.items():
        sizes = [int((a.obs["sample"] == s).sum()) for s in samples]
        assert atlas.samples[m].tolist() == sizes
        assert list(atlas.obs(m).index) == list(a.obs_names[rows[m]])
        present = tuple(c for c in sizes if c)
        layer = None if a.X is not None else "M1"
        X = atlas.X(m, layer=layer)
        assert X.chunks[0] == present
        ref = dense(a.X if layer is None else a.layers[layer])[rows[m]]
        # per-sample sums from Dask vs in memory (sums over the store-order reference rows)
        sums = X.map_blocks(lambda b: np.nansum(dense(b), axis=0).reshape(1, -1),
                            chunks=((1,) * len(present), (a.n_vars,)), dtype=np.float64,
                            meta=np.empty((0, 0))).compute()
        bounds = np.concatenate([[0], np.cumsum(present)])
        exp = np.stack([np.nansum(ref[bounds[i]:bounds[i + 1]], axis=0) for i in range(len(present))])
        np.testing.assert_allclose(sums, exp)
        blk = X.blocks[0].compute()
        assert sp.isspmatrix_csr(blk) if atlas.kind(m) == "counts" else isinstance(blk, np.ndarray)
    assert atlas.kind("atac") == "binary" and atlas.layers("spl") == ["M1", "M2"]
    assert isinstance(atlas.X("rna")._meta, sp.csr_matrix)
    assert isinstance(atlas.X("atac")._meta, np.ndarray)
    # the graph holds no data, only the reader (path + element) and row ranges
    assert len(pickle.dumps(dict(atlas.X("rna").__dask_graph__()))) < 4000
    validate(store)


def test_read_block_and_pickle(src, store):
    atlas = pickle.loads(pickle.dumps(open_atlas(store)))
    _, rows = expected_order(src)
    sl = atlas.sample_slices("atac")
    assert list(sl) == [s for s in expected_order(src)[0] if s in ("S1", "S4")]
    b = atlas.read_block("atac", "S4")
    np.testing.assert_array_equal(b, src["atac"].X[rows["atac"]][sl["S4"]])
    with pytest.raises(KeyError, match="sample 'S3' is not in modality 'atac'"):
        atlas.read_block("atac", "S3")
    with pytest.raises(KeyError, match="no X"):
        atlas.X("spl")
    assert "rna" in repr(atlas)


def test_anndata_mudata_read_same(src, store):
    _, rows = expected_order(src)
    mdata = md.read_zarr(str(store))
    ref = md.MuData({m: ad.AnnData(obs=pd.DataFrame(index=a.obs_names[rows[m]]),
                                   var=pd.DataFrame(index=a.var_names)) for m, a in src.items()})
    assert list(mdata.obs_names) == list(ref.obs_names)
    assert list(mdata.var_names) == list(ref.var_names)
    for m, a in src.items():
        np.testing.assert_array_equal(mdata.obsmap[m], ref.obsmap[m])
        np.testing.assert_array_equal(mdata.varmap[m], ref.varmap[m])
        one = ad.read_zarr(f"{store}/mod/{m}")
        for x, y in ((one, a), (mdata[m], a)):
            if a.X is not None:
                np.testing.assert_array_equal(dense(x.X), dense(a.X)[rows[m]])
            for k in a.layers:
                np.testing.assert_array_equal(dense(x.layers[k]), dense(a.layers[k])[rows[m]])
            assert list(x.obs_names) == list(a.obs_names[rows[m]])
            assert (x.obs["sample"].astype(str).to_numpy() == a.obs["sample"].to_numpy()[rows[m]]).all()
            np.testing.assert_array_equal(x.obs["atlasfit_source_row"].to_numpy(), rows[m])
    one = ad.read_zarr(f"{store}/mod/rna")
    assert one.X.dtype == np.float32 and sp.issparse(one.X)
    np.testing.assert_array_equal(one.obsm["X_pca"], src["rna"].obsm["X_pca"][rows["rna"]])
    np.testing.assert_allclose(one.obs["qc"], src["rna"].obs["qc"].to_numpy()[rows["rna"]])
    assert list(one.obs["ct"].astype(str)) == list(src["rna"].obs["ct"].to_numpy()[rows["rna"]])
    assert not (store / ".zmetadata").exists()  # same as mudata: not consolidated


def test_to_source_order_interleaved(src, store):
    atlas = open_atlas(store)
    for m, a in src.items():
        obs = atlas.obs(m)
        back = to_source_order(atlas, m, obs)
        assert list(back.index) == list(a.obs_names)
        arr = np.arange(a.n_obs)[:, None] * np.ones((1, 2))
        np.testing.assert_array_equal(to_source_order(atlas, m, arr)[:, 0],
                                      np.argsort(obs["atlasfit_source_row"].to_numpy()))
    import dask.array as da

    X = atlas.X("rna").map_blocks(dense, dtype=np.float32, meta=np.empty((0, 0), np.float32))
    np.testing.assert_array_equal(to_source_order(atlas, "rna", X).compute(), dense(src["rna"].X))


def _summary(path):
    atlas = open_atlas(path)
    out = {"samples": atlas.samples.to_dict()}
    for m in atlas.modalities:
        els = ([None] if atlas._info["mods"][m]["has_X"] else []) + atlas.layers(m)
        out[m] = [dense(atlas.X(m, layer=e).compute()) for e in els]
        out[m + "_obs"] = list(atlas.obs(m).index)
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], list) and a[k] and isinstance(a[k][0], np.ndarray):
            for x, y in zip(a[k], b[k]):
                np.testing.assert_array_equal(x, y)
        else:
            assert a[k] == b[k]


def test_convert_from_files_and_memory(src, store, tmp_path):
    ref = _summary(store)
    mdata = md.MuData(src)
    mdata.write_h5mu(tmp_path / "s.h5mu")
    got = convert(tmp_path / "s.h5mu", tmp_path / "a1.zarr", sample_key="sample", modalities=KINDS)
    _same(_summary(got), ref)
    got = convert(dict(src), tmp_path / "a2.zarr", sample_key="sample", modalities=KINDS)
    _same(_summary(got), ref)
    mdata.write_zarr(tmp_path / "s_mu.zarr")
    got = convert(tmp_path / "s_mu.zarr", tmp_path / "a3.zarr", sample_key="sample", modalities=KINDS)
    _same(_summary(got), ref)
    # a single AnnData: in memory, .h5ad and anndata .zarr all become modality "rna"
    rna = src["rna"]
    rna.write_h5ad(tmp_path / "r.h5ad")
    rna.write_zarr(tmp_path / "r.zarr")
    outs = [convert(s, tmp_path / f"r{i}.zarr", sample_key="sample")
            for i, s in enumerate([rna, tmp_path / "r.h5ad", tmp_path / "r.zarr"])]
    for o in outs:
        atlas = open_atlas(o)
        assert atlas.modalities == ["rna"]
        np.testing.assert_array_equal(dense(atlas.X("rna").compute()), ref["rna"][0])
        assert list(atlas.obs("rna").index) == ref["rna_obs"]


def test_sample_key_from_mudata_global_obs(src, tmp_path):
    mods = {m: a.copy() for m, a in src.items()}
    labels = pd.concat([a.obs["sample"] for a in mods.values()])
    labels = labels[~labels.index.duplicated()]
    for a in mods.values():
        del a.obs["sample"]
    mdata = md.MuData(mods)
    mdata.obs["donor"] = labels.reindex(mdata.obs_names).to_numpy()
    p = convert(mdata, tmp_path / "a.zarr", sample_key="donor", modalities=KINDS)
    assert open_atlas(p).samples.index.tolist() == expected_order(src)[0]


def test_partial_overlap_and_layers_selection(src, tmp_path):
    p = convert(dict(src), tmp_path / "a.zarr", sample_key="sample",
                modalities={"atac": "binary", "spl": "counts"}, layers={"spl": ["M2"]})
    atlas = open_atlas(p)
    # global order scans atac first now: atac's first cell decides
    assert atlas.modalities == ["atac", "spl"]
    assert atlas.layers("spl") == ["M2"]
    s = atlas.samples
    assert set(s.index) == {"S1", "S4", "S2", "S5"}
    assert (s.loc[["S2", "S5"], "atac"] == 0).all() and (s.loc[["S1", "S4"], "spl"] == 0).all()
    assert list(atlas.sample_slices("spl")) == ["S2", "S5"]


def test_write_atlas_streaming_generator(tmp_path):
    consumed = []

    def stream():
        for i, s in enumerate(["B", "A", "C"]):
            consumed.append(s)
            n = 3 + i
            x = sp.csr_matrix(np.arange(n * 4, dtype=np.int32).reshape(n, 4) % 3)
            a = ad.AnnData(x, obs=pd.DataFrame({"v": np.arange(n, dtype=np.int64)},
                                               index=[f"{s}{j}" for j in range(n)]))
            b = ad.AnnData(np.ones((n, 2)) * i, obs=pd.DataFrame(index=[f"{s}{j}" for j in range(n)][::-1]))
            yield s, ({"rna": a, "prot": b} if s != "A" else {"rna": a})

    p = write_atlas(tmp_path / "w.zarr", stream(), sample_key="donor", kinds={"prot": "continuous"})
    atlas = open_atlas(p)
    assert consumed == ["B", "A", "C"] and atlas.sample_key == "donor"
    assert atlas.samples.to_dict() == {"rna": {"B": 3, "A": 4, "C": 5}, "prot": {"B": 3, "A": 0, "C": 5}}
    assert atlas.X("rna").dtype == np.int32
    # prot's cells were given reversed: they are matched by name to rna's order
    assert list(atlas.obs("prot").index) == ["B0", "B1", "B2", "C0", "C1", "C2", "C3", "C4"]
    np.testing.assert_array_equal(atlas.obs("prot")["atlasfit_source_row"], [2, 1, 0, 7, 6, 5, 4, 3])
    assert list(atlas.obs("rna")["donor"].astype(str)) == ["B"] * 3 + ["A"] * 4 + ["C"] * 5
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_atlas(p, stream())
    # overwrite replaces the store; no temporary directory is left behind
    p2 = write_atlas(p, [("Z", {"rna": ad.AnnData(np.ones((2, 2), np.float32),
                                                  obs=pd.DataFrame(index=["z1", "z2"]))})], overwrite=True)
    assert open_atlas(p2).samples.index.tolist() == ["Z"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.zarr"]


def test_convert_reads_one_sample_at_a_time(src, tmp_path, monkeypatch):
    """The backed h5ad source is only ever indexed with the rows of one sample."""
    import atlasfit.io._convert as conv

    rna = src["rna"]
    rna.write_h5ad(tmp_path / "r.h5ad")
    sizes = rna.obs["sample"].value_counts().to_dict()
    seen = []
    orig = conv._node_reader

    def spy(node):
        r = orig(node)
        if r is None:
            return r

        def read(idx):
            seen.append(len(idx))
            return r(idx)

        return read

    monkeypatch.setattr(conv, "_node_reader", spy)
    convert(tmp_path / "r.h5ad", tmp_path / "a.zarr", sample_key="sample")
    assert seen and max(seen) == max(sizes.values()) < rna.n_obs


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def test_on_local_cluster(src, store, client, tmp_path):
    atlas = open_atlas(store)
    _, rows = expected_order(src)
    X = atlas.X("rna")
    n = len(X.chunks[0])
    sums = X.map_blocks(lambda b: np.asarray(b.sum(0)).reshape(1, -1), chunks=((1,) * n, (12,)),
                        dtype=np.float64, meta=np.empty((0, 0))).compute()
    ref = dense(src["rna"].X)[rows["rna"]]
    bounds = np.concatenate([[0], np.cumsum(X.chunks[0])])
    np.testing.assert_allclose(sums, np.stack([ref[bounds[i]:bounds[i + 1]].sum(0) for i in range(n)]))
    # the Atlas travels to workers (path only) and reads a block there
    fut = client.submit(lambda a, s: a.read_block("rna", s).sum(), atlas, "S2")
    sl = atlas.sample_slices("rna")["S2"]
    assert fut.result() == ref[sl].sum()
    assert isinstance(pickle.loads(pickle.dumps(atlas)), Atlas)

    # results computed on the workers are written from the workers (rechunked to the zarr chunks)
    import shutil

    from atlasfit.io import write_results

    copy = shutil.copytree(store, tmp_path / "copy.zarr")
    emb = X.map_blocks(lambda b: np.asarray(b[:, :3].todense()) * 2.0, chunks=(X.chunks[0], (3,)),
                       dtype=np.float64, meta=np.empty((0, 0)))
    write_results(copy, obsm={"rna": {"X_emb": emb}})
    got = ad.read_zarr(f"{copy}/mod/rna").obsm["X_emb"]
    np.testing.assert_array_equal(got, ref[:, :3] * 2.0)


def test_convert_kinds_declares_without_selecting(tmp_path):
    """`kinds=` declares some modalities' kinds and keeps every modality (the mapping form of
    `modalities=` selects); a kind for a modality that `modalities=` drops is an error naming both."""
    rng = np.random.default_rng(1)
    obs = pd.DataFrame({"s": np.repeat(["a", "b"], 6)}, index=[f"c{i}" for i in range(12)])
    mdata = md.MuData({"rna": ad.AnnData(rng.poisson(1.0, (12, 4)).astype(np.float32), obs=obs.copy()),
                       "atac": ad.AnnData((rng.random((12, 5)) < 0.5).astype(np.float32), obs=obs.copy())})
    atlas = open_atlas(convert(mdata, tmp_path / "k.zarr", sample_key="s", kinds={"atac": "binary"}))
    assert list(atlas.modalities) == ["rna", "atac"] and atlas.kind("atac") == "binary"
    with pytest.raises(ValueError, match="kinds names modality 'atac'"):
        convert(mdata, tmp_path / "k2.zarr", sample_key="s", modalities=["rna"], kinds={"atac": "binary"})
    assert not (tmp_path / "k2.zarr").exists()
