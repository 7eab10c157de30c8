"""The user-facing MultiGEDI model: in-memory and store fits, on the serial engine and on a Dask
LocalCluster, against the reference fixtures (multigedi 1.1.0 outputs, ``tests/data``), plus
determinism across worker counts, worker loss, resume, results in the store, save/load and errors.
"""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from _kill import KillWorkerAt
from test_multigedi_parity import DATA, TOL, score_state

import atlasfit
from atlasfit.io import convert, open_atlas, to_source_order

distributed = pytest.importorskip("distributed")

FIX = "multigedi_synth_3mod"  # interleaved cells, partial overlap, M + M_list + X, Bl2, K=5


def fixture_mudata(name=FIX):
    """MuData of a fixture's inputs; obs_names = str(global cell id)."""
    import json

    d = np.load(DATA / f"{name}.npz", allow_pickle=False)
    cfg = json.loads(str(d["config"]))
    mods, conf = {}, {}
    for mc in cfg["modalities"]:
        m = mc["name"]
        obs = pd.DataFrame({"sample": [str(x) for x in d[f"input/{m}/sample"].tolist()]},
                           index=[str(c) for c in d[f"input/{m}/cells"]])
        var = pd.DataFrame(index=[f"{m}{j}" for j in range(mc["J"])])
        if mc["obs_type"] == "M_list":
            M1 = sp.csr_matrix(d[f"input/{m}/M1"].astype(np.int32))
            M2 = sp.csr_matrix(d[f"input/{m}/M2"].astype(np.int32))
            a = ad.AnnData(M1 + M2, obs=obs, var=var, layers={"M1": M1, "M2": M2})
        elif mc["obs_type"] == "M":
            a = ad.AnnData(sp.csr_matrix(d[f"input/{m}/X"].astype(np.int32)), obs=obs, var=var)
        else:
            a = ad.AnnData(d[f"input/{m}/X"].astype(np.float32), obs=obs, var=var)
        mods[m] = a
        conf[m] = {"obs_type": mc["obs_type"], "orthoZ": mc["orthoZ"]}
    return d, cfg, md.MuData(mods), conf


def model_for(cfg, conf, solve_Y_every=None):
    """The fixture's model with the reference's Y update (``solve_Y_every=None``: parity 1e-8)."""
    return atlasfit.MultiGEDI(conf, sample_key="sample", K=cfg["K"], mode=cfg["mode"], seed=cfg["seed"],
                              solve_Y_every=solve_Y_every)


def assert_matches_fixture(state, d, t, tol=TOL):
    scores = score_state(state, d, t)
    worst = max(scores, key=scores.get)
    assert scores[worst] <= tol, f"{worst}: {scores[worst]:.3g}"


def states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True), k


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, env={"OMP_NUM_THREADS": "1",
                                                                    "OPENBLAS_NUM_THREADS": "1"})
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d, cfg, mdata, conf = fixture_mudata()
    path = tmp_path_factory.mktemp("mg") / "synth3.zarr"
    convert(mdata, path, sample_key="sample",
            modalities={"rna": "counts", "splicing": "counts", "chromatin": "binary"})
    return path


def test_in_memory_fit_matches_reference_in_caller_order():
    # the reference stores X_multigedi_pca with row c = global cell id c (fixtures README); the
    # cells of this fixture are interleaved across samples, so this checks the order fix of §9.4
    d, cfg, mdata, conf = fixture_mudata()
    model = model_for(cfg, conf).fit(mdata, max_iterations=10, progress=False)
    state = model.export_state()
    assert_matches_fixture(state, d, 10)
    assert list(mdata.obs_names) == [str(i) for i in range(mdata.n_obs)]
    # per-modality embedding rows follow that modality's AnnData rows
    ids = mdata["chromatin"].obs_names.astype(int)
    np.testing.assert_array_equal(model.embedding("chromatin"), state["X_multigedi_pca"][ids])


def test_tl_multigedi_writes_aligned_results():
    d, cfg, mdata, conf = fixture_mudata()
    atlasfit.tl.multigedi(mdata, conf, "sample", K=cfg["K"], mode=cfg["mode"], seed=cfg["seed"],
                          max_iterations=10)
    ref = d["iter10/X_multigedi_pca"]  # the reference stores the PCA at its last iteration only
    for m in conf:
        emb = mdata[m].obsm["X_multigedi_pca"]
        assert emb.shape == (mdata[m].n_obs, cfg["K"])
        rows = ref[mdata[m].obs_names.astype(int)]
        signs = np.sign(np.sum(emb * rows, axis=0))
        np.testing.assert_allclose(emb * signs, rows, rtol=1e-7, atol=1e-9)
    assert set(mdata.uns["multigedi"]["model"]) == set(conf)


def test_store_fit_on_cluster_matches_reference_and_writes_store(store, client):
    """With the reference's Y update (``solve_Y_every=None``) the store fit on a cluster follows the
    reference's trajectory (fixture, 1e-8); by default (``solve_Y_every=10``) iteration 10 solves Y
    from Ŷ and the data instead of one Halley step, which moves the state at iteration 10 by less
    than 1e-6 of the fixture's scale (9e-8 on σ² when written)."""
    d, cfg, _, conf = fixture_mudata()
    atlas = open_atlas(store)
    full = model_for(cfg, conf).fit(store, max_iterations=10, client=client, progress=False)
    state = full.export_state()
    full.close()
    # store rows follow samples; the fixture's PCA rows follow the source (cell ids)
    state["X_multigedi_pca"] = to_source_order(atlas, "rna", state["X_multigedi_pca"])
    assert_matches_fixture(state, d, 10)
    model = model_for(cfg, conf, solve_Y_every=10).fit(store, max_iterations=10, client=client, progress=False)
    state = model.export_state()
    state["X_multigedi_pca"] = to_source_order(atlas, "rna", state["X_multigedi_pca"])
    assert_matches_fixture(state, d, 10, tol=1e-6)
    with pytest.raises(AssertionError):  # the solve did change it
        assert_matches_fixture(state, d, 10)
    model.write()
    # results are readable by anndata/mudata, rows aligned with each modality's store rows
    mdata = md.read_zarr(str(store))
    for m in conf:
        emb = mdata[m].obsm["X_multigedi_pca"]
        assert emb.shape == (atlas.n_obs(m), cfg["K"])
        np.testing.assert_array_equal(np.asarray(emb), model.embedding(m))
    assert np.asarray(mdata["rna"].varm["multigedi_Z"]).shape == (cfg["modalities"][0]["J"], cfg["K"])
    import xarray as xr

    ds = xr.open_zarr(str(store), group="uns/atlasfit_models/multigedi")
    np.testing.assert_array_equal(ds["rna_Z"].values, model.get_Z("rna"))
    model.close()


def test_same_bits_serial_and_dask_workers(store, client):
    d, cfg, _, conf = fixture_mudata()
    # serial engine on the store (no client): an Atlas reader in this process
    serial = model_for(cfg, conf)
    serial._make_engine = lambda shards, c, s: atlasfit.engine.SerialEngine(shards)
    a = serial.fit(store, max_iterations=3, progress=False).export_state()
    b = model_for(cfg, conf).fit(store, max_iterations=3, client=client, progress=False).export_state()
    states_equal(a, b)
    cluster4 = distributed.LocalCluster(n_workers=4, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
    with distributed.Client(cluster4, set_as_default=False) as c4:
        c4.wait_for_workers(4)
        e = model_for(cfg, conf).fit(store, max_iterations=3, client=c4, progress=False).export_state()
    cluster4.close()
    states_equal(a, e)


def test_worker_killed_mid_fit_gives_same_bits(store, tmp_path):
    d, cfg, _, conf = fixture_mudata()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    with distributed.Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2)
        ref = model_for(cfg, conf).fit(store, max_iterations=6, client=c, progress=False,
                                       checkpoint_dir=tmp_path / "ck_ref", checkpoint_every=2)
        ref_state = ref.export_state()
        kill_at_4 = KillWorkerAt(c, 4)

        model = model_for(cfg, conf)
        model.fit(store, max_iterations=6, client=c, progress=False, checkpoint_dir=tmp_path / "ck",
                  checkpoint_every=3, callback=kill_at_4)
        assert kill_at_4.killed == [4]
        states_equal(model.export_state(), ref_state)
    cluster.close()


def test_resume_after_driver_stop_gives_same_bits(store, client, tmp_path):
    d, cfg, _, conf = fixture_mudata()
    full = model_for(cfg, conf).fit(store, max_iterations=5, client=client, progress=False,
                                    checkpoint_dir=tmp_path / "full").export_state()
    ck = tmp_path / "ck"
    # the "driver" stops after 3 iterations with a checkpoint; a new process would do the same
    model_for(cfg, conf).fit(store, max_iterations=3, client=client, progress=False,
                             checkpoint_dir=ck, checkpoint_every=1).close()
    resumed = model_for(cfg, conf).fit(store, max_iterations=5, client=client, progress=False,
                                       checkpoint_dir=ck, resume_from_checkpoint=True)
    assert resumed.n_iter_ == 5
    states_equal(resumed.export_state(), full)


def test_save_load_roundtrip(tmp_path):
    d, cfg, mdata, conf = fixture_mudata()
    model = model_for(cfg, conf).fit(mdata, max_iterations=2, progress=False)
    model.save(tmp_path / "m.zarr")
    back = atlasfit.MultiGEDI.load(tmp_path / "m.zarr")
    states_equal(back.export_state(), model.export_state())
    np.testing.assert_array_equal(back.get_Z("rna"), model.get_Z("rna"))
    assert back.history_.equals(model.history_)


def test_outputs_projection_and_imputation():
    d, cfg, mdata, conf = fixture_mudata()
    model = model_for(cfg, conf).fit(mdata, max_iterations=2, progress=False)
    st = model.export_state()
    g = "S1"
    rows = np.flatnonzero(mdata["rna"].obs["sample"].to_numpy() == g)
    Yhat = model.impute("rna")[rows]
    # closed form of spec §7.3 for one sample: (Z + Q_i) D B_i + (o + o_i)1ᵀ + 1 s_iᵀ
    W = (st["rna/Z"] + st[f"rna/Q/{g}"]) * st["rna/D"][None, :]
    expect = (W @ st[f"B/{g}"] + (st["rna/o"] + st[f"rna/o_i/{g}"])[:, None]
              + st[f"rna/s_i/{g}"][None, :]).T
    np.testing.assert_allclose(Yhat, expect, rtol=1e-12)
    DB = model.projection("rna", "db")[rows]
    np.testing.assert_allclose(DB, (st["rna/D"][:, None] * st[f"B/{g}"]).T, rtol=1e-12)
    assert model.variance("rna").shape == (cfg["modalities"][0]["J"],)


def test_bad_configuration_errors(store):
    d, cfg, mdata, conf = fixture_mudata()
    with pytest.raises(ValueError, match="obs_type"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "Q"}}, sample_key="sample")
    with pytest.raises(ValueError, match="unknown settings"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "M", "ortho": True}}, sample_key="sample")
    bad = dict(conf, chromatin={"obs_type": "M"})
    with pytest.raises(ValueError, match="chromatin.*binary"):
        model_for(cfg, bad)._register_store(store)
    with pytest.raises(ValueError, match="not in the atlas store"):
        model_for(cfg, {"atac": {"obs_type": "X"}})._register_store(store)
    with pytest.raises(ValueError, match="no layer 'U1'"):
        model_for(cfg, {"splicing": {"obs_type": "M_list", "layers": ("U1", "U2")}})._register_store(store)
    with pytest.raises(ValueError, match="sample_key"):
        atlasfit.MultiGEDI(conf, sample_key="donor").fit(store, max_iterations=1)
    # the store is still a valid atlas after the errors
    atlasfit.io.validate(store)
    assert zarr.open_group(str(store), mode="r")["mod/rna/X"] is not None


def test_device_gpu_without_gpu_is_a_clear_error(monkeypatch):
    import atlasfit.cluster as cl

    monkeypatch.setattr(cl, "gpu_available", lambda: False)
    d, cfg, mdata, conf = fixture_mudata()
    model = model_for(cfg, conf)
    model.device = "gpu"
    with pytest.raises(RuntimeError, match="gpu-cu12"):
        model.fit(mdata, max_iterations=1, progress=False)


def test_long_sample_names_fit_checkpoint_and_write(client, tmp_path):
    """Issue 11 item 5: a sample name whose percent-encoding passed 255 bytes (300 ASCII characters, or
    29+ CJK characters) made every store fit fail with `OSError: File name too long` from the
    per-sample checkpoint directory. Such names now fit, checkpoint, resume and write."""
    d, cfg, mdata, conf = fixture_mudata()
    labels = pd.unique(np.concatenate([mdata[m].obs["sample"].astype(str).to_numpy() for m in mdata.mod]))
    long_names = {s: ("样本" * 20 + str(i)) if i % 2 else (f"donor{i}_" + "x" * 300) for i, s in enumerate(labels)}
    for m in mdata.mod:
        mdata[m].obs["sample"] = mdata[m].obs["sample"].astype(str).map(long_names).values
    store = tmp_path / "long.zarr"
    convert(mdata, store, sample_key="sample", modalities={"rna": "counts", "splicing": "counts", "chromatin": "binary"})
    ck = tmp_path / "ck"
    model = model_for(cfg, conf).fit(store, max_iterations=2, client=client, progress=False, checkpoint_dir=ck,
                                      checkpoint_every=1)
    names = [p.name for p in ck.rglob("*")]
    assert names and max(len(n.encode()) for n in names) <= 255
    again = model_for(cfg, conf).fit(store, max_iterations=3, client=client, progress=False, checkpoint_dir=ck,
                                      resume_from_checkpoint=True)
    assert again.n_iter_ == 3
    model.write()
    assert md.read_zarr(str(store))["rna"].obsm["X_multigedi_pca"].shape[0] == open_atlas(store).n_obs("rna")
    model.close()
    again.close()


def test_in_memory_non_integer_counts_are_refused():
    """Issue 11 item 8: non-integer counts for an in-memory obs_type='M' modality fitted silently; the
    error now names the modality, the cell, the feature and the fix (a store's counts are checked when
    it is written)."""
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (40, 8)).astype(np.float64)
    X[5, 3] = 1.5  # e.g. normalised data
    obs = pd.DataFrame({"s": np.repeat(["a", "b"], 20)}, index=[f"c{i}" for i in range(40)])
    a = ad.AnnData(X, obs=obs)
    with pytest.raises(ValueError, match=r"modality 'rna' \(X\).*1\.5 at cell 'c5', feature '3'.*raw counts"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="s", K=2).fit(a, max_iterations=1)
    a.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match=r"at cell 'c5', feature '3'"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="s", K=2).fit(a, max_iterations=1)
    a.X = sp.csc_matrix(X)
    with pytest.raises(ValueError, match=r"at cell 'c5', feature '3'"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="s", K=2).fit(a, max_iterations=1)
    # as anndata reads a CSR from a store / h5ad: int64 indptr, int32 indices (SciPy's tocoo() failed on it)
    C = sp.csr_matrix(X)
    C.indices, C.indptr = C.indices.astype(np.int32), C.indptr.astype(np.int64)  # (the constructor unifies them)
    a.X = C
    with pytest.raises(ValueError, match=r"at cell 'c5', feature '3'"):
        atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="s", K=2).fit(a, max_iterations=1)
    a.X.data[a.X.data == 1.5] = 1.0  # valid counts in that layout fit
    atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="s", K=2).fit(a, max_iterations=1, progress=False)
