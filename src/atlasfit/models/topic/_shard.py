"""Shards of the topic model: per-sample block readers, the seeded validation split, the shard loader
and the shard functions that are not part of an optimisation step (data statistics, validation
sums, the per-cell :math:`\\Omega` rows as local state).

A shard reads its own samples through a small picklable reader: :class:`StoreBlocks` (an atlas
store's :class:`~atlasfit.io._blocks.BlockReader`: the worker reads its samples from disk) or
:class:`MemoryBlocks` (in-memory matrices; a Dask worker is sent only its samples' rows through the
engine's ``select_args`` hook). Within each sample the validation cells are drawn from the key
(seed, 5501, sample position) and the shard keeps its training rows (CSR, model dtype) for the
optimiser and its validation rows for the per-epoch scores. NumPy / SciPy only (no pandas), so a
worker stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..._xp import to_numpy
from ._config import TopicModelConfig
from ._params import init_cell_omega
from ._spatial import load_shard_extras

OMEGA_KEYS = ("omega", "omega_m", "omega_v", "omega_t")


# --------------------------------------------------------------------------- the split


def split_positions(n: int, fraction: float, seed: int, index: int) -> np.ndarray:
    """Sorted positions (within a sample of ``n`` cells) of its validation cells: the first
    ``round(fraction * n)`` of a permutation keyed by (seed, 5501, ``index``), ``index`` the sample's
    position among the registered samples.

    Examples
    --------
    >>> split_positions(10, 0.3, 0, 0).size
    3
    """
    k = int(round(float(fraction) * int(n)))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), 5501, int(index)])).permutation(int(n))
    return np.sort(perm[:k]).astype(np.int64)


def train_positions(n: int, val: np.ndarray) -> np.ndarray:
    """The complement of ``val`` in ``range(n)``, sorted."""
    keep = np.ones(int(n), dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class Layout:
    """What a shard needs to know about its samples (small, picklable).

    Attributes
    ----------
    n
        ``{sample: cells}`` (all registered cells of the sample, training and validation).
    index
        ``{sample: position among the registered samples}`` (the split's key).
    sid
        ``{sample: position among the samples with training cells}`` (the minibatch noise key).
    fraction, seed
        The validation split.
    checks
        ``{modality: likelihood}``: check every block's values on load (store data, not checked at
        registration); empty: the data were checked on the driver.
    """

    n: dict
    index: dict
    sid: dict
    fraction: float = 0.0
    seed: int = 0
    checks: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- readers


class MemoryBlocks:
    """Per-sample row blocks of in-memory matrices ``X[m]`` (``rows[sample]``: the sample's row
    positions, in cell order), with per-row batch codes, continuous covariates and spatial graphs.

    Examples
    --------
    >>> r = MemoryBlocks({"rna": np.arange(6.0).reshape(3, 2)}, {"a": np.array([0, 2]), "b": np.array([1])})
    >>> r.subset(["a"]).read("rna", "a").tolist()
    [[0.0, 1.0], [4.0, 5.0]]
    """

    def __init__(self, X: dict, rows: dict, *, batch=None, cont=None, graphs: dict | None = None, ids=None):
        self.X = X
        self.rows = {s: np.asarray(r, dtype=np.int64) for s, r in rows.items()}
        self.ids = self.rows if ids is None else ids  # the rows' positions in the caller's data
        self.batch, self.cont, self.graphs = batch, cont, graphs or None

    def read(self, m: str, sample: str):
        return self.X[m][self.rows[sample]]

    def row_ids(self, sample: str) -> np.ndarray:
        """The sample's row positions in the caller's data."""
        return self.ids[sample]

    def covariates(self, sample: str) -> dict:
        r = self.rows[sample]
        out = {}
        if self.batch is not None:
            out["batch"] = np.asarray(self.batch)[r]
        if self.cont is not None:
            out["cont"] = np.asarray(self.cont)[r]
        return out

    def graph(self, m: str, rows: np.ndarray):
        """The graph among ``rows`` (positions in ``X``)."""
        G = self.graphs[m]
        sub = G[rows] if sp.issparse(G) else np.asarray(G)[rows]
        return sub[:, rows]

    def subset(self, samples) -> MemoryBlocks:
        """The rows of ``samples`` only (what one Dask worker is sent)."""
        samples = list(samples)
        rows = np.concatenate([self.rows[s] for s in samples]) if samples else np.zeros(0, dtype=np.int64)
        new, off = {}, 0
        for s in samples:
            k = self.rows[s].size
            new[s] = np.arange(off, off + k)
            off += k
        graphs = None
        if self.graphs:
            graphs = {m: self.graph(m, rows) for m in self.graphs}
        return MemoryBlocks(
            {m: X[rows] for m, X in self.X.items()}, new,
            batch=None if self.batch is None else np.asarray(self.batch)[rows],
            cont=None if self.cont is None else np.asarray(self.cont)[rows], graphs=graphs,
            ids={s: self.ids[s] for s in samples},
        )


class StoreBlocks:
    """Per-sample blocks of an atlas store read on the worker (``reader``: the store's
    :class:`~atlasfit.io._blocks.BlockReader`; ``layers[m]``: the element to read), with the per-cell
    covariates of each sample when the model encodes some (``covariates[sample]``)."""

    def __init__(self, reader, layers: dict, covariates: dict | None = None):
        self.reader, self.layers, self.cov = reader, dict(layers), covariates

    def read(self, m: str, sample: str):
        return self.reader.read_block(m, sample, self.layers.get(m))

    def covariates(self, sample: str) -> dict:
        return dict((self.cov or {}).get(sample, {}))

    def subset(self, samples) -> StoreBlocks:
        cov = None if self.cov is None else {s: self.cov[s] for s in samples if s in self.cov}
        return StoreBlocks(self.reader, self.layers, cov)


# --------------------------------------------------------------------------- block checks


def check_block(m: str, sample: str, X, lik: str) -> None:
    """Errors for values a likelihood cannot take, naming the modality, the sample, the cell (its
    position in the sample) and the fix."""
    vals = X.data if sp.issparse(X) else np.asarray(X)

    def where(bad):
        if sp.issparse(X):
            k = int(np.flatnonzero(bad)[0])
            C = X.tocsr()
            r = int(np.searchsorted(C.indptr, k, side="right") - 1)
            return f"sample {sample!r}, cell {r} of the sample, feature {int(C.indices[k])}"
        r, c = np.argwhere(bad)[0]
        return f"sample {sample!r}, cell {int(r)} of the sample, feature {int(c)}"

    bad = ~np.isfinite(vals)
    if bad.any():
        raise ValueError(f"modality {m!r} has non-finite values (NaN/inf; {where(bad)}); fill them (e.g. 0) or "
                         "drop those cells/features before converting the store")
    if lik == "gaussian":
        return
    bad = vals < 0
    if bad.any():
        raise ValueError(f"modality {m!r} has negative values ({where(bad)}); likelihood {lik!r} needs counts >= 0: "
                         f"use the raw-count layer (layers={{{m!r}: 'counts'}}) or likelihoods={{{m!r}: 'gaussian'}}")
    if lik == "bernoulli":
        bad = (vals != 0) & (vals != 1)
        if bad.any():
            raise ValueError(f"modality {m!r} is not binary ({where(bad)}); likelihood 'bernoulli' needs 0/1 data: "
                             "binarise it (x > 0) or use a count likelihood")
        return
    bad = vals != np.round(vals)
    if bad.any():
        raise ValueError(f"modality {m!r} holds non-integer values ({where(bad)}) but likelihood {lik!r} needs "
                         f"counts; use the raw-count layer (layers={{{m!r}: 'counts'}}) or "
                         f"likelihoods={{{m!r}: 'gaussian'}}")


# --------------------------------------------------------------------------- the loader


def _csr(X, dtype) -> sp.csr_matrix:
    """``X`` as CSR in ``dtype`` (None: its own; no copy when it already is one)."""
    if sp.issparse(X):
        X = X.tocsr()
        return X if dtype is None or X.dtype == dtype else X.astype(dtype)
    return sp.csr_matrix(np.asarray(X) if dtype is None else np.asarray(X, dtype=dtype))


def _as_float64(X: sp.csr_matrix) -> sp.csr_matrix:
    """``X`` with float64 values, sharing its index arrays (the data statistics are summed in float64)."""
    if X.dtype == np.float64:
        return X
    return sp.csr_matrix((X.data.astype(np.float64), X.indices, X.indptr), shape=X.shape)


def _vstack(blocks: list, F: int, dtype=np.float64) -> sp.csr_matrix:
    """Stack CSR ``blocks`` (emptied as they are copied) into one CSR matrix.

    The output arrays are allocated untouched (``np.empty``: their pages become resident as they are
    written) and each block is released once copied, so the resident peak is the data plus one
    block, not twice the data as with ``scipy.sparse.vstack`` (measured on the 100k-cell topic
    benchmark: -165 MiB per worker at load).
    """
    if not blocks:
        return sp.csr_matrix((0, F), dtype=dtype)
    if len(blocks) == 1:
        B = blocks.pop()
        return B
    nnz = sum(int(B.nnz) for B in blocks)
    rows = sum(int(B.shape[0]) for B in blocks)
    idx_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    data = np.empty(nnz, dtype=blocks[0].dtype)
    indices = np.empty(nnz, dtype=idx_dtype)
    indptr = np.empty(rows + 1, dtype=idx_dtype)
    indptr[0] = 0
    at = r = 0
    while blocks:
        B = blocks.pop(0)
        k = int(B.nnz)
        data[at:at + k] = B.data
        indices[at:at + k] = B.indices
        indptr[r + 1:r + 1 + B.shape[0]] = B.indptr[1:] + at
        at += k
        r += B.shape[0]
        del B
    return sp.csr_matrix((data, indices, indptr), shape=(rows, F))


def _merge_stats(parts: list, cfg: TopicModelConfig) -> dict:
    """The shard's data statistics from its samples' (:func:`shard_data_stats` of each block, in
    sample order): library values and counts side by side (the driver's lower median sorts them),
    sums added in sample order."""
    out = {}
    for m in cfg.modalities:
        ds = [d[m] for d in parts]
        out[m] = {"lib_vals": np.concatenate([d["lib_vals"] for d in ds]) if ds else np.zeros(0),
                  "lib_counts": np.concatenate([d["lib_counts"] for d in ds]) if ds else np.zeros(0, dtype=np.int64),
                  "lib_sum": float(sum(d["lib_sum"] for d in ds)), "n": int(sum(d["n"] for d in ds))}
        if cfg.has_background(m):
            acc = np.zeros(cfg.n_feat(m))
            for d in ds:
                acc = acc + d["x_over_lib"]
            out[m]["x_over_lib"] = acc
    return out


def load_shard(spec, reader, layout: Layout, cfg: TopicModelConfig, dtype, array_module=None) -> dict:
    """Shard state: read the shard's samples (``spec.samples``, training order), split each into its
    training and validation rows, and build

    * ``x[m]``: training rows (CSR, model dtype) and ``parts``: ``[(sid, offset, cells)]`` per sample;
    * ``val``: the validation rows (``x``, ``parts``: ``[(sample position, offset, cells)]``, covariates);
    * ``samples``: ``[(name, offset, cells)]`` of the training rows (local state per sample);
    * ``cells``: ``[(name, sample position, cells, training offset, validation positions, validation
      offset)]``: every cell of each sample, for the summaries (:mod:`._rounds`);
    * the encoder extensions (batch codes, covariates, the training cells' spatial graph) and the
      per-cell :math:`\\Omega` rows (``weight_mode="cell"``);
    * ``_dstats``: the data statistics of the training rows (:func:`shard_data_stats`).
    """
    names = list(spec.samples)
    tr_blocks = {m: [] for m in cfg.modalities}
    va_blocks = {m: [] for m in cfg.modalities}
    parts, vparts, samples, cells, stats = [], [], [], [], []
    tr_cov, va_cov, graph_rows = [], [], []
    block_stats: dict = {}
    off = voff = 0
    for s in names:
        n = int(layout.n[s])
        val = split_positions(n, layout.fraction, layout.seed, layout.index[s])
        tr = train_positions(n, val)
        for m in cfg.modalities:
            B = reader.read(m, s)
            if B.shape != (n, cfg.n_feat(m)):
                raise ValueError(f"modality {m!r}, sample {s!r}: the block has shape {B.shape}, expected "
                                 f"({n}, {cfg.n_feat(m)}); the store or data changed since registration: "
                                 "register the data again")
            if m in layout.checks:
                check_block(m, s, B, layout.checks[m])
            # kept in the model dtype: a shard's sample blocks are converted one by one (memory:
            # at 10^6 cells a float64 copy of a 2-worker shard is ~4 GB)
            B = _csr(B, None)  # as stored: the data statistics are summed in float64 from these values
            Btr = B if val.size == 0 else B[tr]
            block_stats[m] = shard_data_stats({m: _as_float64(Btr)}, cfg, (m,))[m]
            tr_blocks[m].append(_csr(Btr, dtype))
            va_blocks[m].append(_csr(B[val], dtype))
            del B, Btr
        stats.append(dict(block_stats))
        cov = reader.covariates(s)
        tr_cov.append({k: v[tr] for k, v in cov.items()})
        va_cov.append({k: v[val] for k, v in cov.items()})
        if hasattr(reader, "row_ids"):
            graph_rows.append((reader.rows[s][tr], reader.row_ids(s)[tr]))
        parts.append((int(layout.sid[s]), off, int(tr.size)))
        samples.append((s, off, int(tr.size)))
        vparts.append((int(layout.index[s]), voff, int(val.size)))
        cells.append((s, int(layout.index[s]), n, off, val, voff))
        off += tr.size
        voff += val.size
    x = {}
    for m in cfg.modalities:
        x[m] = _vstack(tr_blocks[m], cfg.n_feat(m), dtype)
        tr_blocks[m] = None  # the stacked copy replaces the blocks
    state = {
        "x": x,
        "parts": parts,
        "samples": samples,
        "cells": cells,
        "cfg": cfg,
        "dtype": dtype,
        "array_module": array_module,
        "_dstats": _merge_stats(stats, cfg),
    }
    val = {"x": {m: _vstack(va_blocks[m], cfg.n_feat(m), dtype) for m in cfg.modalities}, "parts": vparts}
    for key in ("batch", "cont"):
        if va_cov and key in va_cov[0]:
            val[key] = np.concatenate([c[key] for c in va_cov])
    state["val"] = val
    extras = {}
    for key in ("batch", "cont"):
        if tr_cov and key in tr_cov[0]:
            extras[key] = np.concatenate([c[key] for c in tr_cov])
    if graph_rows:  # in-memory rows: their ids in the caller's data, and the training cells' graph
        state["rows"] = np.concatenate([i for _, i in graph_rows])
        if cfg.spatial_mode is not None:
            rows = np.concatenate([r for r, _ in graph_rows])
            extras["graph"] = {m: reader.graph(m, rows) for m in cfg.modalities}
    state.update(load_shard_extras(extras or None, np.arange(off), [(s, k) for s, _, k in samples], cfg, off))
    if cfg.weight_mode == "cell" and cfg.aggregation == "moe":
        om = init_cell_omega(cfg, off, dtype)
        state["omega"], state["omega_m"], state["omega_v"] = om, np.zeros_like(om), np.zeros_like(om)
        state["omega_t"] = np.zeros(off, dtype=np.int64)  # per-row step counts (lazy update)
    return state


def _select_samples(specs, args, kwargs):
    """DaskEngine ``select_args`` hook of :func:`load_shard`: a worker is sent only its samples' rows
    (in-memory readers; a store reader reads on the worker anyway)."""
    reader, *rest = args
    if hasattr(reader, "subset"):
        reader = reader.subset([s for spec in specs for s in spec.samples])
    return (reader, *rest), kwargs


load_shard.select_args = _select_samples


# --------------------------------------------------------------------------- shard functions


def shard_data_stats(x: dict, cfg: TopicModelConfig, modalities=None) -> dict:
    """Library sizes (unique values and counts, for the lower median), their sum, and the summed
    depth-normalised rows per background modality, over the float64 training rows ``x``."""
    out = {}
    for m in (cfg.modalities if modalities is None else modalities):
        X = x[m]
        lib = np.maximum(np.asarray(X.sum(axis=1)).ravel().astype(np.float64), 0.0)
        vals, counts = np.unique(np.maximum(lib, 1.0), return_counts=True)
        out[m] = {"lib_vals": vals, "lib_counts": counts, "lib_sum": float(lib.sum()), "n": int(lib.size)}
        if cfg.has_background(m):
            lt = np.where(lib != 0, lib, 1.0)
            out[m]["x_over_lib"] = np.asarray((X.T @ (1.0 / lt))).ravel()  # sum_n x_n / l_n, no copy of X
    return out


def shard_pop_stats(state) -> dict:
    """The data statistics computed at load (first round of a fit)."""
    return state.pop("_dstats", None) or shard_data_stats({m: X.astype(np.float64) for m, X in state["x"].items()},
                                                          state["cfg"])


def dump_local(state) -> dict:
    """``{sample: {omega, omega_m, omega_v, omega_t}}``: each sample's per-cell :math:`\\Omega` rows and
    their AdamW moments and step counts (``weight_mode="cell"``)."""
    if "omega" not in state:
        return {}
    return {s: {k: np.array(to_numpy(state[k][off:off + n])) for k in OMEGA_KEYS} for s, off, n in state["samples"]}


def restore_local(state, data: dict) -> None:
    """Put back what :func:`dump_local` returned (checkpoints, continued training)."""
    if "omega" not in state:
        return
    for s, off, n in state["samples"]:
        if s in data:
            for k in OMEGA_KEYS:
                state[k][off:off + n] = np.asarray(data[s][k]).reshape(state[k][off:off + n].shape)
