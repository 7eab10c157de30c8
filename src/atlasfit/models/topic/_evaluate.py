"""Cells to evaluate and the evaluation core of :class:`~atlasfit.MultimodalAmortizedLDA`: the registered
cells (or a subset) or new data registered like the training data, read in blocks with their
:math:`\Omega` rows, covariates and spatial inputs; :math:`\hat\theta`, the ELBO and per-token sums.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._data import _check_modality_values, _dense_rows, _register, _Registered
from ._loss import softmax
from ._spatial import check_adjacency, neighbourhood, normalized_adjacency, sgc_features
from ._summaries import EVAL_BLOCK, elbo_block, elbo_draws, loglik, plugin_draws, rho
from ._train import guide_eval


class _EvalSet:
    """Cells to evaluate: full matrices ``X`` with the selected rows ``idx`` (None: all), and per
    selected cell its Omega row, name, batch code and continuous covariates; the full spatial graphs
    (SGC inputs and GCN neighbourhoods are computed over all cells of ``X``); ``groups``:
    ``[(sample position, positions of its selected cells)]`` (Monte-Carlo keys and sums per sample)."""

    def __init__(self, X, idx, omega, names, batch, cont, graphs, groups):
        self.X, self.idx, self.omega, self.names = X, idx, omega, pd.Index(names)
        self.batch, self.cont, self.graphs = batch, cont, graphs or {}
        self.groups = groups
        self.sgc = None
        self.adj_hat = None

    @property
    def n(self) -> int:
        return len(self.names)


def _groups(reg: _Registered, sel) -> list:
    lab = reg.samples[sel]
    index = {s: i for i, s in enumerate(reg.sample_names())}
    out = []
    for s in dict.fromkeys(lab.tolist()):
        out.append((index[s], np.flatnonzero(lab == s)))
    return sorted(out, key=lambda t: t[0])


class _EvalMixin:
    """Resolving the cells to evaluate and the per-block evaluation (used by the summaries)."""

    def _cell_index(self, cells, n: int, obs_names) -> np.ndarray:
        if cells is None:
            return np.arange(n)
        c = np.asarray(cells)
        if c.dtype == bool:
            if c.shape != (n,):
                raise ValueError(f"cells as a boolean mask must have {n} entries, got {c.shape}")
            return np.flatnonzero(c)
        if c.dtype.kind in "iu":
            if c.size and (c.min() < -n or c.max() >= n):
                raise IndexError(f"cells holds positions outside 0..{n - 1}")
            return c.astype(np.int64) % n if c.size else c.astype(np.int64)
        pos = pd.Index(obs_names).get_indexer(c.astype(str))
        if (pos < 0).any():
            raise KeyError(f"cell {str(c[np.flatnonzero(pos < 0)[0]])!r} is not in the data; give obs names, "
                           "positions or a boolean mask")
        return pos

    def _resolve(self, data=None, cells=None) -> _EvalSet:
        """The cells to evaluate: registered cells (``data=None``) or new data, optionally a subset."""
        self._check_trained()
        cfg = self.config
        if data is None:
            if self._data is None:
                raise ValueError("this model has no data attached; pass data= (or load(path, data=...))")
            reg, omega = self._data, None if self._omega is None else self._omega[0]
        else:
            reg = _register(data, cfg.modalities, {m: self.layers_.get(m) for m in cfg.modalities} or None, None,
                            self.spatial_key_ if cfg.spatial_mode is not None else None,
                            self.batch_key_ if cfg.needs_batch else None,
                            self.continuous_covariate_keys_ if cfg.n_cont_encoded else None)
            omega = None
            for m in cfg.modalities:
                F = cfg.n_feat(m)
                if reg.X[m].shape[1] != F:
                    raise ValueError(f"modality {m!r}: new data has {reg.X[m].shape[1]} features, the model {F}; "
                                     "subset the data to the model's features (feature_names_)")
                if reg.named and m in self.feature_names_:
                    new, own = pd.Index(reg.var_names[m]).astype(str), pd.Index(self.feature_names_[m]).astype(str)
                    if not new.equals(own):
                        j = int(np.flatnonzero(new.to_numpy() != own.to_numpy())[0])
                        raise ValueError(f"modality {m!r}: new data's features differ from the model's (position "
                                         f"{j}: {new[j]!r} vs {own[j]!r}); reorder/subset them, e.g. "
                                         f"adata[:, model.feature_names_[{m!r}]]")
                _check_modality_values(m, reg.X[m], cfg.likelihood(m), reg.obs_names, reg.var_names[m])
            if cfg.needs_batch:  # codes of the training categories
                lab = np.asarray(reg.batch_categories, dtype=object)[reg.batch]
                codes = pd.Index(self.batch_categories_).get_indexer(lab)
                if (codes < 0).any():
                    k = int(np.flatnonzero(codes < 0)[0])
                    raise ValueError(f"batch_key {self.batch_key_!r}: cell {str(reg.obs_names[k])!r} has category "
                                     f"{lab[k]!r}, unseen in training ({self.batch_categories_[:5]}); the decoder "
                                     "offsets exist only for the training categories")
                reg.batch = codes.astype(np.int64)
        idx = None if cells is None else self._cell_index(cells, reg.n_obs, reg.obs_names)
        sel = slice(None) if idx is None else idx
        return _EvalSet(
            reg.X, idx, None if omega is None else omega[sel], reg.obs_names[sel],
            None if reg.batch is None else reg.batch[sel], None if reg.cont is None else reg.cont[sel], reg.spatial,
            _groups(reg, sel),
        )

    def _blocks(self, ev: _EvalSet, size: int, positions=None):
        """Yield ``(positions, x, Omega rows, forward extras)`` for consecutive blocks of ``size`` cells
        (of ``positions`` in ``ev``, default all):
        dense rows in the parameters' dtype, and the encoder extensions (batch codes, continuous
        covariates, SGC inputs from the whole evaluated graph, GCN neighbourhoods)."""
        fit, cfg = self._fit, self.config
        dtype = fit.params[next(iter(fit.params))].dtype
        if cfg.spatial_mode is not None:
            missing = [m for m in cfg.modalities if m not in ev.graphs]
            if missing:
                raise ValueError(f"spatial_mode={cfg.spatial_mode!r}: no spatial graph for modalities {missing}; pass "
                                 f"data with .obsp[{self.spatial_key_!r}]")
        if cfg.spatial_mode == "sgc" and ev.sgc is None:
            ev.sgc = {m: sgc_features(ev.graphs[m], ev.X[m], cfg.sgc_n_layers, median=fit.lib_median[m],
                                      transform="none" if lik == "gaussian" or not cfg.normalize_encoder_inputs
                                      else "log1p")
                      for m, lik in zip(cfg.modalities, cfg.likelihoods)}
        if cfg.spatial_mode == "gcn" and ev.adj_hat is None:
            ev.adj_hat = {m: normalized_adjacency(check_adjacency(ev.graphs[m], ev.X[m].shape[0],
                                                                  name=f"spatial graph of modality {m!r}"))
                          for m in cfg.modalities}
        positions = np.arange(ev.n) if positions is None else np.asarray(positions)
        for lo in range(0, positions.size, size):
            pos = positions[lo:lo + size]
            rows = pos if ev.idx is None else ev.idx[pos]
            x = {m: _dense_rows(ev.X[m], rows).astype(dtype, copy=False) for m in cfg.modalities}
            extra: dict = {}
            if cfg.needs_batch:
                extra["batch"] = ev.batch[pos]
            if cfg.n_cont_encoded:
                extra["cont_covariates"] = np.asarray(ev.cont[pos], dtype=dtype)
            if cfg.spatial_mode == "sgc":
                extra["enc_inputs"] = {m: _dense_rows(ev.sgc[m], rows).astype(dtype, copy=False)
                                       for m in cfg.modalities}
            elif cfg.spatial_mode == "gcn":
                adj, xn = {}, {}
                for m in cfg.modalities:
                    sub, cols = neighbourhood(ev.adj_hat[m], rows)
                    adj[m] = sub.astype(dtype)
                    xn[m] = _dense_rows(ev.X[m], cols).astype(dtype, copy=False)
                extra["graph"] = {"adj": adj, "x_nbr": xn}
            yield pos, x, None if ev.omega is None else ev.omega[pos], extra

    def _rho(self, m: str, theta, draws, batch, phi=None):
        return rho(self._fit, m, theta, draws, batch, phi)

    def _loglik(self, x: dict, theta, draws, batch) -> dict:
        return loglik(self._fit, x, theta, draws, batch)

    def _plugin_draws(self) -> dict:
        return plugin_draws(self._fit)

    def _theta(self, ev: _EvalSet, n_samples: int, seed: int, batch_size: int) -> np.ndarray:
        """:math:`\\hat\\theta` (§5), with :func:`~atlasfit.models.topic.topic_proportions`' noise stream
        (so the same values where that function applies)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 977]))
        out = np.empty((ev.n, self.config.n_topics))
        for pos, x, om, extra in self._blocks(ev, batch_size):
            _, mbar, vbar, _ = guide_eval(self._fit, x, omega=om, **extra)
            if n_samples <= 0:
                th = softmax(mbar, axis=1)
            else:
                sd = np.sqrt(vbar)
                th = np.zeros_like(mbar)
                for _ in range(n_samples):
                    th = th + softmax(mbar + sd * np.asarray(rng.standard_normal(mbar.shape), dtype=mbar.dtype), axis=1)
                th = th / n_samples
            out[pos] = th
        return out

    def _elbo(self, ev: _EvalSet, n_samples: int, seed: int) -> float:
        """ELBO per evaluated cell: per-sample sums over blocks of :data:`EVAL_BLOCK` cells (noise keyed by
        (sample, block), so a row's noise does not depend on memory settings or on the other samples),
        summed in sample order (the per-epoch ``val_loss`` of the shards gives the same value)."""
        if ev.n == 0:
            raise ValueError("no cells to evaluate")
        fit = self._fit
        draws, gmean = elbo_draws(fit, n_samples, seed)
        acc = 0.0
        for idx, pos in ev.groups:
            a = 0.0
            for p, x, om, extra in self._blocks(ev, EVAL_BLOCK, positions=pos):
                a += elbo_block(fit, x, om, extra, draws, seed, (idx, int(np.searchsorted(pos, p[0]))))
            acc += a
        return acc / ev.n - gmean / fit.n_cells

    def _per_token(self, ev: _EvalSet, theta, batch_size: int = 4096) -> dict:
        cfg = self.config
        draws = self._plugin_draws() if cfg.batch_offsets else None
        phis = {m: self._phi(m, True) for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"}
        ll = {m: 0.0 for m in phis}
        T = {m: 0.0 for m in phis}
        for lo in range(0, ev.n, batch_size):
            pos = np.arange(lo, min(ev.n, lo + batch_size))
            rows = pos if ev.idx is None else ev.idx[pos]
            for m, phi in phis.items():
                x = _dense_rows(ev.X[m], rows)
                if draws is None:
                    rho = theta[pos] @ phi
                else:
                    rho = self._rho(m, theta[pos], draws, ev.batch[pos])
                ll[m] += float((x * np.log(np.clip(rho, 1e-300, None))).sum())
                T[m] += float(x.sum())
        tot_T = sum(T.values())
        if tot_T <= 0:
            raise ValueError("the evaluated cells have no counts in any count modality; perplexity is undefined")
        out = {m: ll[m] / T[m] if T[m] > 0 else float("nan") for m in phis}
        out["total"] = sum(ll.values()) / tot_T
        return out
