"""Single-modality GEDI with a pathway prior C and sample covariates H (spec §2.8-2.9, §7.4-7.5).

There is no reference fixture (the reference seeds this initialiser from an unseeded generator), so
the model is tested by recovering effects PLANTED in synthetic counts drawn from the model itself:

    Y_i = (Z0 + Q0_i) B0_i + o0 1ᵀ + 1 s_iᵀ,  M_i ~ Poisson(exp(Y_i)),

with J = 200 genes, 8 samples x 150 cells, K = 4 factors. B0 has unit-norm cell columns scaled by 2
(the Bsphere model's cell embeddings, so a perfect fit reproduces the planted effects exactly up to
scale: the correlation ceilings below are 1), Z0 ~ N(0, 0.4²) so that every factor is resolvable.
Planted: (pathway) the 20 genes of pathway "P0" load +1 extra on factor 0; (covariate) the 20 genes
G_de load +0.8 h_i extra on factor 1 in sample i, h_i = ±1 ("treated"). H also holds a null
covariate ("null", ±1 in pairs, orthogonal to "treated") with no effect. C holds P0 and 9 random
20-gene sets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import atlasfit
from atlasfit.models.gedi import (
    diff_exp,
    diff_Q,
    gedi_dof,
    pathway_solver,
    update_A,
    update_oi_prior,
    update_Q_prior,
    update_R,
)

J, I, NI, K = 200, 8, 150, 4
BETA, ZPATH = 0.8, 1.0
ITERS = 60


def make_planted(seed=0, J=J, I=I, n=NI, K=K):
    rng = np.random.default_rng(seed)
    N = I * n
    o = rng.normal(0.5, 0.5, J)
    Z = rng.normal(0.0, 0.4, (J, K))
    genes = np.array([f"g{j}" for j in range(J)])
    perm = rng.permutation(J)
    Gp, Gde = perm[:20], perm[20:40]
    kp, kde = 0, 1
    Z[Gp, kp] += ZPATH
    B = rng.normal(0.0, 1.0, (K, N))
    B = 2.0 * B / np.linalg.norm(B, axis=0)
    samples = [f"s{i}" for i in range(I)]
    h = np.tile([1.0, -1.0], I // 2)
    hnull = np.tile([1.0, 1.0, -1.0, -1.0], I // 4)
    Y = np.empty((J, N))
    planted_diff = np.zeros((J, N))  # planted diffExp of the contrast treated = 1: (R0 h_c) B0
    for i in range(I):
        sl = slice(i * n, (i + 1) * n)
        Q = np.zeros((J, K))
        Q[Gde, kde] = BETA * h[i]
        Y[:, sl] = (Z + Q) @ B[:, sl] + o[:, None] + rng.normal(0.0, 0.2, n)[None, :]
        planted_diff[Gde, sl] = BETA * B[kde, sl]
    import anndata as ad

    a = ad.AnnData(rng.poisson(np.exp(Y)).T.astype(np.float32))
    a.var_names = genes
    a.obs_names = [f"c{c}" for c in range(N)]
    a.obs["sample"] = np.repeat(samples, n)
    Cm = np.zeros((J, 10))
    Cm[Gp, 0] = 1.0
    for p in range(1, 10):
        Cm[rng.choice(J, 20, replace=False), p] = 1.0
    C = pd.DataFrame(Cm, index=genes, columns=[f"P{p}" for p in range(10)])
    H = pd.DataFrame([h, hnull], index=["treated", "null"], columns=samples)
    truth = {"Z": Z, "B": B, "Gp": Gp, "Gde": Gde, "kp": kp, "kde": kde, "diff": planted_diff}
    return a, C, H, truth


def _recovery(a, C, H, truth, model):
    """The recovery figures used by tests (a)-(c) (also by the slow multi-seed test)."""
    Z = model.get_Z().to_numpy()
    kp = truth["kp"]
    # learned factor of the planted one: the metagene best correlated with the planted Z0[:, kp]
    k_hat = int(np.argmax([abs(np.corrcoef(Z[:, k], truth["Z"][:, kp])[0, 1]) for k in range(K)]))
    A = model.get_A().to_numpy()
    p_max, k_max = np.unravel_index(np.argmax(np.abs(A)), A.shape)
    Cm = C.to_numpy()
    A0 = np.linalg.solve(Cm.T @ Cm + np.eye(Cm.shape[1]), Cm.T @ truth["Z"])  # same estimator on Z0
    corr_A = abs(np.corrcoef(A[:, k_hat], A0[:, kp])[0, 1])
    planted = truth["diff"].T.ravel()
    corr_de = np.corrcoef(model.get_diff_exp({"treated": 1.0}).ravel(), planted)[0, 1]
    corr_null = np.corrcoef(model.get_diff_exp({"null": 1.0}).ravel(), planted)[0, 1]
    de = model.diff_expression({"treated": 1.0})
    planted_genes = set(a.var_names[truth["Gde"]])
    prec = len(set(de.index[:20]) & planted_genes) / 20
    return {"k_hat": k_hat, "argmax": (int(p_max), int(k_max)), "corr_A": corr_A, "corr_de": corr_de,
            "corr_null": corr_null, "prec20": prec}


@pytest.fixture(scope="module")
def planted():
    a, C, H, truth = make_planted(0)
    model = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample", seed=0).fit(a, max_iterations=ITERS,
                                                                          progress=False)
    return a, C, H, truth, model, _recovery(a, C, H, truth, model)


# ------------------------------------------------------------------------------- planted effects


def test_a_pathway_planted_in_Z(planted):
    a, C, H, truth, model, rec = planted
    # The largest |A| entry is the planted pathway P0 on the learned factor that carries the planted
    # factor (matched by metagene correlation, which does not look at A or C).
    assert rec["argmax"] == (0, rec["k_hat"])
    # A[:, k] averages Z[:, k] over each pathway's 20 genes (ridge), so per-gene noise of the learned
    # metagene (its correlation with Z0[:, kp] is only ~0.75 here: shrinkage and Poisson noise) is
    # averaged down ~sqrt(20)-fold. Against the same estimator applied to the planted Z0 the
    # correlation was 0.96-0.99 for data seeds 0-4 (test_recovery_over_seeds); 0.9 leaves margin.
    assert rec["corr_A"] > 0.9
    # associations Z Aᵀ (§7.5): the top genes of P0 are P0's genes
    top = set(model.top_pathway_genes("P0", n=20))
    assert len(top & set(a.var_names[truth["Gp"]])) >= 18
    scores = model.pathway_scores()
    assert scores.shape == (a.n_obs, 10) and list(scores.columns) == list(C.columns)


def test_b_covariate_effect_planted_in_Q(planted):
    _a, _C, _H, _truth, _model, rec = planted
    # Learned vs planted cell-level effect of the contrast treated = 1 (§7.4 diffExp = diffQ·DB vs
    # the planted 0.8·1[j in G_de]·B0[kde, n]), over all 200 x 1200 entries. The ceiling is 1
    # (B0 has unit-norm columns, the Bsphere model; correlation ignores the ridge shrinkage of
    # Q_i and R). Seeds 0-4 gave 0.83-0.88; 0.7 leaves margin for Poisson noise.
    assert rec["corr_de"] > 0.7
    # The null covariate (orthogonal to "treated", no planted effect) learns noise: |corr| <= 0.085
    # over seeds 0-4; 0.2 is far below the planted one's.
    assert abs(rec["corr_null"]) < 0.2


def test_c_differential_expression_ranks_planted_genes(planted):
    a, _C, _H, truth, model, rec = planted
    # precision@20 of the per-gene RMS differential expression: 1.0 for seeds 0-4 (20 planted of
    # 200 genes: a random ranking gives 0.1 on average).
    assert rec["prec20"] >= 0.9
    de = model.diff_expression({"treated": 1.0}, include_offset=False)
    assert len(set(de.index[:20]) & set(a.var_names[truth["Gde"]])) >= 18
    # per-gene RMS from reduced K x K moments equals the RMS over cells of get_diff_exp (§7.4)
    full = model.get_diff_exp([1.0, 0.0], include_offset=True)
    rms = np.sqrt((full**2).mean(axis=0))
    got = model.diff_expression([1.0, 0.0]).loc[a.var_names, "rms"].to_numpy()
    np.testing.assert_allclose(got, rms, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_recovery_over_seeds():
    """Where the bounds of tests (a)-(c) come from: the same figures on data seeds 0-4."""
    for seed in range(5):
        a, C, H, truth = make_planted(seed)
        m = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample").fit(a, max_iterations=ITERS, progress=False)
        rec = _recovery(a, C, H, truth, m)
        assert rec["argmax"] == (0, rec["k_hat"]), (seed, rec)
        assert rec["corr_A"] > 0.9 and rec["corr_de"] > 0.7 and abs(rec["corr_null"]) < 0.2, (seed, rec)
        assert rec["prec20"] >= 0.9, (seed, rec)


def test_outputs_shapes_and_labels(planted):
    a, C, H, _truth, model, _rec = planted
    assert model.get_A().shape == (10, K) and list(model.get_A().index) == list(C.columns)
    R = model.get_R()
    assert R.dims == ("gene", "factor", "covariate") and R.shape == (J, K, 2)
    assert list(model.get_Ro().columns) == ["treated", "null"]
    dq = model.get_diff_Q({"treated": 1.0})
    np.testing.assert_array_equal(dq.to_numpy(), R.values[:, :, 0])
    np.testing.assert_array_equal(model.get_diff_O(pd.Series({"treated": 1.0})).to_numpy(),
                                  model.get_Ro()["treated"].to_numpy())
    assert model.embedding().shape == (a.n_obs, K)
    assert np.allclose(np.linalg.norm(model.embedding(), axis=0), 1.0)  # Bsphere: DB rows unit norm
    hist = model.history_
    assert len(hist) == ITERS and np.all(np.isfinite(hist[["sigma2", "dZ", "dA", "dR"]].to_numpy()))
    np.testing.assert_allclose(model.pathway_gradient("P0"), model.get_A().loc["P0"] * model.get_D())


def test_embedding_follows_caller_cell_order(planted):
    a, C, H, _truth, model, _rec = planted
    perm = np.random.default_rng(1).permutation(a.n_obs)
    b = a[perm].copy()
    m2 = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample").fit(b, max_iterations=3, progress=False)
    m1 = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample").fit(a, max_iterations=3, progress=False)
    # the same cells per sample in a different order: per-sample B solves are cell-wise, the
    # reductions are over cells, so results agree up to summation order
    np.testing.assert_allclose(m2.embedding(), m1.embedding()[perm], rtol=1e-6, atol=1e-9)


def test_save_load_and_write_anndata(planted, tmp_path):
    a, C, H, _truth, model, _rec = planted
    model.save(tmp_path / "gedi.zarr")
    back = atlasfit.GEDI.load(tmp_path / "gedi.zarr")
    pd.testing.assert_frame_equal(back.get_A(), model.get_A())
    np.testing.assert_array_equal(back.get_R().values, model.get_R().values)
    np.testing.assert_array_equal(back.embedding(), model.embedding())
    np.testing.assert_array_equal(back.pathway_scores().to_numpy(), model.pathway_scores().to_numpy())
    np.testing.assert_array_equal(back.get_diff_exp({"treated": 1.0}), model.get_diff_exp({"treated": 1.0}))
    pd.testing.assert_frame_equal(back.diff_expression({"treated": 1.0}),
                                  model.diff_expression({"treated": 1.0}), rtol=1e-12)
    pd.testing.assert_frame_equal(back.history_, model.history_)
    b = a.copy()
    model.write(b)
    np.testing.assert_array_equal(b.obsm["X_gedi"], model.embedding())
    np.testing.assert_array_equal(b.varm["gedi_pathway_assoc"], model.pathway_associations().to_numpy())
    np.testing.assert_array_equal(b.uns["gedi"]["A"], model.get_A().to_numpy())
    assert list(b.uns["gedi"]["pathway"]) == list(C.columns)
    assert list(b.uns["gedi"]["covariate"]) == ["treated", "null"]
    with pytest.raises(ValueError, match="is not the one the model was fitted on"):
        model.write(b[:10].copy())
    ds = model.to_xarray()
    assert ds["R"].dims == ("gene", "factor", "covariate") and list(ds["pathway"].values) == list(C.columns)


# ------------------------------------------------------------------------------- engines


@pytest.mark.filterwarnings("ignore:Port 8787 is already in use")  # another process's dashboard
def test_d_same_bits_serial_and_dask(tmp_path):
    """Serial (in-process) fit vs a 2-worker Dask fit of the same AnnData, and of the same data as an
    atlas store (shards loaded on the workers): the same bits."""
    distributed = pytest.importorskip("distributed")
    from atlasfit.engine import DaskEngine
    from atlasfit.io import write_atlas

    a, C, H, _truth = make_planted(3, J=120, I=4, n=60)
    C = C.iloc[:, :4]
    store = write_atlas(str(tmp_path / "a.zarr"),
                        [(g, {"rna": a[a.obs["sample"] == g].copy()}) for g in H.columns])
    serial = atlasfit.GEDI(K=3, C=C, H=H, sample_key="sample").fit(a, max_iterations=6, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        fits = {}
        for name, data, key in (("memory", a, "sample"), ("store", store, None)):
            m = atlasfit.GEDI(K=3, C=C, H=H, sample_key=key).fit(data, max_iterations=6, client=client,
                                                                progress=False)
            assert isinstance(m._engine, DaskEngine)
            fits[name] = (m.shared_, m.embedding(), m.diff_expression({"treated": 1.0}))
            if name == "store":
                m.write(key="gedi")  # into the store the model was fitted on
            m.close()
    import anndata as ad

    written = ad.read_zarr(f"{store}/mod/rna")
    np.testing.assert_array_equal(written.obsm["X_gedi"], fits["store"][1])
    np.testing.assert_array_equal(written.varm["gedi_Z"], fits["store"][0]["Z"])
    assert written.varm["gedi_pathway_assoc"].shape == (120, 4)
    for name, (shared, emb, de) in fits.items():
        for key in ("Z", "D", "o", "A", "R", "Ro", "sigma2", "tracking/sigma2"):
            np.testing.assert_array_equal(np.asarray(serial.shared_[key]), np.asarray(shared[key]),
                                          f"{name}: {key}")
        np.testing.assert_array_equal(serial.embedding(), emb)  # store rows = sample-sorted = a's rows
        pd.testing.assert_frame_equal(serial.diff_expression({"treated": 1.0}), de)


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    a, C, H, _truth = make_planted(4, J=80, I=4, n=40)
    kw = dict(K=3, C=C.iloc[:, :4], H=H, sample_key="sample")
    full = atlasfit.GEDI(**kw).fit(a, max_iterations=7, progress=False)
    part = atlasfit.GEDI(**kw).fit(a, max_iterations=4, checkpoint_dir=tmp_path / "ck", checkpoint_every=3,
                                   progress=False)
    assert part.checkpoint_info_.iteration == 4  # saved every 3 iterations and at the end
    # a new driver (the first one "died" after iteration 4) continues from the checkpoint
    resumed = atlasfit.GEDI(**kw).fit(a, max_iterations=7, checkpoint_dir=tmp_path / "ck",
                                      resume_from_checkpoint=True, progress=False)
    for key in ("Z", "D", "o", "A", "R", "Ro", "sigma2", "S_o", "S_si", "tracking/sigma2", "tracking/dA"):
        np.testing.assert_array_equal(np.asarray(resumed.shared_[key]), np.asarray(full.shared_[key]), key)
    np.testing.assert_array_equal(resumed.embedding(), full.embedding())
    with pytest.raises(ValueError, match=r"config\.H: '[0-9a-f]{16}' \(checkpoint\) -> None \(this fit\)"):
        atlasfit.GEDI(K=3, C=C.iloc[:, :4], sample_key="sample").fit(
            a, max_iterations=7, checkpoint_dir=tmp_path / "ck", resume_from_checkpoint=True, progress=False)


# ------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def small():
    a, C, H, _truth = make_planted(2, J=60, I=4, n=30)
    return a, C.iloc[:, :3], H


def test_e_C_wrong_gene_count(small):
    a, C, H = small
    with pytest.raises(ValueError, match=r"C has shape \(59, 3\) but modality 'rna' has 60 genes"):
        atlasfit.GEDI(K=2, C=C.to_numpy()[:-1], sample_key="sample").fit(a, max_iterations=1, progress=False)


def test_e_C_wrong_gene_names(small):
    a, C, H = small
    bad = C.rename(index={"g5": "NOTAGENE"})
    with pytest.raises(ValueError, match=r"C has no row for gene 'g5' of modality 'rna' \(1 of 60"):
        atlasfit.GEDI(K=2, C=bad, sample_key="sample").fit(a, max_iterations=1, progress=False)
    # a C with extra genes (e.g. a whole pathway database) and another order is aligned by name
    big = pd.concat([C.iloc[::-1], pd.DataFrame(1.0, index=["extra"], columns=C.columns)])
    m1 = atlasfit.GEDI(K=2, C=big, sample_key="sample").fit(a, max_iterations=2, progress=False)
    m2 = atlasfit.GEDI(K=2, C=C, sample_key="sample").fit(a, max_iterations=2, progress=False)
    np.testing.assert_array_equal(m1.get_A().to_numpy(), m2.get_A().to_numpy())


def test_e_H_missing_samples(small):
    a, C, H = small
    with pytest.raises(ValueError, match=r"H has no column for sample 's2' .*1 of 4 samples missing"):
        atlasfit.GEDI(K=2, H=H.drop(columns="s2"), sample_key="sample").fit(a, max_iterations=1,
                                                                             progress=False)
    with pytest.raises(TypeError, match="H must be a pandas DataFrame"):
        atlasfit.GEDI(K=2, H=H.to_numpy(), sample_key="sample").fit(a, max_iterations=1, progress=False)
    with pytest.raises(ValueError, match="H is not finite for covariate 'null', sample 's1'"):
        Hn = H.copy()
        Hn.loc["null", "s1"] = np.nan
        atlasfit.GEDI(K=2, H=Hn, sample_key="sample").fit(a, max_iterations=1, progress=False)


def test_e_non_count_data(small):
    a, C, H = small
    b = a.copy()
    b.X = np.log1p(b.X)  # log-normalised data instead of counts
    with pytest.raises(ValueError, match=r"sample 's0' has non-integer value .* needs raw counts"):
        atlasfit.GEDI(K=2, sample_key="sample").fit(b, max_iterations=1, progress=False)
    c = a.copy()
    c.X[35, 7] = -1.0  # cell row 5 of sample s1
    with pytest.raises(ValueError, match=r"sample 's1' has a negative or non-finite value -1.0 \(first at "
                                         r"cell row 5 of the sample \(cell 'c35'\), feature 'g7'\)"):
        atlasfit.GEDI(K=2, sample_key="sample").fit(c, max_iterations=1, progress=False)


def test_e_missing_sample_key(small):
    a, _C, _H = small
    with pytest.raises(ValueError, match="GEDI: give sample_key"):
        atlasfit.GEDI(K=2).fit(a, max_iterations=1, progress=False)


def test_e_bad_contrast_and_missing_prior(small):
    a, C, H = small
    m = atlasfit.GEDI(K=2, H=H, sample_key="sample").fit(a, max_iterations=1, progress=False)
    with pytest.raises(ValueError, match="unknown covariate 'age'"):
        m.get_diff_Q({"age": 1.0})
    with pytest.raises(ValueError, match="contrast has 3 entries but H has 2 covariates"):
        m.get_diff_O([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"no pathway prior; fit with GEDI\(C=...\)"):
        m.get_A()


# ------------------------------------------------------------------------------- variants


@pytest.mark.parametrize("kw", [{"mode": "Bl2"}, {"orthoZ": False}, {"dtype": "float32"}])
def test_variants_run(small, kw):
    a, C, H = small
    m = atlasfit.GEDI(K=2, C=C, H=H, sample_key="sample", **kw).fit(a, max_iterations=4, progress=False)
    assert np.all(np.isfinite(m.history_["sigma2"])) and m.get_A().shape == (3, 2)
    if kw.get("mode") == "Bl2":
        np.testing.assert_array_equal(m.get_D(), np.ones(2))  # Bl2: D is left unchanged (§2.2)


def test_other_obs_types(small):
    import anndata as ad

    a, C, H = small
    rng = np.random.default_rng(0)
    p = ad.AnnData(np.zeros((a.n_obs, 40), np.float32), obs=a.obs.copy())
    p.layers["M1"] = rng.poisson(3.0, (a.n_obs, 40)).astype(np.float32)
    p.layers["M2"] = rng.poisson(2.0, (a.n_obs, 40)).astype(np.float32)
    m = atlasfit.GEDI(K=2, H=H, sample_key="sample", obs_type="M_list", layers=("M1", "M2")).fit(
        p, max_iterations=3, progress=False)
    assert np.all(np.isfinite(m.get_Z().to_numpy()))
    x = ad.AnnData((rng.random((a.n_obs, 40)) < 0.3).astype(np.float32), obs=a.obs.copy())
    mx = atlasfit.GEDI(K=2, H=H, sample_key="sample", obs_type="X").fit(x, max_iterations=3, progress=False)
    assert mx.get_sigma2() == 1.0  # probit: σ² pinned to 1 (§2.11)


def test_seeded_initialisation(small):
    """The rSVD test matrix comes from ``seed`` (the reference's single-modal one is unseeded)."""
    import scipy.sparse as sp

    a, C, H = small
    kw = dict(K=2, C=sp.csr_matrix(C.to_numpy()), H=H, sample_key="sample")  # sparse C, genes in order
    m1 = atlasfit.GEDI(seed=1, **kw).fit(a, max_iterations=2, progress=False)
    m1b = atlasfit.GEDI(seed=1, **kw).fit(a, max_iterations=2, progress=False)
    m2 = atlasfit.GEDI(seed=2, **kw).fit(a, max_iterations=2, progress=False)
    np.testing.assert_array_equal(m1.shared_["Z"], m1b.shared_["Z"])
    assert not np.array_equal(m1.shared_["Z"], m2.shared_["Z"])
    assert list(m1.get_A().index) == ["pathway_0", "pathway_1", "pathway_2"]


# ------------------------------------------------------------------------------- kernels


def test_kernels_are_block_minimisers():
    rng = np.random.default_rng(0)
    Jk, Kk, n, L = 7, 3, 20, 2
    Y = rng.normal(size=(Jk, n))
    DB = rng.normal(size=(Kk, n))
    Z = rng.normal(size=(Jk, Kk))
    o, oi, si = rng.normal(size=Jk), rng.normal(size=Jk), rng.normal(size=n)
    lam = 0.7
    Qhat = rng.normal(size=(Jk, Kk))
    mom = {"YDBt": Y @ DB.T, "H": DB @ DB.T, "DB1": DB.sum(1), "DBs": DB @ si}
    Q = update_Q_prior(mom, Z, o + oi, lam, Qhat)
    # gradient of ‖Y − (Z + Q)DB − (o + o_i)1ᵀ − 1sᵀ‖² + λ‖Q − Q̂‖² in Q vanishes (closed form, §2.4)
    E = Y - (Z + Q) @ DB - (o + oi)[:, None] - si[None, :]
    np.testing.assert_allclose(-2 * E @ DB.T + 2 * lam * (Q - Qhat), 0.0, atol=1e-10)
    # o_i: gradient of ‖Y − (Z + Q)DB − (o + o_i)1ᵀ − 1sᵀ‖² + λ‖o_i − ô‖² vanishes (§2.5)
    ohat = rng.normal(size=Jk)
    rT = (Y - (Z + Q) @ DB).sum(1)
    oi2 = update_oi_prior(rT, n, o, si, lam, ohat)
    E = Y - (Z + Q) @ DB - (o + oi2)[:, None] - si[None, :]
    np.testing.assert_allclose(-2 * E.sum(1) + 2 * lam * (oi2 - ohat), 0.0, atol=1e-10)
    # A: gradient of ‖Z − CA‖² + ‖A‖² vanishes (§2.8)
    Cm = (rng.random((Jk, 4)) < 0.5).astype(float)
    A = update_A(pathway_solver(Cm), Z)
    np.testing.assert_allclose(-2 * Cm.T @ (Z - Cm @ A) + 2 * A, 0.0, atol=1e-10)
    # R: gradient of Σ_i w‖Q_i − R h_i‖² + ‖R‖² vanishes (§2.9), for each factor k
    h = rng.normal(size=(L, 5))
    Qs = rng.normal(size=(5, Jk, Kk))
    w = 0.5
    T = sum(w * Qs[i][:, :, None] * h[:, i][None, None, :] for i in range(5))
    R = update_R(T, w * h @ h.T)
    for k in range(Kk):
        g = sum(-2 * w * np.outer(Qs[i][:, k] - R[:, k, :] @ h[:, i], h[:, i]) for i in range(5)) + 2 * R[:, k, :]
        np.testing.assert_allclose(g, 0.0, atol=1e-10)
    # §7.4: diffExp = diffQ·DB
    np.testing.assert_allclose(diff_exp(diff_Q(R, h[:, 0]), DB), (R @ h[:, 0]) @ DB)
    assert gedi_dof(10, 100, 4, 3, 5, 2) == 10 * 104 + 4 * 10 * 3 + 4 * 10 * 2 + 3 * 15


@pytest.mark.gpu
def test_gpu_matches_cpu(planted):
    """GPU path (``pytest -m gpu``): the same kernels on CuPy arrays; skipped without a device."""
    cp = pytest.importorskip("cupy")
    try:
        if not cp.cuda.is_available():
            pytest.skip("CuPy is installed but no CUDA device is visible")
    except Exception as err:  # CUDA driver errors surface as various exception types
        pytest.skip(f"CUDA unavailable: {err}")
    a, C, H, _truth, _model, _rec = planted
    cpu = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample", seed=0).fit(a, max_iterations=10, progress=False)
    gpu = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample", seed=0, device="gpu").fit(
        a, max_iterations=10, progress=False)
    # float64 on both; only the summation order inside BLAS differs. Bound: the MultiGEDI GPU path
    # keeps 1e-8 against the reference fixtures after 10 iterations (tests/test_gpu.py); 1e-7 here.
    for key in ("Z", "A", "R", "sigma2"):
        ref = np.asarray(cpu.shared_[key])
        np.testing.assert_allclose(np.asarray(gpu.shared_[key]), ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())
    np.testing.assert_allclose(gpu.embedding(), cpu.embedding(), rtol=1e-7, atol=1e-9)


def test_shard_side_imports_no_pandas():
    """Shard functions and the checked reader are unpickled on Dask workers: importing them must not
    pull pandas / anndata / xarray (worker memory)."""
    import subprocess
    import sys

    code = ("import sys, atlasfit.models.gedi._shard, atlasfit.models.gedi._fit; "
            "print(sorted(m for m in ('pandas', 'anndata', 'xarray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_examples():
    """The numpydoc examples of the gedi modules run (they are not collected by default)."""
    import doctest

    from atlasfit.models.gedi import _fit, _kernels, _model, _shard

    for mod in (_kernels, _shard, _fit, _model):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
        assert res.attempted > 0 and res.failed == 0, (mod.__name__, res)


def test_gpu_without_a_device_is_a_clear_error_naming_gedi(monkeypatch):
    import atlasfit.cluster as cl

    monkeypatch.setattr(cl, "gpu_available", lambda: False)
    a, C, H, _ = make_planted(0)
    with pytest.raises(RuntimeError, match=r"GEDI\(device='gpu'\).*gpu-cu12"):
        atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample", device="gpu").fit(a, max_iterations=1, progress=False)
    with pytest.raises(ValueError, match="device must be 'cpu', 'gpu' or 'auto'"):
        atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample", device="tpu")


def test_tl_gedi_writes_what_the_model_writes():
    a, C, H, _ = make_planted(0)
    ref = atlasfit.GEDI(K=K, C=C, H=H, sample_key="sample", seed=0).fit(a, max_iterations=3, progress=False)
    b = a.copy()
    atlasfit.tl.gedi(b, "sample", K=K, C=C, H=H, max_iterations=3)
    np.testing.assert_array_equal(b.obsm["X_gedi"], ref.embedding())
    np.testing.assert_array_equal(b.varm["gedi_pathway_assoc"], ref.pathway_associations().to_numpy())
    out = atlasfit.tl.gedi(a, "sample", K=K, max_iterations=2, key_added="g2", copy=True)
    assert "X_g2" in out.obsm and "X_g2" not in a.obsm and out.obsm["X_g2"].shape == (a.n_obs, K)


def test_worker_killed_mid_fit_gives_same_bits(tmp_path):
    """A worker process killed mid-fit (store fit, process workers): every shard rolls back to the last
    checkpoint and replays; the result equals the uninterrupted fit bit for bit (MultiGEDI's mechanism)."""
    distributed = pytest.importorskip("distributed")
    from _kill import KillWorkerAt

    from atlasfit.io import write_atlas

    a, C, H, _truth = make_planted(3, J=120, I=4, n=60)
    C = C.iloc[:, :4]
    store = write_atlas(str(tmp_path / "a.zarr"),
                        [(g, {"rna": a[a.obs["sample"] == g].copy()}) for g in H.columns])
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2)
        ref = atlasfit.GEDI(K=3, C=C, H=H).fit(store, max_iterations=6, client=c, progress=False,
                                              checkpoint_dir=tmp_path / "ck_ref", checkpoint_every=2)
        ref_shared, ref_emb = dict(ref.shared_), ref.embedding()
        ref.close()
        kill_at_4 = KillWorkerAt(c, 4)

        m = atlasfit.GEDI(K=3, C=C, H=H).fit(store, max_iterations=6, client=c, progress=False,
                                            checkpoint_dir=tmp_path / "ck", checkpoint_every=3, callback=kill_at_4)
        assert kill_at_4.killed == [4]
        for key in ("Z", "D", "o", "A", "R", "Ro", "sigma2", "tracking/sigma2"):
            np.testing.assert_array_equal(np.asarray(m.shared_[key]), np.asarray(ref_shared[key]), key)
        np.testing.assert_array_equal(m.embedding(), ref_emb)
        m.close()
    cluster.close()
