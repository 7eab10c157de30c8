"""Posterior summaries as functions of a fitted :class:`~atlasfit.models.topic.TopicFit` and rows of
data (spec §5, §7), shared by the driver (new data, in-memory cells) and the shard functions (the
per-epoch validation scores of a fit, computed where the rows live).

Every Monte-Carlo draw over cells is keyed by the cell's sample (its position among the registered
samples) and by the block of :data:`EVAL_BLOCK` cells within that sample, and every sum is taken per
sample and then over samples in sample order: a score does not depend on how samples are grouped
into shards, on the number of workers, or on memory settings.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ._loss import (
    global_draws,
    global_kl,
    loglik_bernoulli,
    loglik_gaussian,
    loglik_multinomial,
    loglik_nb_fixed,
    loglik_nb_learned,
    softmax,
)
from ._params import draw_global_noise
from ._train import TopicFit, guide_eval, topic_feature_dist

EVAL_BLOCK = 1024


def plugin_draws(fit: TopicFit) -> dict:
    """Global latents at their variational location (zero noise, §5 plug-in)."""
    p = fit.params
    zero = {k: np.zeros_like(v) for k, v in draw_global_noise(fit.cfg, (0,), p[next(iter(p))].dtype).items()}
    return global_draws(p, zero, fit.cfg, fit.buffers)


def rho(fit: TopicFit, m: str, theta, draws: dict, batch, phi=None):
    """:math:`\\rho_{nm} = \\theta_n\\phi^{(c(n))}_m` with :math:`\\phi^{(c)} = \\mathrm{softmax}_f(Z_m + b_m + \\tau^b_m\\Delta_{m,c})`
    (§1.5, §1.6); ``phi`` replaces the plug-in :math:`\\mathrm{softmax}(Z+b)` when given."""
    cfg = fit.cfg
    eta = draws[f"Z/{m}"] + draws[f"b/{m}"][None, :] if cfg.has_background(m) else draws[f"Z/{m}"]
    if not cfg.batch_offsets:
        return theta @ (softmax(eta, axis=1) if phi is None else phi)
    tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
    out = np.empty((theta.shape[0], eta.shape[1]), dtype=theta.dtype)
    for c in np.unique(batch):
        idx = np.flatnonzero(batch == c)
        out[idx] = theta[idx] @ softmax(eta + tb[:, None] * dl[int(c)][None, :], axis=1)
    return out


def loglik(fit: TopicFit, x: dict, theta, draws: dict, batch) -> dict:
    """Per-cell :math:`\\log p_m(x_{nm}\\mid\\theta_n, \\text{draws})` with the training likelihoods (§1.5-§1.7)."""
    cfg = fit.cfg
    out = {}
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        xm = x[m]
        if lik == "gaussian":
            mean = theta @ draws[f"Z/{m}"]
            if cfg.batch_offsets:
                mean = mean + (theta @ draws[f"tb/{m}"])[:, None] * draws[f"delta/{m}"][batch]
            out[m] = loglik_gaussian(xm, mean, draws[f"sigma/{m}"])[0]
            continue
        r = rho(fit, m, theta, draws, batch)
        lib = np.maximum(xm.sum(axis=1), 0.0)
        if lik == "multinomial":
            out[m] = loglik_multinomial(xm, r)[0]
        elif lik == "bernoulli":
            s = lib if cfg.bernoulli_scaling == "depth" else lib / fit.bern_depth[m]
            out[m] = loglik_bernoulli(xm, r, s, cfg.bernoulli_link)[0]
        elif cfg.learns_dispersion(m):
            out[m] = loglik_nb_learned(xm, r, lib, draws[f"d/{m}"])[0]
        else:
            out[m] = loglik_nb_fixed(xm, r, lib, cfg.dispersion)[0]
    return out


def elbo_draws(fit: TopicFit, n_samples: int, seed: int) -> tuple[list, float]:
    """The ``n_samples`` joint draws of the global latents of :func:`elbo_sums` (keyed by (seed, 7919,
    draw)) and the mean of their global KL term."""
    p, buf = fit.params, fit.buffers
    draws, gvals = [], []
    for s in range(max(1, int(n_samples))):
        gn = draw_global_noise(fit.cfg, (int(seed), 7919, s), p[next(iter(p))].dtype)
        draws.append(global_draws(p, gn, fit.cfg, buf))
        gvals.append(global_kl(p, gn, fit.cfg, buf)[0])
    return draws, float(np.mean(gvals))


def elbo_block(fit: TopicFit, x: dict, omega, extra: dict, draws: list, seed: int, key: tuple) -> float:
    """Sum over the block's cells of :math:`\\frac1S\\sum_s\\sum_m w_m\\log p_m - \\mathrm{KL}_n` (the cells'
    part of :meth:`~atlasfit.MultimodalAmortizedLDA.get_elbo`); the cells' noise is keyed by (seed,
    7920, draw, ``*key``), ``key`` = (sample position, first cell of the block in the sample)."""
    buf = fit.buffers
    _, mbar, vbar, batch = guide_eval(fit, x, omega=omega, **extra)
    prior_mu, prior_sd = buf["prior_mu"], buf["prior_sd"]
    kl = (np.log(prior_sd) - 0.5 * np.log(vbar) + (vbar + (mbar - prior_mu) ** 2) / (2 * prior_sd**2) - 0.5).sum()
    acc = -float(kl)
    S = len(draws)
    for s in range(S):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7920, s, *(int(k) for k in key)]))
        theta = softmax(mbar + np.sqrt(vbar) * rng.standard_normal(mbar.shape), axis=1)
        lp = loglik(fit, x, theta, draws[s], batch)
        acc += sum(float(buf[f"lik_w/{m}"]) * float(lp[m].sum()) for m in fit.cfg.modalities) / S
    return acc


def token_phis(fit: TopicFit) -> dict:
    """:math:`\\hat\\phi_m` with the background for every count modality (the per-token scores' :math:`\\rho`)."""
    cfg = fit.cfg
    return {m: topic_feature_dist(fit, m, include_background=True)
            for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"}


def token_sums(fit: TopicFit, x: dict, theta, batch, phis: dict, draws) -> dict:
    """``{m: (sum x log rho, sum x)}`` over the rows ``x`` (dense) for the count modalities ``phis``."""
    out = {}
    for m, phi in phis.items():
        xm = np.asarray(x[m], dtype=np.float64)
        r = theta @ phi if draws is None else rho(fit, m, theta, draws, batch)
        out[m] = (float((xm * np.log(np.clip(r, 1e-300, None))).sum()), float(xm.sum()))
    return out


def reduce_scores(per_sample: Iterable, fit: TopicFit, gmean: float, phis: dict) -> dict:
    """Combine per-sample ``(position, {"n", "elbo", "ll/<m>", "T/<m>"})`` in sample order into
    ``{"val_loss", "val_ll_per_token", "val_ll_per_token/<m>"}``."""
    items = sorted(per_sample, key=lambda t: t[0])
    acc, n_cells = 0.0, 0
    ll = {m: 0.0 for m in phis}
    T = {m: 0.0 for m in phis}
    for _, d in items:
        acc += d["elbo"]
        n_cells += d["n"]
        for m in phis:
            ll[m] += d[f"ll/{m}"]
            T[m] += d[f"T/{m}"]
    out = {"val_loss": -(acc / n_cells - gmean / fit.n_cells)}
    tot = sum(T.values())
    out["val_ll_per_token"] = sum(ll.values()) / tot if tot > 0 else float("nan")
    for m in phis:
        out[f"val_ll_per_token/{m}"] = ll[m] / T[m] if T[m] > 0 else float("nan")
    return out


def score_rows(fit: TopicFit, blocks, draws: list, seed: int, phis: dict, token_draws) -> dict:
    """ELBO and per-token sums of one sample's rows, given as blocks ``(key, x, omega, extra)``."""
    d = {"n": 0, "elbo": 0.0}
    for m in phis:
        d[f"ll/{m}"] = d[f"T/{m}"] = 0.0
    for key, x, om, extra in blocks:
        d["n"] += x[fit.cfg.modalities[0]].shape[0]
        d["elbo"] += elbo_block(fit, x, om, extra, draws, seed, key)
        _, mbar, _, batch = guide_eval(fit, x, omega=om, **extra)
        theta = np.asarray(softmax(mbar, axis=1), dtype=np.float64)
        for m, (a, t) in token_sums(fit, x, theta, batch, phis, token_draws).items():
            d[f"ll/{m}"] += a
            d[f"T/{m}"] += t
    return d


def shard_validation(state, fit: TopicFit, seed: int, n_samples: int) -> list:
    """Shard function: ``[(sample position, sums)]`` of :func:`score_rows` over the shard's validation
    rows, one entry per sample with validation cells."""
    val = state.get("val")
    if not val or not val["parts"]:
        return []
    cfg = fit.cfg
    dtype = state["dtype"]
    draws, _ = elbo_draws(fit, n_samples, seed)
    phis = token_phis(fit)
    tdraws = plugin_draws(fit) if cfg.batch_offsets else None
    out = []
    for idx, off, k in val["parts"]:
        if k == 0:
            continue

        def blocks(off=off, k=k, idx=idx):
            for lo in range(0, k, EVAL_BLOCK):
                r = np.arange(off + lo, off + min(k, lo + EVAL_BLOCK))
                x = {m: np.asarray(val["x"][m][r].toarray(), dtype=dtype) for m in cfg.modalities}
                extra = {}
                if "batch" in val:
                    extra["batch"] = val["batch"][r]
                if "cont" in val:
                    extra["cont_covariates"] = np.asarray(val["cont"][r], dtype=dtype)
                yield (idx, lo), x, None, extra

        out.append((idx, score_rows(fit, blocks(), draws, seed, phis, tdraws)))
    return out
