"""Global latents of MultimodalAmortizedLDA (spec §1.3–§1.5, §3.4): the reparameterised draws of the
topic-feature logits, background, dispersion, Gaussian scale, batch offsets and horseshoe prior, their
backward, and the global KL term :math:`\\mathcal G` with its gradient. Used once per step on the
driver (and by every shard for the draws)."""

from __future__ import annotations

import math


from ..._xp import get_xp
from ._config import BATCH_DELTA_DF, BATCH_DELTA_SCALE, BATCH_TAU_AB, HS_EPS, HS_SLAB_AB, TopicModelConfig
from ._params import sigmoid, softplus

_LOG_2PI = math.log(2.0 * math.pi)
_LOG_2_OVER_PI = math.log(2.0 / math.pi)


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
