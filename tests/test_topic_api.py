"""User API of the topic model: atlasfit.MultimodalAmortizedLDA (spec §5, §7, §8, §11 B).

Data: planted topics (θ_n ~ Dir(0.3), φ_k ~ Dir(0.1); RNA ~ Multinomial(ℓ_n, θ_nφ^rna) with
ℓ_n ~ U{200..599}; ATAC ~ Bernoulli(min(1, 30 θ_nφ^atac))), 600 cells in 2 samples, K=3.
"""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.optimize import linear_sum_assignment

import atlasfit
from atlasfit.models.topic import MultimodalAmortizedLDA, topic_proportions, train_serial
from atlasfit.models.topic._loss import softmax
from atlasfit.models.topic._params import softplus
from _topic_dtype import float64_topic_default  # noqa: F401 - float64 default for this module


K = 3


def _planted(n=600, F_rna=60, F_atac=80, seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.dirichlet(np.full(K, 0.3), n)
    phi_r = rng.dirichlet(np.full(F_rna, 0.1), K)
    phi_a = rng.dirichlet(np.full(F_atac, 0.1), K)
    lib = rng.integers(200, 600, n)
    rna = np.stack([rng.multinomial(lv, p) for lv, p in zip(lib, theta @ phi_r)]).astype(float)
    atac = (rng.random((n, F_atac)) < np.clip(theta @ phi_a * 30, 0, 1)).astype(float)
    atac[5] = 0.0  # one cell without ATAC: that modality is "absent" for it (§2.3 mask)
    return theta, phi_r, phi_a, rna, atac


def _mudata(rna, atac):
    n = rna.shape[0]
    obs = pd.DataFrame({"batch": np.repeat(["s1", "s2"], [n // 2, n - n // 2])},
                       index=[f"c{i}" for i in range(n)])
    a = ad.AnnData(sp.csr_matrix(rna), obs=obs.copy())
    a.var_names = [f"g{j}" for j in range(rna.shape[1])]
    b = ad.AnnData(atac, obs=obs.copy())
    b.var_names = [f"p{j}" for j in range(atac.shape[1])]
    mdata = md.MuData({"rna": a, "atac": b})
    mdata.obs["batch"] = obs["batch"]
    return mdata


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def fitted(planted):
    theta, phi_r, phi_a, rna, atac = planted
    model = MultimodalAmortizedLDA.from_mudata(
        _mudata(rna, atac), modalities=["rna", "atac"], likelihoods={"rna": "multinomial"}, sample_key="batch",
        n_topics=K, n_hidden=16,
    )
    model.train(max_epochs=40, batch_size=64, lr=0.05, kl_schedule="constant", progress=False, seed=1)
    return model


def _hungarian(a, b):
    C = np.corrcoef(a, b)[: a.shape[0], a.shape[0]:]
    r, c = linear_sum_assignment(-C)
    return C[r, c], c


# --------------------------------------------------------------------------- construction


def test_input_kinds_register_the_same_matrices(planted, tmp_path):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna, atac)
    from_mu = MultimodalAmortizedLDA.from_mudata(mdata, sample_key="batch", n_topics=K)
    from_dict = MultimodalAmortizedLDA.from_data({"rna": mdata["rna"], "atac": mdata["atac"]}, sample_key="batch",
                                                 n_topics=K)
    from_arr = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, n_topics=K)
    store = atlasfit.io.convert(mdata, tmp_path / "a.zarr", sample_key="batch",
                                modalities={"rna": "counts", "atac": "binary"})
    from_store = MultimodalAmortizedLDA.from_data(store, n_topics=K)
    one = MultimodalAmortizedLDA.from_data(mdata["rna"], n_topics=K)
    # defaults (§8 made data-aware): name "rna" -> gamma_poisson, 0/1 data or store kind binary -> bernoulli
    for m in (from_mu, from_dict, from_arr, from_store):
        assert dict(zip(m.config.modalities, m.config.likelihoods)) == {"rna": "gamma_poisson", "atac": "bernoulli"}
    assert one.config.modalities == ("rna",)
    for m in (from_dict, from_arr, from_store):
        for mod, X in (("rna", rna), ("atac", atac)):
            got = m._data.X[mod]
            got = got.toarray() if sp.issparse(got) else got
            np.testing.assert_array_equal(got, X)  # same cells, same order (store order = source order here)
    assert list(from_store._data.samples[[0, -1]]) == ["s1", "s2"]
    assert from_mu.feature_names_["atac"][0] == "p0"


def test_layers_option(planted):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna, atac)
    mdata["rna"].layers["counts"] = mdata["rna"].X.copy()
    mdata["rna"].X = np.log1p(mdata["rna"].X.toarray())  # normalised X: not counts
    with pytest.raises(ValueError, match="'rna' holds non-integer.*layers="):
        MultimodalAmortizedLDA.from_mudata(mdata, likelihoods={"rna": "gamma_poisson"}, n_topics=K)
    m = MultimodalAmortizedLDA.from_mudata(mdata, layers={"rna": "counts"}, n_topics=K)
    np.testing.assert_array_equal(m._data.X["rna"].toarray(), rna)
    with pytest.raises(ValueError, match="no layer 'raw'"):
        MultimodalAmortizedLDA.from_mudata(mdata, layers={"rna": "raw"}, n_topics=K)


# --------------------------------------------------------------------------- planted recovery and getters


def test_planted_topics_and_proportions_are_recovered(fitted, planted):
    theta, phi_r, phi_a, rna, atac = planted
    # planted truth: Hungarian-matched correlations (measured 0.997-0.9997 for φ, 0.984-0.988 for θ)
    corr, _ = _hungarian(fitted.get_feature_topic_dist("rna", include_background=True).to_numpy().T, phi_r)
    assert corr.min() > 0.95
    corr, _ = _hungarian(fitted.get_latent_representation().T, theta.T)
    assert corr.min() > 0.9


def test_latent_representation(fitted, planted):
    _, _, _, rna, atac = planted
    th = fitted.get_latent_representation()
    # simplex (definition), to the rounding of the model's dtype (float32 by default)
    np.testing.assert_allclose(th.sum(axis=1), 1.0, atol=50 * np.finfo(fitted.dtype).eps)
    np.testing.assert_array_equal(th, fitted.get_cell_topic_dist())  # alias
    df = fitted.get_cell_topic_dist(return_dataframe=True)
    assert list(df.columns) == ["topic_0", "topic_1", "topic_2"] and df.index[3] == "c3"
    # n_samples=0 is a per-cell function: a subset or another batch size gives the same rows
    # (fixes §11 items 9 and 12)
    full = fitted.get_latent_representation(n_samples=0)
    sub = fitted.get_latent_representation(cells=[7, 3, 100], n_samples=0, batch_size=2)
    np.testing.assert_allclose(sub, full[[7, 3, 100]], rtol=1e-12)
    by_name = fitted.get_latent_representation(cells=["c7", "c3"], n_samples=0)
    np.testing.assert_allclose(by_name, full[[7, 3]], rtol=1e-12)
    # new data: the same cells passed as data give the same proportions (equal weight mode)
    new = fitted.get_latent_representation(data={"rna": fitted._data.X["rna"][:10], "atac": fitted._data.X["atac"][:10]},
                                           n_samples=0)
    np.testing.assert_allclose(new, full[:10], rtol=1e-12)
    mdata = _mudata(rna[:10], atac[:10])
    np.testing.assert_allclose(fitted.get_latent_representation(data=mdata, n_samples=0), full[:10], rtol=1e-12)
    swapped = mdata["rna"][:, ::-1].copy()
    with pytest.raises(ValueError, match="'rna': new data's features differ.*position 0: 'g59' vs 'g0'"):
        fitted.get_latent_representation(data={"rna": swapped, "atac": mdata["atac"]})


def test_latent_representation_is_topic_proportions(planted):
    _, _, _, rna, atac = planted
    d = {"rna": rna[:300], "atac": atac[:300]}
    m = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8, weight_mode="cell")
    m.train(max_epochs=2, batch_size=50, lr=0.05, progress=False)
    # same definition and noise keys (seed, sample, block) as the core's topic_proportions, given each
    # cell's Omega row and the CSR rows the shards hold
    csr = {k: sp.csr_matrix(v) for k, v in d.items()}
    want = topic_proportions(m._fit, csr, n_samples=7, seed=3, cell_omega=m._omega[0], batch_size=64)
    np.testing.assert_array_equal(m.get_latent_representation(n_samples=7, seed=3, batch_size=64), want)


def test_feature_topic_dist(fitted):
    phi = fitted.get_feature_topic_dist("rna")
    np.testing.assert_allclose(phi.sum(axis=0), 1.0, atol=1e-12)  # each topic is a distribution over features
    p = fitted._fit.params
    # closed form (§5, §1.4): softmax_f(M^phi) without, softmax_f(M^phi + b0) with background (multinomial
    # has no background, so both agree here); the learned-background case is in test_nb_and_dispersion
    np.testing.assert_allclose(phi.to_numpy().T, softmax(p["dec/rna/Z_loc"], axis=1), rtol=1e-12)
    both = fitted.get_feature_topic_dist()
    assert both.index.names == ["modality", "feature"] and both.shape == (60 + 80, K)
    assert set(fitted.get_feature_topic_dist(as_dict=True)) == {"rna", "atac"}
    mc = fitted.get_feature_topic_dist("rna", n_samples=200)
    np.testing.assert_allclose(mc.sum(axis=0), 1.0, atol=1e-12)


def test_perplexity_per_token_not_inflated(fitted, planted):
    theta, phi_r, phi_a, rna, atac = planted
    th = fitted.get_latent_representation(n_samples=0)
    # definition: exp(-sum x log(theta phi) / sum x) over count modalities (here rna and the atac ones)
    ll, T = 0.0, 0.0
    for m, X in (("rna", rna), ("atac", atac)):
        phi = fitted.get_feature_topic_dist(m, include_background=True).to_numpy().T
        ll += (X * np.log(th @ phi)).sum()
        T += X.sum()
    want = np.exp(-ll / T)
    for bs in (7, 10_000):  # many batches or one: the same value (§11 item 7: no N/B factor)
        assert fitted.get_perplexity(n_samples=0, batch_size=bs) == pytest.approx(want, rel=1e-10)
    per = fitted.get_perplexity_per_modality(n_samples=0, batch_size=7)
    phi = fitted.get_feature_topic_dist("rna", include_background=True).to_numpy().T
    assert per["rna"] == pytest.approx(np.exp(-(rna * np.log(th @ phi)).sum() / rna.sum()), rel=1e-10)
    # planted truth on the held-out cells: between 0.9x the planted parameters' perplexity (15.47) and
    # 1.15x it (measured 16.09), and well below the background-only model (22.78)
    val = fitted.validation_indices_
    planted_ppl = np.exp(-(rna[val] * np.log(theta[val] @ phi_r)).sum() / rna[val].sum())
    got = fitted.get_perplexity_per_modality(cells=val)["rna"]
    bg = rna[fitted.train_indices_].sum(0) / rna[fitted.train_indices_].sum()
    bg_ppl = np.exp(-(rna[val] * np.log(np.clip(bg, 1e-12, None))).sum() / rna[val].sum())
    assert 0.9 * planted_ppl < got < 1.15 * planted_ppl < bg_ppl


def test_likelihood_per_modality(fitted, planted):
    _, _, _, rna, atac = planted
    th = fitted.get_latent_representation(n_samples=0)
    ll = fitted.get_likelihood_per_modality(n_samples=0, per_token=False)
    # multinomial without coefficient (§1.7): sum x log rho
    phi = fitted.get_feature_topic_dist("rna", include_background=True).to_numpy().T
    assert ll["rna"] == pytest.approx((rna * np.log(th @ phi)).sum(), rel=1e-9)
    # Bernoulli with depth scaling and the default cloglog link: p = 1 - exp(-rho * l_n); scipy's log-pmf
    phi_a = fitted.get_feature_topic_dist("atac", include_background=True).to_numpy().T
    q = np.maximum((th @ phi_a) * atac.sum(1, keepdims=True), 1.1920929e-07)
    assert ll["atac"] == pytest.approx(stats.bernoulli.logpmf(atac, -np.expm1(-q)).sum(), rel=1e-9)
    per = fitted.get_likelihood_per_modality(n_samples=0)
    assert per["rna"] == pytest.approx(ll["rna"] / rna.sum(), rel=1e-12)  # per token: / sum of counts
    # the multinomial per-token likelihood is minus the log perplexity (same definition)
    assert per["rna"] == pytest.approx(-np.log(fitted.get_perplexity_per_modality(n_samples=0)["rna"]), rel=1e-9)


def test_nb_and_dispersion(planted):
    _, _, _, rna, _ = planted
    m = MultimodalAmortizedLDA.from_data({"rna": rna[:200]}, likelihoods=["gamma_poisson"], n_topics=K, n_hidden=8,
                                         learnable_dispersion=True)
    m.train(max_epochs=3, batch_size=50, lr=0.05, progress=False)
    p = m._fit.params
    d = m.get_learned_dispersion("rna")
    # LogNormal mean, checked by Monte Carlo (200k draws; relative s.e. ~ 0.1% at these scales)
    s = softplus(p["dec/rna/disp_scale"])
    draws = np.exp(p["dec/rna/disp_loc"] + s * np.random.default_rng(0).standard_normal(200_000))
    assert d.shape == (1,) and d[0] == pytest.approx(draws.mean(), rel=0.01)
    # background (§1.4): softmax(M + b0 + bg_loc) with include_background, softmax(M) without
    b = m._fit.buffers["b0/rna"] + p["dec/rna/bg_loc"]
    np.testing.assert_allclose(m.get_feature_topic_dist("rna", include_background=True).to_numpy().T,
                               softmax(p["dec/rna/Z_loc"] + b[None], axis=1), rtol=1e-10)
    # NB log-likelihood (§1.7, learned: size a = 1/(d^2 + 1e-8), mean l rho) at the plug-in d = exp(loc)
    th = m.get_latent_representation(n_samples=0)
    rho = th @ m.get_feature_topic_dist("rna", include_background=True).to_numpy().T
    mu = rna[:200].sum(1, keepdims=True) * rho
    a = 1.0 / (np.exp(p["dec/rna/disp_loc"][0]) ** 2 + 1e-8)
    want = stats.nbinom.logpmf(rna[:200], a, a / (a + mu)).sum()
    assert m.get_likelihood_per_modality(n_samples=0, per_token=False)["rna"] == pytest.approx(want, rel=1e-9)
    fixed = MultimodalAmortizedLDA.from_data({"rna": rna[:200]}, likelihoods=["nb"], n_topics=K, dispersion=2.5)
    fixed.train(max_epochs=1, batch_size=50, progress=False)
    assert fixed.get_learned_dispersion() == {"rna": [2.5]}  # fixed: the NB size r, as the reference
    with pytest.raises(ValueError, match="no NB dispersion"):
        fixed.get_learned_dispersion("atac")


def test_horseshoe_summaries(planted):
    _, _, _, rna, _ = planted
    m = MultimodalAmortizedLDA.from_data({"rna": rna[:200]}, likelihoods=["gamma_poisson"], n_topics=K, n_hidden=8,
                                         topic_feature_prior_type="horseshoe")
    m.train(max_epochs=2, batch_size=50, lr=0.05, progress=False)
    p = m._fit.params
    # §5 horseshoe: beta_loc * lambda_tilde with c, tau, delta, lambda at their LogNormal means, then
    # softmax with the background
    e = {g: p[f"dec/rna/hs_{g}_loc"] + 0.5 * softplus(p[f"dec/rna/hs_{g}_scale"]) ** 2
         for g in ("c", "tau", "delta", "lam")}
    lt2 = np.exp(2 * e["c"]) * np.exp(2 * (e["tau"][:, None] + e["delta"][None, :] + e["lam"]))
    lt = np.sqrt(lt2 / (np.exp(2 * e["c"]) + np.exp(2 * (e["tau"][:, None] + e["delta"][None, :] + e["lam"])) + 1e-8))
    b = m._fit.buffers["b0/rna"] + p["dec/rna/bg_loc"]
    np.testing.assert_allclose(m.get_feature_topic_dist("rna", include_background=True).to_numpy().T,
                               softmax(p["dec/rna/hs_beta_loc"] * lt + b[None], axis=1), rtol=1e-9)
    assert np.isfinite(m.get_elbo()) and np.isfinite(m.get_perplexity())


def test_elbo(fitted, planted):
    _, _, _, rna, atac = planted
    elbo = fitted.get_elbo()
    untrained = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, likelihoods={"rna": "multinomial"},
                                                 n_topics=K, n_hidden=16)
    untrained.train(max_epochs=0, progress=False, seed=1)
    # training maximises the ELBO: 40 epochs raise it by far more than its Monte-Carlo noise
    assert np.isfinite(elbo) and elbo > untrained.get_elbo() + 100
    # history_: val_loss is -ELBO per validation cell with one draw keyed by the training seed (definition)
    val = fitted.validation_indices_
    assert fitted.history_["val_loss"].iloc[-1] == pytest.approx(-fitted.get_elbo(cells=val, n_samples=1, seed=1),
                                                                 rel=1e-12)


def test_modality_weights(fitted):
    w = fitted.get_modality_weights()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # equal mode (§2.3): 1/M where both modalities are present; cell 5 has no ATAC -> (1, 0)
    assert w.loc["c5"].tolist() == [1.0, 0.0]
    assert np.allclose(w.drop(index="c5").to_numpy(), 0.5)


def test_cell_weight_mode_uses_each_cells_own_row(planted):
    _, _, _, rna, atac = planted
    m = MultimodalAmortizedLDA.from_data({"rna": rna[:300], "atac": atac[:300]}, n_topics=K, n_hidden=8,
                                         weight_mode="cell")
    m.train(max_epochs=3, batch_size=50, lr=0.05, progress=False)
    omega = m._omega[0]
    w = m.get_modality_weights(return_format="array")
    present = np.stack([rna[:300].sum(1) > 0, atac[:300].sum(1) > 0], axis=1)
    want = softmax(np.where(present, omega, -1e5), axis=1)  # masked softmax of the cell's Omega row
    np.testing.assert_allclose(w, want, rtol=1e-12)
    assert not np.allclose(omega[m.train_indices_], 1.0)  # the rows were trained
    np.testing.assert_allclose(omega[m.validation_indices_], 1.0)  # validation cells: never trained
    # rows by global index, whatever the subset (§11 item 9)
    idx = m.train_indices_[[10, 3, 50]]
    np.testing.assert_allclose(m.get_modality_weights(cells=idx, return_format="array"), w[idx], rtol=1e-12)
    th = m.get_latent_representation(n_samples=0)
    np.testing.assert_allclose(m.get_latent_representation(cells=idx, n_samples=0), th[idx], rtol=1e-12)


def test_top_features_diversity_entropy_variance(fitted, planted):
    _, phi_r, _, _, _ = planted
    phi = fitted.get_feature_topic_dist("rna").to_numpy()
    top = fitted.get_top_features_per_topic("rna", 5)
    for k in range(K):  # definition: descending phi
        assert top[f"topic_{k}"].tolist() == [f"g{j}" for j in np.argsort(-phi[:, k], kind="stable")[:5]]
    scored = fitted.get_top_features_per_topic("rna", 2, return_scores=True)
    assert scored["topic_0"][0] == (top["topic_0"][0], pytest.approx(phi.max(axis=0)[0]))
    # planted truth: the top feature of each learned topic is among the 5 largest of its matched planted topic
    _, match = _hungarian(phi.T, phi_r)
    for k in range(K):
        assert int(top[f"topic_{k}"][0][1:]) in np.argsort(-phi_r[match[k]])[:5]
    # diversity: closed form 1 - mean cosine similarity; identical topics (untrained, Z=0) give 0
    u = phi.T / np.linalg.norm(phi.T, axis=1, keepdims=True)
    cos = (u @ u.T)[np.triu_indices(K, 1)].mean()
    assert fitted.get_topic_diversity("rna") == pytest.approx(1 - cos, rel=1e-12)
    assert fitted.get_topic_diversity() == pytest.approx(
        np.mean([fitted.get_topic_diversity("rna"), fitted.get_topic_diversity("atac")]), rel=1e-12)
    assert fitted.get_topic_diversity("rna") > 0.5  # planted Dir(0.1) topics are far apart (measured 0.85)
    th = fitted.get_latent_representation()
    H = fitted.get_cell_entropy()
    np.testing.assert_allclose(H, -(th * np.log(th + 1e-10)).sum(1), rtol=1e-12)
    assert H.min() >= 0 and H.max() <= np.log(K) + 1e-9
    np.testing.assert_allclose(fitted.get_topic_variance(), th.var(axis=0, ddof=1), rtol=1e-12)


def test_untrained_topics_have_zero_diversity(planted):
    _, _, _, rna, atac = planted
    m = MultimodalAmortizedLDA.from_data({"rna": rna[:100]}, likelihoods=["multinomial"], n_topics=K)
    m.train(max_epochs=0, decoder_init="zeros", progress=False)
    assert m.get_topic_diversity() == pytest.approx(0.0, abs=1e-12)  # Z_loc = 0: identical uniform topics
    k = MultimodalAmortizedLDA.from_data({"rna": rna[:100]}, likelihoods=["multinomial"], n_topics=K)
    k.train(max_epochs=0, progress=False)  # the default k-means start: distinct topics before any step
    assert k.get_topic_diversity() > 0.1


def test_likelihood_weights_and_cross_modality(fitted, planted):
    _, _, _, rna, atac = planted
    assert fitted.get_likelihood_weights("dict") == {"rna": 1.0, "atac": 1.0}
    m = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, n_topics=K,
                                         likelihood_weight_mode="inverse_features")
    # §1.8: F_ref / F_m with F_ref = mean(60, 80) = 70
    assert m.get_likelihood_weights("dict") == {"rna": pytest.approx(70 / 60), "atac": pytest.approx(70 / 80)}
    assert m.get_likelihood_weights().shape == (1, 2)
    P = fitted.cross_modality_score("rna", "atac", n_samples=0)
    pa = fitted.get_feature_topic_dist("rna").to_numpy().T
    pb = fitted.get_feature_topic_dist("atac").to_numpy().T
    th = fitted.get_latent_representation(n_samples=0)
    want = (pa / (pa.sum(0) + 1e-12)).T @ np.diag(th.mean(0)) @ (pb / (pb.sum(0) + 1e-12))  # §7 formula
    np.testing.assert_allclose(P.to_numpy(), want / want.max(), rtol=1e-10)
    assert P.shape == (60, 80) and P.index[0] == "g0" and P.columns[0] == "p0"
    with pytest.raises(ValueError, match="two different"):
        fitted.cross_modality_score("rna", "rna")


# --------------------------------------------------------------------------- training behaviour


def test_early_stopping_stops(planted):
    _, _, _, rna, _ = planted
    m = MultimodalAmortizedLDA.from_data({"rna": rna[:200]}, n_topics=K, n_hidden=8)
    # rule: stop after `patience` epochs without an improvement > min_delta; min_delta=1e9 means no
    # epoch after the first can improve, so epochs 0 and 1 run and then it stops
    m.train(max_epochs=50, batch_size=50, early_stopping=True, patience=1, min_delta=1e9, progress=False)
    assert len(m.history_) == 2 and m.stopped_early_ and m.best_epoch_ == 0
    m2 = MultimodalAmortizedLDA.from_data({"rna": rna[:200]}, n_topics=K, n_hidden=8)
    m2.train(max_epochs=4, batch_size=50, early_stopping=True, patience=10, progress=False)
    assert len(m2.history_) == 4 and not m2.stopped_early_
    m3 = MultimodalAmortizedLDA.from_data({"rna": rna[:200]}, n_topics=K, n_hidden=8)
    m3.train(max_epochs=50, batch_size=50, progress=False, callback=lambda epoch, rec: epoch == 2)
    assert len(m3.history_) == 3  # callback returning True stops


def test_validation_split_is_stratified_and_seeded(fitted):
    val, tr = fitted.validation_indices_, fitted.train_indices_
    assert len(np.intersect1d(val, tr)) == 0 and len(val) + len(tr) == 600
    assert (fitted._data.samples[val] == "s1").sum() == 30 == (fitted._data.samples[val] == "s2").sum()  # 10% each


@pytest.mark.parametrize("kw", [{}, {"steps_per_round": 2}, {"theta_bar_sync": "lagged"}])
def test_train_is_train_serial(planted, kw):
    _, _, _, rna, atac = planted
    d = {"rna": rna[:300], "atac": atac[:300]}
    sample = np.repeat(["a", "b", "c"], 100)
    m = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8, weight_mode="cell")
    m._data.samples[:] = sample
    m.train(max_epochs=2, batch_size=40, lr=0.02, validation_fraction=0.0, progress=False, seed=4, **kw)
    fit = train_serial(d, m.config, sample=sample, n_epochs=2, batch_size=40, lr=0.02, seed=4, **kw)
    # the API drives the same shard functions with the same keys: the core trainer's bits
    for k, v in fit.params.items():
        np.testing.assert_array_equal(m._fit.params[k], v)
    np.testing.assert_array_equal(m._omega[0], fit.cell_omega)
    assert m.history_["train_loss"].tolist() == [h["loss"] for h in fit.history]


def test_continued_training_keeps_optimizer_state(planted):
    _, _, _, rna, atac = planted
    d = {"rna": rna[:300], "atac": atac[:300]}
    kw = dict(batch_size=64, lr=0.02, progress=False)
    a = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8, weight_mode="cell")
    a.train(max_epochs=2, **kw)
    a.train(max_epochs=1, **kw)
    b = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8, weight_mode="cell")
    b.train(max_epochs=3, **kw)
    # the driver is deterministic in (seed, epoch, step): continuing == one run, iff the AdamW moments,
    # step count, Omega rows and BatchNorm statistics carried over
    assert a._opt.step == b._opt.step == 3 * 5  # ceil(270 / 64) = 5 steps per epoch
    for k, v in b._fit.params.items():
        np.testing.assert_array_equal(a._fit.params[k], v)
    np.testing.assert_array_equal(a._omega[0], b._omega[0])
    assert a.history_["epoch"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="continues the previous fit"):
        a.train(max_epochs=1, validation_fraction=0.2, progress=False)


def test_training_continues_after_save_and_load(planted, tmp_path):
    _, _, _, rna, atac = planted
    d = {"rna": rna[:300], "atac": atac[:300]}
    kw = dict(batch_size=64, lr=0.02, progress=False, seed=3, theta_bar_sync="lagged")
    a = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8, weight_mode="cell")
    a.train(max_epochs=2, omega_update="minibatch", **kw)
    a.save(tmp_path / "m")
    a = MultimodalAmortizedLDA.load(tmp_path / "m", data=d)
    a.train(max_epochs=1, omega_update="minibatch", **kw)
    b = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8, weight_mode="cell")
    b.train(max_epochs=3, omega_update="minibatch", **kw)
    # save keeps the AdamW moments, the per-row Omega step counts, the lagged mean theta and the
    # split: the same as one run
    for k, v in b._fit.params.items():
        np.testing.assert_array_equal(a._fit.params[k], v)
    for x, y in zip(a._omega, b._omega):
        np.testing.assert_array_equal(x, y)


def test_dask_client_gives_the_serial_result(planted):
    distributed = pytest.importorskip("distributed")
    _, _, _, rna, atac = planted
    d = {"rna": rna[:300], "atac": atac[:300]}
    serial = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8)
    serial._data.samples[:] = np.repeat(["a", "b", "c"], 100)
    # steps_per_round="auto" is 128 local steps per round on a cluster (1 in process): ask for 16 here
    serial.train(max_epochs=2, batch_size=60, progress=False, steps_per_round=16)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dist = MultimodalAmortizedLDA.from_data(d, n_topics=K, n_hidden=8)
        dist._data.samples[:] = np.repeat(["a", "b", "c"], 100)
        dist.train(max_epochs=2, batch_size=60, progress=False, client=client)
    # engine protocol: results reduced in shard order, so the same bits on 1 or 2 workers
    for k, v in serial._fit.params.items():
        np.testing.assert_array_equal(dist._fit.params[k], v)
    pd.testing.assert_frame_equal(serial.history_, dist.history_)


# --------------------------------------------------------------------------- persistence and store


def test_save_load_round_trip(fitted, planted, tmp_path):
    _, _, _, rna, atac = planted
    fitted.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        fitted.save(tmp_path / "m")
    loaded = MultimodalAmortizedLDA.load(tmp_path / "m", data=_mudata(rna, atac))
    for name, kw in [("get_latent_representation", {}), ("get_cell_entropy", {}), ("get_topic_variance", {}),
                     ("get_modality_weights", {}), ("get_feature_topic_dist", {}), ("get_elbo", {}),
                     ("get_perplexity", {}), ("get_perplexity_per_modality", {}),
                     ("get_likelihood_per_modality", {}), ("get_topic_diversity", {}),
                     ("get_top_features_per_topic", {"modality": "rna"}), ("get_likelihood_weights", {}),
                     ("cross_modality_score", {"mod_a": "rna", "mod_b": "atac"})]:
        a, b = getattr(fitted, name)(**kw), getattr(loaded, name)(**kw)
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b)
        elif isinstance(a, dict):
            assert a == b
        else:
            np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(fitted.history_, loaded.history_)
    assert loaded._opt.step == fitted._opt.step
    nodata = MultimodalAmortizedLDA.load(tmp_path / "m")
    np.testing.assert_array_equal(nodata.get_latent_representation(data=_mudata(rna, atac)),
                                  fitted.get_latent_representation())
    with pytest.raises(ValueError, match="no data attached"):
        nodata.get_elbo()
    with pytest.raises(ValueError, match="cells differ"):
        MultimodalAmortizedLDA.load(tmp_path / "m", data=_mudata(rna[:100], atac[:100]))


def test_store_write_then_anndata_reads_obsm(planted, tmp_path):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna[:200], atac[:200])
    mdata.obs["batch"] = np.tile(["s2", "s1"], 100)  # store order (by sample) differs from source order
    for m in ("rna", "atac"):
        mdata[m].obs["batch"] = mdata.obs["batch"].to_numpy()
    store = atlasfit.io.convert(mdata, tmp_path / "a.zarr", sample_key="batch",
                                modalities={"rna": "counts", "atac": "binary"})
    m = MultimodalAmortizedLDA.from_data(store, n_topics=K, n_hidden=8)
    assert m._data.obs_names[0] == "c0" and m._data.obs_names[100] == "c1"  # store order: s2 first
    m.train(max_epochs=2, batch_size=50, progress=False)
    m.write()
    theta = m.get_latent_representation()
    for mod in ("rna", "atac"):
        a = ad.read_zarr(f"{store}/mod/{mod}")
        np.testing.assert_array_equal(a.obsm["X_topic"], theta)
        np.testing.assert_array_equal(a.varm["topic_loadings"], m.get_feature_topic_dist(mod).to_numpy())
    # back in the source order with to_source_order
    src = atlasfit.io.to_source_order(store, "rna", theta)
    np.testing.assert_array_equal(src[1], theta[100])
    m.save(tmp_path / "m")
    again = MultimodalAmortizedLDA.load(tmp_path / "m")  # reopens the store
    np.testing.assert_array_equal(again.get_latent_representation(), theta)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs(planted):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna[:50], atac[:50])
    bad = rna[:50].copy()
    bad[3, 7] = 1.5
    with pytest.raises(ValueError, match=r"'rna'.*non-integer.*cell 'cell3', feature 'rna_7'.*gaussian"):
        MultimodalAmortizedLDA.from_data({"rna": bad}, likelihoods=["gamma_poisson"], n_topics=K)
    neg = rna[:50].copy()
    neg[2, 1] = -1
    with pytest.raises(ValueError, match="'rna' has negative values"):
        MultimodalAmortizedLDA.from_data({"rna": neg}, likelihoods=["multinomial"], n_topics=K)
    with pytest.raises(ValueError, match="'rna' is not binary"):
        MultimodalAmortizedLDA.from_data({"rna": rna[:50]}, likelihoods=["bernoulli"], n_topics=K)
    with pytest.raises(ValueError, match="modality 'protein' is missing.*modalities="):
        MultimodalAmortizedLDA.from_mudata(mdata, modalities=["rna", "protein"], n_topics=K)
    with pytest.raises(ValueError, match="mismatched cells: modality 'atac' has 49 rows"):
        MultimodalAmortizedLDA.from_data({"rna": rna[:50], "atac": atac[:49]}, n_topics=K)
    other = mdata["atac"].copy()
    other.obs_names = [f"x{i}" for i in range(50)]
    with pytest.raises(ValueError, match="mismatched cells: modality 'atac'.*cell 0 is 'x0'"):
        MultimodalAmortizedLDA.from_data({"rna": mdata["rna"], "atac": other}, n_topics=K)
    with pytest.raises(ValueError, match="unknown sample_key 'donor'.*batch"):
        MultimodalAmortizedLDA.from_mudata(mdata, sample_key="donor", n_topics=K)
    with pytest.raises(ValueError, match=r"spatial key 'spatial_connectivities' is absent.*\.obsp"):
        MultimodalAmortizedLDA.from_mudata(mdata, spatial_key="spatial_connectivities", n_topics=K)
    with pytest.raises(ValueError, match="needs a graph: pass spatial_key"):
        MultimodalAmortizedLDA.from_mudata(mdata, spatial_mode="gcn", n_topics=K)
    mdata["rna"].obsp["knn"] = sp.identity(50, format="csr")
    mdata["atac"].obsp["knn"] = sp.identity(50, format="csr")
    ok = MultimodalAmortizedLDA.from_mudata(mdata, spatial_key="knn", n_topics=K)
    assert ok._data.spatial["rna"].shape == (50, 50)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        MultimodalAmortizedLDA.from_data({"rna": rna[:50]}, likelihoods=["poisson"], n_topics=K)
    with pytest.raises(TypeError, match="cannot use data of type list"):
        MultimodalAmortizedLDA.from_data([rna], n_topics=K)
    nan = atac[:50].copy()
    nan[4, 0] = np.nan
    with pytest.raises(ValueError, match="'atac' has non-finite values"):
        MultimodalAmortizedLDA.from_data({"rna": rna[:50], "atac": nan}, n_topics=K)
    m = MultimodalAmortizedLDA.from_data({"rna": rna[:50]}, n_topics=K)
    with pytest.raises(RuntimeError, match="not trained"):
        m.get_latent_representation()
    with pytest.raises(ValueError, match="early_stopping needs validation"):
        m.train(max_epochs=1, validation_fraction=0.0, early_stopping=True, progress=False)


def test_covariates_and_graph_reach_the_trainer(planted):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna[:200], atac[:200])
    mdata.obs["plate"] = np.tile(["p1", "p2", "p3", "p4"], 50)
    mdata.obs["depth"] = np.log(rna[:200].sum(1))
    # decoder batch offsets (§1.5): n_batches comes from the batch_key column
    m = MultimodalAmortizedLDA.from_mudata(mdata, sample_key="batch", batch_key="plate", n_topics=K, n_hidden=8)
    assert m.config.n_batches == 4 and m.config.batch_offsets
    np.testing.assert_array_equal(m._data.batch[:4], [0, 1, 2, 3])
    m.train(max_epochs=2, batch_size=50, lr=0.05, progress=False)
    p = m._fit.params
    assert p["dec/rna/delta_loc"].shape == (4, 60)
    assert np.abs(p["dec/rna/delta_loc"]).max() > 0  # the offsets were trained with the codes
    assert np.isfinite(m.history_["val_loss"]).all()
    # §1.5 plug-in: rho_n = theta_n softmax_f(Z + b + sigmoid(tb_loc) Delta_loc[c(n)]); multinomial-free
    # check through the Bernoulli modality's log-likelihood (scipy) and depth scaling
    th = m.get_latent_representation(n_samples=0)
    b = m._fit.buffers["b0/rna"] + p["dec/rna/bg_loc"]
    tb = 1 / (1 + np.exp(-p["dec/rna/tb_loc"]))
    rho = np.stack([th[i] @ softmax(p["dec/rna/Z_loc"] + b + tb[:, None] * p["dec/rna/delta_loc"][c], axis=1)
                    for i, c in enumerate(m._data.batch)])
    mu = rna[:200].sum(1, keepdims=True) * rho
    want = stats.nbinom.logpmf(rna[:200], 1.0, 1.0 / (1.0 + mu)).sum()  # NB size r = 1 (§1.7)
    got = m.get_likelihood_per_modality(n_samples=0, per_token=False)["rna"]
    assert got == pytest.approx(want, rel=1e-7)  # the model clips p to [eps32, 1 - eps32] (§1.7); scipy does not
    assert np.isfinite(m.get_elbo()) and np.isfinite(m.get_perplexity())
    new = _mudata(rna[:4], atac[:4])
    new.obs["plate"] = ["p1", "p2", "p9", "p1"]
    with pytest.raises(ValueError, match="batch_key 'plate': cell 'c2' has category 'p9', unseen in training"):
        m.get_latent_representation(data=new)
    new.obs["plate"] = ["p4", "p3", "p2", "p1"]
    got = m.get_likelihood_per_modality(data=new, n_samples=0, per_token=False)["rna"]
    idx = [3, 2, 1, 0]  # cells c0..c3 of the training data have plates p1..p4, so codes 0..3
    new_rho = np.stack([th[i] @ softmax(p["dec/rna/Z_loc"] + b + tb[:, None] * p["dec/rna/delta_loc"][c], axis=1)
                        for i, c in zip(range(4), idx)])
    want = stats.nbinom.logpmf(rna[:4], 1.0, 1.0 / (1.0 + rna[:4].sum(1, keepdims=True) * new_rho)).sum()
    assert got == pytest.approx(want, rel=1e-7)  # new cells are decoded with their own batch's offsets
    # continuous encoder covariates (§2.2)
    c = MultimodalAmortizedLDA.from_mudata(mdata, continuous_covariate_keys=["depth"], n_topics=K, n_hidden=8)
    assert c.config.n_continuous_covariates == 1 and c.config.encode_covariates
    c.train(max_epochs=1, batch_size=50, progress=False)
    assert c._fit.params["enc/rna/W0"].shape[0] == 60 + 1  # [x_hat, cont] input
    th = c.get_latent_representation(n_samples=0)
    mdata.obs["depth"] = mdata.obs["depth"] + 1.0  # the encoder reads the covariate of the new data
    moved = c.get_latent_representation(data=mdata, n_samples=0)
    assert th.shape == (200, K) and not np.allclose(th, moved)
    # spatial encoders (§4): the .obsp graph goes to the shards (edges within samples)
    G = sp.block_diag([sp.diags([1.0, 1.0], [-1, 1], shape=(100, 100))] * 2, format="csr")
    mdata["rna"].obsp["knn"] = G
    mdata["atac"].obsp["knn"] = G
    s = MultimodalAmortizedLDA.from_mudata(mdata, sample_key="batch", spatial_key="knn", spatial_mode="sgc",
                                           n_topics=K, n_hidden=8)
    s.train(max_epochs=1, batch_size=50, progress=False)
    assert s._fit.params["enc/rna/W0"].shape[0] == 60 * 2  # [X, A X] (sgc_n_layers=1)
    np.testing.assert_allclose(s.get_latent_representation(n_samples=0).sum(1), 1.0)
    # a cell's SGC input depends on its neighbours: changing cell 1 moves cells 0 and 2 (its graph
    # neighbours), not cell 50
    changed = rna[:200].copy()
    changed[1] = rna[150]  # another cell's profile (a rescaled row would be undone by depth normalisation)
    other = _mudata(changed, atac[:200])
    for mod in ("rna", "atac"):
        other[mod].obsp["knn"] = G
    a = s.get_latent_representation(n_samples=0)
    b = s.get_latent_representation(data=other, n_samples=0)
    assert not np.allclose(a[[0, 2]], b[[0, 2]]) and np.allclose(a[50], b[50], rtol=1e-12)
    g = MultimodalAmortizedLDA.from_mudata(mdata, sample_key="batch", spatial_key="knn", spatial_mode="gcn",
                                           n_topics=K, n_hidden=8)
    g.train(max_epochs=1, batch_size=50, progress=False)
    assert np.isfinite(g.get_elbo())
    assert np.allclose(g.get_latent_representation(cells=[5, 6], n_samples=0),
                       g.get_latent_representation(n_samples=0)[[5, 6]], rtol=1e-12)  # subset: same neighbourhoods
    with pytest.raises(ValueError, match="n_batches=3 needs per-cell batch labels"):
        MultimodalAmortizedLDA.from_mudata(mdata, n_batches=3, n_topics=K)
    with pytest.raises(ValueError, match="n_batches=3 but batch_key 'plate' has 4 categories"):
        MultimodalAmortizedLDA.from_mudata(mdata, batch_key="plate", n_batches=3, n_topics=K)
    with pytest.raises(ValueError, match="unknown batch_key 'lane'"):
        MultimodalAmortizedLDA.from_mudata(mdata, batch_key="lane", n_topics=K)


def test_store_bad_inputs(planted, tmp_path):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna[:40], atac[:40])
    store = atlasfit.io.convert(mdata, tmp_path / "a.zarr", sample_key="batch",
                                modalities={"rna": "counts", "atac": "continuous"})
    with pytest.raises(ValueError, match="'atac' is stored as kind 'continuous'.*gaussian"):
        MultimodalAmortizedLDA.from_data(store, likelihoods={"atac": "multinomial"}, n_topics=K)
    assert MultimodalAmortizedLDA.from_data(store, n_topics=K).config.likelihoods == ("gamma_poisson", "gaussian")
    with pytest.raises(ValueError, match="unknown sample_key 'donor'"):
        MultimodalAmortizedLDA.from_data(store, sample_key="donor", n_topics=K)
    with pytest.raises(ValueError, match="modality 'adt' is missing from the atlas store"):
        MultimodalAmortizedLDA.from_data(store, modalities=["rna", "adt"], n_topics=K)


def test_binary_default_likelihood_is_the_same_from_memory_and_from_a_store(planted, tmp_path):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna[:40], atac[:40])
    # the 0/1 peaks stored as kind "counts": the store's values are scanned (in chunks), as memory's are
    store = atlasfit.io.convert(mdata, tmp_path / "a.zarr", sample_key="batch",
                                modalities={"rna": "counts", "atac": "counts"})
    mem = MultimodalAmortizedLDA.from_mudata(mdata, n_topics=K).config
    st = MultimodalAmortizedLDA.from_mudata(store, n_topics=K).config  # from_mudata takes a store (README)
    assert dict(zip(st.modalities, st.likelihoods)) == dict(zip(mem.modalities, mem.likelihoods)) == \
        {"rna": "gamma_poisson", "atac": "bernoulli"}
    with pytest.raises(TypeError, match="MuData or an atlas store path"):
        MultimodalAmortizedLDA.from_mudata({"rna": mdata["rna"]}, n_topics=K)


def test_store_blocks_are_checked_where_the_shards_read_them(planted, tmp_path):
    _, _, _, rna, atac = planted
    mdata = _mudata(rna[:40], atac[:40])
    store = atlasfit.io.convert(mdata, tmp_path / "a.zarr", sample_key="batch",
                                modalities={"rna": "counts", "atac": "counts"})
    # a count modality forced to Bernoulli: the 0/1 check runs on the shard's load and names the sample
    m = MultimodalAmortizedLDA.from_data(store, likelihoods={"rna": "bernoulli"}, n_topics=K, n_hidden=4)
    with pytest.raises(ValueError, match="modality 'rna' is not binary \\(sample 's1', cell 0 of the sample"):
        m.train(max_epochs=1, batch_size=10, progress=False, checkpoint_every=0)


def test_top_level_export():
    assert atlasfit.MultimodalAmortizedLDA is MultimodalAmortizedLDA


def test_device_choice_and_clear_gpu_error(planted, monkeypatch):
    import atlasfit.cluster as cl

    _, _, _, rna, atac = planted
    model = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, n_topics=K, n_hidden=8)
    with pytest.raises(ValueError, match="device must be 'cpu', 'gpu' or 'auto'"):
        model.train(1, 64, device="tpu", progress=False)
    monkeypatch.setattr(cl, "gpu_available", lambda: False)
    with pytest.raises(RuntimeError, match="gpu-cu12"):
        model.train(1, 64, device="gpu", progress=False)
    assert not model.is_trained
    # "auto" without a usable GPU trains on the CPU, the same bits as device="cpu"
    a = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, n_topics=K, n_hidden=8)
    a.train(2, 64, device="auto", progress=False)
    b = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, n_topics=K, n_hidden=8)
    b.train(2, 64, device="cpu", progress=False)
    assert a.device_ == "cpu"
    np.testing.assert_array_equal(a.get_feature_topic_dist("rna").to_numpy(), b.get_feature_topic_dist("rna").to_numpy())


def test_low_level_topic_proportions_with_encoder_covariates(planted):
    # the encoder input is [x_hat, one-hot(batch)]: the low-level function must give what the model API gives
    _, _, _, rna, atac = planted
    mdata = _mudata(rna, atac)
    model = MultimodalAmortizedLDA.from_mudata(mdata, sample_key="batch", batch_key="batch", n_topics=K,
                                               n_hidden=8, encode_covariates=True)
    model.train(2, 64, progress=False)
    api = model.get_latent_representation(n_samples=0)
    codes = pd.Index(model.batch_categories_).get_indexer(mdata.obs["batch"].astype(str))
    low = topic_proportions(model._fit, {"rna": rna, "atac": atac}, n_samples=0, batch=codes)
    np.testing.assert_allclose(low, np.asarray(api), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="pass batch="):
        topic_proportions(model._fit, {"rna": rna, "atac": atac}, n_samples=0)


def test_kmeans_decoder_init_starts_each_topic_near_a_planted_one(planted):
    # zeros (the reference) start every topic at the same point; the k-means start puts each planted
    # topic near its own learned one. Measured on this fixture (3 seeds): matched corr of
    # softmax(Z_loc) with the planted phi 0.77-0.91 (rna), 0.60-0.70 (atac); bounds below leave margin.
    from atlasfit.datasets import matched_correlation
    from atlasfit.models.topic import TopicModelConfig, kmeans_decoder_init, make_buffers

    theta, phi_r, phi_a, rna, atac = planted
    cfg = TopicModelConfig(("rna", "atac"), (rna.shape[1], atac.shape[1]), ("multinomial", "bernoulli"), n_topics=K)
    Z = kmeans_decoder_init(cfg, {"rna": rna, "atac": sp.csr_matrix(atac)}, {}, seed=0)
    r, _ = matched_correlation(softmax(Z["dec/rna/Z_loc"], axis=1), phi_r)
    assert r.min() > 0.65, r
    r, _ = matched_correlation(softmax(Z["dec/atac/Z_loc"], axis=1), phi_a)
    assert r.min() > 0.5, r
    # with a background buffer the logits are relative to it: softmax(Z + b) is the start profile
    b0 = {"b0/rna": np.log(rna.sum(0) / rna.sum() + 1e-9)}
    Zb = kmeans_decoder_init(cfg, {"rna": rna, "atac": atac}, b0, seed=0)["dec/rna/Z_loc"]
    np.testing.assert_allclose(softmax(Zb + b0["b0/rna"], axis=1), softmax(Z["dec/rna/Z_loc"], axis=1), rtol=1e-9)
    # the model option: same seed, same start; training from it recovers the topics
    m = MultimodalAmortizedLDA.from_data({"rna": rna, "atac": atac}, likelihoods={"rna": "multinomial"},
                                         n_topics=K, n_hidden=16)
    m.train(max_epochs=20, batch_size=64, lr=0.05, kl_schedule="constant", decoder_init="kmeans", progress=False)
    r, _ = matched_correlation(m.get_feature_topic_dist("rna").to_numpy().T, phi_r)
    assert r.min() > 0.95, r
    with pytest.raises(ValueError, match="decoder_init"):
        m.train(1, 64, decoder_init="pca", progress=False)
