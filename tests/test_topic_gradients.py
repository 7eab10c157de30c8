"""Finite-difference checks of every gradient of the topic-model loss (float64, fixed noise).

Every parameter array (and the per-cell mixing logits in ``weight_mode="cell"``) is perturbed at a few
coordinates; the analytic gradient must match a 5-point central difference within 1e-6 relative.
The absolute floor ``ATOL`` only matters for gradients that are exactly zero (e.g. the bias of a
Linear layer followed by training-mode BatchNorm, which the batch mean cancels).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from atlasfit.models.topic import (
    TopicModelConfig,
    draw_cell_noise,
    draw_global_noise,
    forward_cells,
    global_draws,
    global_draws_backward,
    global_kl,
    init_params,
    loglik_bernoulli,
    loglik_gaussian,
    loglik_multinomial,
    loglik_nb_fixed,
    loglik_nb_learned,
    loss_and_grad,
    make_buffers,
)
from atlasfit.models.topic._loss import backward_cells, combine_loss, topic_variance
from _fd import check_sampled_gradients, fd

RTOL = 1e-6
H = 1e-4  # 5-point stencil: truncation O(H^4) ~ 1e-16, round-off ~ 1e-16 |L| / H


def _data(cfg, B, rng):
    x = {}
    for m, F, lik in zip(cfg.modalities, cfg.n_features, cfg.likelihoods):
        if lik == "bernoulli":
            x[m] = (rng.random((B, F)) < 0.4).astype(float)
        elif lik == "gaussian":
            x[m] = rng.standard_normal((B, F))
        else:
            x[m] = rng.poisson(3.0, (B, F)).astype(float)
    return x


def _setup(cfg, B=6, seed=0):
    rng = np.random.default_rng(seed)
    p = init_params(cfg, seed=seed)
    for k in p:  # move away from the symmetric init so every path carries gradient
        p[k] = p[k] + 0.1 * rng.standard_normal(p[k].shape)
    x = _data(cfg, B, rng)
    b0 = {m: -3.0 + 0.3 * rng.standard_normal(F) for m, F in zip(cfg.modalities, cfg.n_features)}
    buf = make_buffers(cfg, b0)
    cn = draw_cell_noise(cfg, B, (seed, 1))
    gn = draw_global_noise(cfg, (seed, 2))
    om = 1.0 + 0.3 * rng.standard_normal((B, cfg.n_modalities)) if cfg.weight_mode == "cell" else None
    return p, x, buf, cn, gn, om, rng


_fd = fd  # tests/_fd.py


def _check_all(cfg, B=6, seed=0, n_total=None, beta=0.7, per_array=3, **kw):
    p, x, buf, cn, gn, om, rng = _setup(cfg, B, seed)
    n_total = B if n_total is None else n_total

    def loss(pp, o=om):
        return loss_and_grad(pp, x, cn, gn, cfg, buf, n_total=n_total, beta=beta, cell_omega=o, **kw)

    L, g = loss(p)
    assert set(g) == set(p) | ({"omega_cell"} if om is not None else set())
    atol = 1e-11 * (1.0 + abs(L))
    checked = check_sampled_gradients(loss, p, om, g, rng, per_array=per_array, rtol=RTOL, atol=atol,
                                      check_shapes=True)
    return checked


BASE = dict(n_topics=3, n_hidden=5)


@pytest.mark.parametrize(
    "lik,extra",
    [
        ("multinomial", {}),
        ("gamma_poisson", {}),  # fixed NB size r, learnable background
        ("gamma_poisson", {"learnable_bg": False, "dispersion": 2.5}),
        ("nb", {}),  # NB without background
        ("gamma_poisson", {"learnable_dispersion": True}),  # global d
        ("nb", {"learnable_dispersion": True, "global_dispersion": False}),  # per-feature d
        ("bernoulli", {}),  # corrected depth scaling, cloglog link (defaults)
        ("bernoulli", {"bernoulli_scaling": "reference"}),
        ("bernoulli", {"bernoulli_link": "clip"}),  # the reference link
        ("gaussian", {}),
    ],
)
def test_gradients_every_likelihood(lik, extra):
    # second modality multinomial so the mixture path is exercised too
    cfg = TopicModelConfig(("m1", "m2"), (7, 5), (lik, "multinomial"), **BASE, **extra)
    assert _check_all(cfg) > 30


@pytest.mark.parametrize("weight_mode", ["equal", "universal", "cell"])
def test_gradients_every_weight_mode(weight_mode):
    cfg = TopicModelConfig(
        ("rna", "atac", "adt"), (7, 6, 4), ("gamma_poisson", "bernoulli", "multinomial"), weight_mode=weight_mode, **BASE
    )
    assert _check_all(cfg, B=7, seed=1) > 40


def test_gradients_attention():
    cfg = TopicModelConfig(
        ("rna", "atac"), (7, 6), ("gamma_poisson", "bernoulli"), aggregation="attention", att_dim=4, **BASE
    )
    assert _check_all(cfg, seed=2, per_array=4) > 40


def test_gradients_absent_modality_rows():
    # a cell with an all-zero row in one modality is "absent" there: masked softmax path
    cfg = TopicModelConfig(("rna", "adt"), (7, 5), ("gamma_poisson", "multinomial"), weight_mode="cell", **BASE)
    p, x, buf, cn, gn, om, rng = _setup(cfg, 6, 3)
    x["adt"][2] = 0.0
    L, g = loss_and_grad(p, x, cn, gn, cfg, buf, n_total=6, beta=1.0, cell_omega=om)
    # the absent modality's logit has no influence on the loss: exact zero gradient
    assert g["omega_cell"][2, 1] == 0.0
    fd = _fd(lambda a: loss_and_grad(p, x, cn, gn, cfg, buf, n_total=6, beta=1.0, cell_omega=a)[0], om, (2, 0))
    assert abs(fd - g["omega_cell"][2, 0]) <= 1e-6 * max(abs(fd), 1e-3)


@pytest.mark.parametrize(
    "extra",
    [
        {"n_layers": 2, "likelihood_weight_mode": "inverse_features"},
        {"likelihood_weight_mode": "sqrt_inverse_features", "likelihood_weight_ref": "median"},
        {"likelihood_weight_mode": "inverse_features", "likelihood_weight_ref": "max", "regularizer_sign": "documented"},
        {"normalize_encoder_inputs": False, "cell_topic_prior": [0.5, 0.2, 0.3], "topic_feature_prior": 0.4},
    ],
)
def test_gradients_options(extra):
    cfg = TopicModelConfig(("rna", "atac"), (7, 9), ("gamma_poisson", "bernoulli"), **BASE, **extra)
    assert _check_all(cfg, seed=4, n_total=60, beta=0.3) > 30


def test_gradients_fixed_median_and_depth():
    cfg = TopicModelConfig(("rna", "atac"), (7, 9), ("nb", "bernoulli"), bernoulli_scaling="reference", **BASE)
    assert _check_all(cfg, seed=5, lib_median={"rna": 20.0, "atac": 4.0}, bern_depth={"rna": 1.0, "atac": 3.5}) > 30


def test_sharded_gradient_equals_fd_of_sharded_objective():
    """Two shards with their own BatchNorm statistics but the exact global topic variance (§3.6):
    sum of shard gradients + global terms == FD gradient of that objective."""
    cfg = TopicModelConfig(("rna", "atac"), (7, 6), ("gamma_poisson", "bernoulli"), weight_mode="universal", **BASE)
    p, x, buf, cn, gn, _, rng = _setup(cfg, 9, 6)
    parts = [np.arange(0, 4), np.arange(4, 9)]
    N, beta = 50, 0.6

    def objective(pp, want_grad=False):
        draws = global_draws(pp, gn, cfg, buf)
        res = [
            forward_cells(pp, {m: v[r] for m, v in x.items()}, {k: v[r] for k, v in cn.items()}, cfg, buf, draws)
            for r in parts
        ]
        tot = {k: sum(s[k] for _, s in res) for k in res[0][1]}
        B = int(tot["n"])
        gval, gkl = global_kl(pp, gn, cfg, buf)
        L = combine_loss(tot, cfg, cell_scale=N / B, beta=beta, global_value=gval)
        if not want_grad:
            return L
        grads = {}
        for c, _ in res:
            for k, v in backward_cells(pp, c, cfg, cell_scale=N / B, beta=beta, n_batch=B, theta_bar=tot["theta_sum"] / B).items():
                grads[k] = grads[k] + v if k in grads else v
        for k, v in global_draws_backward(pp, gn, draws, grads, cfg).items():
            grads[k] = grads[k] + v if k in grads else v
        for k, v in gkl.items():
            grads[k] = grads[k] + beta * v if k in grads else beta * v
        return L, grads

    L, g = objective(p, True)
    for k in sorted(p):
        i = tuple(rng.integers(0, s) for s in p[k].shape)
        fd = _fd(lambda a, k=k: objective({**p, k: a}), p[k], i)
        an = float(g[k][i]) if k in g else 0.0
        assert abs(fd - an) <= RTOL * max(abs(fd), abs(an)) + 1e-11 * (1 + abs(L)), (k, fd, an)


def test_minibatch_scaling_is_linear_in_n_total():
    # L = (N/B) * cell terms + global terms + variance term: the N-derivative is the per-cell sum / B
    cfg = TopicModelConfig(("rna",), (7,), ("multinomial",), **BASE)
    p, x, buf, cn, gn, _, _ = _setup(cfg, 5, 7)
    f = [loss_and_grad(p, x, cn, gn, cfg, buf, n_total=n, beta=1.0)[0] for n in (5, 10, 15)]
    assert abs((f[2] - f[1]) - (f[1] - f[0])) <= 1e-9 * abs(f[2])


def test_likelihoods_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.poisson(4.0, (3, 5)).astype(float)
    rho = rng.dirichlet(np.ones(5), size=3)
    lib = x.sum(1)
    # NB with size r and mean mu: scipy nbinom(n=r, p=r/(r+mu))
    lp, _ = loglik_nb_fixed(x, rho, lib, 2.0)
    mu = lib[:, None] * rho
    ref = st.nbinom.logpmf(x, 2.0, 2.0 / (2.0 + mu)).sum(1)
    np.testing.assert_allclose(lp, ref, rtol=1e-12)
    d = np.array([0.7])
    lp, _, _ = loglik_nb_learned(x, rho, lib, d)
    a = 1.0 / (0.49 + 1e-8)
    np.testing.assert_allclose(lp, st.nbinom.logpmf(x, a, a / (a + mu)).sum(1), rtol=1e-12)
    # multinomial without the coefficient = multinomial logpmf - log coefficient
    lp, _ = loglik_multinomial(x, rho)
    coef = st.multinomial.logpmf(x, lib, rho) - (x * np.log(rho)).sum(1)
    np.testing.assert_allclose(lp + coef, st.multinomial.logpmf(x, lib, rho), rtol=1e-12)
    xb = (x > 3).astype(float)
    lp, _ = loglik_bernoulli(xb, rho, np.full(3, 0.9))
    np.testing.assert_allclose(lp, st.bernoulli.logpmf(xb, rho * 0.9).sum(1), rtol=1e-12)
    # cloglog link: an open feature is a positive Poisson(q) count, p = 1 - exp(-q)
    lp, _ = loglik_bernoulli(xb, rho, np.full(3, 3.0), link="cloglog")
    np.testing.assert_allclose(lp, st.bernoulli.logpmf(xb, -np.expm1(-rho * 3.0)).sum(1), rtol=1e-12)
    sig = np.array([0.5, 1.0, 2.0, 1.5, 0.8])
    lp, _, _ = loglik_gaussian(x, rho, sig)
    np.testing.assert_allclose(lp, st.norm.logpdf(x, rho, sig).sum(1), rtol=1e-12)


def test_global_kl_closed_form():
    # q = prior => analytic KL terms vanish (closed form)
    cfg = TopicModelConfig(("rna",), (4,), ("gamma_poisson",), n_topics=2, n_hidden=3)
    p = init_params(cfg)
    buf = make_buffers(cfg)
    sd = float(buf["phi_sd/rna"])
    p["dec/rna/Z_scale"] = np.full((2, 4), np.log(np.expm1(sd)))
    p["dec/rna/bg_scale"] = np.full(4, np.log(np.expm1(1.0)))
    val, _ = global_kl(p, draw_global_noise(cfg, (0,)), cfg, buf)
    assert abs(val) < 1e-12


def test_topic_variance_unbiased():
    t = np.random.default_rng(1).dirichlet(np.ones(4), size=6)
    assert abs(topic_variance(t.sum(0), (t * t).sum(0), 6) - t.var(axis=0, ddof=1).sum()) < 1e-14
