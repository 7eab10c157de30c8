"""Shard-side code of a single-modality GEDI fit.

The shard state has MultiGEDI's layout (``samples``, ``B``, ``mods[m][g]`` with ``Y``, ``raw``,
``Q``, ``oi``, ``si``, ``si0``, ``lamQ``, ``lamO``; see ``models/multigedi/_shard.py``), with one
modality, plus per sample ``h`` (its covariate column h_i, L; empty without H) and the prior means
``Qhat`` / ``ohat`` of the current iteration. MultiGEDI's loader, initialisation shard functions and
round B are reused; rounds A, C and D differ (single-modal B solve, covariate prior means).
Every function returns statistics per sample, ``[(sample, ...), ...]`` in the shard's sample order.
"""

from __future__ import annotations

import numpy as np

from ..._xp import get_xp, to_numpy
from .._factor import msh, normalize_B_columns, o_statistic, row_sumsq, update_si
from ._kernels import qhat_from_R, solve_B_single, update_oi_prior, update_Q_prior

_p = msh._p
_f64 = msh._f64
_items = msh._items


class CheckedReader:
    """Wraps a ``read_block`` reader and refuses non-count data for count obs types.

    Counts (``"M"``, ``"M_list"``) must be finite integers >= 0; the error names the modality, the
    sample, the first offending cell (row within the sample) and feature, and the fix.

    Examples
    --------
    >>> from atlasfit.models.multigedi import InMemoryReader
    >>> r = CheckedReader(InMemoryReader({"rna": np.array([[0.5, 1.0]])}, {"rna": ["a"]}),
    ...                   "M", np.array(["g1", "g2"]))
    >>> r.read_block("rna", "a")
    Traceback (most recent call last):
    ...
    ValueError: GEDI: modality 'rna' sample 'a' has non-integer value 0.5 (first at cell row 0 of the sample, feature 'g1'); obs_type 'M' needs raw counts (integers >= 0), not normalised or log-transformed values: pass the raw counts (layer=...)
    """

    def __init__(self, reader, obs_type: str, feature_names, cell_names: dict | None = None):
        self.reader = reader
        self.obs_type = obs_type
        self.feature_names = np.asarray(feature_names)
        self.cell_names = cell_names

    def _cell(self, mod, sample, r) -> str:
        """' (cell NAME)' for row r of ``sample``: from ``cell_names``, or an atlas store's obs."""
        try:
            if self.cell_names is not None:
                return f" (cell {str(self.cell_names[sample][r])!r})"
            sl = self.reader.sample_slices(mod)[sample]
            return f" (cell {str(self.reader.obs(mod).index[sl.start + r])!r})"
        except (AttributeError, KeyError, IndexError, TypeError):
            return ""

    def read_block(self, mod, sample, layer=None):
        """The block of ``reader.read_block``, after the count checks."""
        blk = self.reader.read_block(mod, sample, layer=layer)
        if self.obs_type in ("M", "M_list"):
            self._check(blk, mod, sample, layer)
        return blk

    def _check(self, blk, mod, sample, layer):
        sparse = hasattr(blk, "tocoo") and not isinstance(blk, np.ndarray)
        if sparse:  # only the stored entries can be bad; report the first in cell-row order
            coo = blk.tocoo()
            vals = np.asarray(coo.data)
        else:
            vals = np.asarray(to_numpy(blk))
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(vals) | (vals < 0)
            what = "a negative or non-finite value"
            if not bad.any():
                bad = vals != np.round(vals)
                what = "non-integer value"
        if not bad.any():
            return
        if sparse:
            idx = np.flatnonzero(bad)
            k = idx[np.lexsort((coo.col[idx], coo.row[idx]))[0]]
            r, c, v = int(coo.row[k]), int(coo.col[k]), float(vals[k])
        else:
            r, c = (int(x) for x in np.argwhere(bad)[0])
            v = float(vals[r, c])
        lay = "" if layer is None else f" (layer {layer!r})"
        raise ValueError(
            f"GEDI: modality {mod!r} sample {sample!r}{lay} has {what} {v!r} (first at cell "
            f"row {r} of the sample{self._cell(mod, sample, r)}, feature {str(self.feature_names[c])!r}); "
            f"obs_type {self.obs_type!r} "
            "needs raw counts (integers >= 0), not normalised or log-transformed values: pass the raw "
            "counts (layer=...)"
        )


def load_gedi_shard(spec, reader, plan, config, lamQ: float, lamO: float, hcols: dict,
                    array_module=None) -> dict:
    """Engine loader: MultiGEDI's :func:`~atlasfit.models.multigedi.load_shard` (Y from the data,
    §1.2) for the one modality, then the single-modal hyperparameters λ_Qi = 1/S_Qi, λ_oi = 1/S_oi
    (§1.4), the covariate column h_i of each sample and zero prior means Q̂_i, ô_i.
    ``array_module="cupy"`` keeps the state on the GPU (as MultiGEDI's loader).

    Examples
    --------
    >>> from atlasfit.engine import plan_shards
    >>> from atlasfit.models.multigedi import FitConfig, ModalityConfig, InMemoryReader, make_plan
    >>> plan = make_plan({"rna": ["a"] * 4}, {"rna": 3})
    >>> st = load_gedi_shard(plan_shards(["a"], [4])[0], InMemoryReader({"rna": np.ones((4, 3))},
    ...     {"rna": ["a"] * 4}), plan, FitConfig(K=2, modalities=[ModalityConfig("rna")]), 1.0, 1.0,
    ...     {"a": np.zeros(0)})
    >>> st["mods"]["rna"]["a"]["Qhat"].shape
    (3, 2)
    """
    state = msh.load_shard(spec, reader, plan, config, array_module)
    for g, _m, loc in _items(state):
        xp = get_xp(loc["Y"])
        loc["lamQ"] = float(lamQ)
        loc["lamO"] = float(lamO)
        loc["h"] = np.asarray(hcols[g], dtype=np.float64)
        loc["Qhat"] = xp.zeros_like(loc["Q"])
        loc["ohat"] = xp.zeros_like(loc["oi"])
    return state


def round_A_single(state, pa: dict, mode: str):
    """Single-modal B solve (§2.1) of every sample; Bsphere: unit cell columns (§2.2).

    Returns ρ_i = row sums of squares of B_i (the normalisation statistic of §2.2).
    """
    out = []
    for g, _m, loc in _items(state):
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        W = (_p(xp, pa["Z"], dt) + loc["Q"]) * _p(xp, pa["D"], dt)[None, :]
        B = solve_B_single(W, loc["Y"], _p(xp, pa["o"], dt) + loc["oi"], loc["si"])
        if mode == "Bsphere":
            B = normalize_B_columns(B)
        state["B"][g] = B.astype(dt, copy=False)
        out.append((g, _f64(row_sumsq(state["B"][g]))))
    return out


def round_C_gedi(state, pc: dict):
    """Q_i (§2.4) and o_i (§2.5) towards their covariate prior means, then s_i (§2.6).

    Q̂_i = [R_k h_i]_k and ô_i = R_o h_i from the R of the previous iteration (zero without H);
    kept for round D's σ² terms. Returns per sample v_i (§2.7), Q_i and o_i (the R statistics of
    §2.9 are formed on the driver, which knows h_i).
    """
    out = []
    for g, m, loc in _items(state):
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        o = _p(xp, pc["o"], dt)
        Z = _p(xp, pc["Z"], dt)
        DB = _p(xp, pc["D"], dt)[:, None] * state["B"][g]
        if pc["R"] is not None:
            h = loc["h"]
            loc["Qhat"] = _p(xp, qhat_from_R(pc["R"], h), dt)
            loc["ohat"] = _p(xp, np.asarray(pc["Ro"]) @ h, dt)
        mom = state["tmp"].pop(("mom", g, m))
        Y = loc["Y"]
        J, N = Y.shape
        Q = update_Q_prior(mom, Z, o + loc["oi"], loc["lamQ"], loc["Qhat"])
        ZQ = Z + Q
        rT = Y.sum(axis=1) - ZQ @ mom["DB1"]
        oi = update_oi_prior(rT, N, o, loc["si"], loc["lamO"], loc["ohat"])
        if not pc["is_si_fixed"]:
            cT = Y.sum(axis=0) - ZQ.sum(axis=0) @ DB
            loc["si"] = update_si(cT, J, o, oi, loc["si0"], pc["lam_s"])
        loc["Q"], loc["oi"] = Q, oi
        out.append((g, _f64(o_statistic(rT, N, oi, loc["si"])), _f64(Q), _f64(oi)))
    return out


def round_D_gedi(state, pd: dict):
    """Y update (§2.10) with the new o and the old σ²; returns per sample e_i (§2.11, with the
    prior means: λ_oi‖o_i − ô_i‖² + λ_Qi‖Q_i − Q̂_i‖² + ‖E_i‖² + V_i) and t_i = ‖s_i − s_i0‖²."""
    out = []
    for g, _m, loc in _items(state):
        xp = get_xp(loc["Y"])
        esq, V = msh.y_update_sample(loc, state["B"][g], pd)
        do = loc["oi"] - loc["ohat"]
        dq = loc["Q"] - loc["Qhat"]
        e = (loc["lamO"] * float(_f64(xp.sum(do * do))) + loc["lamQ"] * float(_f64(xp.sum(dq * dq)))
             + esq + V)
        ds = loc["si"] - loc["si0"]
        out.append((g, e, float(_f64(xp.sum(ds * ds)))))
    return out


def db_moments(state, D):
    """Per sample Σ_n DB_n (K) and DB DBᵀ (K x K), DB = diag(D) B_i: the cell averages behind the
    per-gene differential-expression summary (§7.4) without gathering cells."""
    out = []
    for g in state["samples"]:
        B = state["B"][g]
        xp = get_xp(B)
        DB = _p(xp, D, B.dtype)[:, None] * B
        out.append((g, _f64(DB.sum(axis=1)), _f64(DB @ DB.T)))
    return out
