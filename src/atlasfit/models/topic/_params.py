"""Parameter initialisation, fixed buffers and noise draws of the topic model (spec §1.4, §2.1, §2.2)."""

from __future__ import annotations

import math

import numpy as np

from ._config import TopicModelConfig, cell_topic_prior, likelihood_weights, topic_feature_prior_sigma

#: softplus^{-1}(0.1): raw initial value of most scale parameters (constrained scale 0.1).
S01 = math.log(math.expm1(0.1))


def softplus(x, xp=np):
    """Numerically stable :math:`\\log(1+e^x)`."""
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(x, xp=np):
    """:math:`1/(1+e^{-x})` without overflow."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def encoder_input_dim(cfg: TopicModelConfig, m: str) -> int:
    """Width of the first encoder layer's input: :math:`F_m` (:math:`F_m(L+1)` for SGC) plus the
    continuous and one-hot covariate blocks (§2.2, §4.5).

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (10,), ("multinomial",), n_topics=2, n_batches=3,
    ...                        encode_covariates=True, spatial_mode="sgc", sgc_n_layers=2)
    >>> encoder_input_dim(cfg, "rna")
    33
    """
    base = cfg.n_feat(m) * (cfg.sgc_n_layers + 1) if cfg.spatial_mode == "sgc" else cfg.n_feat(m)
    return base + cfg.n_cont_encoded + cfg.n_onehot


#: Horseshoe variational groups (§2.1): name -> (shape kind, initial loc). All but ``beta`` are LogNormal.
HS_GROUPS = {"c": ("1", 0.1), "tau": ("K", 0.0), "delta": ("F", 0.0), "lam": ("KF", 0.0), "beta": ("KF", 0.0)}


def _hs_shape(kind: str, K: int, F: int) -> tuple:
    return {"1": (1,), "K": (K,), "F": (F,), "KF": (K, F)}[kind]


def init_params(cfg: TopicModelConfig, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Initial global parameters (flat dict of NumPy arrays; names below), following §2.1–§2.3.

    * ``enc/{m}/W{l}, b{l}``: PyTorch default Linear init, uniform :math:`\\pm1/\\sqrt{\\text{fan\\_in}}`;
      ``g{l}`` = 1, ``be{l}`` = 0 (BatchNorm); heads ``W_mu, b_mu, W_v, b_v`` likewise uniform.
    * ``dec/{m}/Z_loc`` = 0 and raw ``dec/{m}/Z_scale`` = :math:`\\sqrt{1-1/F_m}` (the reference quirk).
    * ``dec/{m}/bg_loc`` = 0, ``bg_scale`` = :math:`s_{0.1}` (learned background only);
      ``disp_loc/disp_scale`` (learned NB dispersion), ``sigma_loc/sigma_scale`` (Gaussian) likewise.
    * ``mix/omega`` = ones (``weight_mode="universal"``); ``att/W``, ``att/u`` Xavier-uniform (attention).
    * Horseshoe (``topic_feature_prior_type="horseshoe"``, replaces ``Z_loc``/``Z_scale``):
      ``dec/{m}/hs_{g}_loc``, ``hs_{g}_scale`` for :math:`g\\in\\{c,\\tau,\\delta,\\lambda,\\beta\\}` with
      shapes (1,), (K,), (F,), (K, F), (K, F); loc 0 (0.1 for :math:`c`), raw scale :math:`s_{0.1}` (§2.1).
    * Decoder batch offsets: ``dec/{m}/tb_loc``, ``tb_scale`` (K,) and ``dec/{m}/delta_loc``,
      ``delta_scale`` (C, F); loc 0, raw scale :math:`s_{0.1}` (§2.1).
    * GCN: ``enc/{m}/Wg`` (F, H) uniform :math:`\\pm1/\\sqrt F` and the skip logit ``enc/{m}/alpha``
      (1,) = logit(``gcn_alpha_init``).
    * Deeper GCN (``gcn_n_layers`` = L > 1): ``enc/{m}/Wg{j}`` (H, H) uniform :math:`\\pm1/\\sqrt H` for
      j = 1..L-1 and inner biases ``enc/{m}/bg{j}`` = 0 (j < L-1). GATv2 (``gcn_conv_type="gatv2"``,
      replaces ``Wg``): ``enc/{m}/gat{j}/WL``, ``WR`` (fan-in, H) Glorot-uniform, ``bR`` = 0 and the
      attention vectors ``a`` (heads, H/heads) Glorot-uniform :math:`\\pm\\sqrt{6/(\\text{heads} + c)}`.

    Per-cell weights of ``weight_mode="cell"`` are not global: see :func:`init_cell_omega`.

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (30,), ("gamma_poisson",), n_topics=3, n_hidden=8)
    >>> p = init_params(cfg)
    >>> p["enc/rna/W0"].shape, p["dec/rna/Z_loc"].shape, p["dec/rna/bg_loc"].shape
    ((30, 8), (3, 30), (30,))
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7301]))
    K, H = cfg.n_topics, cfg.n_hidden
    p: dict[str, np.ndarray] = {}

    def uni(bound, shape):
        return rng.uniform(-bound, bound, size=shape)

    for m, F, lik in zip(cfg.modalities, cfg.n_features, cfg.likelihoods):
        pre = f"enc/{m}/"
        fan_in = encoder_input_dim(cfg, m)
        for l in range(cfg.n_layers):
            bound = 1.0 / math.sqrt(fan_in)
            p[f"{pre}W{l}"] = uni(bound, (fan_in, H))
            p[f"{pre}b{l}"] = uni(bound, (H,))
            p[f"{pre}g{l}"] = np.ones(H)
            p[f"{pre}be{l}"] = np.zeros(H)
            fan_in = H
        bound = 1.0 / math.sqrt(H)
        for head in ("mu", "v"):
            p[f"{pre}W_{head}"] = uni(bound, (H, K))
            p[f"{pre}b_{head}"] = uni(bound, (K,))
        if cfg.spatial_mode == "gcn":
            if cfg.gcn_conv_type == "gcn":
                p[f"{pre}Wg"] = uni(1.0 / math.sqrt(F), (F, H))
            a0 = cfg.gcn_alpha_init
            p[f"{pre}alpha"] = np.full(1, math.log(a0 / (1.0 - a0)))
            p.update(_graph_params(cfg, pre, F, uni))
        d = f"dec/{m}/"
        if cfg.horseshoe:
            for g, (kind, loc) in HS_GROUPS.items():
                p[f"{d}hs_{g}_loc"] = np.full(_hs_shape(kind, K, F), loc)
                p[f"{d}hs_{g}_scale"] = np.full(_hs_shape(kind, K, F), S01)
        else:
            p[f"{d}Z_loc"] = np.zeros((K, F))
            p[f"{d}Z_scale"] = np.full((K, F), math.sqrt(max(1.0 - 1.0 / F, 0.0)))
        if cfg.batch_offsets:
            p[f"{d}tb_loc"] = np.zeros(K)
            p[f"{d}tb_scale"] = np.full(K, S01)
            p[f"{d}delta_loc"] = np.zeros((cfg.n_batches, F))
            p[f"{d}delta_scale"] = np.full((cfg.n_batches, F), S01)
        if cfg.learns_background(m):
            p[f"{d}bg_loc"] = np.zeros(F)
            p[f"{d}bg_scale"] = np.full(F, S01)
        if cfg.learns_dispersion(m):
            p[f"{d}disp_loc"] = np.zeros(cfg.dispersion_shape(m))
            p[f"{d}disp_scale"] = np.full(cfg.dispersion_shape(m), S01)
        if lik == "gaussian":
            p[f"{d}sigma_loc"] = np.zeros(F)
            p[f"{d}sigma_scale"] = np.full(F, S01)
    if cfg.aggregation == "attention":
        a = cfg.att_dim
        p["att/W"] = uni(math.sqrt(6.0 / (a * (K + 1))), (K, a))
        p["att/u"] = uni(math.sqrt(6.0 / (a + 1)), (a,))
    elif cfg.weight_mode == "universal":
        p["mix/omega"] = np.ones(cfg.n_modalities)
    return {k: np.asarray(v, dtype=dtype) for k, v in p.items()}


def _graph_params(cfg: TopicModelConfig, pre: str, F: int, uni) -> dict:
    """Graph-branch parameters beyond the one-layer ``Wg`` (see :func:`init_params`), drawn after it."""
    H, L = cfg.n_hidden, cfg.gcn_n_layers
    out = {}
    for j in range(L):
        fan_in = F if j == 0 else H
        if cfg.gcn_conv_type == "gatv2":
            q = f"{pre}gat{j}/"
            c = H // cfg.gcn_heads
            out[q + "WL"] = uni(math.sqrt(6.0 / (fan_in + H)), (fan_in, H))
            out[q + "WR"] = uni(math.sqrt(6.0 / (fan_in + H)), (fan_in, H))
            out[q + "bR"] = np.zeros(H)
            out[q + "a"] = uni(math.sqrt(6.0 / (cfg.gcn_heads + c)), (cfg.gcn_heads, c))
        elif j > 0:
            out[f"{pre}Wg{j}"] = uni(1.0 / math.sqrt(H), (H, H))
        if j < L - 1:
            out[f"{pre}bg{j}"] = np.zeros(H)
    return out


def init_cell_omega(cfg: TopicModelConfig, n_cells: int, dtype=np.float64) -> np.ndarray:
    """Per-cell mixing logits :math:`\\Omega` (``weight_mode="cell"``), initialised to ones (§2.3)."""
    return np.ones((int(n_cells), cfg.n_modalities), dtype=dtype)


def init_bn_state(cfg: TopicModelConfig, dtype=np.float64) -> dict[str, np.ndarray]:
    """BatchNorm running statistics (mean 0, variance 1), keyed ``enc/{m}/rm{l}``, ``enc/{m}/rv{l}``."""
    s = {}
    for m in cfg.modalities:
        for l in range(cfg.n_layers):
            s[f"enc/{m}/rm{l}"] = np.zeros(cfg.n_hidden, dtype=dtype)
            s[f"enc/{m}/rv{l}"] = np.ones(cfg.n_hidden, dtype=dtype)
    return s


def background_init(x_sum_over_lib, n_cells: int, bg_offset: float = 1e-15) -> np.ndarray:
    """Empirical background :math:`b^0_f = \\log(\\frac1N\\sum_n x_{nf}/\\tilde\\ell_n + \\text{bg\\_offset})` (§1.4).

    ``x_sum_over_lib`` is :math:`\\sum_n x_{nf}/\\tilde\\ell_n` (additive over shards), with
    :math:`\\tilde\\ell_n = \\ell_n` or 1 where :math:`\\ell_n = 0`.

    Examples
    --------
    >>> background_init(np.array([5.0, 0.0]), 10).round(3).tolist()
    [-0.693, -34.539]
    """
    if n_cells < 1:
        raise ValueError("background_init: n_cells must be >= 1")
    return np.log(np.asarray(x_sum_over_lib, dtype=np.float64) / n_cells + bg_offset)


def make_buffers(cfg: TopicModelConfig, b0: dict | None = None, dtype=np.float64) -> dict[str, np.ndarray]:
    """Fixed buffers: cell prior ``prior_mu``, ``prior_sd`` (§1.2), ``phi_sd/{m}`` (§1.3a),
    likelihood weight ``lik_w/{m}`` (§1.8) and background ``b0/{m}`` (§1.4; zeros if ``b0`` not given).

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=5)
    >>> round(float(make_buffers(cfg)["prior_sd"][0] ** 2), 12)
    4.0
    """
    mu, sd = cell_topic_prior(cfg)
    buf = {"prior_mu": mu, "prior_sd": sd}
    w = likelihood_weights(cfg)
    for m, F in zip(cfg.modalities, cfg.n_features):
        buf[f"phi_sd/{m}"] = np.asarray(topic_feature_prior_sigma(cfg, m))
        buf[f"lik_w/{m}"] = np.asarray(w[m])
        if cfg.has_background(m):
            v = np.zeros(F) if b0 is None or m not in b0 else np.asarray(b0[m], dtype=np.float64)
            if v.shape != (F,):
                raise ValueError(f"modality {m!r}: background b0 has shape {v.shape}, expected ({F},)")
            buf[f"b0/{m}"] = v
    return {k: np.asarray(v, dtype=dtype) for k, v in buf.items()}


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def draw_cell_noise(cfg: TopicModelConfig, n_cells: int, key, dtype=np.float64) -> dict[str, np.ndarray]:
    """Per-cell noise for one minibatch part, keyed by ``key`` (a tuple of ints, e.g. (seed, epoch, step, sample)).

    * ``eps_z``: :math:`\\epsilon_n \\sim \\mathcal N(0, I_K)`, shape (n_cells, K);
    * ``drop/{m}/{l}``: inverted-dropout masks, 0 or :math:`1/(1-p)`, shape (n_cells, H).

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=3, n_hidden=5)
    >>> sorted(draw_cell_noise(cfg, 2, (0, 1)))
    ['drop/rna/0', 'eps_z']
    """
    rng = _rng(tuple(key) + (1,))
    out = {"eps_z": rng.standard_normal((n_cells, cfg.n_topics))}
    keep = 1.0 - cfg.dropout
    for m in cfg.modalities:
        for l in range(cfg.n_layers):
            out[f"drop/{m}/{l}"] = (rng.random((n_cells, cfg.n_hidden)) < keep) / keep
    return {k: np.asarray(v, dtype=dtype) for k, v in out.items()}


def draw_global_noise(cfg: TopicModelConfig, key, dtype=np.float64) -> dict[str, np.ndarray]:
    """One joint draw of the global latents' standard-normal noise (§2.3 "global draws"), keyed by ``key``.

    ``E/{m}`` (K, F) for :math:`Z_m`; ``e_bg/{m}`` (F) for :math:`u_m`; ``e_disp/{m}`` for
    :math:`d_m`; ``e_sigma/{m}`` (F) for :math:`\\varsigma_m`, each only where the latent exists.
    Horseshoe: ``e_hs_{g}/{m}`` for :math:`g\\in\\{c,\\tau,\\delta,\\lambda,\\beta\\}` instead of ``E/{m}``;
    batch offsets: ``e_tb/{m}`` (K) and ``e_delta/{m}`` (C, F), drawn after the default ones of the
    modality, so the default noise is unchanged when the options are off.
    """
    rng = _rng(tuple(key) + (2,))
    out = {}
    K = cfg.n_topics
    for m, F, lik in zip(cfg.modalities, cfg.n_features, cfg.likelihoods):
        if cfg.horseshoe:
            for g, (kind, _) in HS_GROUPS.items():
                out[f"e_hs_{g}/{m}"] = rng.standard_normal(_hs_shape(kind, K, F))
        else:
            out[f"E/{m}"] = rng.standard_normal((cfg.n_topics, F))
        if cfg.learns_background(m):
            out[f"e_bg/{m}"] = rng.standard_normal(F)
        if cfg.learns_dispersion(m):
            out[f"e_disp/{m}"] = rng.standard_normal(cfg.dispersion_shape(m))
        if lik == "gaussian":
            out[f"e_sigma/{m}"] = rng.standard_normal(F)
        if cfg.batch_offsets:
            out[f"e_tb/{m}"] = rng.standard_normal(K)
            out[f"e_delta/{m}"] = rng.standard_normal((cfg.n_batches, F))
    return {k: np.asarray(v, dtype=dtype) for k, v in out.items()}


def kmeans_decoder_init(
    cfg: TopicModelConfig,
    data: dict,
    buffers: dict,
    *,
    seed: int = 0,
    n_cells: int = 2000,
    mix: float = 0.5,
    dtype=np.float64,
) -> dict[str, np.ndarray]:
    """Data-driven start for the topic-feature logits: ``{"dec/{m}/Z_loc": (K, F_m)}``.

    With ``Z_loc = 0`` (the reference, :func:`init_params`) every topic starts at the same point and
    only the variational noise separates them; on the planted atlases some runs end with two learned
    topics on one planted topic and another planted topic lost (docs/topic_model.md, "Measured").
    Here ``n_cells`` cells (a seeded draw without replacement) are clustered into :math:`K` groups by
    k-means (:func:`scipy.cluster.vq.kmeans2`, k-means++ seeding) on their depth-normalised
    square-root profiles (Hellinger geometry), each count modality scaled to unit norm so that every
    modality weighs the same. Group :math:`k`'s mean normalised profile :math:`p_{mk}` (cells whose
    modality :math:`m` is empty are left out) is shrunk towards the overall mean :math:`\\bar p_m`,
    :math:`\\tilde p_{mk} = \\text{mix}\\,p_{mk} + (1-\\text{mix})\\,\\bar p_m`, and the logits are set so
    that :math:`\\mathrm{softmax}_f(Z_{mk} + b_m) = \\tilde p_{mk}` at the start (:math:`b_m` the
    background buffer ``b0/{m}``, 0 without a background; each row centred). Gaussian modalities and
    the horseshoe prior keep their defaults (returns nothing for them).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = np.vstack([rng.poisson(np.r_[np.full(5, 9.0), np.zeros(5)], (20, 10)),
    ...                rng.poisson(np.r_[np.zeros(5), np.full(5, 9.0)], (20, 10))]).astype(float)
    >>> cfg = TopicModelConfig(("rna",), (10,), ("multinomial",), n_topics=2)
    >>> Z = kmeans_decoder_init(cfg, {"rna": X}, {}, seed=0)["dec/rna/Z_loc"]
    >>> sorted((Z[:, :5].mean(1) > Z[:, 5:].mean(1)).tolist())   # one topic per planted block
    [False, True]
    """
    if cfg.horseshoe:
        return {}
    mods = [m for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"]
    if not mods:
        return {}
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"kmeans_decoder_init: mix must be in (0, 1], got {mix}")
    rows, rng = kmeans_rows(data[mods[0]].shape[0], seed, n_cells)
    return kmeans_from_rows(cfg, {m: data[m][rows] for m in mods}, buffers, rng, mix=mix, dtype=dtype)


def kmeans_rows(n_total: int, seed: int = 0, n_cells: int = 2000):
    """The cells :func:`kmeans_decoder_init` clusters: ``(sorted row positions, generator)``, a draw of
    ``min(n_total, n_cells)`` of ``n_total`` rows without replacement keyed by (seed, 7302); the
    generator continues into the k-means seeding.

    Examples
    --------
    >>> kmeans_rows(10, 0, 3)[0].size
    3
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7302]))
    rows = np.sort(rng.choice(int(n_total), size=min(int(n_total), int(n_cells)), replace=False))
    return rows, rng


def kmeans_from_rows(cfg: TopicModelConfig, sub: dict, buffers: dict, rng, *, mix: float = 0.5,
                     dtype=np.float64) -> dict[str, np.ndarray]:
    """:func:`kmeans_decoder_init` on the already drawn rows ``sub[m]`` (:func:`kmeans_rows`): a small
    input independent of the data size, gathered from the shards in a fit."""
    import scipy.sparse as sp
    from scipy.cluster.vq import kmeans2

    if not 0.0 < mix <= 1.0:
        raise ValueError(f"kmeans_decoder_init: mix must be in (0, 1], got {mix}")
    mods = [m for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"]
    if cfg.horseshoe or not mods:
        return {}
    K = cfg.n_topics
    n_rows = sub[mods[0]].shape[0]
    prof = {}
    for m in mods:
        X = sub[m]
        X = sp.csr_matrix(X, dtype=np.float64) if not sp.issparse(X) else X.tocsr().astype(np.float64)
        lib = np.asarray(X.sum(axis=1)).ravel()
        P = sp.diags(1.0 / np.where(lib > 0, lib, 1.0)) @ X  # normalised profiles (0 rows stay 0)
        prof[m] = (P.tocsr(), lib > 0)
    # Hellinger: sqrt of a profile has unit norm, so every present modality weighs the same; the dense
    # (cells x all features) input of k-means is filled in row blocks (one dense copy, not two)
    feats = np.empty((n_rows, sum(prof[m][0].shape[1] for m in mods)))
    off = 0
    for m in mods:
        P = prof[m][0]
        for lo in range(0, n_rows, 256):
            feats[lo:lo + 256, off:off + P.shape[1]] = P[lo:lo + 256].sqrt().toarray()
        off += P.shape[1]
    if n_rows < K:
        raise ValueError(f"kmeans_decoder_init: {n_rows} cells for {K} topics; need at least K cells")
    _, label = kmeans2(feats, K, iter=20, minit="++", seed=rng)
    out = {}
    for m in mods:
        P, present = prof[m]
        pbar = np.asarray(P[present].mean(axis=0)).ravel()
        Z = np.empty((K, P.shape[1]))
        for k in range(K):
            sel = (label == k) & present
            pk = np.asarray(P[sel].mean(axis=0)).ravel() if sel.any() else pbar
            pt = mix * pk + (1.0 - mix) * pbar
            Z[k] = np.log(np.maximum(pt, 1e-12))
        b = np.asarray(buffers.get(f"b0/{m}", np.zeros(P.shape[1])), dtype=np.float64)
        Z = Z - b[None, :]
        out[f"dec/{m}/Z_loc"] = (Z - Z.mean(axis=1, keepdims=True)).astype(dtype)
    return out
