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
from ._config import (
    BATCH_DELTA_DF,
    BATCH_DELTA_SCALE,
    BATCH_TAU_AB,
    EPS32,
    HS_EPS,
    HS_SLAB_AB,
    TopicModelConfig,
)
from ._nn import clamppos, clampsym, encoder_backward, encoder_forward, lower_median, normalize_counts
from ._params import sigmoid, softplus
from ._sparse import (
    SparseBlocks,
    csr_like,
    entry_row_sums,
    is_sparse,
    row_ids,
    row_sums,
    sddmm,
    to_dense,
    xp_of,
)
from ._special import digamma, gammaln

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2_OVER_PI = math.log(2.0 / math.pi)
_ENT_EPS = 1e-5
_MU_FLOOR = 1e-8
_MASK_LOGIT = -1e5


def softmax(t, axis=-1):
    """Softmax along ``axis`` (max-shifted).

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([0.0, np.log(3.0)])).tolist()
    [0.25, 0.75]
    """
    xp = get_xp(t)
    e = xp.exp(t - t.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(y, dy, axis=-1):
    """Vector-Jacobian product of the softmax: :math:`\\partial t = y\\odot(\\partial y - \\sum y\\,\\partial y)`."""
    return y * (dy - (y * dy).sum(axis=axis, keepdims=True))


# --------------------------------------------------------------------------- global latents


def global_draws(params: dict, gnoise: dict, cfg: TopicModelConfig, buffers: dict) -> dict:
    """One joint reparameterised draw of the global latents (§2.1, §2.3).

    .. math::
        Z_m = M^\\phi_m + \\mathrm{sp}(S^\\phi_m)\\odot E_m,\\quad
        b_m = b^0_m + \\text{bg\\_loc}_m + \\mathrm{sp}(\\text{bg\\_scale}_m)\\odot e_m,\\quad
        d_m = \\exp(\\text{loc} + \\mathrm{sp}(\\text{scale})\\,e),\\quad
        \\varsigma_m = \\exp(\\text{loc} + \\mathrm{sp}(\\text{scale})\\odot e)

    With the horseshoe prior :math:`Z_m = \\beta_m\\odot\\tilde\\lambda_m` (:func:`horseshoe_draw`); with
    decoder batch offsets also :math:`\\tau^b_m = \\sigma(\\text{tb\\_loc} + \\mathrm{sp}(\\text{tb\\_scale})\\,e)`
    and :math:`\\Delta_m = \\text{delta\\_loc} + \\mathrm{sp}(\\text{delta\\_scale})\\odot e` (§1.5).

    Returns ``{"Z/{m}", "b/{m}" (background modalities), "d/{m}" (learned NB dispersion),
    "sigma/{m}" (Gaussian), "tb/{m}", "delta/{m}" (batch offsets)}``.
    """
    xp = get_xp(*params.values())
    out = {}
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        d = f"dec/{m}/"
        if cfg.horseshoe:
            out[f"Z/{m}"] = horseshoe_draw(params, gnoise, m)[0]
        else:
            out[f"Z/{m}"] = params[f"{d}Z_loc"] + softplus(params[f"{d}Z_scale"], xp) * gnoise[f"E/{m}"]
        if cfg.batch_offsets:
            out[f"tb/{m}"] = sigmoid(params[f"{d}tb_loc"] + softplus(params[f"{d}tb_scale"], xp) * gnoise[f"e_tb/{m}"], xp)
            out[f"delta/{m}"] = params[f"{d}delta_loc"] + softplus(params[f"{d}delta_scale"], xp) * gnoise[f"e_delta/{m}"]
        if cfg.has_background(m):
            b = buffers[f"b0/{m}"]
            if cfg.learns_background(m):
                b = b + params[f"{d}bg_loc"] + softplus(params[f"{d}bg_scale"], xp) * gnoise[f"e_bg/{m}"]
            out[f"b/{m}"] = b
        if cfg.learns_dispersion(m):
            out[f"d/{m}"] = xp.exp(params[f"{d}disp_loc"] + softplus(params[f"{d}disp_scale"], xp) * gnoise[f"e_disp/{m}"])
        if lik == "gaussian":
            out[f"sigma/{m}"] = xp.exp(
                params[f"{d}sigma_loc"] + softplus(params[f"{d}sigma_scale"], xp) * gnoise[f"e_sigma/{m}"]
            )
    return out


def global_draws_backward(params: dict, gnoise: dict, draws: dict, dgrads: dict, cfg: TopicModelConfig) -> dict:
    """Chain gradients w.r.t. the draws (keys ``draw/Z/{m}`` ...) into the variational parameters.

    :math:`\\partial M = \\partial Z`, :math:`\\partial S = \\partial Z\\odot E\\odot\\sigma(S)`; for the
    log-normal latents :math:`\\partial\\,\\text{loc} = \\partial d\\cdot d` and
    :math:`\\partial\\,\\text{scale} = \\partial d\\cdot d\\,e\\,\\sigma(\\text{scale})`.
    """
    xp = get_xp(*params.values())
    g = {}
    for m in cfg.modalities:
        d = f"dec/{m}/"
        dZ = dgrads.get(f"draw/Z/{m}")
        if dZ is not None and cfg.horseshoe:
            g.update(horseshoe_draw_backward(params, gnoise, m, dZ))
        elif dZ is not None:
            g[f"{d}Z_loc"] = dZ
            g[f"{d}Z_scale"] = dZ * gnoise[f"E/{m}"] * sigmoid(params[f"{d}Z_scale"], xp)
        dtb = dgrads.get(f"draw/tb/{m}")
        if dtb is not None:
            tb = draws[f"tb/{m}"]
            dv = dtb * tb * (1.0 - tb)
            g[f"{d}tb_loc"] = dv
            g[f"{d}tb_scale"] = dv * gnoise[f"e_tb/{m}"] * sigmoid(params[f"{d}tb_scale"], xp)
        ddl = dgrads.get(f"draw/delta/{m}")
        if ddl is not None:
            g[f"{d}delta_loc"] = ddl
            g[f"{d}delta_scale"] = ddl * gnoise[f"e_delta/{m}"] * sigmoid(params[f"{d}delta_scale"], xp)
        db = dgrads.get(f"draw/b/{m}")
        if db is not None and cfg.learns_background(m):
            g[f"{d}bg_loc"] = db
            g[f"{d}bg_scale"] = db * gnoise[f"e_bg/{m}"] * sigmoid(params[f"{d}bg_scale"], xp)
        for name, e in (("disp", "e_disp"), ("sigma", "e_sigma")):
            key = "d" if name == "disp" else "sigma"
            dd = dgrads.get(f"draw/{key}/{m}")
            if dd is not None:
                val = draws[f"{key}/{m}"]
                g[f"{d}{name}_loc"] = dd * val
                g[f"{d}{name}_scale"] = dd * val * gnoise[f"{e}/{m}"] * sigmoid(params[f"{d}{name}_scale"], xp)
    return g


def kl_normal(mu, s, mu0, s0):
    """:math:`\\sum_i\\big[\\log(s_{0,i}/s_i) + (s_i^2 + (\\mu_i-\\mu_{0,i})^2)/(2s_{0,i}^2) - \\tfrac12\\big]` (§3.1).

    Returns ``(value, d/dmu, d/ds)``.

    Examples
    --------
    >>> import numpy as np
    >>> float(kl_normal(np.zeros(2), np.ones(2), 0.0, 1.0)[0])
    0.0
    """
    xp = get_xp(mu, s)
    val = (xp.log(s0 / s) + (s * s + (mu - mu0) ** 2) / (2.0 * s0 * s0) - 0.5).sum()
    return val, (mu - mu0) / (s0 * s0), -1.0 / s + s / (s0 * s0)


def _lognormal_halfcauchy_mc(loc, raw, e, xp):
    """One-sample :math:`\\log q(d) - \\log p(d)` for :math:`q=\\mathrm{LogNormal}(\\text{loc}, \\mathrm{sp}(\\text{raw}))`,
    :math:`p=\\mathrm{HalfCauchy}(1)`, at :math:`d=\\exp(\\text{loc}+\\mathrm{sp}(\\text{raw})e)`:

    .. math:: f = -\\text{loc} - s e - \\log s - \\tfrac12\\log 2\\pi - \\tfrac{e^2}2 - \\log\\tfrac2\\pi + \\log(1+d^2)

    Returns ``(value, d/dloc, d/draw)`` (total derivatives through the reparameterised sample).
    """
    s = softplus(raw, xp)
    d = xp.exp(loc + s * e)
    val = (-loc - s * e - xp.log(s) - 0.5 * _LOG_2PI - 0.5 * e * e - _LOG_2_OVER_PI + xp.log1p(d * d)).sum()
    t = 2.0 * d * d / (1.0 + d * d)
    dloc = -1.0 + t
    ds = -e - 1.0 / s + t * e
    return val, dloc, ds * sigmoid(raw, xp)


def global_kl(params: dict, gnoise: dict, cfg: TopicModelConfig, buffers: dict) -> tuple[float, dict]:
    """Global KL terms :math:`\\mathcal G` (not yet multiplied by :math:`\\beta`) and their gradient (§3.1).

    .. math::
        \\mathcal G = \\sum_m \\mathrm{KL}(\\mathcal N(M^\\phi_m,\\mathrm{sp}(S^\\phi_m)^2)\\,\\|\\,\\mathcal N(0,(\\sigma^\\phi_m)^2))
        + \\mathrm{KL}(q(u_m)\\,\\|\\,\\mathcal N(0,I)) + [\\log q - \\log p](d_m) + [\\log q - \\log p](\\varsigma_m)

    The horseshoe replaces the first term by :func:`horseshoe_kl`; batch offsets add the one-sample
    :math:`[\\log q - \\log p](\\tau^b_m)` (logit-normal vs Beta(0.5, 0.5)) and
    :math:`[\\log q - \\log p](\\Delta_m)` (Normal vs StudentT(10, 0, 0.01)) (§3.1).
    """
    xp = get_xp(*params.values())
    total = 0.0
    g = {}
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        d = f"dec/{m}/"
        if cfg.horseshoe:
            val, gh = horseshoe_kl(params, gnoise, m)
            total += val
            g.update(gh)
        else:
            raw = params[f"{d}Z_scale"]
            val, dmu, ds = kl_normal(params[f"{d}Z_loc"], softplus(raw, xp), 0.0, buffers[f"phi_sd/{m}"])
            total += float(val)
            g[f"{d}Z_loc"] = dmu
            g[f"{d}Z_scale"] = ds * sigmoid(raw, xp)
        if cfg.batch_offsets:
            for name, fn in (("tb", _logitnormal_beta_mc), ("delta", _normal_studentt_mc)):
                val, dloc, draw = fn(params[f"{d}{name}_loc"], params[f"{d}{name}_scale"], gnoise[f"e_{name}/{m}"], xp)
                total += float(val)
                g[f"{d}{name}_loc"] = dloc
                g[f"{d}{name}_scale"] = draw
        if cfg.learns_background(m):
            raw = params[f"{d}bg_scale"]
            val, dmu, ds = kl_normal(params[f"{d}bg_loc"], softplus(raw, xp), 0.0, 1.0)
            total += float(val)
            g[f"{d}bg_loc"] = dmu
            g[f"{d}bg_scale"] = ds * sigmoid(raw, xp)
        for name, e, on in (
            ("disp", "e_disp", cfg.learns_dispersion(m)),
            ("sigma", "e_sigma", lik == "gaussian"),
        ):
            if on:
                val, dloc, draw = _lognormal_halfcauchy_mc(
                    params[f"{d}{name}_loc"], params[f"{d}{name}_scale"], gnoise[f"{e}/{m}"], xp
                )
                total += float(val)
                g[f"{d}{name}_loc"] = dloc
                g[f"{d}{name}_scale"] = draw
    return total, g


def _lognormal_invgamma_mc(loc, raw, e, xp, a=HS_SLAB_AB, b=HS_SLAB_AB):
    """One-sample :math:`\\log q(c) - \\log p(c)` for :math:`q=\\mathrm{LogNormal}(\\text{loc},\\mathrm{sp}(\\text{raw}))`,
    :math:`p=\\mathrm{InvGamma}(a, b)`, at :math:`c = e^\\ell`, :math:`\\ell=\\text{loc}+s e`:

    .. math:: f = a\\ell + b e^{-\\ell} - \\log s - \\tfrac12\\log2\\pi - \\tfrac{e^2}2 - a\\log b + \\log\\Gamma(a),
              \\qquad \\partial f/\\partial\\ell = a - b e^{-\\ell}

    Returns ``(value, d/dloc, d/draw)``.
    """
    s = softplus(raw, xp)
    ell = loc + s * e
    val = (a * ell + b * xp.exp(-ell) - xp.log(s) - 0.5 * _LOG_2PI - 0.5 * e * e - a * math.log(b) + math.lgamma(a)).sum()
    dl = a - b * xp.exp(-ell)
    return val, dl, (dl * e - 1.0 / s) * sigmoid(raw, xp)


def _logitnormal_beta_mc(loc, raw, e, xp, a=BATCH_TAU_AB, b=BATCH_TAU_AB):
    """One-sample :math:`\\log q(\\tau) - \\log p(\\tau)`, :math:`\\tau=\\sigma(v)`, :math:`v=\\text{loc}+s e`,
    :math:`q` logit-normal (the Jacobian :math:`-\\log\\tau(1-\\tau)` included), :math:`p=\\mathrm{Beta}(a,b)`:

    .. math:: f = a\\,\\mathrm{sp}(-v) + b\\,\\mathrm{sp}(v) + \\log B(a,b) - \\log s - \\tfrac12\\log2\\pi - \\tfrac{e^2}2,
              \\qquad \\partial f/\\partial v = b\\tau - a(1-\\tau)

    Returns ``(value, d/dloc, d/draw)``.
    """
    s = softplus(raw, xp)
    v = loc + s * e
    lbeta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    val = (a * softplus(-v, xp) + b * softplus(v, xp) + lbeta - xp.log(s) - 0.5 * _LOG_2PI - 0.5 * e * e).sum()
    t = sigmoid(v, xp)
    dv = b * t - a * (1.0 - t)
    return val, dv, (dv * e - 1.0 / s) * sigmoid(raw, xp)


def _normal_studentt_mc(loc, raw, e, xp, df=BATCH_DELTA_DF, scale=BATCH_DELTA_SCALE):
    """One-sample :math:`\\log q(\\Delta) - \\log p(\\Delta)`, :math:`q=\\mathcal N(\\text{loc},\\mathrm{sp}(\\text{raw})^2)`,
    :math:`p=\\mathrm{StudentT}(\\nu, 0, \\sigma)`, at :math:`\\Delta=\\text{loc}+s e`:

    .. math:: f = -\\log s - \\tfrac12\\log2\\pi - \\tfrac{e^2}2 - \\log\\Gamma(\\tfrac{\\nu+1}2) + \\log\\Gamma(\\tfrac\\nu2)
              + \\tfrac12\\log(\\nu\\pi) + \\log\\sigma + \\tfrac{\\nu+1}2\\log(1+\\Delta^2/(\\nu\\sigma^2)),
              \\qquad \\partial f/\\partial\\Delta = \\frac{(\\nu+1)\\Delta}{\\nu\\sigma^2+\\Delta^2}

    Returns ``(value, d/dloc, d/draw)``.
    """
    s = softplus(raw, xp)
    x = loc + s * e
    const = -math.lgamma((df + 1) / 2) + math.lgamma(df / 2) + 0.5 * math.log(df * math.pi) + math.log(scale)
    val = (-xp.log(s) - 0.5 * _LOG_2PI - 0.5 * e * e + const + 0.5 * (df + 1) * xp.log1p(x * x / (df * scale * scale))).sum()
    dx = (df + 1) * x / (df * scale * scale + x * x)
    return val, dx, (dx * e - 1.0 / s) * sigmoid(raw, xp)


_HS_LOGNORMAL = ("c", "tau", "delta", "lam")


def horseshoe_draw(params: dict, gnoise: dict, m: str):
    """Reparameterised horseshoe logits of modality ``m`` (§1.3b):

    .. math::
        \\ell_g = \\text{loc}_g + \\mathrm{sp}(\\text{scale}_g)\\odot e_g\\ (g = c,\\tau,\\delta,\\lambda),\\quad
        u_{kf} = (\\tau_k\\delta_f\\lambda_{kf})^2,\\quad D = c^2 + u + 10^{-8},\\quad
        \\tilde\\lambda = \\sqrt{c^2u/D},\\quad Z = \\beta\\odot\\tilde\\lambda

    with :math:`\\beta = \\text{loc}_\\beta + \\mathrm{sp}(\\text{scale}_\\beta)\\odot e_\\beta`.
    Returns ``(Z, parts)`` with ``parts = (beta, lt, c2, u, D)``.

    Examples
    --------
    >>> from atlasfit.models.topic import TopicModelConfig, init_params, draw_global_noise
    >>> cfg = TopicModelConfig(("rna",), (5,), ("multinomial",), n_topics=2, topic_feature_prior_type="horseshoe")
    >>> Z, _ = horseshoe_draw(init_params(cfg), draw_global_noise(cfg, (0,)), "rna")
    >>> Z.shape
    (2, 5)
    """
    xp = get_xp(*params.values())
    d = f"dec/{m}/"
    ell = {g: params[f"{d}hs_{g}_loc"] + softplus(params[f"{d}hs_{g}_scale"], xp) * gnoise[f"e_hs_{g}/{m}"] for g in _HS_LOGNORMAL}
    beta = params[f"{d}hs_beta_loc"] + softplus(params[f"{d}hs_beta_scale"], xp) * gnoise[f"e_hs_beta/{m}"]
    s = ell["tau"][:, None] + ell["delta"][None, :] + ell["lam"]
    c2 = xp.exp(2.0 * ell["c"])
    u = xp.exp(2.0 * s)
    D = c2 + u + HS_EPS
    lt = xp.exp(ell["c"] + s - 0.5 * xp.log(D))
    return beta * lt, (beta, lt, c2, u, D)


def horseshoe_draw_backward(params: dict, gnoise: dict, m: str, dZ) -> dict:
    """Chain :math:`\\partial Z` into the horseshoe variational parameters of modality ``m``.

    :math:`\\partial\\beta = \\partial Z\\odot\\tilde\\lambda`; with :math:`r = \\partial Z\\odot\\beta\\odot\\tilde\\lambda`,
    :math:`\\partial\\ell_\\lambda = r(c^2+10^{-8})/D`, :math:`\\partial\\ell_\\tau = \\sum_f\\partial\\ell_\\lambda`,
    :math:`\\partial\\ell_\\delta = \\sum_k\\partial\\ell_\\lambda`, :math:`\\partial\\ell_c = \\sum_{kf} r(u+10^{-8})/D`;
    then :math:`\\partial\\,\\text{loc} = \\partial\\ell`, :math:`\\partial\\,\\text{scale} = \\partial\\ell\\odot e\\odot\\sigma(\\text{scale})`.
    """
    xp = get_xp(dZ)
    d = f"dec/{m}/"
    _, (beta, lt, c2, u, D) = horseshoe_draw(params, gnoise, m)
    r = dZ * beta * lt
    dlam = r * (c2 + HS_EPS) / D
    dell = {
        "lam": dlam,
        "tau": dlam.sum(axis=1),
        "delta": dlam.sum(axis=0),
        "c": (r * (u + HS_EPS) / D).sum(keepdims=True).reshape(1),
        "beta": dZ * lt,
    }
    g = {}
    for name, dl in dell.items():
        g[f"{d}hs_{name}_loc"] = dl
        g[f"{d}hs_{name}_scale"] = dl * gnoise[f"e_hs_{name}/{m}"] * sigmoid(params[f"{d}hs_{name}_scale"], xp)
    return g


def horseshoe_kl(params: dict, gnoise: dict, m: str) -> tuple[float, dict]:
    """Horseshoe terms of :math:`\\mathcal G` for modality ``m`` (§3.1) and their gradient:
    analytic :math:`\\mathrm{KL}(q(\\beta)\\|\\mathcal N(0,1))`, one-sample LogNormal vs
    :math:`\\mathrm{InvGamma}(0.5,0.5)` for :math:`c` and LogNormal vs HalfCauchy(1) for
    :math:`\\tau,\\delta,\\lambda`.
    """
    xp = get_xp(*params.values())
    d = f"dec/{m}/"
    raw = params[f"{d}hs_beta_scale"]
    val, dmu, ds = kl_normal(params[f"{d}hs_beta_loc"], softplus(raw, xp), 0.0, 1.0)
    total = float(val)
    g = {f"{d}hs_beta_loc": dmu, f"{d}hs_beta_scale": ds * sigmoid(raw, xp)}
    for name in _HS_LOGNORMAL:
        fn = _lognormal_invgamma_mc if name == "c" else _lognormal_halfcauchy_mc
        val, dloc, draw = fn(params[f"{d}hs_{name}_loc"], params[f"{d}hs_{name}_scale"], gnoise[f"e_hs_{name}/{m}"], xp)
        total += float(val)
        g[f"{d}hs_{name}_loc"] = dloc
        g[f"{d}hs_{name}_scale"] = draw
    return total, g


def topic_feature_logits(params: dict, cfg: TopicModelConfig, m: str):
    """Plug-in topic-feature logits :math:`\\bar Z_m` (K, F_m) at the variational means (§5).

    Logistic normal: :math:`M^\\phi_m`. Horseshoe: :math:`\\text{loc}_\\beta\\odot\\tilde\\lambda` with
    :math:`c,\\tau,\\delta,\\lambda` at their LogNormal means :math:`e^{\\text{loc}+\\mathrm{sp}(\\text{scale})^2/2}`.
    Background and batch offsets are not included.

    Examples
    --------
    >>> from atlasfit.models.topic import TopicModelConfig, init_params
    >>> cfg = TopicModelConfig(("rna",), (5,), ("multinomial",), n_topics=2, topic_feature_prior_type="horseshoe")
    >>> topic_feature_logits(init_params(cfg), cfg, "rna").shape
    (2, 5)
    """
    d = f"dec/{m}/"
    if not cfg.horseshoe:
        return params[f"{d}Z_loc"]
    xp = get_xp(*params.values())
    ell = {g: params[f"{d}hs_{g}_loc"] + 0.5 * softplus(params[f"{d}hs_{g}_scale"], xp) ** 2 for g in _HS_LOGNORMAL}
    s = ell["tau"][:, None] + ell["delta"][None, :] + ell["lam"]
    D = xp.exp(2.0 * ell["c"]) + xp.exp(2.0 * s) + HS_EPS
    return params[f"{d}hs_beta_loc"] * xp.exp(ell["c"] + s - 0.5 * xp.log(D))


# --------------------------------------------------------------------------- likelihoods


def loglik_multinomial(x, rho):
    """Multinomial without coefficient (§1.7): :math:`\\sum_f\\tilde x_f\\log\\mathrm{clip}(\\rho_f,\\varepsilon_{32},1-\\varepsilon_{32})`.

    Returns ``(log p per cell, d log p / d rho)``. The reference's renormalisation
    :math:`\\rho/\\sum_f\\rho` is the identity on the simplex and leaves parameter gradients unchanged
    (its Jacobian only removes a per-cell constant, which the softmaxes annihilate), so it is omitted.

    Examples
    --------
    >>> import numpy as np
    >>> lp, g = loglik_multinomial(np.array([[2.0, 0.0]]), np.array([[0.5, 0.5]]))
    >>> round(float(lp[0]), 6), g.tolist()
    (-1.386294, [[4.0, 0.0]])
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.maximum(x, 0.0))
    rc = xp.clip(rho, EPS32, 1.0 - EPS32)
    ok = ((rho > EPS32) & (rho < 1.0 - EPS32)).astype(rho.dtype)
    return (xt * xp.log(rc)).sum(axis=1), xt / rc * ok


def loglik_nb_fixed(x, rho, lib, r):
    """NB with fixed size :math:`r` (§1.7): :math:`\\mu = \\max(\\ell\\rho, 10^{-8})`, :math:`p = \\mathrm{clip}(\\mu/(\\mu+r))`,

    .. math:: \\log p(\\tilde x) = \\log\\Gamma(\\tilde x+r) - \\log\\Gamma(r) - \\log\\Gamma(\\tilde x+1) + r\\log(1-p) + \\tilde x\\log p

    Returns ``(log p per cell, d log p / d rho)``.

    Examples
    --------
    >>> import numpy as np
    >>> lp, g = loglik_nb_fixed(np.array([[1.0]]), np.array([[1.0]]), np.array([1.0]), 1.0)
    >>> round(float(lp[0]), 6)
    -1.386294
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.maximum(x, 0.0))
    mu_raw = lib[:, None] * rho
    mu = xp.maximum(mu_raw, _MU_FLOOR)
    p = mu / (mu + r)
    pc = xp.clip(p, EPS32, 1.0 - EPS32)
    ok = ((p > EPS32) & (p < 1.0 - EPS32) & (mu_raw > _MU_FLOOR)).astype(rho.dtype)
    lp = gammaln(xt + r) - gammaln(xp.asarray(r, dtype=rho.dtype)) - gammaln(xt + 1.0) + r * xp.log1p(-pc) + xt * xp.log(pc)
    dp = xt / pc - r / (1.0 - pc)
    return lp.sum(axis=1), dp * ok * (r / (mu + r) ** 2) * lib[:, None]


def loglik_nb_learned(x, rho, lib, d):
    """Gamma-Poisson with size :math:`a = 1/(d^2+10^{-8})` and mean :math:`\\mu=\\max(\\ell\\rho,10^{-8})` (§1.7):

    .. math:: \\log p = \\log\\Gamma(\\tilde x+a) - \\log\\Gamma(a) - \\log\\Gamma(\\tilde x+1)
              + a\\log\\frac a{a+\\mu} + \\tilde x\\log\\frac\\mu{a+\\mu}

    Returns ``(log p per cell, d log p/d rho, d log p/d d)`` with the last summed over cells (and over
    features when ``d`` has shape (1,)), using :math:`\\partial a/\\partial d = -2d/(d^2+10^{-8})^2` (§3.7).
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.maximum(x, 0.0))
    mu_raw = lib[:, None] * rho
    mu = xp.maximum(mu_raw, _MU_FLOOR)
    den = d * d + 1e-8
    a = 1.0 / den
    lam = xp.log(a + mu)
    lp = gammaln(xt + a) - gammaln(a) - gammaln(xt + 1.0) + a * (xp.log(a) - lam) + xt * (xp.log(mu) - lam)
    dmu = xt / mu - (a + xt) / (a + mu)
    da = digamma(xt + a) - digamma(a) + xp.log(a) + 1.0 - lam - (a + xt) / (a + mu)
    da_sum = da.sum(axis=0)
    if d.shape[0] == 1:
        da_sum = da_sum.sum(keepdims=True)
    dd = da_sum * (-2.0 * d / (den * den))
    return lp.sum(axis=1), dmu * (mu_raw > _MU_FLOOR).astype(rho.dtype) * lib[:, None], dd


def loglik_bernoulli(x, rho, scale, link: str = "clip"):
    """Bernoulli (§1.7) with :math:`q_{nf}=\\rho_{nf}s_n`,
    :math:`\\log p = \\sum_f\\tilde x\\log p + (1-\\tilde x)\\log(1-p)`, :math:`\\tilde x=\\mathrm{round}(\\mathrm{clip}(x,0,1))`.

    ``link="clip"`` (the reference): :math:`p=\\mathrm{clip}(\\min(q,1),\\varepsilon_{32},1-\\varepsilon_{32})`;
    the gradient is zero wherever :math:`q` leaves :math:`(\\varepsilon_{32}, 1-\\varepsilon_{32})`, so a
    topic whose features saturate (:math:`q\\ge1`) gets no signal to come back.
    ``link="cloglog"``: :math:`p = 1-e^{-q}` (a feature is open when a Poisson(:math:`q`) count is
    positive, the binarised-count model), smooth for every :math:`q>0`:
    :math:`\\partial\\log p/\\partial q = \\tilde x/(e^q-1) - (1-\\tilde x)`. For small :math:`q` both agree.

    ``scale`` is :math:`s_n` (:math:`\\ell_n` for ``bernoulli_scaling="depth"``,
    :math:`\\ell_n/\\bar\\ell` for ``"reference"``). Returns ``(log p per cell, d log p / d rho)``.
    """
    xp = get_xp(x, rho)
    xt = xp.round(xp.clip(x, 0.0, 1.0))
    q = rho * scale[:, None]
    if link == "cloglog":
        ok = (q > EPS32).astype(rho.dtype)
        qc = xp.maximum(q, EPS32)
        lp = (xt * xp.log(-xp.expm1(-qc)) - (1.0 - xt) * qc).sum(axis=1)
        return lp, (xt / xp.expm1(qc) - (1.0 - xt)) * ok * scale[:, None]
    if link != "clip":
        raise ValueError(f"bernoulli link {link!r}: use 'clip' or 'cloglog'")
    pm = xp.minimum(q, 1.0)
    pc = xp.clip(pm, EPS32, 1.0 - EPS32)
    ok = ((q > EPS32) & (q < 1.0 - EPS32)).astype(rho.dtype)
    lp = (xt * xp.log(pc) + (1.0 - xt) * xp.log1p(-pc)).sum(axis=1)
    return lp, (xt / pc - (1.0 - xt) / (1.0 - pc)) * ok * scale[:, None]


def sparse_kernel_ok(cfg: TopicModelConfig, m: str) -> bool:
    """Whether modality ``m`` has sparse-exact kernels (a CSR minibatch stays sparse): the
    multinomial and the ``"cloglog"`` Bernoulli likelihoods without a spatial encoder. The other
    likelihoods (NB, Gaussian, the reference ``"clip"`` Bernoulli) and ``spatial_mode="sgc"/"gcn"``
    densify that modality's minibatch rows.

    Examples
    --------
    >>> cfg = TopicModelConfig(("rna", "atac"), (5, 6), ("multinomial", "gamma_poisson"), n_topics=2)
    >>> sparse_kernel_ok(cfg, "rna"), sparse_kernel_ok(cfg, "atac")
    (True, False)
    """
    if cfg.spatial_mode is not None:
        return False
    lik = cfg.likelihood(m)
    return lik == "multinomial" or (lik == "bernoulli" and cfg.bernoulli_link == "cloglog")


def loglik_multinomial_sparse(X, rho):
    """:func:`loglik_multinomial` on a CSR minibatch ``X`` (B, F) with ``rho`` given only at its
    stored entries (:func:`~._sparse.sddmm`): a zero count contributes :math:`0\\cdot\\log\\rho = 0`, so

    .. math:: \\log p_n = \\sum_{f:\\,x_{nf}\\neq0}\\tilde x_{nf}\\log\\mathrm{clip}(\\rho_{nf}),\\qquad
              \\partial\\log p_n/\\partial\\rho_{nf} = \\tilde x_{nf}/\\mathrm{clip}(\\rho_{nf})\\ \\text{(0 elsewhere)}

    :math:`O(\\mathrm{nnz})`. Returns ``(log p per cell, gradient at the stored entries)``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> lp, g = loglik_multinomial_sparse(sp.csr_matrix(np.array([[2.0, 0.0]])), np.array([0.5]))
    >>> round(float(lp[0]), 6), g.tolist()
    (-1.386294, [4.0])
    """
    xp = xp_of(X)
    xt = xp.round(xp.maximum(X.data, 0.0))
    rc = xp.clip(rho, EPS32, 1.0 - EPS32)
    ok = ((rho > EPS32) & (rho < 1.0 - EPS32)).astype(rho.dtype)
    return entry_row_sums(X, xt * xp.log(rc)), xt / rc * ok


def loglik_bernoulli_sparse(X, rho, scale, rho_rowsum, rows=None):
    """Complementary log-log Bernoulli (:func:`loglik_bernoulli` with ``link="cloglog"``) on a CSR
    minibatch ``X`` (B, F), :math:`O(\\mathrm{nnz})`.

    With :math:`q_{nf} = s_n\\rho_{nf}` and :math:`\\log(1-p_{nf}) = -q_{nf}`, the sum over the zeros is
    the sum over all features minus the sum over the ones:

    .. math:: \\log p_n = \\sum_{f:\\,\\tilde x_{nf}=1}\\big[\\log(1-e^{-\\max(q_{nf},\\varepsilon_{32})}) + q_{nf}\\big]
              - s_n\\sum_f\\rho_{nf}

    where :math:`\\sum_f\\rho_{nf} = \\theta_n\\cdot\\sum_f\\phi_{\\cdot f}` is ``rho_rowsum`` (B,), and
    ``rho`` holds :math:`\\rho` at the stored entries only. The gradient splits into a part at the
    stored entries and a rank-1 part that every feature of cell :math:`n` shares:

    .. math:: \\frac{\\partial\\log p_n}{\\partial\\rho_{nf}} = \\tilde x_{nf}\\,s_n\\Big(\\frac{[q_{nf}>\\varepsilon_{32}]}{e^{q_{nf}}-1} + 1\\Big) - s_n

    Difference from the dense kernel: it clamps :math:`q` at :math:`\\varepsilon_{32}` for the zeros
    too (:math:`-\\max(q,\\varepsilon_{32})`, zero gradient below), while here the zeros use the exact
    :math:`-q`; the two differ only where :math:`q_{nf} < 1.2\\cdot10^{-7}`.

    Returns ``(log p per cell, gradient at the stored entries, rank-1 gradient (B,))``.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> X = sp.csr_matrix(np.array([[1.0, 0.0]]))
    >>> lp, g, u = loglik_bernoulli_sparse(X, np.array([0.25]), np.array([2.0]), np.array([1.0]))
    >>> bool(np.isclose(lp[0], np.log(1 - np.exp(-0.5)) - 1.5)), u.tolist()
    (True, [-2.0])
    """
    xp = xp_of(X)
    if rows is None:
        rows = row_ids(X)
    xt = xp.round(xp.clip(X.data, 0.0, 1.0))
    se = scale[rows]
    q = rho * se
    ok = (q > EPS32).astype(rho.dtype)
    qc = xp.maximum(q, EPS32)
    em = xp.expm1(qc)
    lp = entry_row_sums(X, xt * (xp.log(-xp.expm1(-qc)) + q)) - scale * rho_rowsum
    return lp, xt * se * (ok / em + 1.0), -scale


def loglik_gaussian(x, mean, sigma):
    """Gaussian (§1.7): :math:`\\sum_f -\\tfrac12\\log2\\pi - \\log\\varsigma_f - (x_f-\\mu^G_f)^2/(2\\varsigma_f^2)`.

    Returns ``(log p per cell, d/d mean, d/d sigma summed over cells)``.
    """
    r = x - mean
    s2 = sigma * sigma
    xp = get_xp(x, mean)
    lp = (-0.5 * _LOG_2PI - xp.log(sigma) - r * r / (2.0 * s2)).sum(axis=1)
    dsig = (-1.0 / sigma + r * r / (s2 * sigma)).sum(axis=0)
    return lp, r / s2, dsig


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
    (:func:`~atlasfit.models.topic._spatial.neighbourhood`).
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


def _bernoulli_scale(cfg: TopicModelConfig, m: str, lib, bern_depth):
    """:math:`s_n`: the depth :math:`\\ell_n` or :math:`\\ell_n/\\bar\\ell` (§1.7)."""
    if cfg.bernoulli_scaling == "depth":
        return lib
    ref = lib.mean() if bern_depth is None else bern_depth[m]
    if not float(ref) > 0:
        raise ValueError(
            f"modality {m!r}: mean depth is 0, so bernoulli_scaling='reference' is undefined; "
            "use bernoulli_scaling='depth' or drop empty cells"
        )
    return lib / ref


def _sparse_likelihood(cfg: TopicModelConfig, m: str, lik: str, X, theta, draws: dict, batch, bern_depth, entry: dict):
    """Sparse-exact likelihood of modality ``m`` for the CSR rows ``X`` (B, F): :math:`\\rho` only at
    the stored entries, :math:`O(\\mathrm{nnz}\\cdot K)` (:func:`~._sparse.sddmm`).

    With decoder batch offsets there are :math:`P` topic-feature matrices :math:`\\phi^{(c)}`, one per
    batch present; they are stacked as a (P F, K) table and each entry's column :math:`f` of a cell
    of batch :math:`c` is read at row :math:`pF + f`. Fills ``entry`` for :func:`backward_cells`
    and returns :math:`\\log p` per cell.
    """
    xp = xp_of(X)
    F = X.shape[1]
    K = theta.shape[1]
    Z = draws[f"Z/{m}"]
    eta = Z + draws[f"b/{m}"][None, :] if cfg.has_background(m) else Z
    if cfg.batch_offsets:  # phi^(c) = softmax_f(eta + tb Delta_c), one per batch present
        tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
        bnp = to_numpy(batch)
        cbs = np.unique(bnp)
        phis = xp.stack([softmax(eta + tb[:, None] * dl[int(cb)][None, :], axis=1) for cb in cbs])
        bidx = xp.asarray(np.searchsorted(cbs, bnp))
    else:
        cbs, bidx = None, None
        phis = softmax(eta, axis=1)[None]
    P = phis.shape[0]
    phiT = xp.ascontiguousarray(phis.transpose(0, 2, 1).reshape(P * F, K))
    rows = row_ids(X)
    cols = X.indices if P == 1 else X.indices.astype(xp.int64) + bidx[rows].astype(xp.int64) * F
    rho = _rho_at_entries(theta, phis, phiT, X, rows, cols, bidx)
    entry.update(sparse=True, X=X, cols=cols, phis=phis, phiT=phiT, bidx=bidx, cbs=cbs, u=None)
    if lik == "multinomial":
        lp, g = loglik_multinomial_sparse(X, rho)
    else:
        r = phis.sum(axis=2)  # (P, K): sum_f phi_kf (1 up to rounding)
        rsum = theta @ r[0] if P == 1 else (theta * r[bidx]).sum(axis=1)
        s = _bernoulli_scale(cfg, m, xp.maximum(row_sums(X), 0.0), bern_depth)
        lp, g, u = loglik_bernoulli_sparse(X, rho, s, rsum, rows)
        entry.update(u=u, r=r)
    entry["g"] = g
    return lp


#: ρ at the stored entries comes from one dense θφ product (then a gather) when at least this
#: fraction of the minibatch's entries is stored: a BLAS product of B·F·K multiply-adds is then
#: faster than gathering nnz·K pairs (measured on one core with the planted atlas's 256-cell parts:
#: RNA rows 24% stored, 0.5 ms dense vs 4.5 ms gathered; peaks 3.5% stored, 1.0 ms vs 0.65 ms).
DENSE_RHO_FRACTION = 1.0 / 16.0


def _rho_at_entries(theta, phis, phiT, X, rows, cols, bidx):
    """:math:`\\rho_{nf} = \\theta_n\\cdot\\phi^{(c(n))}_{\\cdot f}` at the stored entries of ``X``: the sampled
    product :func:`~._sparse.sddmm` (:math:`O(\\mathrm{nnz}\\cdot K)`), or for a dense enough minibatch
    (:data:`DENSE_RHO_FRACTION`) the dense product read at the entries (the same sums)."""
    xp = xp_of(theta)
    B, F = X.shape
    if X.nnz < DENSE_RHO_FRACTION * B * F:
        return sddmm(theta, phiT, rows, cols)
    if phis.shape[0] == 1:
        R = theta @ phis[0]
    else:
        R = xp.empty((B, F), dtype=theta.dtype)
        for p in range(phis.shape[0]):
            idx = xp.flatnonzero(bidx == p)
            R[idx] = theta[idx] @ phis[p]
    return xp.take(R.ravel(), rows.astype(xp.int64) * F + X.indices)


def _sparse_likelihood_backward(cfg: TopicModelConfig, entry: dict, theta, c: float, draws: dict, m: str, g: dict):
    """Backward of :func:`_sparse_likelihood` with :math:`G = c\\,\\partial\\log p/\\partial\\rho`
    (stored entries plus the Bernoulli rank-1 part :math:`u_n\\mathbf 1^\\top`):

    .. math:: \\partial\\theta_n \\mathrel{+}= \\sum_f G_{nf}\\phi^{(c(n))}_{\\cdot f} = G^{\\rm sp}_n\\phi^\\top + u_n r^{(c(n))},\\qquad
              A^{(c)} = \\sum_{n\\in c}\\theta_n^\\top G_n = (G^{\\rm sp}_c)^\\top\\theta_c + (\\textstyle\\sum_{n\\in c}\\theta_n u_n)\\mathbf 1^\\top

    (:math:`r^{(c)}_k = \\sum_f\\phi^{(c)}_{kf}`; both sparse products are :math:`O(\\mathrm{nnz}\\cdot K)`),
    then :math:`\\partial\\eta = \\sum_c \\mathrm{softmax\\_backward}(\\phi^{(c)}, A^{(c)})`. Returns
    :math:`\\partial\\theta` and fills ``g`` with the gradients w.r.t. the draws.
    """
    X, phis, phiT = entry["X"], entry["phis"], entry["phiT"]
    xp = xp_of(theta)
    P, K, F = phis.shape
    B = theta.shape[0]
    M = csr_like(X, c * entry["g"], shape=(B, P * F), indices=entry["cols"])
    dtheta = xp.asarray(M @ phiT)
    A = xp.asarray(M.T @ theta).reshape(P, F, K).transpose(0, 2, 1)  # (P, K, F)
    if entry["u"] is not None:
        cu = c * entry["u"]
        tu = theta * cu[:, None]
        r = entry["r"]
        if P == 1:
            dtheta = dtheta + cu[:, None] * r[0][None, :]
            A = A + tu.sum(axis=0)[None, :, None]
        else:
            bidx = entry["bidx"]
            dtheta = dtheta + cu[:, None] * r[bidx]
            onehot = (bidx[:, None] == xp.arange(P)[None, :]).astype(theta.dtype)
            A = A + (onehot.T @ tu)[:, :, None]
    de = softmax_backward(phis, A, axis=2)  # (P, K, F)
    if cfg.batch_offsets:
        tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
        cbs = xp.asarray(entry["cbs"])
        deta = de.sum(axis=0)
        g[f"draw/tb/{m}"] = (de * dl[cbs][:, None, :]).sum(axis=(0, 2))
        ddl = xp.zeros_like(dl)
        ddl[cbs] = (de * tb[None, :, None]).sum(axis=1)
        g[f"draw/delta/{m}"] = ddl
    else:
        deta = de[0]
    g[f"draw/Z/{m}"] = deta
    if cfg.has_background(m):
        g[f"draw/b/{m}"] = deta.sum(axis=0)
    return dtheta


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
            if xs.shape[1:] != (cfg.n_feat(m),) or adj.shape != (B, xs.shape[0]):
                raise ValueError(
                    f"modality {m!r}: graph['adj'] has shape {adj.shape} and graph['x_nbr'] {xs.shape}; "
                    f"expected ({B}, S) and (S, {cfg.n_feat(m)})"
                )
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
