"""Sparse-exact kernels of the topic model (CSR minibatches) against the dense computation.

Reference numbers: every sparse result is compared with the dense computation of the same
quantity on ``X.toarray()`` (the kernels the model used before, still used for dense inputs), to
1e-10 relative in float64; the sparse path's gradient is also checked by 5-point central finite
differences of its own loss (as in ``test_topic_gradients.py``). The complementary log-log
Bernoulli kernel differs from the dense one only where :math:`q = s\\rho < 1.2\\cdot10^{-7}` (exact
:math:`-q` for the zeros instead of the clamp), so the data here keep every :math:`q` far above that
(asserted).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

from atlasfit.models.topic import (
    TopicModelConfig,
    draw_cell_noise,
    draw_global_noise,
    init_params,
    loglik_bernoulli,
    loglik_multinomial,
    loss_and_grad,
    make_buffers,
)
from atlasfit.models.topic import _loss
from atlasfit.models.topic._config import EPS32
from atlasfit.models.topic._loss import (
    loglik_bernoulli_sparse,
    loglik_multinomial_sparse,
    softmax,
    sparse_kernel_ok,
)
from atlasfit.models.topic._nn import encoder_backward, encoder_forward, normalize_counts
from atlasfit.models.topic._sparse import (
    SparseBlocks,
    input_matmul,
    input_tmatmul,
    minibatch_rows,
    row_ids,
    sddmm,
)
from _fd import check_sampled_gradients, fd

RTOL = 1e-10


def _pre_bn_bias(k: str) -> bool:
    """Encoder bias followed by training-mode BatchNorm: its exact gradient is 0."""
    return bool(re.fullmatch(r"enc/.+/b\d+", k))


def _close(a, b, scale=None, rtol=RTOL):
    """|a - b| <= rtol * scale elementwise, scale = max|b| (or the given scale)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    s = np.abs(b).max() if scale is None else scale
    assert a.shape == b.shape
    err = np.abs(a - b).max() if a.size else 0.0
    assert err <= rtol * max(s, 1e-300), (err, s)


def _counts(rng, B, F, lam=0.8):
    return sp.csr_matrix(rng.poisson(lam, (B, F)).astype(float))


def _binary(rng, B, F, p=0.3):
    return sp.csr_matrix((rng.random((B, F)) < p).astype(float))


# --------------------------------------------------------------------------- likelihood kernels


def test_sddmm_is_the_dense_product_at_the_entries():
    rng = np.random.default_rng(0)
    X = _counts(rng, 7, 11)
    A, Bm = rng.random((7, 3)), rng.random((3, 11))
    dense = A @ Bm  # reference: the dense product read at the stored entries
    rows = row_ids(X)
    _close(sddmm(A, np.ascontiguousarray(Bm.T), rows, X.indices), dense[rows, X.indices])


def test_multinomial_sparse_matches_dense():
    rng = np.random.default_rng(1)
    X = _counts(rng, 9, 13, lam=1.5)
    theta = softmax(rng.standard_normal((9, 4)), axis=1)
    rho = theta @ softmax(rng.standard_normal((4, 13)), axis=1)
    lp_d, g_d = loglik_multinomial(X.toarray(), rho)  # reference: the dense kernel
    rows = row_ids(X)
    lp_s, g_s = loglik_multinomial_sparse(X, rho[rows, X.indices])
    _close(lp_s, lp_d)
    _close(g_s, g_d[rows, X.indices])
    # the dense gradient is zero off the stored entries (x = 0 there)
    off = g_d.copy()
    off[rows, X.indices] = 0.0
    assert not off.any()


@pytest.mark.parametrize("depth_ref", [None, 3.7])  # s = depth, s = depth / reference mean
def test_bernoulli_cloglog_sparse_matches_dense(depth_ref):
    rng = np.random.default_rng(2)
    B, F, K = 10, 17, 3
    X = _binary(rng, B, F, 0.35)
    theta = softmax(rng.standard_normal((B, K)), axis=1)
    phi = softmax(rng.standard_normal((K, F)), axis=1)
    rho = theta @ phi
    lib = np.asarray(X.sum(axis=1)).ravel()
    s = lib if depth_ref is None else lib / depth_ref
    s = np.maximum(s, 0.5)  # no empty row: every q far above EPS32 (the one documented difference)
    assert (rho * s[:, None]).min() > 1e3 * EPS32
    lp_d, g_d = loglik_bernoulli(X.toarray(), rho, s, "cloglog")  # reference: the dense kernel
    rows = row_ids(X)
    lp_s, g_s, u = loglik_bernoulli_sparse(X, rho[rows, X.indices], s, rho.sum(axis=1), rows)
    _close(lp_s, lp_d)
    full = np.zeros((B, F))
    full[rows, X.indices] = g_s
    full += u[:, None]  # rank-1 part: every feature of cell n
    _close(full, g_d)


def test_bernoulli_cloglog_sparse_exact_where_dense_clamps():
    # a zero with q < EPS32: the dense kernel uses -EPS32 and gradient 0, the sparse one the exact -q, -s
    X = sp.csr_matrix(np.array([[1.0, 0.0]]))
    rho = np.array([[1.0 - 1e-9, 1e-9]])
    s = np.array([1.0])
    lp_s, g_s, u = loglik_bernoulli_sparse(X, rho[0, :1], s, rho.sum(axis=1))
    # closed form: log(1 - e^{-q1}) - q2
    assert lp_s[0] == pytest.approx(np.log(-np.expm1(-rho[0, 0])) - rho[0, 1], rel=1e-12)
    assert u.tolist() == [-1.0]
    lp_d, g_d = loglik_bernoulli(X.toarray(), rho, s, "cloglog")
    assert abs(lp_d[0] - lp_s[0]) <= EPS32 and g_d[0, 1] == 0.0


# --------------------------------------------------------------------------- encoder


def test_normalize_counts_sparse_matches_dense():
    rng = np.random.default_rng(3)
    X = _counts(rng, 8, 12)
    for med in (None, 5.0):
        S = normalize_counts(X, med)
        assert sp.issparse(S) and S.nnz == X.nnz
        _close(S.toarray(), normalize_counts(X.toarray(), med))  # reference: dense transform


@pytest.mark.parametrize("n_cov", [0, 3])
def test_first_layer_products_match_dense(n_cov):
    rng = np.random.default_rng(4)
    X = _counts(rng, 9, 14)
    cov = rng.standard_normal((9, n_cov))
    h = SparseBlocks(X, cov) if n_cov else X
    dense = np.hstack([X.toarray(), cov])
    W = rng.standard_normal((14 + n_cov, 5))
    D = rng.standard_normal((9, 5))
    _close(input_matmul(h, W), dense @ W)  # reference: dense products
    _close(input_tmatmul(h, D), dense.T @ D)


@pytest.fixture(params=["sparse-layout", "dense-layout"])
def input_layout(request, monkeypatch):
    """Both ways the first encoder layer may read a sparse input (``encoder_layout``): the sparse
    products (threshold above any density) and the densified BLAS product (threshold 0)."""
    from atlasfit.models.topic import _sparse

    monkeypatch.setattr(_sparse, "DENSE_INPUT_FRACTION", 2.0 if request.param == "sparse-layout" else 0.0)
    return request.param


@pytest.mark.parametrize("n_cov", [0, 2])
def test_encoder_forward_backward_sparse_matches_dense(n_cov, input_layout):
    cfg = TopicModelConfig(("rna",), (14,), ("multinomial",), n_topics=3, n_hidden=6, n_layers=2,
                           n_continuous_covariates=n_cov, encode_covariates=bool(n_cov))
    rng = np.random.default_rng(5)
    p = init_params(cfg, seed=5)
    X = _counts(rng, 11, 14)
    cov = rng.standard_normal((11, n_cov))
    xh = normalize_counts(X, 4.0)
    h_s = SparseBlocks(xh, cov) if n_cov else xh
    h_d = np.hstack([xh.toarray(), cov])
    masks = [draw_cell_noise(cfg, 11, (5, l))["drop/rna/0"] for l in range(2)]
    out = []
    for h in (h_d, h_s):
        mu, v, cache, bn = encoder_forward(p, "enc/rna/", h, masks, 2, cfg.bn_eps, cfg.var_eps)
        g = encoder_backward(p, "enc/rna/", cache, np.ones_like(mu), 0.3 * np.ones_like(v), 2)
        out.append((mu, v, bn, g))
    (mu_d, v_d, bn_d, g_d), (mu_s, v_s, bn_s, g_s) = out  # reference: the dense input
    _close(mu_s, mu_d)
    _close(v_s, v_d)
    for (a1, a2), (b1, b2) in zip(bn_s, bn_d):
        _close(a1, b1)
        _close(a2, b2)
    scale = max(np.abs(v).max() for v in g_d.values())
    for k in g_d:  # b0, b1 are zero up to rounding (BatchNorm removes them): compare on the gradients' scale
        _close(g_s[k], g_d[k], scale=scale if _pre_bn_bias(k) else None)


# --------------------------------------------------------------------------- full loss and gradient


def _setup(cfg, B, seed, p_bin=0.3, lam=0.8):
    rng = np.random.default_rng(seed)
    p = init_params(cfg, seed=seed)
    for k in p:
        p[k] = p[k] + 0.1 * rng.standard_normal(p[k].shape)
    x = {}
    for m, F, lik in zip(cfg.modalities, cfg.n_features, cfg.likelihoods):
        if lik == "bernoulli":
            d = (rng.random((B, F)) < p_bin).astype(float)
            d[:, 0] = 1.0  # no empty rows: q = depth * rho stays far above EPS32
        else:
            d = rng.poisson(lam, (B, F)).astype(float)
        x[m] = d
    b0 = {m: -2.0 + 0.3 * rng.standard_normal(F) for m, F in zip(cfg.modalities, cfg.n_features)}
    buf = make_buffers(cfg, b0)
    cn = draw_cell_noise(cfg, B, (seed, 1))
    gn = draw_global_noise(cfg, (seed, 2))
    kw = {}
    if cfg.weight_mode == "cell":
        kw["cell_omega"] = 1.0 + 0.3 * rng.standard_normal((B, cfg.n_modalities))
    if cfg.n_batches:
        kw["batch"] = np.r_[np.arange(cfg.n_batches - 1), rng.integers(0, cfg.n_batches - 1, B - cfg.n_batches + 1)]
    if cfg.n_continuous_covariates:
        kw["cont_covariates"] = rng.standard_normal((B, cfg.n_continuous_covariates))
    return p, x, buf, cn, gn, kw


CASES = [
    dict(),
    dict(weight_mode="cell"),
    dict(weight_mode="cell", bernoulli_scaling="reference"),
    dict(n_batches=3),  # decoder batch offsets: one phi per batch present (two of three here)
    dict(n_batches=3, encode_covariates=True, weight_mode="cell"),  # + one-hot encoder covariate
    dict(n_continuous_covariates=2, encode_covariates=True),
    dict(aggregation="attention"),
]


@pytest.mark.parametrize("rho_path", ["dense-product", "sampled"])
@pytest.mark.parametrize("extra", CASES)
def test_loss_and_grad_sparse_matches_dense(extra, rho_path, monkeypatch, input_layout):
    # rho at the entries: from the dense theta phi product (dense enough rows) or the sampled product
    monkeypatch.setattr(_loss, "DENSE_RHO_FRACTION", 0.0 if rho_path == "dense-product" else 2.0)
    cfg = TopicModelConfig(("rna", "atac"), (9, 13), ("multinomial", "bernoulli"), n_topics=3, n_hidden=6, **extra)
    assert sparse_kernel_ok(cfg, "rna") and sparse_kernel_ok(cfg, "atac")
    p, x, buf, cn, gn, kw = _setup(cfg, 12, 7)
    args = dict(n_total=50, beta=0.7, **kw)
    L_d, g_d = loss_and_grad(p, x, cn, gn, cfg, buf, **args)  # reference: dense minibatch
    L_s, g_s = loss_and_grad(p, {m: sp.csr_matrix(v) for m, v in x.items()}, cn, gn, cfg, buf, **args)
    assert set(g_s) == set(g_d)
    _close(L_s, L_d)
    scale = max(np.abs(v).max() for v in g_d.values())
    for k in g_d:
        # encoder biases before BatchNorm have a zero gradient (rounding-level values): the common scale
        _close(g_s[k], g_d[k], scale=scale if _pre_bn_bias(k) else None)


@pytest.mark.parametrize(
    "lik,extra",
    [("gamma_poisson", {}), ("nb", {"learnable_dispersion": True}), ("bernoulli", {"bernoulli_link": "clip"})],
)
def test_dense_fallback_modalities_give_the_dense_numbers(lik, extra):
    # a modality without sparse kernels has its CSR rows densified: the same computation, same bits
    cfg = TopicModelConfig(("m1", "m2"), (8, 6), (lik, "multinomial"), n_topics=3, n_hidden=5, **extra)
    assert not sparse_kernel_ok(cfg, "m1")
    p, x, buf, cn, gn, kw = _setup(cfg, 10, 3)
    L_d, g_d = loss_and_grad(p, x, cn, gn, cfg, buf, n_total=30, beta=1.0)
    xs = dict(x, m1=sp.csr_matrix(x["m1"]))  # m2 stays dense: only m1 takes the fallback
    L_s, g_s = loss_and_grad(p, xs, cn, gn, cfg, buf, n_total=30, beta=1.0)
    assert L_s == L_d
    for k in g_d:
        assert np.array_equal(g_s[k], g_d[k]), k


H = 1e-4


_fd = fd  # tests/_fd.py


@pytest.mark.parametrize("extra", [dict(), dict(n_batches=3, weight_mode="cell"), dict(bernoulli_scaling="reference")])
def test_sparse_path_gradients_match_finite_differences(extra):
    cfg = TopicModelConfig(("rna", "atac"), (7, 9), ("multinomial", "bernoulli"), n_topics=3, n_hidden=5, **extra)
    p, x, buf, cn, gn, kw = _setup(cfg, 8, 11)
    xs = {m: sp.csr_matrix(v) for m, v in x.items()}
    om = kw.pop("cell_omega", None)

    def loss(pp, o=om):
        return loss_and_grad(pp, xs, cn, gn, cfg, buf, n_total=20, beta=0.7, cell_omega=o, **kw)

    L, g = loss(p)
    atol = 1e-11 * (1.0 + abs(L))
    check_sampled_gradients(loss, p, om, g, np.random.default_rng(0), per_array=3, rtol=1e-6, atol=atol)


# --------------------------------------------------------------------------- rows, threads, eval


def test_minibatch_rows_keeps_canonical_csr_in_the_model_dtype():
    X = sp.csr_matrix((np.array([1.0, 2.0, 3.0], dtype=np.float32), np.array([2, 0, 1]), np.array([0, 2, 3])), shape=(2, 3))
    sub = minibatch_rows(X, np.array([1, 0]), np.float64)
    assert sp.issparse(sub) and sub.dtype == np.float64 and sub.has_canonical_format
    assert sub.toarray().tolist() == [[0.0, 3.0, 0.0], [2.0, 0.0, 1.0]]
    dense = minibatch_rows(X, np.array([1, 0]), np.float64, sparse=False)
    assert isinstance(dense, np.ndarray) and dense.tolist() == sub.toarray().tolist()


def test_sparse_products_same_bits_for_any_thread_count(monkeypatch):
    rng = np.random.default_rng(8)
    X = sp.random(300, 400, density=0.4, format="csc", random_state=8)
    W, D = rng.standard_normal((400, 32)), rng.standard_normal((300, 32))
    res = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("ATLASFIT_SPARSE_THREADS", n)
        res.append((input_matmul(X, W), input_tmatmul(X, D)))
    for a, b in res[1:]:
        assert np.array_equal(a, res[0][0]) and np.array_equal(b, res[0][1])
    _close(res[0][0], X.toarray() @ W)  # reference: dense product


def test_topic_proportions_csr_equals_dense():
    from atlasfit.models.topic import topic_proportions, train_serial

    rng = np.random.default_rng(9)
    x = {"rna": rng.poisson(1.0, (40, 12)).astype(float), "atac": (rng.random((40, 15)) < 0.3).astype(float)}
    cfg = TopicModelConfig(("rna", "atac"), (12, 15), ("multinomial", "bernoulli"), n_topics=3, n_hidden=6)
    fit = train_serial(x, cfg, n_epochs=1, batch_size=10, decoder_init="zeros")
    d = topic_proportions(fit, x, n_samples=3, batch_size=16)  # reference: dense rows
    s = topic_proportions(fit, {m: sp.csr_matrix(v) for m, v in x.items()}, n_samples=3, batch_size=16)
    _close(s, d)


@pytest.mark.parametrize("extra", [dict(), dict(bernoulli_scaling="reference"), dict(weight_mode="universal")])
def test_scores_of_csr_rows_match_dense(extra):
    # validation ELBO, per-token sums and log-likelihoods score CSR rows with the sparse-exact kernels;
    # reference: the same functions on the dense rows (float64; no Bernoulli q near EPS32 here)
    from atlasfit.models.topic import train_serial
    from atlasfit.models.topic._summaries import elbo_block, elbo_draws, eval_rows, loglik, token_phis, token_sums

    rng = np.random.default_rng(11)
    x = {"rna": rng.poisson(1.0, (40, 12)).astype(float), "atac": (rng.random((40, 15)) < 0.3).astype(float)}
    x["atac"][:, 0] = 1.0
    cfg = TopicModelConfig(("rna", "atac"), (12, 15), ("multinomial", "bernoulli"), n_topics=3, n_hidden=6, **extra)
    fit = train_serial(x, cfg, n_epochs=1, batch_size=10, decoder_init="zeros")
    xs = eval_rows(cfg, {m: sp.csr_matrix(v) for m, v in x.items()}, np.float64)
    assert all(sp.issparse(v) for v in xs.values())
    draws, _ = elbo_draws(fit, 2, 0)
    _close(elbo_block(fit, xs, None, {}, draws, 0, (0, 0)), elbo_block(fit, x, None, {}, draws, 0, (0, 0)))
    theta = rng.dirichlet(np.ones(3), 40)
    for m, v in loglik(fit, xs, theta, draws[0], None).items():
        _close(v, loglik(fit, x, theta, draws[0], None)[m])
    phis = token_phis(fit)
    for d in (None, draws[0]):
        for m, (a, t) in token_sums(fit, xs, theta, None, phis, d).items():
            a0, t0 = token_sums(fit, x, theta, None, phis, d)[m]
            _close(a, a0)
            assert t == t0
