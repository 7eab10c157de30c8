"""Loss of MultimodalAmortizedLDA for one minibatch and its exact gradient (spec §1–§3).

The minimised loss (§3.1, §3.2) for a minibatch :math:`\\mathcal B` of the training data of size :math:`N` is

.. math::
    \\mathcal L = \\frac NB\\sum_{n\\in\\mathcal B}\\Big[-\\sum_m w_m\\log p_m(x_{nm}) + \\beta\\,\\mathrm{KL}_n
    + s\\,\\lambda_H H(\\theta_n)\\Big] + \\beta\\,\\mathcal G + s\\,\\lambda_V\\sum_k\\widehat{\\mathrm{Var}}_{n\\in\\mathcal B}(\\theta_{nk})

with :math:`s=+1` for ``regularizer_sign="reference"`` and :math:`-1` for ``"documented"`` (§3.3), and
:math:`\\mathcal G` the global KL terms (analytic for :math:`Z_m, u_m`; one-sample Monte Carlo for the
learned dispersion :math:`d_m` and the Gaussian scale :math:`\\varsigma_m`).

It is split for sharding (§3.6) into

* :func:`global_draws` / :func:`global_draws_backward`: the reparameterised global latents
  (:math:`Z_m = M^\\phi_m + \\mathrm{sp}(S^\\phi_m)\\odot E_m`, background, dispersion, Gaussian scale);
* :func:`forward_cells` / :func:`backward_cells`: everything per cell, for the rows one shard holds;
  the backward returns parameter gradients and gradients w.r.t. the global *draws*;
* :func:`global_kl`: :math:`\\mathcal G` and its gradient;
* :func:`loss_and_grad`: the single-process composition (what the finite-difference tests check).

Clamps (``clampsym``/``clamppos``, probability clips at float32 eps, the 1e-8 mean floor) have zero
derivative where active, as in autograd.
"""

from __future__ import annotations

import math

import numpy as np

from ..._xp import get_xp, to_numpy
from ._config import TopicModelConfig
from ._globals import (  # noqa: F401 - re-exported: the global latents are part of this module's API
    global_draws,
    global_draws_backward,
    global_kl,
    horseshoe_draw,
    horseshoe_draw_backward,
    horseshoe_kl,
    kl_normal,
    topic_feature_logits,
)
from ._likelihoods import (  # noqa: F401 - re-exported
    DENSE_RHO_FRACTION,
    _bernoulli_scale,
    _sparse_likelihood,
    _sparse_likelihood_backward,
    loglik_bernoulli,
    loglik_bernoulli_sparse,
    loglik_gaussian,
    loglik_multinomial,
    loglik_multinomial_sparse,
    loglik_nb_fixed,
    loglik_nb_learned,
    sparse_kernel_ok,
)
from ._nn import (  # noqa: F401 - softmax re-exported
    clamppos,
    clampsym,
    encoder_backward,
    encoder_forward,
    lower_median,
    normalize_counts,
    softmax,
    softmax_backward,
)
from ._sparse import (
    SparseBlocks,
    is_sparse,
    row_sums,
    to_dense,
    xp_of,
)

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2_OVER_PI = math.log(2.0 / math.pi)
_ENT_EPS = 1e-5
_MU_FLOOR = 1e-8
_MASK_LOGIT = -1e5


# --------------------------------------------------------------------------- aggregation


def masked_softmax(omega, present, clamp: bool = True):
    """Mixture weights :math:`w_{n\\cdot} = \\mathrm{softmax}_m(\\omega_{n\\cdot})` with absent modalities
    set to :math:`-10^5` (all absent gives uniform weights), §2.3. ``clamp`` applies clampsym to
    :math:`\\omega` first (weight modes; not for attention scores). Returns ``(w, ok)`` where ``ok`` is
    the derivative mask of the logits.

    Examples
    --------
    >>> import numpy as np
    >>> w, _ = masked_softmax(np.ones((1, 3)), np.array([[True, False, True]]))
    >>> w.round(3).tolist()
    [[0.5, 0.0, 0.5]]
    """
    xp = get_xp(omega)
    if clamp:
        oc, ok = clampsym(omega)
    else:
        oc, ok = omega, xp.ones_like(omega)
    presf = present.astype(omega.dtype)
    logits = xp.where(present, oc, _MASK_LOGIT)
    return softmax(logits, axis=1), ok * presf


def moment_match(w, mus, vs):
    """Collapse the weighted Gaussian mixture to one Gaussian with the same two moments (§2.3):

    .. math:: \\bar\\mu = \\mathrm{clampsym}\\Big(\\sum_m w_m\\mu_m\\Big),\\quad
              \\bar v = \\mathrm{clamppos}\\Big(\\sum_m w_m v_m + \\sum_m w_m(\\mu_m-\\bar\\mu)^2\\Big)

    ``w`` is (B, M); ``mus``, ``vs`` are (M, B, K). Returns ``(mbar, vbar, cache)``.
    """
    mraw = (w.T[:, :, None] * mus).sum(axis=0)
    mbar, ok_m = clampsym(mraw)
    dev = mus - mbar[None]
    vraw = (w.T[:, :, None] * (vs + dev * dev)).sum(axis=0)
    vbar, ok_v = clamppos(vraw)
    return mbar, vbar, (w, mus, vs, dev, ok_m, ok_v)


def moment_match_backward(dmbar, dvbar, cache):
    """Backward of :func:`moment_match`: returns ``(dmus, dvs, dw)`` (§3.7 "moment matching").

    :math:`\\partial\\mu_m = w_m\\partial\\bar\\mu + 2w_m(\\mu_m-\\bar\\mu)\\partial\\bar v`,
    :math:`\\partial v_m = w_m\\partial\\bar v`,
    :math:`\\partial w_m = \\sum_k[\\mu_m\\partial\\bar\\mu + (v_m + (\\mu_m-\\bar\\mu)^2)\\partial\\bar v]`,
    including the (normally zero) path through the clamped :math:`\\bar\\mu` inside :math:`\\bar v`.
    """
    w, mus, vs, dev, ok_m, ok_v = cache
    dvraw = dvbar * ok_v
    wT = w.T[:, :, None]
    dmbar_tot = dmbar - 2.0 * dvraw * (wT * dev).sum(axis=0)
    dmraw = dmbar_tot * ok_m
    dmus = wT * dmraw[None] + 2.0 * wT * dev * dvraw[None]
    dvs = wT * dvraw[None]
    dw = ((mus * dmraw[None]).sum(axis=2) + ((vs + dev * dev) * dvraw[None]).sum(axis=2)).T
    return dmus, dvs, dw


# --------------------------------------------------------------------------- per-cell forward / backward


def _as_xp(v, xp, dtype):
    return xp.asarray(v, dtype=dtype)


def forward_cells(
    params: dict,
    x: dict,
    cnoise: dict,
    cfg: TopicModelConfig,
    buffers: dict,
    draws: dict,
    *,
    lib_median: dict | None = None,
    bern_depth: dict | None = None,
    cell_omega=None,
    batch=None,
    cont_covariates=None,
    enc_inputs: dict | None = None,
    graph: dict | None = None,
) -> tuple[dict, dict]:
    """Per-cell forward pass for the rows ``x[m]`` (B, F_m) of one minibatch part.

    Encoders (§2.2) -> mixture weights and moment matching (§2.3) -> :math:`z_n=\\bar\\mu_n+\\sqrt{\\bar v_n}\\epsilon_n`,
    :math:`\\theta_n=\\mathrm{softmax}(z_n)` -> per-modality likelihoods (§1.6, §1.7), cell KL, entropy.

    ``lib_median[m]``: median library for the encoder input (``None``: lower median of this part);
    ``bern_depth[m]``: :math:`\\bar\\ell` for ``bernoulli_scaling="reference"`` (``None``: mean of this part);
    ``cell_omega``: (B, M) rows of :math:`\\Omega` for ``weight_mode="cell"``.

    Extensions (all off by default): ``batch`` (B,) integer batch codes (decoder offsets, one-hot
    encoder covariate); ``cont_covariates`` (B, P) continuous encoder covariates; ``enc_inputs[m]``
    precomputed encoder inputs (B, F_m (L+1)) for ``spatial_mode="sgc"``
    (:func:`~atlasfit.models.topic._spatial.sgc_features` rows); ``graph = {"adj": (B, S) rows of
    the normalised adjacency restricted to the neighbourhood (or ``{m: ...}`` per modality),
    "x_nbr": {m: (S, F_m) raw rows of the neighbourhood}}`` for ``spatial_mode="gcn"``
    (:func:`~atlasfit.models.topic._spatial.neighbourhood`); with ``gcn_n_layers`` > 1 ``"adj"`` holds
    the list of layer blocks of a :class:`~atlasfit.models.topic._sampling.LayeredGraph`.
    Encoder inputs are :math:`[\\hat x, \\text{cont}, \\text{onehot}]` (§2.2).

    Returns ``(cache, stats)``; ``stats`` holds sums over the rows: ``nll`` (weighted
    :math:`-\\sum_m w_m\\log p_m`), ``nll/{m}`` (unweighted), ``kl``, ``entropy``, ``theta_sum``,
    ``theta_sq_sum``, ``n`` and BatchNorm sums ``bn/{m}/{l}/s1``, ``bn/{m}/{l}/s2``.
    """
    first = x[cfg.modalities[0]]
    xp = xp_of(first)
    dtype = first.dtype
    B = first.shape[0]
    K = cfg.n_topics
    mus, vs, enc_caches, present = [], [], [], []
    stats: dict = {"n": B}
    for m in cfg.modalities:
        if x[m].shape != (B, cfg.n_feat(m)):
            raise ValueError(f"modality {m!r}: minibatch has shape {x[m].shape}, expected ({B}, {cfg.n_feat(m)})")
    # CSR rows stay sparse where the modality has sparse-exact kernels; otherwise only they are densified
    x = {m: (to_dense(x[m]) if is_sparse(x[m]) and not sparse_kernel_ok(cfg, m) else x[m]) for m in cfg.modalities}
    batch, inputs = encoder_inputs(
        cfg, x, lib_median=lib_median, batch=batch, cont_covariates=cont_covariates, enc_inputs=enc_inputs, graph=graph
    )
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        xm = x[m]
        present.append(row_sums(xm) > 0)
        xh, gcn = inputs[m]
        masks = [cnoise[f"drop/{m}/{l}"] for l in range(cfg.n_layers)]
        mu, v, c, bn_sums = encoder_forward(
            params, f"enc/{m}/", xh, masks, cfg.n_layers, cfg.bn_eps, cfg.var_eps, gcn=gcn
        )
        for l, (s1, s2) in enumerate(bn_sums):
            stats[f"bn/{m}/{l}/s1"] = s1
            stats[f"bn/{m}/{l}/s2"] = s2
        mus.append(mu)
        vs.append(v)
        enc_caches.append(c)
    mus = xp.stack(mus)  # (M, B, K)
    vs = xp.stack(vs)
    pres = xp.stack(present, axis=1)  # (B, M)

    att_cache = None
    if cfg.aggregation == "attention":
        t = xp.tanh(mus @ params["att/W"])  # (M, B, a)
        omega = (t @ params["att/u"]).T  # (B, M)
        att_cache = t
        w, ok_w = masked_softmax(omega, pres, clamp=False)
    else:
        if cfg.weight_mode == "equal":
            omega = xp.ones((B, cfg.n_modalities), dtype=dtype)
        elif cfg.weight_mode == "universal":
            omega = xp.broadcast_to(params["mix/omega"][None, :], (B, cfg.n_modalities))
        else:
            if cell_omega is None or cell_omega.shape != (B, cfg.n_modalities):
                raise ValueError(
                    f"weight_mode='cell' needs cell_omega of shape ({B}, {cfg.n_modalities}) for the minibatch rows"
                )
            omega = cell_omega
        w, ok_w = masked_softmax(omega, pres, clamp=True)
    mbar, vbar, mm_cache = moment_match(w, mus, vs)
    sd = xp.sqrt(vbar)
    eps = cnoise["eps_z"]
    z = mbar + sd * eps
    theta = softmax(z, axis=1)

    prior_mu = _as_xp(buffers["prior_mu"], xp, dtype)
    prior_sd = _as_xp(buffers["prior_sd"], xp, dtype)
    kl_cell = (xp.log(prior_sd) - 0.5 * xp.log(vbar) + (vbar + (mbar - prior_mu) ** 2) / (2.0 * prior_sd**2) - 0.5).sum()
    ent = -(theta * xp.log(theta + _ENT_EPS)).sum()

    liks = []
    nll = 0.0
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        xm = x[m]
        wm = float(buffers[f"lik_w/{m}"])
        Z = draws[f"Z/{m}"]
        entry = {"lik": lik, "w": wm}
        if cfg.batch_offsets:
            tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
        if lik == "gaussian":
            mean = theta @ Z
            if cfg.batch_offsets:  # mean_n = theta_n (Z + tb Delta_c(n)) = theta_n Z + (theta_n . tb) Delta_c(n)
                s_n = theta @ tb
                dlb = dl[batch]
                mean = mean + s_n[:, None] * dlb
                entry.update(s_n=s_n, dlb=dlb)
            lp, dmean, dsig = loglik_gaussian(xm, mean, draws[f"sigma/{m}"])
            entry.update(dmean=dmean, dsig=dsig)
        elif is_sparse(xm):
            lp = _sparse_likelihood(cfg, m, lik, xm, theta, draws, batch, bern_depth, entry)
        else:
            eta = Z + draws[f"b/{m}"][None, :] if cfg.has_background(m) else Z
            if cfg.batch_offsets:  # phi^(c) = softmax_f(eta + tb Delta_c), one per batch present
                phi = []
                rho = xp.empty((B, xm.shape[1]), dtype=dtype)
                for cb in np.unique(to_numpy(batch)):
                    idx = xp.flatnonzero(batch == int(cb))
                    ph = softmax(eta + tb[:, None] * dl[int(cb)][None, :], axis=1)
                    rho[idx] = theta[idx] @ ph
                    phi.append((int(cb), idx, ph))
            else:
                phi = softmax(eta, axis=1)
                rho = theta @ phi
            lib = xp.maximum(row_sums(xm), 0.0)
            if lik == "multinomial":
                lp, drho = loglik_multinomial(xm, rho)
            elif lik == "bernoulli":
                s = _bernoulli_scale(cfg, m, lib, bern_depth)
                lp, drho = loglik_bernoulli(xm, rho, s, cfg.bernoulli_link)
            elif cfg.learns_dispersion(m):
                lp, drho, dd = loglik_nb_learned(xm, rho, lib, draws[f"d/{m}"])
                entry["dd"] = dd
            else:
                lp, drho = loglik_nb_fixed(xm, rho, lib, cfg.dispersion)
            entry.update(phi=phi, drho=drho)
        s_lp = -lp.sum()
        stats[f"nll/{m}"] = s_lp
        nll = nll + wm * s_lp
        liks.append(entry)
    stats.update(
        nll=nll,
        kl=kl_cell,
        entropy=ent,
        theta_sum=theta.sum(axis=0),
        theta_sq_sum=(theta * theta).sum(axis=0),
    )
    cache = dict(
        mus=mus, vs=vs, pres=pres, w=w, ok_w=ok_w, att=att_cache, mm=mm_cache, mbar=mbar, vbar=vbar,
        sd=sd, eps=eps, theta=theta, liks=liks, enc=enc_caches, prior_mu=prior_mu, prior_sd=prior_sd,
        draws=draws, batch=batch,
    )
    return cache, stats


def encoder_inputs(
    cfg: TopicModelConfig,
    x: dict,
    *,
    lib_median: dict | None = None,
    batch=None,
    cont_covariates=None,
    enc_inputs: dict | None = None,
    graph: dict | None = None,
):
    """Encoder inputs of every modality for the rows ``x[m]`` (B, F_m), training or eval (§2.2, §4).

    :math:`\\hat x` is the depth-normalised log1p input (raw for Gaussian modalities or
    ``normalize_encoder_inputs=False``; the SGC rows ``enc_inputs[m]`` for ``spatial_mode="sgc"``),
    followed by the covariate blocks :math:`[\\hat x, \\text{cont}, \\text{onehot}]`. For
    ``spatial_mode="gcn"`` the neighbourhood rows ``graph["x_nbr"][m]`` are normalised with the same
    median as the minibatch (the given ``lib_median[m]``, else the rows' lower median).

    Returns ``(batch, {m: (xh, gcn)})``: the validated batch codes (``None`` without a categorical
    covariate) and per modality the first-layer input and ``gcn = (adj, xs)`` or ``None``, ready for
    :func:`~atlasfit.models.topic._nn.encoder_forward` / ``encoder_eval``.

    Examples
    --------
    >>> import numpy as np
    >>> cfg = TopicModelConfig(("rna",), (3,), ("multinomial",), n_topics=2, n_batches=2, encode_covariates=True)
    >>> b, ins = encoder_inputs(cfg, {"rna": np.ones((2, 3))}, lib_median={"rna": 3.0}, batch=np.array([1, 0]))
    >>> ins["rna"][0].round(4).tolist()
    [[0.6931, 0.6931, 0.6931, 0.0, 1.0], [0.6931, 0.6931, 0.6931, 1.0, 0.0]]
    """
    first = x[cfg.modalities[0]]
    xp = xp_of(first)
    dtype = first.dtype
    B = first.shape[0]
    batch, cov_blocks = _covariate_inputs(cfg, B, batch, cont_covariates, xp, dtype)
    if cfg.spatial_mode == "sgc" and enc_inputs is None:
        raise ValueError("spatial_mode='sgc' needs enc_inputs (the precomputed SGC features of these cells, sgc_features)")
    if cfg.spatial_mode != "sgc" and enc_inputs is not None:
        raise ValueError("enc_inputs (precomputed SGC features) are only used with spatial_mode='sgc'")
    if cfg.spatial_mode == "gcn" and (graph is None or "adj" not in graph or "x_nbr" not in graph):
        raise ValueError("spatial_mode='gcn' needs graph={'adj': (B, S) normalised adjacency rows, 'x_nbr': {m: (S, F_m)}}")
    out = {}
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        xm = x[m]
        raw_input = lik == "gaussian" or not cfg.normalize_encoder_inputs
        med = None if lib_median is None else lib_median[m]
        gcn = None
        if cfg.spatial_mode == "gcn":
            xs = graph["x_nbr"][m]
            adj = graph["adj"][m] if isinstance(graph["adj"], dict) else graph["adj"]
            _check_graph_blocks(cfg, m, adj, xs, B)
            if not raw_input:
                if med is None:  # the minibatch median of these rows, as for the minibatch itself
                    med = lower_median(xp.maximum(xp.maximum(row_sums(xm), 0.0), 1.0))
                xs = normalize_counts(xs, med)
            gcn = (adj, xs)
        if enc_inputs is not None:
            xh = enc_inputs[m]
            want = (B, cfg.n_feat(m) * (cfg.sgc_n_layers + 1))
            if xh.shape != want:
                raise ValueError(
                    f"modality {m!r}: enc_inputs has shape {xh.shape}, expected {want} (sgc_n_layers={cfg.sgc_n_layers})"
                )
        elif raw_input:
            xh = xm
        else:
            xh = normalize_counts(xm, med)
        if cov_blocks and is_sparse(xh):  # CSR input: covariates as a dense block beside it
            xh = SparseBlocks(xh, cov_blocks[0] if len(cov_blocks) == 1 else xp.concatenate(cov_blocks, axis=1))
        elif cov_blocks:
            xh = xp.concatenate([xh] + cov_blocks, axis=1)
        out[m] = (xh, gcn)
    return batch, out


def _check_graph_blocks(cfg: TopicModelConfig, m: str, adj, xs, B: int):
    """The layer blocks ``adj`` (one matrix or a list of ``gcn_n_layers``, input side first) chain
    from the (S, F_m) node inputs ``xs`` to the B minibatch rows."""
    blocks = list(adj) if isinstance(adj, (list, tuple)) else [adj]
    shapes = [tuple(a.shape) for a in blocks]
    if len(blocks) != cfg.gcn_n_layers:
        raise ValueError(f"modality {m!r}: graph['adj'] has {len(blocks)} layer blocks but gcn_n_layers="
                         f"{cfg.gcn_n_layers}; build them with _sampling.layered_subgraph(..., n_layers={cfg.gcn_n_layers})")
    ok = xs.shape[1:] == (cfg.n_feat(m),) and shapes[0][1] == xs.shape[0] and shapes[-1][0] == B
    ok = ok and all(shapes[j][0] == shapes[j + 1][1] for j in range(len(shapes) - 1))
    if not ok:
        raise ValueError(
            f"modality {m!r}: graph['adj'] has shapes {shapes} and graph['x_nbr'] {tuple(xs.shape)}; expected "
            f"(S, {cfg.n_feat(m)}) node inputs and blocks chaining S nodes to the {B} minibatch rows"
        )


def _covariate_inputs(cfg: TopicModelConfig, B: int, batch, cont, xp, dtype):
    """Validated batch codes (or None) and the encoder covariate blocks ``[cont, onehot]`` (§2.2)."""
    if cfg.needs_batch:
        if batch is None:
            raise ValueError(
                f"the model has a categorical covariate (n_batches={cfg.n_batches}): pass batch= integer codes "
                "in [0, n_batches) for the minibatch rows"
            )
        batch = xp.asarray(batch)
        if batch.shape != (B,):
            raise ValueError(f"batch codes have shape {batch.shape}; expected ({B},), one per minibatch row")
        bmin, bmax = int(batch.min()), int(batch.max())
        if bmin < 0 or bmax >= cfg.n_batches:
            raise ValueError(f"batch codes must be in [0, n_batches={cfg.n_batches}), got min {bmin}, max {bmax}")
        batch = batch.astype(xp.int64)
    else:
        batch = None
    blocks = []
    if cfg.n_cont_encoded:
        if cont is None or tuple(cont.shape) != (B, cfg.n_cont_encoded):
            got = None if cont is None else tuple(cont.shape)
            raise ValueError(f"cont_covariates must have shape ({B}, {cfg.n_cont_encoded}); got {got}")
        blocks.append(xp.asarray(cont, dtype=dtype))
    if cfg.n_onehot:
        blocks.append((batch[:, None] == xp.arange(cfg.n_batches)[None, :]).astype(dtype))
    return batch, blocks


def backward_cells(
    params: dict,
    cache: dict,
    cfg: TopicModelConfig,
    *,
    cell_scale: float,
    beta: float,
    n_batch: int,
    theta_bar,
) -> dict:
    """Gradient of this part's share of :math:`\\mathcal L` (see the module docstring).

    Objective differentiated: ``cell_scale`` :math:`\\cdot\\sum_n[-\\sum_m w_m\\log p_m + \\beta\\mathrm{KL}_n + s\\lambda_H H_n]`
    :math:`+\\, s\\lambda_V\\sum_k\\widehat{\\mathrm{Var}}`, whose derivative w.r.t. :math:`\\theta_{nk}` in
    the variance term is :math:`2(\\theta_{nk}-\\bar\\theta_k)/(B-1)` with the *global* minibatch mean
    ``theta_bar`` and size ``n_batch`` (§3.6 d; 0 when ``n_batch < 2``).

    Returns parameter gradients (``enc/...``, ``att/...``, ``mix/omega``), gradients w.r.t. the global
    draws (``draw/Z/{m}``, ``draw/b/{m}``, ``draw/d/{m}``, ``draw/sigma/{m}``) and ``omega_cell`` (B, M)
    for ``weight_mode="cell"``.
    """
    theta = cache["theta"]
    xp = get_xp(theta)
    g: dict = {}
    dtheta = xp.zeros_like(theta)
    for m, entry in zip(cfg.modalities, cache["liks"]):
        c = -cell_scale * entry["w"]
        Z = cache["draws"][f"Z/{m}"]
        if cfg.batch_offsets:
            tb, dl = cache["draws"][f"tb/{m}"], cache["draws"][f"delta/{m}"]
        if entry["lik"] == "gaussian":
            dmean = c * entry["dmean"]
            dtheta = dtheta + dmean @ Z.T
            g[f"draw/Z/{m}"] = theta.T @ dmean
            g[f"draw/sigma/{m}"] = c * entry["dsig"]
            if cfg.batch_offsets:
                q = (dmean * entry["dlb"]).sum(axis=1)
                dtheta = dtheta + q[:, None] * tb[None, :]
                g[f"draw/tb/{m}"] = theta.T @ q
                onehot = (cache["batch"][:, None] == xp.arange(cfg.n_batches)[None, :]).astype(theta.dtype)
                g[f"draw/delta/{m}"] = onehot.T @ (entry["s_n"][:, None] * dmean)
        elif entry.get("sparse"):
            dtheta = dtheta + _sparse_likelihood_backward(cfg, entry, theta, c, cache["draws"], m, g)
        elif cfg.batch_offsets:
            G = c * entry["drho"]
            deta = xp.zeros_like(Z)
            dtb = xp.zeros_like(tb)
            ddl = xp.zeros_like(dl)
            for cb, idx, ph in entry["phi"]:
                Gi = G[idx]
                dtheta[idx] = dtheta[idx] + Gi @ ph.T
                de = softmax_backward(ph, theta[idx].T @ Gi, axis=1)
                deta = deta + de
                dtb = dtb + (de * dl[cb][None, :]).sum(axis=1)
                ddl[cb] = ddl[cb] + (de * tb[:, None]).sum(axis=0)
            g[f"draw/Z/{m}"] = deta
            g[f"draw/tb/{m}"] = dtb
            g[f"draw/delta/{m}"] = ddl
            if cfg.has_background(m):
                g[f"draw/b/{m}"] = deta.sum(axis=0)
            if "dd" in entry:
                g[f"draw/d/{m}"] = c * entry["dd"]
        else:
            G = c * entry["drho"]
            phi = entry["phi"]
            dtheta = dtheta + G @ phi.T
            deta = softmax_backward(phi, theta.T @ G, axis=1)
            g[f"draw/Z/{m}"] = deta
            if cfg.has_background(m):
                g[f"draw/b/{m}"] = deta.sum(axis=0)
            if "dd" in entry:
                g[f"draw/d/{m}"] = c * entry["dd"]
    s = cfg.regularizer_factor
    if cfg.entropy_weight:
        dH = -xp.log(theta + _ENT_EPS) - theta / (theta + _ENT_EPS)
        dtheta = dtheta + (cell_scale * s * cfg.entropy_weight) * dH
    if cfg.topic_variance_weight and n_batch >= 2:
        tb = xp.asarray(theta_bar, dtype=theta.dtype)
        dtheta = dtheta + (2.0 * s * cfg.topic_variance_weight / (n_batch - 1)) * (theta - tb[None, :])
    dz = softmax_backward(theta, dtheta, axis=1)
    mbar, vbar, sd, eps = cache["mbar"], cache["vbar"], cache["sd"], cache["eps"]
    pm, psd = cache["prior_mu"], cache["prior_sd"]
    kc = cell_scale * beta
    dmbar = dz + kc * (mbar - pm) / psd**2
    dvbar = dz * eps / (2.0 * sd) + kc * (-0.5 / vbar + 0.5 / psd**2)
    dmus, dvs, dw = moment_match_backward(dmbar, dvbar, cache["mm"])
    # mixture weights -> logits
    w = cache["w"]
    domega = softmax_backward(w, dw, axis=1) * cache["ok_w"]
    if cfg.aggregation == "attention":
        t = cache["att"]  # (M, B, a)
        u = params["att/u"]
        g["att/u"] = (t * domega.T[:, :, None]).sum(axis=(0, 1))
        dpre = domega.T[:, :, None] * u[None, None, :] * (1.0 - t * t)
        g["att/W"] = xp.einsum("mbk,mba->ka", cache["mus"], dpre)
        dmus = dmus + dpre @ params["att/W"].T
    elif cfg.weight_mode == "universal":
        g["mix/omega"] = domega.sum(axis=0)
    elif cfg.weight_mode == "cell":
        g["omega_cell"] = domega
    for i, m in enumerate(cfg.modalities):
        g.update(encoder_backward(params, f"enc/{m}/", cache["enc"][i], dmus[i], dvs[i], cfg.n_layers))
    return g


def topic_variance(theta_sum, theta_sq_sum, n: int) -> float:
    """:math:`\\sum_k\\widehat{\\mathrm{Var}}_n(\\theta_{nk})` (unbiased) from the sums; 0 when ``n < 2``.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.array([[0.2, 0.8], [0.6, 0.4]])
    >>> round(topic_variance(t.sum(0), (t * t).sum(0), 2), 6)
    0.16
    """
    if n < 2:
        return 0.0
    s1 = np.asarray(to_numpy(theta_sum), dtype=np.float64)
    s2 = np.asarray(to_numpy(theta_sq_sum), dtype=np.float64)
    return float(((s2 - s1 * s1 / n) / (n - 1)).sum())


def combine_loss(stats: dict, cfg: TopicModelConfig, *, cell_scale: float, beta: float, global_value: float) -> float:
    """:math:`\\mathcal L` from summed per-cell statistics (§3.1): see the module docstring."""
    s = cfg.regularizer_factor
    n = int(stats["n"])
    per_cell = float(stats["nll"]) + beta * float(stats["kl"]) + s * cfg.entropy_weight * float(stats["entropy"])
    var = topic_variance(stats["theta_sum"], stats["theta_sq_sum"], n)
    return cell_scale * per_cell + beta * global_value + s * cfg.topic_variance_weight * var


def loss_and_grad(
    params: dict,
    x: dict,
    cnoise: dict,
    gnoise: dict,
    cfg: TopicModelConfig,
    buffers: dict,
    *,
    n_total: int,
    beta: float,
    lib_median: dict | None = None,
    bern_depth: dict | None = None,
    cell_omega=None,
    batch=None,
    cont_covariates=None,
    enc_inputs: dict | None = None,
    graph: dict | None = None,
) -> tuple[float, dict]:
    """Loss :math:`\\mathcal L` of one minibatch scaled to ``n_total`` cells (§3.2) and its gradient.

    Parameters
    ----------
    params
        Global parameters (:func:`~atlasfit.models.topic.init_params`).
    x
        Minibatch rows per modality, dense (B, F_m).
    cnoise, gnoise
        Per-cell and global noise (:func:`draw_cell_noise`, :func:`draw_global_noise`); fixing them
        makes the loss a deterministic function of the parameters.
    cfg, buffers
        Model configuration and fixed buffers (:func:`make_buffers`).
    n_total
        :math:`N`, the number of training cells (the per-cell terms are scaled by :math:`N/B`).
    beta
        KL weight :math:`\\beta_t` (:func:`kl_weight_schedule`).
    lib_median, bern_depth, cell_omega, batch, cont_covariates, enc_inputs, graph
        See :func:`forward_cells`.

    Returns
    -------
    loss, grads
        ``grads`` has one array per entry of ``params`` (same shape) plus ``omega_cell`` for
        ``weight_mode="cell"``.

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.models.topic import TopicModelConfig, init_params, make_buffers
    >>> from atlasfit.models.topic import draw_cell_noise, draw_global_noise
    >>> cfg = TopicModelConfig(("rna",), (6,), ("multinomial",), n_topics=2, n_hidden=4)
    >>> p = init_params(cfg)
    >>> x = {"rna": np.arange(24.0).reshape(4, 6)}
    >>> loss, g = loss_and_grad(p, x, draw_cell_noise(cfg, 4, (0,)), draw_global_noise(cfg, (0,)),
    ...                         cfg, make_buffers(cfg), n_total=40, beta=1.0)
    >>> sorted(g) == sorted(p)
    True
    """
    B = x[cfg.modalities[0]].shape[0]
    draws = global_draws(params, gnoise, cfg, buffers)
    cache, stats = forward_cells(
        params, x, cnoise, cfg, buffers, draws, lib_median=lib_median, bern_depth=bern_depth, cell_omega=cell_omega,
        batch=batch, cont_covariates=cont_covariates, enc_inputs=enc_inputs, graph=graph,
    )
    cell_scale = n_total / B
    theta_bar = stats["theta_sum"] / B
    gval, gkl = global_kl(params, gnoise, cfg, buffers)
    loss = combine_loss(stats, cfg, cell_scale=cell_scale, beta=beta, global_value=gval)
    gc = backward_cells(params, cache, cfg, cell_scale=cell_scale, beta=beta, n_batch=B, theta_bar=theta_bar)
    grads = {k: v for k, v in gc.items() if not k.startswith("draw/")}
    gd = global_draws_backward(params, gnoise, draws, gc, cfg)
    for k, v in gd.items():
        grads[k] = grads[k] + v if k in grads else v
    for k, v in gkl.items():
        grads[k] = grads[k] + beta * v if k in grads else beta * v
    for k, v in params.items():
        if k not in grads:
            grads[k] = get_xp(v).zeros_like(v)
    return loss, grads
