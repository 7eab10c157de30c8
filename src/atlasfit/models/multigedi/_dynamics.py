"""Dynamics (spec §7.6): the reference's ``tl.vector_field`` and ``tl.pseudotime``.

- **Vector field**: the offset effect diffO evaluated at contrasts interpolated linearly between a
  start contrast c₀ and an end contrast c₁: c(t) = (1 − t) c₀ + t c₁ for t on a grid of [0, 1], and
  field(t) = E c(t), with E the matrix of effects: R_o (genes x covariates) for single-modality GEDI
  with sample covariates H (diffO = R_o h_c, §7.4), and for MultiGEDI (no H: every sample is its own
  covariate) the fitted sample offsets E = [o_1, …, o_I] of a modality (J x I), so
  field(t) = Σ_i c_i(t) o_i. Being linear in t, its velocity d field / dt = E (c₁ − c₀) is constant.
- **Pseudotime**: the Euclidean distance of every cell to the centroid of the start cells in a
  representation, min–max scaled to [0, 1]. Every representation used here is linear in the shared
  embedding (rows B_gᵀ T: joint or per-modality PCA, DB, B), so the centroid is a reduction of
  per-sample row sums and the distances are computed on the shard that holds the cells.
"""

from __future__ import annotations

import numpy as np

from ...engine._reduce import gather_by_sample, ordered_sum
from ._shard import _f64


def minmax(d):
    """(d − min d) / (max d − min d); all zeros when d is constant.

    Examples
    --------
    >>> minmax(np.array([2.0, 4.0, 3.0])).tolist()
    [0.0, 1.0, 0.5]
    """
    d = np.asarray(d, dtype=np.float64)
    lo, hi = float(d.min()), float(d.max())
    return np.zeros_like(d) if hi <= lo else (d - lo) / (hi - lo)


def pseudotime_dense(rep, start) -> np.ndarray:
    """Pseudotime of the rows of an in-memory representation ``rep`` (cells x r): distance to the
    centroid of the ``start`` rows (boolean mask or indices), min–max scaled.

    Examples
    --------
    >>> pseudotime_dense(np.array([[0.0], [1.0], [3.0]]), [0]).tolist()
    [0.0, 0.3333333333333333, 1.0]
    """
    rep = np.asarray(rep, dtype=np.float64)
    idx = start_indices(start, rep.shape[0])
    mu = rep[idx].mean(axis=0)
    return minmax(np.linalg.norm(rep - mu[None, :], axis=1))


def start_indices(start, n: int) -> np.ndarray:
    """Row indices of the start cells from a boolean mask of length ``n`` or integer indices."""
    a = np.asarray(start)
    if a.dtype == bool:
        if a.shape != (n,):
            raise ValueError(f"pseudotime: the start mask has shape {a.shape}; it needs one entry per cell ({n})")
        idx = np.flatnonzero(a)
    elif a.size and np.issubdtype(a.dtype, np.integer):
        idx = a.reshape(-1).astype(np.int64)
        if idx.min() < -n or idx.max() >= n:
            raise ValueError(f"pseudotime: start cell index out of range for {n} cells")
        idx = np.unique(np.where(idx < 0, idx + n, idx))
    else:
        raise ValueError("pseudotime: give the start cells as a boolean mask or integer row indices "
                         "(tl.pseudotime also takes obs names or a (column, value) pair)")
    if idx.size == 0:
        raise ValueError("pseudotime: no start cells selected; the start set must hold at least one cell")
    return idx


def start_sums(state, T, positions: dict):
    """Shard function: per sample with start cells, (Σ of their rows B_gᵀ T, count)."""
    T = np.ascontiguousarray(T, dtype=np.float64)  # one memory layout, one BLAS path
    out = []
    for g in state["samples"]:
        pos = positions.get(g)
        if pos is None or len(pos) == 0:
            continue
        rows = _f64(state["B"][g])[:, np.asarray(pos)].T @ T  # B on the host first (CuPy states too)
        out.append((g, rows.sum(axis=0), len(pos)))
    return out


def centroid_distances(state, T, mu, samples):
    """Shard function: per sample of ``samples``, ‖B_gᵀ T − μ‖ for each cell (N_g)."""
    T = np.ascontiguousarray(T, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    keep = set(samples)
    return [(g, np.linalg.norm(_f64(state["B"][g]).T @ T - mu[None, :], axis=1))
            for g in state["samples"] if g in keep]


def pseudotime(engine, T, positions: dict, samples) -> dict:
    """Distributed pseudotime: ``{g: scaled distance per cell of g}`` for the given samples.

    ``positions``: ``{g: indices of the start cells among the cells of sample g}``. Round 1 reduces
    the start rows' sums (r-vectors) in ``samples`` order; round 2 returns one distance per cell
    (the output); the min–max scaling is over all of them.
    """
    sums = gather_by_sample(engine.map(start_sums, T, positions))
    have = [g for g in samples if g in sums]
    if not have:
        raise ValueError("pseudotime: no start cells selected; the start set must hold at least one cell")
    mu = ordered_sum([sums[g][0][0] for g in have]) / sum(sums[g][0][1] for g in have)
    dist = {g: v[0][0] for g, v in gather_by_sample(engine.map(centroid_distances, T, mu, list(samples))).items()}
    allv = np.concatenate([dist[g] for g in samples])
    lo, hi = float(allv.min()), float(allv.max())
    span = hi - lo
    return {g: (np.zeros_like(dist[g]) if span <= 0 else (dist[g] - lo) / span) for g in samples}


def sample_offsets(state, m):
    """Shard function: ``[(g, o_i)]`` of modality ``m`` (J each): the effects of §7.6 for MultiGEDI."""
    return [(g, _f64(state["mods"][m][g]["oi"])) for g in state["samples"] if g in state["mods"].get(m, {})]


def contrast_vector(contrast, names, what: str = "contrast") -> np.ndarray:
    """A contrast as a vector over ``names`` (samples or covariates) from an array of that length or
    a dict ``{name: weight}`` (others 0).

    Examples
    --------
    >>> contrast_vector({"b": 1.0}, ["a", "b"]).tolist()
    [0.0, 1.0]
    """
    names = [str(x) for x in names]
    if isinstance(contrast, dict) or hasattr(contrast, "to_dict") and not isinstance(contrast, np.ndarray):
        items = {str(k): float(v) for k, v in dict(contrast).items()}
        unknown = [k for k in items if k not in names]
        if unknown:
            raise ValueError(f"vector_field: {what} names {unknown[0]!r}, which is not one of {names}")
        c = np.array([items.get(n, 0.0) for n in names])
    else:
        c = np.asarray(contrast, dtype=np.float64).reshape(-1)
        if c.size != len(names):
            raise ValueError(f"vector_field: {what} has {c.size} entries but needs {len(names)} ({names}); "
                             "or pass a dict {name: weight}")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"vector_field: {what} must be finite")
    return c


def vector_field(effects, start, end, n_steps: int = 10) -> dict:
    """field(t) = E ((1 − t) c₀ + t c₁) on ``n_steps`` points t of [0, 1] (module docstring).

    Parameters
    ----------
    effects
        E (features x L).
    start, end
        c₀, c₁ (L-vectors).
    n_steps
        Number of grid points (≥ 2).

    Returns
    -------
    dict
        ``t`` (n_steps), ``contrasts`` (n_steps x L), ``field`` (n_steps x features) and ``velocity``
        (features): d field / dt = E (c₁ − c₀).

    Examples
    --------
    >>> out = vector_field(np.array([[1.0, 3.0]]), [1.0, 0.0], [0.0, 1.0], n_steps=3)
    >>> out["field"].ravel().tolist(), out["velocity"].tolist()
    ([1.0, 2.0, 3.0], [2.0])
    """
    n_steps = int(n_steps)
    if n_steps < 2:
        raise ValueError(f"vector_field: n_steps must be >= 2, got {n_steps}")
    E = np.asarray(effects, dtype=np.float64)
    c0 = np.asarray(start, dtype=np.float64)
    c1 = np.asarray(end, dtype=np.float64)
    t = np.linspace(0.0, 1.0, n_steps)
    C = (1.0 - t)[:, None] * c0[None, :] + t[:, None] * c1[None, :]
    return {"t": t, "contrasts": C, "field": C @ E.T, "velocity": E @ (c1 - c0)}
