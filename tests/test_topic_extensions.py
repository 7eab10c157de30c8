"""Topic-model extensions: horseshoe prior, decoder batch offsets, encoder covariates, spatial SGC/GCN.

Gradient tests: every parameter array is perturbed at a few coordinates (fixed noise keys, float64);
the analytic gradient must match a 5-point central finite difference within 1e-6 relative (the
absolute floor only matters for gradients that are exactly zero, e.g. Linear biases before
training-mode BatchNorm). Behaviour tests use small planted data sets and say where each threshold
comes from.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sps

from atlasfit.engine import plan_shards
from atlasfit.models.topic import (
    TopicModelConfig,
    adamw_init,
    adamw_step,
    draw_cell_noise,
    draw_global_noise,
    global_draws,
    global_draws_backward,
    global_kl,
    init_params,
    loglik_gaussian,
    loss_and_grad,
    make_buffers,
)
from atlasfit.models.topic._loss import topic_feature_logits
from atlasfit.models.topic._spatial import (
    check_adjacency,
    load_shard_extras,
    minibatch_extras,
    neighbourhood,
    normalized_adjacency,
    sgc_features,
)
from atlasfit.models.topic._shard import Layout, MemoryBlocks, load_shard
from atlasfit.models.topic._train import _shard_backward, _shard_forward
from _fd import fd

RTOL = 1e-6
H = 1e-4  # 5-point stencil: truncation O(H^4), round-off ~ 1e-16 |L| / H
BASE = dict(n_topics=3, n_hidden=5)


def _data(cfg, n, rng):
    x = {}
    for m, F, lik in zip(cfg.modalities, cfg.n_features, cfg.likelihoods):
        if lik == "bernoulli":
            x[m] = (rng.random((n, F)) < 0.4).astype(float)
        elif lik == "gaussian":
            x[m] = rng.standard_normal((n, F)) + 2.0
        else:
            x[m] = rng.poisson(3.0, (n, F)).astype(float)
    return x


def _random_graph(n, rng, p=0.35):
    A = np.triu((rng.random((n, n)) < p) * rng.uniform(0.5, 2.0, (n, n)), 1)
    return sps.csr_matrix(A + A.T)


_fd = fd  # tests/_fd.py


def _check_all(cfg, B=6, seed=0, n_total=40, beta=0.7, per_array=3, n_graph=11, graph_per_modality=False):
    """FD check of every parameter; builds batch codes, covariates, SGC inputs or the GCN graph as
    the configuration needs them."""
    rng = np.random.default_rng(seed)
    p = init_params(cfg, seed=seed)
    for k in p:  # move away from the symmetric init so every path carries gradient
        p[k] = p[k] + 0.1 * rng.standard_normal(p[k].shape)
    big = _data(cfg, n_graph, rng)  # cells of one sample; the minibatch is the first B of them
    rows = np.arange(B)
    x = {m: v[rows] for m, v in big.items()}
    b0 = {m: -3.0 + 0.3 * rng.standard_normal(F) for m, F in zip(cfg.modalities, cfg.n_features)}
    buf = make_buffers(cfg, b0)
    cn = draw_cell_noise(cfg, B, (seed, 1))
    gn = draw_global_noise(cfg, (seed, 2))
    kw = {}
    if cfg.needs_batch:
        kw["batch"] = np.arange(B) % cfg.n_batches  # every batch present
    if cfg.n_cont_encoded:
        kw["cont_covariates"] = rng.standard_normal((B, cfg.n_cont_encoded))
    if cfg.spatial_mode is not None:
        A = _random_graph(n_graph, rng)
        if cfg.spatial_mode == "sgc":
            kw["enc_inputs"] = {
                m: sgc_features(A, big[m], cfg.sgc_n_layers, transform="none" if lik == "gaussian" else "log1p")[rows]
                for m, lik in zip(cfg.modalities, cfg.likelihoods)
            }
        elif not graph_per_modality:
            sub, cols = neighbourhood(normalized_adjacency(A), rows)
            assert cols.size > B  # the neighbourhood reaches cells outside the minibatch
            kw["graph"] = {"adj": sub, "x_nbr": {m: big[m][cols] for m in cfg.modalities}}
        else:  # a different graph (and neighbourhood) per modality
            kw["graph"] = {"adj": {}, "x_nbr": {}}
            for i, m in enumerate(cfg.modalities):
                sub, cols = neighbourhood(normalized_adjacency(_random_graph(n_graph, rng, 0.2 + 0.2 * i)), rows)
                kw["graph"]["adj"][m], kw["graph"]["x_nbr"][m] = sub, big[m][cols]

    def loss(pp):
        return loss_and_grad(pp, x, cn, gn, cfg, buf, n_total=n_total, beta=beta, **kw)

    L, g = loss(p)
    assert set(g) == set(p)
    atol = 1e-11 * (1.0 + abs(L))
    checked = set()
    for k in sorted(g):
        assert g[k].shape == p[k].shape, k
        idxs = list(np.ndindex(p[k].shape))
        for s in rng.choice(len(idxs), size=min(per_array, len(idxs)), replace=False):
            i = idxs[s]
            fd = _fd(lambda a, k=k: loss({**p, k: a})[0], p[k], i)
            an = float(g[k][i])
            assert abs(fd - an) <= RTOL * max(abs(fd), abs(an)) + atol, (k, i, fd, an)
            checked.add(k)
    return checked


# --------------------------------------------------------------------------- gradients


def test_gradients_horseshoe():
    cfg = TopicModelConfig(
        ("rna", "atac"), (7, 6), ("gamma_poisson", "bernoulli"), topic_feature_prior_type="horseshoe", **BASE
    )
    checked = _check_all(cfg, seed=1)
    for m in ("rna", "atac"):
        for g in ("c", "tau", "delta", "lam", "beta"):
            assert {f"dec/{m}/hs_{g}_loc", f"dec/{m}/hs_{g}_scale"} <= checked
    assert "dec/rna/Z_loc" not in checked


@pytest.mark.parametrize("liks", [("gamma_poisson", "bernoulli"), ("multinomial", "gaussian"), ("nb", "multinomial")])
def test_gradients_batch_offsets(liks):
    cfg = TopicModelConfig(("a", "b"), (7, 5), liks, n_batches=3, **BASE)
    checked = _check_all(cfg, seed=2)
    for m in ("a", "b"):
        assert {f"dec/{m}/tb_loc", f"dec/{m}/tb_scale", f"dec/{m}/delta_loc", f"dec/{m}/delta_scale"} <= checked


@pytest.mark.parametrize("offsets", [True, False])
def test_gradients_encoder_covariates(offsets):
    cfg = TopicModelConfig(
        ("rna", "adt"), (7, 4), ("gamma_poisson", "multinomial"), n_batches=3, decoder_batch_offsets=offsets,
        encode_covariates=True, n_continuous_covariates=2, weight_mode="universal", **BASE,
    )
    checked = _check_all(cfg, seed=3)
    assert init_params(cfg)["enc/rna/W0"].shape == (7 + 2 + 3, 5)  # [x, cont, onehot]
    assert ("dec/rna/delta_loc" in checked) == offsets


@pytest.mark.parametrize(
    "extra,per_mod", [({}, False), ({"n_layers": 2, "aggregation": "attention", "att_dim": 3}, True)]
)
def test_gradients_gcn(extra, per_mod):
    cfg = TopicModelConfig(("rna", "atac"), (7, 6), ("gamma_poisson", "bernoulli"), spatial_mode="gcn", **BASE, **extra)
    checked = _check_all(cfg, seed=4, per_array=4, graph_per_modality=per_mod)
    assert {"enc/rna/Wg", "enc/rna/alpha", "enc/atac/Wg", "enc/atac/alpha"} <= checked


def test_gradients_sgc_with_everything():
    cfg = TopicModelConfig(
        ("rna", "prot"), (6, 4), ("multinomial", "gaussian"), spatial_mode="sgc", sgc_n_layers=2,
        topic_feature_prior_type="horseshoe", n_batches=2, encode_covariates=True, **BASE,
    )
    _check_all(cfg, seed=5)
    assert init_params(cfg)["enc/rna/W0"].shape == (6 * 3 + 2, 5)


def test_gradients_gcn_with_offsets_and_covariates():
    cfg = TopicModelConfig(
        ("rna",), (8,), ("gamma_poisson",), spatial_mode="gcn", n_batches=2, encode_covariates=True,
        n_continuous_covariates=1, learnable_dispersion=True, **BASE,
    )
    _check_all(cfg, seed=6, per_array=4)


# --------------------------------------------------------------------------- defaults unchanged


def test_defaults_unchanged():
    cfg = TopicModelConfig(("rna",), (6,), ("gamma_poisson",), **BASE)
    assert not (cfg.horseshoe or cfg.batch_offsets or cfg.needs_batch or cfg.spatial_mode)
    p = init_params(cfg)
    assert not any(("hs_" in k or "delta" in k or "tb_" in k or k.endswith(("Wg", "alpha"))) for k in p)
    gn = draw_global_noise(cfg, (0,))
    assert sorted(gn) == ["E/rna", "e_bg/rna"]


# --------------------------------------------------------------------------- SGC closed form and graph checks


def test_sgc_matches_closed_form_on_3_nodes():
    # path 0 -(1)- 1 -(2)- 2; A + I has row sums d = (2, 4, 3), so
    # A_hat = [[1/2, 1/sqrt(8), 0], [1/sqrt(8), 1/4, 2/sqrt(12)], [0, 2/sqrt(12), 1/3]]
    A = sps.csr_matrix(np.array([[0, 1.0, 0], [1.0, 0, 2.0], [0, 2.0, 0]]))
    Ah = np.array([[0.5, 8**-0.5, 0.0], [8**-0.5, 0.25, 2 / 12**0.5], [0.0, 2 / 12**0.5, 1 / 3]])
    np.testing.assert_allclose(normalized_adjacency(A).toarray(), Ah, rtol=1e-14)
    # every library is 4 = the median, so the depth normalisation is the identity
    X = np.array([[4.0, 0.0], [1.0, 3.0], [2.0, 2.0]])
    want = np.log1p(np.hstack([X, Ah @ X, Ah @ Ah @ X]))
    np.testing.assert_allclose(sgc_features(A, X, 2), want, rtol=1e-14)
    # sparse input gives the same values as CSR
    np.testing.assert_allclose(sgc_features(A, sps.csr_matrix(X), 2).toarray(), want, rtol=1e-14)
    # depth normalisation with an explicit median: x / max(l, 1) * med, zero library guarded
    X0 = np.array([[2.0, 2.0], [0.0, 0.0], [1.0, 3.0]])
    got = sgc_features(A, X0, 1, median=8.0)
    Xn = X0 / np.array([4.0, 1.0, 4.0])[:, None] * 8.0
    np.testing.assert_allclose(got, np.log1p(np.hstack([Xn, Ah @ Xn])), rtol=1e-14)


def test_graph_errors_name_the_problem():
    with pytest.raises(ValueError, match="square"):
        check_adjacency(np.zeros((3, 2)), 3)
    with pytest.raises(ValueError, match="4 cells"):
        check_adjacency(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match=r"not symmetric.*cell 0, cell 1"):
        check_adjacency(np.array([[0, 1.0, 0], [0.5, 0, 0], [0, 0, 0]]), 3)
    with pytest.raises(ValueError, match="negative edge weight"):
        check_adjacency(np.array([[0, -1.0], [-1.0, 0]]), 2)
    cfg = TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, spatial_mode="gcn")
    A = sps.csr_matrix(np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]]))
    parts = [("s0", 2), ("s1", 2)]
    st = load_shard_extras({"graph": A}, np.arange(4), parts, cfg, 4)
    assert st["adj_hat"]["rna"].shape == (4, 4)
    c2 = TopicModelConfig(("rna", "atac"), (4, 3), ("multinomial",) * 2, n_topics=2, spatial_mode="sgc")
    with pytest.raises(ValueError, match=r"no graph for modalities \['atac'\]"):
        load_shard_extras({"graph": {"rna": A}}, np.arange(4), parts, c2, 4)
    st = load_shard_extras({"graph": {"rna": A, "atac": sps.csr_matrix((4, 4))}}, np.arange(4), parts, c2, 4)
    assert st["adj"]["atac"].nnz == 0 and st["adj"]["rna"].nnz == 4
    with pytest.raises(ValueError, match="needs the spatial graph"):
        load_shard_extras(None, np.arange(4), parts, cfg, 4)
    with pytest.raises(ValueError, match="there are 5 cells"):
        load_shard_extras({"graph": A}, np.arange(4), parts, cfg, 5)
    cross = A.tolil()
    cross[1, 2] = cross[2, 1] = 1.0
    with pytest.raises(ValueError, match="edge between cell 1 .*'s0'.* and cell 2 .*'s1'"):
        load_shard_extras({"graph": cross.tocsr()}, np.arange(4), parts, cfg, 4)
    with pytest.raises(ValueError, match="other samples"):  # shard holds only sample s0
        load_shard_extras({"graph": cross.tocsr()}, np.arange(2), parts[:1], cfg, 4)
    cb = TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, n_batches=2)
    with pytest.raises(ValueError, match="no per-cell batch codes"):
        load_shard_extras(None, np.arange(4), parts, cb, 4)
    with pytest.raises(ValueError, match="batch code 2 of cell 3"):
        load_shard_extras({"batch": np.array([0, 1, 1, 2])}, np.arange(4), parts, cb, 4)
    with pytest.raises(ValueError, match="spatial_mode"):
        TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, spatial_mode="gat")
    with pytest.raises(ValueError, match="topic_feature_prior_type"):
        TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, topic_feature_prior_type="dirichlet")
    with pytest.raises(ValueError, match="encode_covariates"):
        TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, encode_covariates=True, n_batches=1)


def test_shard_functions_pass_batch_codes_and_graph():
    """load_shard / _shard_forward / _shard_backward with a GCN graph and batch offsets over two samples:
    the shard's gradient equals loss_and_grad on the same rows (same noise)."""
    rng = np.random.default_rng(7)
    cfg = TopicModelConfig(("rna",), (6,), ("multinomial",), spatial_mode="gcn", n_batches=2, **BASE)
    n0, n1 = 7, 5
    x = {"rna": rng.poisson(3.0, (n0 + n1, 6)).astype(float)}
    A = sps.block_diag([_random_graph(n0, rng), _random_graph(n1, rng)]).tocsr()
    batch = rng.integers(0, 2, n0 + n1)
    groups = {"s0": np.arange(n0), "s1": np.arange(n0, n0 + n1)}
    spec = plan_shards(["s0", "s1"], [n0, n1], max_shards=1)[0]
    # the shard reads its samples' blocks (rows, batch codes and graph) through the in-memory reader
    reader = MemoryBlocks(x, groups, batch=batch, graphs={"rna": A})
    layout = Layout(n={"s0": n0, "s1": n1}, index={"s0": 0, "s1": 1}, sid={"s0": 0, "s1": 1})
    state = load_shard(spec, reader, layout, cfg, np.float64)
    p = init_params(cfg, seed=1)
    buf = make_buffers(cfg)
    gn = draw_global_noise(cfg, (0, 0, 0))
    med = {"rna": 18.0}
    stats = _shard_forward(state, p, gn, buf, 0, 0, 0, 2, med, None)
    B = int(stats["n"])
    local = state["_local"]
    grads = _shard_backward(state, 30.0 / B, 1.0, B, stats["theta_sum"] / B, 1, {"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0})
    # reference: the same rows through loss_and_grad with the same per-sample noise
    chunks = [local[np.isin(local, groups[s])] for s in ("s0", "s1")]
    cn = [draw_cell_noise(cfg, len(c), (0, 0, 0, i)) for i, c in enumerate(chunks)]
    cn = {k: np.concatenate([c[k] for c in cn]) for k in cn[0]}
    kw = minibatch_extras(state, local, med)
    L, g = loss_and_grad(p, {"rna": x["rna"][local]}, cn, gn, cfg, buf, n_total=30, beta=1.0, lib_median=med, **kw)
    np.testing.assert_array_equal(kw["batch"], batch[local])
    assert kw["graph"]["adj"]["rna"][-1].shape[0] == B  # the last layer block gives the minibatch rows
    draws = global_draws(p, gn, cfg, buf)
    full = dict(grads)
    for k, v in global_draws_backward(p, gn, draws, grads, cfg).items():
        full[k] = full.get(k, 0) + v
    _, gkl = global_kl(p, gn, cfg, buf)
    for k, v in gkl.items():
        full[k] = full.get(k, 0) + v
    for k in ("enc/rna/Wg", "enc/rna/alpha", "enc/rna/W0", "dec/rna/delta_loc", "dec/rna/tb_scale", "dec/rna/Z_loc"):
        np.testing.assert_allclose(full[k], g[k], rtol=1e-10, atol=1e-12, err_msg=k)


# --------------------------------------------------------------------------- behaviour


def _fit(cfg, x, n_steps, lr, seed=0, **kw):
    """Full-batch AdamW on loss_and_grad (beta = 1, fresh noise each step); returns params and the
    mean loss over the last 50 steps."""
    n = x[cfg.modalities[0]].shape[0]
    p = init_params(cfg, seed=seed)
    buf = make_buffers(cfg)
    st = adamw_init(p)
    losses = []
    for t in range(n_steps):
        L, g = loss_and_grad(
            p, x, draw_cell_noise(cfg, n, (seed, t, 1)), draw_global_noise(cfg, (seed, t, 2)), cfg, buf,
            n_total=n, beta=1.0, **kw,
        )
        losses.append(L)
        p = adamw_step(p, g, st, lr=lr, weight_decay=0.0)
    return p, float(np.mean(losses[-50:]))


def test_batch_offsets_absorb_planted_shift():
    rng = np.random.default_rng(11)
    K, F, n = 3, 20, 240
    phi_logits = rng.normal(0.0, 1.0, (K, F))
    shift = np.zeros(F)
    shift[:5] = 1.5  # planted per-batch logit shift of batch 1 on features 0..4
    batch = np.repeat([0, 1], n // 2)
    theta = rng.dirichlet(np.full(K, 0.5), n)
    x = np.empty((n, F))
    for i in range(n):
        eta = phi_logits + (shift if batch[i] else 0.0)
        ph = np.exp(eta - eta.max(1, keepdims=True))
        ph /= ph.sum(1, keepdims=True)
        x[i] = rng.multinomial(200, theta[i] @ ph)
    common = dict(n_topics=K, n_hidden=16, dropout=0.0, entropy_weight=0.0, topic_variance_weight=0.0)
    with_off = TopicModelConfig(("rna",), (F,), ("multinomial",), n_batches=2, **common)
    without = TopicModelConfig(("rna",), (F,), ("multinomial",), **common)
    p_on, loss_on = _fit(with_off, {"rna": x}, 400, 0.05, batch=batch)
    _, loss_off = _fit(without, {"rna": x}, 400, 0.05)
    # learned batch-1-minus-batch-0 logit offset, tb at its logit-normal median sigma(loc)
    tb = 1.0 / (1.0 + np.exp(-p_on["dec/rna/tb_loc"]))
    d = p_on["dec/rna/delta_loc"][1] - p_on["dec/rna/delta_loc"][0]
    learned = tb.mean() * d
    r = np.corrcoef(learned, shift)[0, 1]
    # the planted shift moves ~40% of the mass of batch 1 (200 counts per cell); the offsets cost a
    # StudentT(10, 0, 0.01) prior of ~40 nats per feature, far below the likelihood gain.
    # Measured with these keys: r = 0.998, learned shift 1.40 on features 0..4 (planted 1.5) and 0.003
    # elsewhere, loss 391 nats lower
    assert r > 0.9, r
    assert abs(learned[:5].mean() - 1.5) < 0.3 and abs(learned[5:]).max() < 0.3, learned
    assert loss_on < loss_off - 100.0, (loss_on, loss_off)


def _fit_decoder_only(cfg, x, theta, n_steps=600, lr=0.05):
    """Mean-field SVI of the topic-feature logits alone: Gaussian observations x_n ~ N(theta_n Z, 1) with
    fixed one-hot theta, loss = -log p + global KL terms (the model's own draws, KLs and backward)."""
    p = init_params(cfg, seed=0)
    p = {k: v for k, v in p.items() if k.startswith("dec/")}
    buf = make_buffers(cfg)
    st = adamw_init(p)
    m = cfg.modalities[0]
    for t in range(n_steps):
        gn = draw_global_noise(cfg, (3, t))
        draws = global_draws(p, gn, cfg, buf)
        mean = theta @ draws[f"Z/{m}"]
        _, dmean, _ = loglik_gaussian(x, mean, np.ones(x.shape[1]))
        g = global_draws_backward(p, gn, draws, {f"draw/Z/{m}": -(theta.T @ dmean)}, cfg)
        _, gkl = global_kl(p, gn, cfg, buf)
        for k, v in gkl.items():
            g[k] = g.get(k, 0) + v
        g = {k: g.get(k, np.zeros_like(v)) for k, v in p.items()}
        p = adamw_step(p, g, st, lr=lr, weight_decay=0.0)
    return topic_feature_logits(p, cfg, m)


def test_horseshoe_shrinks_planted_sparse_phi_more():
    rng = np.random.default_rng(5)
    K, F = 8, 50
    Z = np.zeros((K, F))
    for k in range(K):  # 8% of the logits carry signal 4.0, the rest are exactly 0
        Z[k, rng.choice(F, 4, replace=False)] = 4.0
    theta = np.eye(K)  # one cell per topic
    x = theta @ Z + rng.standard_normal((K, F))  # observation noise sd 1
    ln = TopicModelConfig(("prot",), (F,), ("gaussian",), n_topics=K, n_hidden=4)
    hs = TopicModelConfig(("prot",), (F,), ("gaussian",), n_topics=K, n_hidden=4, topic_feature_prior_type="horseshoe")
    z_ln = _fit_decoder_only(ln, x, theta, n_steps=800)
    z_hs = _fit_decoder_only(hs, x, theta, n_steps=800)
    null = Z == 0
    null_ln, null_hs = np.abs(z_ln[null]).mean(), np.abs(z_hs[null]).mean()
    # logistic-normal prior variance K (1 - 1/F) ~ 7.8 against noise variance 1: the posterior mean keeps
    # ~89% of the noise, E|.| ~ 0.8 * 0.89 ~ 0.71 (measured 0.69). The horseshoe learns its scale from the
    # mostly-null logits (measured 0.42 with these keys); require a clear margin
    assert null_hs < 0.75 * null_ln, (null_hs, null_ln)
    # while keeping the planted signal (4.0) well separated from the nulls (measured 3.0 vs 0.42)
    assert z_hs[~null].mean() > 4.0 * null_hs, (z_hs[~null].mean(), null_hs)


def test_mc_terms_match_scipy_densities():
    """The one-sample KL terms are log q - log p of the reparameterised draw (scipy densities)."""
    import scipy.stats as st

    from atlasfit.models.topic._globals import (
        _logitnormal_beta_mc,
        _lognormal_halfcauchy_mc,
        _lognormal_invgamma_mc,
        _normal_studentt_mc,
        horseshoe_draw,
    )
    from atlasfit.models.topic._params import softplus

    rng = np.random.default_rng(3)
    loc, raw, e = rng.normal(0, 0.5, 4), rng.normal(0, 0.5, 4), rng.standard_normal(4)
    s = softplus(raw)
    v = loc + s * e
    lq_normal = st.norm.logpdf(v, loc, s)
    t = 1 / (1 + np.exp(-v))
    want = (lq_normal - np.log(t * (1 - t)) - st.beta.logpdf(t, 0.5, 0.5)).sum()
    assert abs(_logitnormal_beta_mc(loc, raw, e, np)[0] - want) < 1e-10
    d = 0.01 * loc + s * e  # Delta = loc + sp(raw) e, loc near the StudentT(10, 0, 0.01) prior's scale
    want = (st.norm.logpdf(d, 0.01 * loc, s) - st.t.logpdf(d, 10, 0, 0.01)).sum()
    assert abs(_normal_studentt_mc(0.01 * loc, raw, e, np)[0] - want) < 1e-9
    c = np.exp(v)
    lq = st.lognorm.logpdf(c, s, scale=np.exp(loc))
    assert abs(_lognormal_invgamma_mc(loc, raw, e, np)[0] - (lq - st.invgamma.logpdf(c, 0.5, scale=0.5)).sum()) < 1e-10
    assert abs(_lognormal_halfcauchy_mc(loc, raw, e, np)[0] - (lq - st.halfcauchy.logpdf(c)).sum()) < 1e-10
    # horseshoe logits: Z = beta * sqrt(c^2 (tau delta lam)^2 / (c^2 + (tau delta lam)^2 + 1e-8))
    cfg = TopicModelConfig(("rna",), (5,), ("multinomial",), n_topics=2, topic_feature_prior_type="horseshoe")
    p = init_params(cfg)
    gn = draw_global_noise(cfg, (1,))
    val = {g: p[f"dec/rna/hs_{g}_loc"] + softplus(p[f"dec/rna/hs_{g}_scale"]) * gn[f"e_hs_{g}/rna"] for g in ("c", "tau", "delta", "lam", "beta")}
    u = (np.exp(val["tau"])[:, None] * np.exp(val["delta"])[None, :] * np.exp(val["lam"])) ** 2
    c2 = np.exp(val["c"]) ** 2
    np.testing.assert_allclose(horseshoe_draw(p, gn, "rna")[0], val["beta"] * np.sqrt(c2 * u / (c2 + u + 1e-8)), rtol=1e-12)
