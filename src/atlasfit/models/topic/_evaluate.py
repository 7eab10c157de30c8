"""Cells to evaluate and the evaluation core of :class:`~atlasfit.MultimodalAmortizedLDA`: the registered
cells (or a subset) or new data registered like the training data, read in blocks with their
:math:`\\Omega` rows, covariates and spatial inputs; :math:`\\hat\theta`, the ELBO and per-token sums.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...engine import ShardLostError, make_engine, plan_shards
from ._data import (
    _check_modality_values,
    _dense_rows,
    _register,
    _Registered,
    training_layout,
)
from ._rounds import FullRows, evaluate_sample, light_fit, round_context, shard_summary
from ._shard import load_shard, restore_local
from ._sampling import layered_subgraph
from ._spatial import check_adjacency, normalized_adjacency, sgc_features
from ._sparse import minibatch_rows


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

    def _register_new(self, data) -> _Registered:
        """New data registered like the training data, checked against the model's features,
        likelihoods and batch categories (batch codes of the training categories). Its samples are
        the model's ``sample_key`` column when the data have it (noise keys per sample), else one sample."""
        cfg = self.config
        args = (self.spatial_key_ if cfg.spatial_mode is not None else None,
                self.batch_key_ if cfg.needs_batch else None,
                self.continuous_covariate_keys_ if cfg.n_cont_encoded else None)
        layers = {m: self.layers_.get(m) for m in cfg.modalities} or None
        try:
            reg = _register(data, cfg.modalities, layers, self.sample_key_, *args)
        except ValueError as e:
            if self.sample_key_ is None or "unknown sample_key" not in str(e):
                raise
            reg = _register(data, cfg.modalities, layers, None, *args)
        for m in cfg.modalities:
            F = cfg.n_feat(m)
            if reg.n_features(m) != F:
                raise ValueError(f"modality {m!r}: new data has {reg.n_features(m)} features, the model {F}; "
                                 "subset the data to the model's features (feature_names_)")
            if reg.named and m in self.feature_names_:
                new, own = pd.Index(reg.var_names[m]).astype(str), pd.Index(self.feature_names_[m]).astype(str)
                if not new.equals(own):
                    j = int(np.flatnonzero(new.to_numpy() != own.to_numpy())[0])
                    raise ValueError(f"modality {m!r}: new data's features differ from the model's (position "
                                     f"{j}: {new[j]!r} vs {own[j]!r}); reorder/subset them, e.g. "
                                     f"adata[:, model.feature_names_[{m!r}]]")
            if not reg.is_store:
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
        return reg

    def _registered(self) -> _Registered:
        if self._data is None:
            raise ValueError("this model has no data attached; pass data= (or load(path, data=...))")
        return self._data

    def _resolve(self, data=None, cells=None) -> _EvalSet:
        """The cells to evaluate on the driver (spatial encoders, which need the in-memory graph of
        all evaluated cells): registered cells (``data=None``) or new data, optionally a subset."""
        self._check_trained()
        if data is None:
            reg = self._registered()
            omega = None if self._omega is None else self._omega[0]
        else:
            reg, omega = self._register_new(data), None
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
                for m in cfg.modalities:  # exact L-hop neighbourhoods (deterministic), also after sampled training
                    g = layered_subgraph(ev.adj_hat[m], rows, cfg.gcn_n_layers)
                    adj[m] = [a.astype(dtype) for a in g.adj]
                    xn[m] = minibatch_rows(ev.X[m], g.nodes, dtype)
                extra["graph"] = {"adj": adj, "x_nbr": xn}
            yield pos, x, None if ev.omega is None else ev.omega[pos], extra

    # ------------------------------------------------------------------ summaries as engine rounds

    def _summary_engine(self):
        """The engine holding the registered cells' shards: the one kept by :meth:`train`, or shards
        re-created from the registered data (store reader or in-memory rows) through the same loader."""
        eng = self._engine
        client = getattr(eng, "client", None)
        if eng is not None and client is not None and getattr(client, "status", "running") != "running":
            self._engine = eng = None  # the client of the training engine is gone
        if eng is not None:
            return eng
        cfg, reg, st = self.config, self._registered(), self._train_settings
        layout, names, sizes, _, reader = training_layout(reg, dict(zip(cfg.modalities, cfg.likelihoods)),
                                                          st["validation_fraction"], st["seed"])
        if not names:
            return None
        eng, _ = make_engine(plan_shards(names, sizes), client=None, store=reg.is_store, device="cpu",
                             who=type(self).__name__, name="topic-summaries")
        eng.setup(load_shard, reader, layout, cfg, self.dtype, None)
        if self._local:
            eng.map(restore_local, self._local)
        self._engine = eng
        return eng

    def close(self) -> None:
        """Release the shards kept for the summaries (the workers' or this process's copy of the rows);
        the next summary re-creates them from the registered data."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def _cell_map(self):
        """Per registered cell: its sample's position and its position within the sample (cached)."""
        if self._cell_map_cache is None:
            reg = self._registered()
            sidx = np.empty(reg.n_obs, dtype=np.int64)
            within = np.empty(reg.n_obs, dtype=np.int64)
            for i, rows in enumerate(reg.sample_rows().values()):
                sidx[rows] = i
                within[rows] = np.arange(rows.size)
            self._cell_map_cache = (sidx, within)
        return self._cell_map_cache

    def _evaluate(self, what: str, data, cells, opts: dict):
        """Run one summary per sample of the evaluated cells: ``(names, results)`` with ``results`` the
        per-cell rows in the requested order (``"theta"``, ``"weights"``) or the per-sample sums in
        sample order (``"elbo"``, ``"tokens"``, ``"loglik"``)."""
        self._check_trained()
        fit = light_fit(self._fit)
        spatial = self.config.spatial_mode is not None
        reg = self._registered() if data is None else self._register_new(data)
        n = reg.n_obs
        if cells is None:
            uniq, inv = np.arange(n), None
        else:
            uniq, inv = np.unique(self._cell_index(cells, n, reg.obs_names), return_inverse=True)
        names = reg.obs_names[uniq if inv is None else uniq[inv]]
        sample_names = reg.sample_names()
        srows = reg.sample_rows()
        if data is None:
            sidx, within = self._cell_map()
        else:
            sidx = np.empty(n, dtype=np.int64)
            within = np.empty(n, dtype=np.int64)
            for i, s in enumerate(sample_names):
                sidx[srows[s]] = i
                within[srows[s]] = np.arange(srows[s].size)
        order = np.argsort(sidx[uniq], kind="stable")
        su = sidx[uniq][order]
        bounds = np.flatnonzero(np.diff(su)) + 1
        groups = []  # (sample, position, sorted positions within the sample, positions in uniq)
        for part in np.split(order, bounds) if uniq.size else []:
            i = int(sidx[uniq[part[0]]])
            groups.append((sample_names[i], i, within[uniq[part]], part))
        results: dict = {}
        driver_groups = groups
        if data is None and not spatial:
            eng = self._summary_engine()
            held = set() if eng is None else {s for spec in eng.shards for s in spec.samples}
            request = None if inv is None and cells is None else {s: P for s, _, P, _ in groups if s in held}
            if eng is not None and (request is None or request):
                for part in self._map_summary(eng, shard_summary, fit, request, what, opts):
                    for s, res in part:
                        results[s] = res
            driver_groups = [g for g in groups if g[0] not in held]
        if driver_groups:
            ctx = round_context(fit, what, opts)
            if spatial:
                ev = self._resolve(data, uniq)
            for s, i, P, part in driver_groups:
                if spatial:
                    src = _EvalSource(self, ev, part)
                    P = np.arange(part.size)
                else:
                    src = self._driver_source(reg, s, srows[s], data is None)
                results[s] = evaluate_sample(fit, src, i, P, what, opts, ctx)
        if what in ("theta", "weights"):
            width = self.config.n_topics if what == "theta" else self.config.n_modalities
            out = np.empty((uniq.size, width))
            for s, _, _, part in groups:
                out[part] = results[s]
            return names, (out if inv is None else out[inv])
        return names, [results[s] for s, _, _, _ in groups]

    def _map_summary(self, eng, fn, *args):
        """One summary round; a lost worker's shards are re-created (with their Omega rows) and the
        round is run again (the results depend only on the data and the parameters)."""
        try:
            return eng.map(fn, *args)
        except ShardLostError:
            eng.recover()
            if self._local:
                eng.map(restore_local, self._local)
            return eng.map(fn, *args)

    def _driver_source(self, reg: _Registered, sample: str, rows: np.ndarray, registered: bool):
        """The rows of one sample read on the driver: new data (in memory), or a registered sample
        that no shard holds (it has no training cells: a few cells), read through the shards' reader."""
        if reg.is_store:
            x = {m: reg.atlas.read_block(m, sample, reg.layers.get(m)) for m in self.config.modalities}
            return FullRows(x, None, None if reg.batch is None else reg.batch[rows],
                            None if reg.cont is None else reg.cont[rows])
        om = self._omega[0] if registered and self._omega is not None else None
        return FullRows({m: reg.X[m] for m in self.config.modalities}, om, reg.batch, reg.cont, rows=rows)


class _EvalSource:
    """Rows of one sample of an :class:`_EvalSet` (``pos``: its cells' positions in the set), through
    the driver's block reader with the spatial inputs (SGC features, GCN neighbourhoods)."""

    def __init__(self, model, ev: _EvalSet, pos: np.ndarray):
        self.model, self.ev, self.pos = model, ev, np.asarray(pos)

    def take(self, P: np.ndarray, dtype):
        _, x, om, extra = next(self.model._blocks(self.ev, max(1, P.size), positions=self.pos[P]))
        return {m: sp.csr_matrix(v) for m, v in x.items()}, om, extra
