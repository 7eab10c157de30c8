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
import pandas as pd

from ._loss import (
    _sparse_likelihood,
    global_draws,
    global_kl,
    loglik_bernoulli,
    loglik_gaussian,
    loglik_multinomial,
    loglik_nb_fixed,
    loglik_nb_learned,
    softmax,
    sparse_kernel_ok,
)
from ._params import draw_global_noise, softplus
from ._ranking import DEFAULT_LAMBDA, check_ranking, feature_scores
from ._sparse import is_sparse, row_ids, sddmm
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


def eval_rows(cfg, x: dict, dtype) -> dict:
    """Rows to score: CSR (``dtype``, duplicates summed) for the modalities with sparse-exact kernels,
    dense rows for the others (NB, Gaussian, the ``clip`` link)."""
    out = {}
    for m in cfg.modalities:
        X = x[m]
        if is_sparse(X) and sparse_kernel_ok(cfg, m):
            X = X.tocsr().astype(dtype, copy=False)
            X.sum_duplicates()
            out[m] = X
        else:
            out[m] = np.asarray(X.toarray() if is_sparse(X) else X, dtype=dtype)
    return out


def loglik(fit: TopicFit, x: dict, theta, draws: dict, batch) -> dict:
    """Per-cell :math:`\\log p_m(x_{nm}\\mid\\theta_n, \\text{draws})` with the training likelihoods (§1.5-§1.7).

    CSR rows of a modality with sparse-exact kernels (multinomial, cloglog Bernoulli) are scored in
    :math:`O(\\mathrm{nnz}\\,K)` by the training kernels (the same log-likelihood; the Bernoulli zeros
    use the exact :math:`-q` where the dense kernel clamps :math:`q<1.2\\cdot10^{-7}`); other rows are
    densified."""
    cfg = fit.cfg
    out = {}
    for m, lik in zip(cfg.modalities, cfg.likelihoods):
        xm = x[m]
        if is_sparse(xm):
            if sparse_kernel_ok(cfg, m):
                out[m] = _sparse_likelihood(cfg, m, lik, xm.tocsr(), theta, draws, batch, fit.bern_depth, {})
                continue
            xm = xm.toarray()
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
    """``{m: (sum x log rho, sum x)}`` over the rows ``x`` for the count modalities ``phis``; CSR rows
    need :math:`\\rho` only at their stored entries (:math:`O(\\mathrm{nnz}\\,K)`; with decoder batch
    offsets the block's :math:`\\rho` is dense)."""
    out = {}
    for m, phi in phis.items():
        if is_sparse(x[m]):
            X = x[m].tocsr().astype(np.float64)
            X.sum_duplicates()
            if draws is None:
                r = sddmm(theta, np.ascontiguousarray(np.asarray(phi, dtype=np.float64).T), row_ids(X), X.indices)
            else:
                r = rho(fit, m, theta, draws, batch)[row_ids(X), X.indices]
            out[m] = (float((X.data * np.log(np.clip(r, 1e-300, None))).sum()), float(X.data.sum()))
            continue
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
                x = eval_rows(cfg, {m: val["x"][m][r] for m in cfg.modalities}, dtype)
                extra = {}
                if "batch" in val:
                    extra["batch"] = val["batch"][r]
                if "cont" in val:
                    extra["cont_covariates"] = np.asarray(val["cont"][r], dtype=dtype)
                yield (idx, lo), x, None, extra

        out.append((idx, score_rows(fit, blocks(), draws, seed, phis, tdraws)))
    return out


class _SummariesMixin:
    """The ``get_*`` posterior summaries of :class:`~atlasfit.MultimodalAmortizedLDA` (spec §5, §7)."""

    def get_latent_representation(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                                  batch_size: int = 4096, return_dataframe: bool = False):
        """Posterior mean topic proportions :math:`\\hat\\theta` (cells x K), spec §5.

        .. math:: \\hat\\theta_n = \\frac1S\\sum_{s=1}^S\\mathrm{softmax}(\\bar\\mu_n + \\sqrt{\\bar v_n}\\odot\\epsilon_s)

        in eval mode (BatchNorm running statistics, no dropout), with the dataset median library (so
        the result does not depend on ``batch_size``, §11 item 12), the trained aggregation (attention
        included, §11 item 10) and, for ``weight_mode="cell"``, each registered cell's own
        :math:`\\Omega` row (§11 item 9; validation and new cells get equal weights). ``n_samples=0``
        gives :math:`\\mathrm{softmax}(\\bar\\mu_n)`.

        Parameters
        ----------
        data
            ``None`` (the registered cells) or new data of the same kind as :meth:`from_data` takes,
            with the model's modalities and features.
        cells
            Subset: positions, obs names or a boolean mask.
        n_samples, seed, batch_size
            Monte-Carlo draws, their key, and rows per evaluation block.
        return_dataframe
            DataFrame indexed by obs names with columns ``topic_k``.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_latent_representation(cells=[0, 1]).sum(axis=1).round(6).tolist()
        [1.0, 1.0]
        """
        names, th = self._evaluate("theta", data, cells, {"n_samples": int(n_samples), "seed": int(seed),
                                                          "block": int(batch_size)})
        if return_dataframe:
            return pd.DataFrame(th, index=names, columns=[f"topic_{k}" for k in range(self.config.n_topics)])
        return th

    def get_cell_topic_dist(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                            batch_size: int = 4096, return_dataframe: bool = False):
        """The cell-topic matrix :math:`\\hat\\theta`; the same as :meth:`get_latent_representation`.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_cell_topic_dist(return_dataframe=True).shape
        (40, 3)
        """
        return self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed, batch_size=batch_size,
                                              return_dataframe=return_dataframe)

    def _phi(self, m, include_background, n_samples=0, seed=0) -> np.ndarray:
        self._check_trained()
        if m not in self.config.modalities:
            raise ValueError(f"unknown modality {m!r}; the model has {list(self.config.modalities)}")
        return topic_feature_dist(self._fit, m, include_background=include_background, n_samples=n_samples,
                                  seed=seed)

    def get_feature_topic_dist(self, modality: str | None = None, include_background: bool = False, *,
                               n_samples: int = 0, seed: int = 0, as_dict: bool = False):
        """Topic-feature distributions :math:`\\hat\\phi_{mk}` as features x topics DataFrames (§5).

        .. math:: \\hat\\phi_{mk} = \\mathrm{softmax}_f(M^\\phi_{mk} + b_m)

        at the variational means (``n_samples=0``) or the Monte-Carlo mean of
        :math:`\\mathrm{softmax}_f(M^\\phi_{mk} + \\mathrm{sp}(S^\\phi_{mk})\\odot e_s + b_m)`. ``b_m`` (the
        feature background :math:`b^0_m + \\text{bg\\_loc}_m`, ``gamma_poisson`` only) is included only
        with ``include_background=True``: that is the distribution the likelihood uses, while the
        default shows what each topic adds on top of the background (the reference's output, §11
        item 13). Gaussian modalities: the mean loadings :math:`M^\\phi_m` (no softmax). Horseshoe prior
        (§5): :math:`M^\\phi` is replaced by :math:`\\text{loc}_\\beta\\odot\\tilde\\lambda` with
        :math:`c,\\tau,\\delta,\\lambda` at their LogNormal means (plug-in; ``n_samples`` is ignored).

        Returns one modality's frame, ``{modality: frame}`` with ``as_dict=True``, or (``modality=None``)
        all modalities stacked with a (modality, feature) MultiIndex.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_feature_topic_dist("rna").sum(axis=0).round(6).tolist()
        [1.0, 1.0, 1.0]
        """
        self._check_trained()
        cols = [f"topic_{k}" for k in range(self.config.n_topics)]
        frames = {m: pd.DataFrame(self._phi(m, include_background, n_samples, seed).T,
                                  index=self.feature_names_[m], columns=cols)
                  for m in self.config.modalities}
        if as_dict:
            return frames
        if modality is not None:
            if modality not in frames:
                raise ValueError(f"unknown modality {modality!r}; the model has {list(frames)}")
            return frames[modality]
        return pd.concat(frames, names=["modality", "feature"])

    def get_elbo(self, data=None, cells=None, *, n_samples: int = 10, seed: int = 0) -> float:
        """Evidence lower bound per evaluated cell (higher is better), eval mode, :math:`\\beta=1`, no regularisers:

        .. math::
            \\mathrm{ELBO} = \\frac1C\\sum_{n=1}^{C}\\Big[\\frac1S\\sum_s\\sum_m w_m\\log p_m(x_{nm}\\mid\\theta_n^{(s)}, G^{(s)})
            - \\mathrm{KL}(\\mathcal N(\\bar\\mu_n,\\bar v_n)\\,\\|\\,\\mathcal N(\\mu_\\theta,\\sigma_\\theta^2))\\Big]
            - \\frac{1}{N}\\frac1S\\sum_s\\mathcal G^{(s)}

        with :math:`C` the evaluated cells, :math:`N` the training cells (the global KL
        :math:`\\mathcal G` is shared by the whole training set), :math:`S` joint draws of
        :math:`z_n` and of the global latents :math:`G` (keyed by ``seed``, draw and block of 1,024
        rows). No :math:`N/B` factor: a per-cell average, comparable across data sizes (§11 items 6-7).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(m.get_elbo() < 0)
        True
        """
        _, parts = self._evaluate("elbo", data, cells, {"n_samples": int(n_samples), "seed": int(seed)})
        n = sum(d["n"] for d in parts)
        if n == 0:
            raise ValueError("no cells to evaluate")
        acc = 0.0
        for d in parts:  # sample order
            acc += d["elbo"]
        _, gmean = elbo_draws(self._fit, n_samples, seed)
        return acc / n - gmean / self._fit.n_cells

    def _sums(self, what, data, cells, n_samples, seed, batch_size, mods) -> tuple[dict, dict]:
        """``({m: sum ll}, {m: sum T})`` over the samples' sums, added in sample order."""
        _, parts = self._evaluate(what, data, cells, {"n_samples": int(n_samples), "seed": int(seed),
                                                     "block": int(batch_size)})
        ll = {m: 0.0 for m in mods}
        T = {m: 0.0 for m in mods}
        for d in parts:
            for m in mods:
                ll[m] += d.get(f"ll/{m}", 0.0)
                T[m] += d.get(f"T/{m}", 0.0)
        return ll, T

    def _tokens(self, data, cells, n_samples, seed, batch_size):
        cfg = self.config
        mods = [m for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"]
        ll, T = self._sums("tokens", data, cells, n_samples, seed, batch_size, mods)
        tot_T = sum(T.values())
        if tot_T <= 0:
            raise ValueError("the evaluated cells have no counts in any count modality; perplexity is undefined")
        out = {m: ll[m] / T[m] if T[m] > 0 else float("nan") for m in mods}
        out["total"] = sum(ll.values()) / tot_T
        return out

    def get_perplexity(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                       batch_size: int = 4096) -> float:
        """Perplexity per token over the evaluated cells (lower is better):

        .. math:: \\exp\\Big(-\\frac{\\sum_{m}\\sum_{n,f} x_{nmf}\\log(\\hat\\theta_n\\hat\\phi_m)_f}{\\sum_m\\sum_{n,f}x_{nmf}}\\Big)

        over the count modalities (Bernoulli ones count as tokens; Gaussian modalities are left
        out), with :math:`\\hat\\theta` from :meth:`get_latent_representation` and
        :math:`\\hat\\phi_m` including the background (the likelihood's :math:`\\rho`). Unscaled sums over
        the cells, so not inflated by :math:`N/B` (§11 item 7); no multinomial coefficient.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(m.get_perplexity() > 1.0)
        True
        """
        return float(np.exp(-self._tokens(data, cells, n_samples, seed, batch_size)["total"]))

    def get_perplexity_per_modality(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                                    batch_size: int = 4096) -> dict:
        """``{modality: exp(-sum x log(theta phi) / sum x)}`` for each count modality (see :meth:`get_perplexity`).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> list(m.get_perplexity_per_modality())
        ['rna']
        """
        ll = self._tokens(data, cells, n_samples, seed, batch_size)
        return {m: float(np.exp(-v)) for m, v in ll.items() if m != "total"}

    def get_likelihood_per_modality(self, data=None, cells=None, *, per_token: bool = True, n_samples: int = 100,
                                    seed: int = 0, batch_size: int = 4096) -> dict:
        """Log-likelihood of each modality under its own likelihood (NB, multinomial, Bernoulli, Gaussian),
        plugged in at the posterior means, summed over the evaluated cells:

        .. math:: \\mathcal{LL}_m = \\sum_{n}\\log p_m(x_{nm}\\mid\\hat\\theta_n, \\hat G),\\qquad
                  \\text{per token: } \\mathcal{LL}_m / T_m

        with :math:`\\hat G` the global latents at their variational location (zero noise:
        :math:`Z = M^\\phi`, :math:`b = b^0+\\text{bg\\_loc}`, :math:`d = e^{\\text{loc}}`), no :math:`w_m`,
        no :math:`N/B` factor (§11 item 7), and :math:`T_m = \\sum_{n,f}x_{nmf}` for count modalities
        (the number of ones for Bernoulli) or the number of values for Gaussian ones.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(m.get_likelihood_per_modality()["rna"] < 0)
        True
        """
        cfg = self.config
        ll, T = self._sums("loglik", data, cells, n_samples, seed, batch_size, list(cfg.modalities))
        if not per_token:
            return ll
        return {m: ll[m] / T[m] if T[m] > 0 else float("nan") for m in cfg.modalities}

    def get_modality_weights(self, data=None, cells=None, *, return_format: str = "dataframe"):
        """Mixture weights :math:`w_{nm}` of each modality in each cell's posterior (§2.3):

        .. math:: w_{n\\cdot} = \\mathrm{softmax}_m\\big(\\omega_{n\\cdot}\\ \\text{with absent modalities at } -10^5\\big)

        where :math:`\\omega` is 1 (``"equal"``), the learned vector (``"universal"``), the cell's own
        :math:`\\Omega_n` row (``"cell"``, §11 item 9 fixed; validation/new cells: 1), or the attention
        score :math:`u^\\top\\tanh(W^\\top\\mu_{nm})` (``aggregation="attention"``, §11 item 10 fixed).
        A modality is absent where the cell's raw row sum is 0. Rows sum to 1.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"a": rng.poisson(2, (40, 6)), "b": rng.poisson(2, (40, 5))}
        >>> m = MultimodalAmortizedLDA.from_data(d, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_modality_weights().iloc[0].tolist()
        [0.5, 0.5]
        """
        if return_format not in ("dataframe", "dict", "array"):
            raise ValueError(f"return_format {return_format!r}: use 'dataframe', 'dict' or 'array'")
        cfg = self.config
        names, out = self._evaluate("weights", data, cells, {"block": 4096})
        if return_format == "array":
            return out
        if return_format == "dict":
            return {m: out[:, i] for i, m in enumerate(cfg.modalities)}
        return pd.DataFrame(out, index=names, columns=list(cfg.modalities))

    def get_top_features_per_topic(self, modality: str, n_features: int = 10, *, method: str = "probability",
                                   lambda_: float = DEFAULT_LAMBDA, topic_weights=None,
                                   include_background: bool = False, return_scores: bool = False) -> pd.DataFrame:
        """The ``n_features`` top features per topic, in descending order of a ranking score.

        ``method="probability"`` (the default, as before) ranks by :math:`\\hat\\phi_{mkf}`: features that
        are frequent everywhere (MALAT1, MT- and ribosomal genes) top every topic. The specific rankings
        divide by the marginal feature probability :math:`p_f = \\sum_k w_k\\hat\\phi_{mkf}`:
        ``"lift"`` ranks by :math:`\\hat\\phi_{mkf}/p_f` and ``"relevance"`` (LDAvis, Sievert & Shirley
        2014) by :math:`\\lambda\\log\\hat\\phi_{mkf} + (1-\\lambda)\\log(\\hat\\phi_{mkf}/p_f)` with
        ``lambda_`` (default 0.6; 1 is the probability ranking, 0 the lift). ``topic_weights``: the
        :math:`w_k` (``None``: uniform; ``lda.get_latent_representation().mean(0)`` weights topics by
        their mean share of the cells). Count and binary modalities only for lift and relevance.

        Returns a DataFrame (rows: rank 0.., columns ``topic_k``) of feature names, or of
        ``(name, score)`` pairs with ``return_scores=True`` (the score of ``method``: φ, lift or relevance).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_top_features_per_topic("rna", 2).shape
        (2, 3)
        >>> m.get_top_features_per_topic("rna", 2, method="relevance", lambda_=0.6).shape
        (2, 3)
        """
        where = "get_top_features_per_topic"
        check_ranking(method, lambda_, where)
        phi = self._phi(modality, include_background)
        if method != "probability" and self.config.likelihood(modality) == "gaussian":
            raise ValueError(f"{where}: modality {modality!r} is Gaussian (its topics are loadings, not "
                             f"probabilities); use method='probability'")
        scores = feature_scores(phi, method, lambda_, topic_weights)
        n = min(int(n_features), phi.shape[1])
        names = np.asarray(self.feature_names_[modality]).astype(str)
        cols = {}
        for k in range(phi.shape[0]):
            order = np.argsort(-scores[k], kind="stable")[:n]
            cols[f"topic_{k}"] = [(names[j], float(scores[k, j])) if return_scores else names[j] for j in order]
        return pd.DataFrame(cols)

    def get_topic_diversity(self, modality: str | None = None, *, include_background: bool = False) -> float:
        """Topic diversity: one minus the mean pairwise cosine similarity of the topics' feature profiles,

        .. math:: D_m = 1 - \\frac{2}{K(K-1)}\\sum_{k<l}\\frac{\\hat\\phi_{mk}\\cdot\\hat\\phi_{ml}}{\\|\\hat\\phi_{mk}\\|\\,\\|\\hat\\phi_{ml}\\|}

        (0: identical topics; 1: topics on disjoint features). ``modality=None``: the mean of
        :math:`D_m` over modalities.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(0.0 <= m.get_topic_diversity() <= 1.0)
        True
        """
        mods = self.config.modalities if modality is None else [modality]
        vals = []
        for m in mods:
            phi = self._phi(m, include_background)
            u = phi / np.maximum(np.linalg.norm(phi, axis=1, keepdims=True), 1e-300)
            C = u @ u.T
            iu = np.triu_indices(C.shape[0], k=1)
            vals.append(1.0 - float(C[iu].mean()))
        return float(np.mean(vals))

    def get_cell_entropy(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                         batch_size: int = 4096) -> np.ndarray:
        """Entropy of each cell's topic proportions, :math:`H_n = -\\sum_k\\hat\\theta_{nk}\\log(\\hat\\theta_{nk}+10^{-10})`
        (nats; 0 for one topic, :math:`\\log K` for uniform). Fixes §11 item 8 (the reference raises).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool((m.get_cell_entropy() <= np.log(3) + 1e-9).all())
        True
        """
        th = self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed, batch_size=batch_size)
        return -(th * np.log(th + 1e-10)).sum(axis=1)

    def get_topic_variance(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                           batch_size: int = 4096) -> np.ndarray:
        """Variance of each topic's usage across cells (unbiased), shape (K,):
        :math:`V_k = \\frac1{C-1}\\sum_n(\\hat\\theta_{nk}-\\bar\\theta_k)^2`. Fixes §11 item 8.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_topic_variance().shape
        (3,)
        """
        th = self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed, batch_size=batch_size)
        if th.shape[0] < 2:
            raise ValueError("get_topic_variance needs at least 2 cells")
        return th.var(axis=0, ddof=1)

    def get_learned_dispersion(self, modality: str | None = None):
        """NB dispersion of the NB modalities (``"gamma_poisson"``, ``"nb"``).

        Learned (``learnable_dispersion=True``): the posterior mean of :math:`d` (the square root of the
        overdispersion; variance :math:`\\mu + d^2\\mu^2`, NB size :math:`1/d^2`), the LogNormal mean

        .. math:: \\mathbb E[d] = \\exp(\\text{loc} + \\mathrm{sp}(\\text{scale})^2/2)

        of shape (1,) (global) or (F,). Fixed: ``[dispersion]``, the NB *size* :math:`r` (variance
        :math:`\\mu+\\mu^2/r`), as the reference returns. ``modality=None``: a dict over NB modalities.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      likelihoods=["nb"], n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_learned_dispersion("rna").tolist()
        [1.0]
        """
        self._check_trained()
        cfg = self.config
        nb = [m for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik in ("gamma_poisson", "nb")]

        def one(m):
            if cfg.learns_dispersion(m):
                p = self._fit.params
                s = softplus(np.asarray(p[f"dec/{m}/disp_scale"], dtype=np.float64))
                return np.exp(np.asarray(p[f"dec/{m}/disp_loc"], dtype=np.float64) + s * s / 2)
            return np.array([float(cfg.dispersion)])

        if modality is None:
            return {m: one(m) for m in nb}
        if modality not in nb:
            raise ValueError(f"modality {modality!r} has no NB dispersion (NB modalities: {nb})")
        return one(modality)

    def get_likelihood_weights(self, return_format: str = "dataframe"):
        """Per-modality likelihood weights :math:`w_m` (§1.8): 1, :math:`F_{\\rm ref}/F_m` or
        :math:`\\sqrt{F_{\\rm ref}/F_m}` by ``likelihood_weight_mode``, :math:`F_{\\rm ref}` the mean /
        lower median / max of the :math:`F_m`.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"a": rng.poisson(2, (40, 10)), "b": rng.poisson(2, (40, 30))}
        >>> m = MultimodalAmortizedLDA.from_data(d, n_topics=3, likelihood_weight_mode="inverse_features")
        >>> m.get_likelihood_weights("dict")
        {'a': 2.0, 'b': 0.6666666666666666}
        """
        from ._config import likelihood_weights

        w = likelihood_weights(self.config)
        if return_format == "dict":
            return w
        if return_format != "dataframe":
            raise ValueError(f"return_format {return_format!r}: use 'dataframe' or 'dict'")
        return pd.DataFrame([w], index=["likelihood_weight"])

    def cross_modality_score(self, mod_a: str, mod_b: str, *, normalise: bool = True, return_df: bool = True,
                             include_background: bool = False, data=None, cells=None, n_samples: int = 100,
                             seed: int = 0):
        """SHARE-Topic style feature-feature association between two modalities (§7):

        .. math::
            \\Phi^*_a[k,f] = \\frac{\\hat\\phi_a[k,f]}{\\sum_{k'}\\hat\\phi_a[k',f] + 10^{-12}},\\quad
            s_k = \\frac1C\\sum_n\\hat\\theta_{nk},\\quad
            P_{fg} = \\sum_k\\Phi^*_a[k,f]\\,s_k\\,\\Phi^*_b[k,g]

        divided by :math:`\\max P` when ``normalise``. :math:`\\hat\\theta` uses each cell's own
        :math:`\\Omega` row (§11 item 9 fixed). Returns an :math:`F_a\\times F_b` DataFrame (or array).

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"a": rng.poisson(2, (40, 6)), "b": rng.poisson(2, (40, 5))}
        >>> m = MultimodalAmortizedLDA.from_data(d, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> float(m.cross_modality_score("a", "b").to_numpy().max())
        1.0
        """
        if self.config.n_modalities < 2:
            raise ValueError("cross_modality_score needs a model with at least 2 modalities")
        if mod_a == mod_b:
            raise ValueError(f"cross_modality_score: give two different modalities (got {mod_a!r} twice)")
        pa = self._phi(mod_a, include_background)
        pb = self._phi(mod_b, include_background)
        sa = pa / (pa.sum(axis=0, keepdims=True) + 1e-12)
        sb = pb / (pb.sum(axis=0, keepdims=True) + 1e-12)
        th = self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed)
        s = (th / th.sum(axis=1, keepdims=True)).mean(axis=0)
        P = (sa * s[:, None]).T @ sb
        if normalise:
            P = P / P.max()
        if not return_df:
            return P
        return pd.DataFrame(P, index=self.feature_names_[mod_a], columns=self.feature_names_[mod_b])
