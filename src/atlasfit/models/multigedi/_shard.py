"""Shard-side code: the loader and every shard function of a MultiGEDI fit.

A shard holds whole global samples. Its state is a dict::

    {"samples": (g, ...),                      # global sample order
     "B": {g: K x N_g},                        # shared embedding of each sample
     "mods": {m: {g: {"Y": J x N_g, "raw": {...}, "Q": J x K, "oi": J, "si": N_g, "si0": N_g,
                      "lamQ": N_g / N_m, "lamO": N_g}}},
     "tmp": {}}                                # initialisation scratch (removed afterwards)

Y is stored features x cells (J x N_g) as in the spec. Every shard function returns statistics
**per sample**, as a list of ``(sample, stats)`` in the shard's sample order, so the driver can reduce
them in global sample order: the same bits whatever the grouping of samples into shards.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial

import numpy as np
import scipy.sparse

from ..._xp import get_xp, to_numpy
from ._config import FitConfig, SamplePlan
from ._kernels import (
    densify,
    normalize_B_columns,
    o_statistic,
    project_Ytilde,
    row_sumsq,
    sample_moments,
    csc_block_entries,
    solve_shared_B,
    sparse_y_ok,
    update_oi,
    update_Q,
    update_si,
    update_Y_binary,
    update_Y_counts,
    update_Y_counts_sparse,
    update_Y_paired,
    update_Y_paired_sparse,
    solve_Y_counts,
    solve_Y_paired,
    variance_counts,
    variance_paired,
    z_statistics,
)

# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _check_counts(block, mod, sample, what):
    data = block.data if hasattr(block, "data") and not isinstance(block, np.ndarray) else block
    data = to_numpy(data)
    bad = ~np.isfinite(data) | (data < 0)
    if np.any(bad):
        dense = to_numpy(densify(block))
        bad2 = ~np.isfinite(dense) | (dense < 0)
        r, c = np.argwhere(bad2)[0]
        raise ValueError(
            f"modality {mod!r} has negative or non-finite {what} in sample {sample!r} (first at cell "
            f"row {r} of the sample, feature {c}); MultiGEDI obs_type "
            f"{'M' if what == 'counts' else 'M_list'} needs finite counts >= 0"
        )


def _check_binary(X, mod, sample):
    Xn = to_numpy(X)
    bad = ~(np.isnan(Xn) | (Xn == 0) | (Xn == 1))
    if np.any(bad):
        c, r = np.argwhere(bad)[0]
        raise ValueError(
            f"modality {mod!r} (obs_type 'X') has value {float(Xn[c, r])!r} in sample {sample!r} (first at "
            f"cell row {r} of the sample, feature {c}); obs_type 'X' needs values in {{0, 1, NaN}}: "
            "binarise the data or mark missing entries as NaN"
        )


def _check_finite(Y, mod, sample):
    """obs type "Y": every value must be finite (Y has no missing-value model)."""
    bad = ~np.isfinite(to_numpy(Y))
    if bad.any():
        c, r = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"modality {mod!r} (obs_type 'Y') has a non-finite value in sample {sample!r} (first at cell row "
            f"{r} of the sample, feature {c}); obs_type 'Y' needs a finite matrix (e.g. log-normalised "
            "expression): impute or drop such values"
        )


def _read(reader, mod, sample, layer, n_cells, J):
    block = reader.read_block(mod, sample, layer=layer)
    if block.shape != (n_cells, J):
        raise ValueError(
            f"modality {mod!r} sample {sample!r} (layer {layer!r}): reader returned a block of shape "
            f"{block.shape}, expected (cells, features) = {(n_cells, J)}"
        )
    return block


def _raw_dtype(values, dtype):
    """Storage dtype of raw counts: float32 when every value is an integer below 2**24 (exact in
    float32, half the bytes of float64; blocks are densified to the fit's dtype when used, so the
    arithmetic is unchanged), else the fit's dtype."""
    v = np.asarray(values)
    if np.dtype(dtype) == np.float64 and v.size and np.all(v >= 0) and v.max() < 2**24 and np.all(v == np.floor(v)):
        return np.float32
    return dtype


def _transpose_raw(block, dtype):
    """Features x cells copy of a cells x features block (sparse stays sparse)."""
    if hasattr(block, "tocsr") and not isinstance(block, np.ndarray):
        # cells x features CSR -> features x cells CSC (a free transpose): cell blocks slice cheaply
        csc = block.tocsr().T.tocsc()
        return csc.astype(_raw_dtype(csc.data, dtype))
    xp = get_xp(block)
    return xp.ascontiguousarray(xp.asarray(block, dtype=dtype).T)


def load_shard(spec, reader, plan: SamplePlan, config: FitConfig, array_module=None) -> dict:
    """Create the local state of one shard (engine ``setup`` loader).

    Reads every (modality, sample) block of the shard through ``reader.read_block``, validates it,
    and builds the starting Y (§1.2): M: log(1 + M); M_list: log((M1 + 1)/(M2 + 1));
    X: +1 / −1 / 0 for 1 / 0 / NaN; Y (single-modality GEDI): the block itself (finite values). Q_i, o_i, B start at zero (set by :func:`initialize`).

    Parameters
    ----------
    spec
        The shard's :class:`~atlasfit.engine.ShardSpec`.
    reader
        Object with ``read_block(mod, sample, layer=None)`` (cells x features block).
    plan, config
        From :func:`make_plan` and :class:`FitConfig`.
    array_module
        ``None`` for NumPy; ``"cupy"`` to keep the state on the GPU.

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.engine import plan_shards
    >>> from atlasfit.models.multigedi import FitConfig, ModalityConfig, InMemoryReader, make_plan
    >>> lab = ["a"] * 4
    >>> plan = make_plan({"rna": lab}, {"rna": 3})
    >>> st = load_shard(plan_shards(["a"], [4])[0], InMemoryReader({"rna": np.ones((4, 3))},
    ...                 {"rna": lab}), plan, FitConfig(K=2, modalities=[ModalityConfig("rna")]))
    >>> st["mods"]["rna"]["a"]["Y"].shape
    (3, 4)
    """
    if array_module == "cupy":  # pragma: no cover - GPU only
        import cupy as xp  # noqa: PLC0415
    else:
        xp = np
    dt = config.dtype
    K = config.K
    state = {"samples": tuple(spec.samples), "B": {}, "mods": {m: {} for m in config.names}, "tmp": {}}
    for g in spec.samples:
        if g not in plan.n_cells:
            raise ValueError(f"shard sample {g!r} is not in the sample plan")
        n = plan.n_cells[g]
        state["B"][g] = xp.zeros((K, n), dtype=dt)
        for mc in config.modalities:
            m = mc.name
            if g not in plan.mod_samples[m]:
                continue
            J = plan.n_features[m]
            if mc.obs_type == "M":
                blk = _read(reader, m, g, mc.layer, n, J)
                _check_counts(blk, m, g, "counts")
                raw = {"M": _transpose_raw(blk, dt)}
                Y = _blockwise_Y(J, n, xp, dt, partial(initial_Y_block, raw, xp=xp, dt=dt))
            elif mc.obs_type == "M_list":
                b1 = _read(reader, m, g, mc.layers[0], n, J)
                b2 = _read(reader, m, g, mc.layers[1], n, J)
                _check_counts(b1, m, g, f"counts in layer {mc.layers[0]!r}")
                _check_counts(b2, m, g, f"counts in layer {mc.layers[1]!r}")
                raw = {"M1": _transpose_raw(b1, dt), "M2": _transpose_raw(b2, dt)}
                Y = _blockwise_Y(J, n, xp, dt, partial(initial_Y_block, raw, xp=xp, dt=dt))
            elif mc.obs_type == "Y":  # single-modality GEDI: Y is the given matrix, never updated (§1.2)
                blk = _read(reader, m, g, mc.layer, n, J)
                if hasattr(blk, "toarray") and not isinstance(blk, np.ndarray):
                    blk = blk.toarray()
                Y = xp.ascontiguousarray(densify(blk, xp, dt).T)
                _check_finite(Y, m, g)
                raw = {}
            else:
                blk = _read(reader, m, g, mc.layer, n, J)
                if hasattr(blk, "toarray") and not isinstance(blk, np.ndarray):
                    blk = blk.toarray()
                X = xp.ascontiguousarray(densify(blk, xp, dt).T)
                _check_binary(X, m, g)
                raw = {"X": X}
                Y = initial_Y_block(raw, slice(None), xp, dt)
            if xp is not np and mc.obs_type in ("M", "M_list"):  # pragma: no cover - GPU only
                import cupyx.scipy.sparse as csp  # noqa: PLC0415

                for name, arr in raw.items():
                    sparse = hasattr(arr, "tocsr") and not isinstance(arr, np.ndarray)
                    raw[name] = csp.csc_matrix(arr) if sparse else xp.asarray(arr, dtype=dt)
            state["mods"][m][g] = {
                "Y": Y if (Y.dtype == dt and Y.flags.c_contiguous) else xp.ascontiguousarray(Y.astype(dt)),
                "raw": raw,
                "Q": xp.zeros((J, K), dtype=dt),
                "oi": xp.zeros(J, dtype=dt),
                "si": xp.zeros(n, dtype=dt),
                "si0": xp.zeros(n, dtype=dt),
                "lamQ": n / plan.N(m),
                "lamO": float(n),
                "y_from": ("init",),  # Y is its starting value, a function of the data (_ckpt.py)
            }
    return state


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def initial_Y_block(raw, sl, xp, dt):
    """The starting Y (§1.2) of the cells ``sl`` from the raw data of a (sample, modality):
    M: log(1 + M); M_list: log((M1 + 1)/(M2 + 1)); X: +1 / −1 / 0 for 1 / 0 / NaN."""
    if "M" in raw:
        return xp.log1p(densify(raw["M"][:, sl], xp, dt))
    if "M1" in raw:
        return xp.log((densify(raw["M1"][:, sl], xp, dt) + 1.0) / (densify(raw["M2"][:, sl], xp, dt) + 1.0))
    X = raw["X"][:, sl]
    return xp.where(xp.isnan(X), 0.0, xp.where(X == 0, -1.0, 1.0)).astype(dt)


def _blockwise_Y(J, n, xp, dt, block_fn):
    """J x n array filled block of cells by block of cells with ``block_fn(slice)`` (no J x n temporary)."""
    Y = xp.empty((J, n), dtype=dt)
    for sl in cell_blocks(n, J):
        Y[:, sl] = block_fn(sl)
    return Y


def _p(xp, a, dtype):
    """Broadcast parameter -> array of the shard's module and dtype."""
    return xp.asarray(a, dtype=dtype)


def _f64(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def _items(state):
    """(g, m, local dict) over the shard's samples in order, modalities in registration order."""
    for g in state["samples"]:
        for m, per in state["mods"].items():
            if g in per:
                yield g, m, per[g]


def _ytilde_matmul(loc, o, M, xp, dt):
    """Ỹ M with Ỹ = Y − (o + o_i)1ᵀ − 1 s_iᵀ, expanded (no J x N temporary):
    Y M − (o + o_i)(1ᵀM) − 1_J (s_iᵀ M)."""
    M = _p(xp, M, dt)
    return loc["Y"] @ M - (_p(xp, o, dt) + loc["oi"])[:, None] * M.sum(axis=0)[None, :] - (loc["si"] @ M)[None, :]


def _ytilde_T_matmul(loc, o, M, xp, dt):
    """Ỹᵀ M, expanded: Yᵀ M − 1_N ((o + o_i)ᵀ M) − s_i (1ᵀ M)."""
    M = _p(xp, M, dt)
    return loc["Y"].T @ M - ((_p(xp, o, dt) + loc["oi"]) @ M)[None, :] - loc["si"][:, None] * M.sum(axis=0)[None, :]


def _raw_dense(loc, name, xp, dt):
    return densify(loc["raw"][name], xp, dt)


# ---------------------------------------------------------------------------------------------
# initialisation: priors (§5.1)
# ---------------------------------------------------------------------------------------------


def prior_pass1(state, obs_types):
    """Per sample and count modality: s̃ = (colsum M + 0.01)/J kept locally; returns Σ_n M_jn / s̃_n."""
    out = []
    for g, m, loc in _items(state):
        ot = obs_types[m]
        if ot == "X":
            continue
        Y = loc["Y"]
        xp, dt = get_xp(Y), Y.dtype
        J = Y.shape[0]
        names = ("M",) if ot == "M" else ("M1", "M2")
        sums = []
        for nm in names:
            raw = loc["raw"][nm]
            if hasattr(raw, "tocsc") and not isinstance(raw, np.ndarray):  # sparse: no J x N temporary
                colsum = xp.asarray(raw.sum(axis=0), dtype=dt).ravel()
                st = (colsum + 0.01) / J
                scaled = (raw if xp is np else raw.astype(dt)) @ (1.0 / st)  # SciPy upcasts exactly
                state["tmp"][("stilde", m, g, nm)] = st
                sums.append(_f64(xp.asarray(scaled).ravel()))
                continue
            Md = _raw_dense(loc, nm, xp, dt)
            st = (Md.sum(axis=0) + 0.01) / J
            state["tmp"][("stilde", m, g, nm)] = st
            sums.append(_f64((Md / st[None, :]).sum(axis=1)))
        out.append((g, m, sums))
    return out


def prior_pass2(state, o0):
    """Set s_i0 = s_i = s_0 slice (§5.1); return the per-sample SSR Σ(Y − s_0 − o_0)²."""
    out = []
    for g, m, loc in _items(state):
        Y = loc["Y"]
        xp, dt = get_xp(Y), Y.dtype
        if m not in o0:  # obs type X: s_0 = 0
            continue
        if ("stilde", m, g, "M") in state["tmp"]:
            s0 = xp.log(state["tmp"].pop(("stilde", m, g, "M")))
        else:
            s1 = state["tmp"].pop(("stilde", m, g, "M1"))
            s2 = state["tmp"].pop(("stilde", m, g, "M2"))
            s0 = xp.log(s1 / s2)
        loc["si0"] = s0.astype(dt)
        loc["si"] = s0.astype(dt).copy()
        o0m = _p(xp, o0[m], dt)[:, None]
        ssr = 0.0
        for sl in cell_blocks(Y.shape[1], Y.shape[0]):  # blocks of cells: no J x N temporary
            R = Y[:, sl] - s0[None, sl] - o0m
            ssr += float(_f64(xp.sum(R * R)))
        out.append((g, m, ssr))
    return out


def apply_init_state(state, init_state, K):
    """Set Q_i, o_i, s_i, s_i0 and B of the shard's samples from a flat ``init_state`` dict."""
    for g in state["samples"]:
        key = f"B/{g}"
        if key in init_state:
            B = state["B"][g]
            state["B"][g] = _p(get_xp(B), init_state[key], B.dtype).reshape(B.shape).copy()
    for g, m, loc in _items(state):
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        for name, key in (("Q", "Q"), ("oi", "o_i"), ("si", "s_i"), ("si0", "s_i0")):
            k = f"{m}/{key}/{g}"
            if k in init_state:
                arr = _p(xp, init_state[k], dt)
                if arr.shape != loc[name].shape:
                    raise ValueError(
                        f"init_state[{k!r}] has shape {arr.shape}, expected {loc[name].shape}"
                    )
                loc[name] = arr.copy()
    return None


# ---------------------------------------------------------------------------------------------
# initialisation: randomised SVD (§5.3), distributed
# ---------------------------------------------------------------------------------------------


def rsvd_set_oi(state, m, o):
    """§5.3 step 1 / §5.4 step 5: o_i := rowsum(Y_i − o1ᵀ − 1s_iᵀ)/(N_i + λ_oi) (caches zero)."""
    for g, mm, loc in _items(state):
        if m is not None and mm != m:
            continue
        Y = loc["Y"]
        xp, dt = get_xp(Y), Y.dtype
        loc["oi"] = update_oi(Y.sum(axis=1), Y.shape[1], _p(xp, o[mm], dt), loc["si"], loc["lamO"])
    return None


def rsvd_project(state, m, o, mat):
    """Flipped rSVD: local rows of A·mat = Ỹ_gᵀ mat (N_g x l), kept; returns their Gram matrices."""
    out = []
    for g, mm, loc in _items(state):
        if mm != m:
            continue
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        Yg = _ytilde_T_matmul(loc, o, mat, xp, dt)
        state["tmp"][("rs", g)] = Yg
        out.append((g, _f64(Yg.T @ Yg)))
    return out


def rsvd_rescale(state, m, rinv):
    """Flipped rSVD: Y_g ← Y_g R⁻¹ (first pass of the tall orthonormalisation); returns Grams."""
    out = []
    for g, mm, loc in _items(state):
        if mm != m:
            continue
        xp = get_xp(loc["Y"])
        Yg = state["tmp"][("rs", g)] @ _p(xp, rinv, loc["Y"].dtype)
        state["tmp"][("rs", g)] = Yg
        out.append((g, _f64(Yg.T @ Yg)))
    return out


def rsvd_back(state, m, o, rinv):
    """Flipped rSVD: Q_g = Y_g R⁻¹ (orthonormal rows block); returns Aᵀ-contribution Ỹ_g Q_g (J x l)."""
    out = []
    for g, mm, loc in _items(state):
        if mm != m:
            continue
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        Qg = state["tmp"].pop(("rs", g)) @ _p(xp, rinv, dt)
        out.append((g, _f64(_ytilde_matmul(loc, o, Qg, xp, dt))))
    return out


def omega_rows(seed32, offset, n, ncol):
    """Rows [offset, offset + n) of RandomState(seed32).standard_normal((N, ncol)), drawn locally.

    The legacy generator fills row by row, so earlier rows are drawn and discarded in chunks.

    Examples
    --------
    >>> full = np.random.RandomState(7).standard_normal((5, 3))
    >>> bool(np.array_equal(omega_rows(7, 2, 2, 3), full[2:4]))
    True
    """
    rs = np.random.RandomState(seed32)
    left = offset
    while left > 0:
        k = min(left, 65536)
        rs.standard_normal((k, ncol))
        left -= k
    return rs.standard_normal((n, ncol))


def rsvd_nf_start(state, m, o, seed32, offsets, ncol):
    """Non-flipped rSVD (J >= N): Ỹ_g Ω_g (J x l) with Ω_g this sample's rows of the test matrix."""
    out = []
    for g, mm, loc in _items(state):
        if mm != m:
            continue
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        om = _p(xp, omega_rows(seed32, offsets[g], loc["Y"].shape[1], ncol), dt)
        out.append((g, _f64(_ytilde_matmul(loc, o, om, xp, dt))))
    return out


def rsvd_nf_left(state, m, o, Q):
    """Non-flipped rSVD: this sample's rows of AᵀQ = Ỹ_gᵀ Q (N_g x l)."""
    out = []
    for g, mm, loc in _items(state):
        if mm != m:
            continue
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        out.append((g, _f64(_ytilde_T_matmul(loc, o, Q, xp, dt))))
    return out


def rsvd_nf_right(state, m, o, Qp, offsets):
    """Non-flipped rSVD: Ỹ_g Q'_g (J x l), Q'_g = this sample's rows of Q'."""
    out = []
    for g, mm, loc in _items(state):
        if mm != m:
            continue
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        n = loc["Y"].shape[1]
        rows = _p(xp, np.asarray(Qp)[offsets[g] : offsets[g] + n], dt)
        out.append((g, _f64(_ytilde_matmul(loc, o, rows, xp, dt))))
    return out


def init_B(state, params, init_mods, largest, mode):
    """§5.3 steps 4-5 and §5.4 step 3: Q_i := Z for initialised modalities; B_g by least squares.

    B_g := (WᵀW)⁻¹ WᵀỸ_g with W = 2 Z diag(D_init) of g's largest modality; Bsphere: unit columns.
    Returns ρ_g = row sums of squares of B_g.
    """
    for g, m, loc in _items(state):
        if m in init_mods:
            xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
            loc["Q"] = _p(xp, params[m]["Z"], dt).copy()
    out = []
    for g in state["samples"]:
        m = largest[g]
        loc = state["mods"][m][g]
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        W = 2.0 * _p(xp, params[m]["Z"], dt) * _p(xp, params[m]["D"], dt)[None, :]
        B = xp.linalg.solve(W.T @ W, project_Ytilde(W, loc["Y"], _p(xp, params[m]["o"], dt) + loc["oi"], loc["si"]))
        if mode == "Bsphere":
            B = normalize_B_columns(B)
        state["B"][g] = B.astype(dt)
        out.append((g, _f64(row_sumsq(B))))
    return out


def init_finish(state, scale, o):
    """Bl2: B_g ← diag(c) B_g; then every spoke recomputes o_i with zero caches (§5.4 step 5)."""
    if scale is not None:
        for g in state["samples"]:
            B = state["B"][g]
            state["B"][g] = B * _p(get_xp(B), scale, B.dtype)[:, None]
    rsvd_set_oi(state, None, o)
    state["tmp"].clear()
    return None


# ---------------------------------------------------------------------------------------------
# one BCD iteration: rounds A-D (Appendix A)
# ---------------------------------------------------------------------------------------------


def round_A(state, params, mode):
    """Shared B solve for every sample of the shard (§3.3), Bsphere column step (§3.4); returns ρ_g."""
    out = []
    for g in state["samples"]:
        Ws, WtYts, ws = [], [], []
        for m, per in state["mods"].items():
            if g not in per:
                continue
            loc = per[g]
            xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
            pm = params[m]
            W = (_p(xp, pm["Z"], dt) + loc["Q"]) * _p(xp, pm["D"], dt)[None, :]
            Ws.append(W)
            WtYts.append(project_Ytilde(W, loc["Y"], _p(xp, pm["o"], dt) + loc["oi"], loc["si"]))
            ws.append(1.0 / pm["sigma2"])
        B = solve_shared_B(Ws, WtYts, ws)
        if mode == "Bsphere":
            B = normalize_B_columns(B)
        state["B"][g] = B
        out.append((g, _f64(row_sumsq(B))))
    return out


def round_B(state, params, scale, need_H):
    """Apply the Bl2 row scale lazily; return G_mg = R^Z DBᵀ (and H_mg = DB DBᵀ) per (g, m) (§2.3).

    The sample moments (Y DBᵀ, DB DBᵀ, DB1, DBs) are kept for round C (Y, B, s_i unchanged).
    """
    if scale is not None:
        for g in state["samples"]:
            B = state["B"][g]
            state["B"][g] = B * _p(get_xp(B), scale, B.dtype)[:, None]
    out = []
    for g, m, loc in _items(state):
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        pm = params[m]
        DB = _p(xp, pm["D"], dt)[:, None] * state["B"][g]
        mom = sample_moments(loc["Y"], DB, loc["si"])
        state["tmp"][("mom", g, m)] = mom
        G = z_statistics(mom, loc["Q"], _p(xp, pm["o"], dt), loc["oi"])
        out.append((g, m, _f64(G), _f64(mom["H"]) if need_H[m] else None))
    return out


def round_C(state, params):
    """Q_i (§2.4), then o_i (§2.5), then s_i (§2.6, unless fixed); returns v_mg for o (§2.7).

    Row and column sums of T = Y − (Z + Q_i)DB_i are formed as rowsum(Y) − (Z + Q_i)(DB1) and
    colsum(Y) − (1ᵀ(Z + Q_i)) DB, without a J x N_i temporary.
    """
    out = []
    for g, m, loc in _items(state):
        xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
        pm = params[m]
        o = _p(xp, pm["o"], dt)
        Z = _p(xp, pm["Z"], dt)
        DB = _p(xp, pm["D"], dt)[:, None] * state["B"][g]
        mom = state["tmp"].pop(("mom", g, m))
        Y = loc["Y"]
        J, N = Y.shape
        Q = update_Q(mom, Z, o, loc["oi"], loc["lamQ"])
        ZQ = Z + Q
        rT = Y.sum(axis=1) - ZQ @ mom["DB1"]
        oi = update_oi(rT, N, o, loc["si"], loc["lamO"])
        if not pm["is_si_fixed"]:
            cT = Y.sum(axis=0) - ZQ.sum(axis=0) @ DB
            loc["si"] = update_si(cT, J, o, oi, loc["si0"], pm["lam_s"])
        loc["Q"], loc["oi"] = Q, oi
        out.append((g, m, _f64(o_statistic(rT, N, oi, loc["si"]))))
    return out


CELL_BLOCK_BYTES = 2 * 2**20  # one J x block float64 temporary of round D is at most ~2 MiB


#: Round D's elementwise Y update (the Halley step: ~25 NumPy passes per block) runs on blocks of
#: ~512 KiB per J x block float64 temporary, so that its live temporaries stay in the core's cache.
#: Measured on the 20k-cell benchmark shape (16 samples, rna 2,000 + splicing 1,000, K=20, in
#: memory, float64, this project's 2-core machine): 3.52 / 2.55 / 2.73 / 3.05 s per iteration on one
#: thread at 2 MiB / 512 / 256 / 128 KiB blocks, 2.27 / 1.66 / 1.72 (1 MiB) s on two threads. The
#: block size changes which cells share a partial sum of ‖E‖² and V (not Y): σ² moves in the last
#: bits, the same on any engine. Override with ``ATLASFIT_Y_BLOCK_BYTES``.
Y_BLOCK_BYTES = int(os.environ.get("ATLASFIT_Y_BLOCK_BYTES", 512 * 2**10))


def cell_blocks(n: int, J: int, block_bytes: int | None = None, min_cells: int = 64):
    """Column (cell) slices of a J x n array such that a float64 J x block temporary is ~2 MiB.

    Small enough that round D's dozen live temporaries stay in the allocator's heap (below the
    64 MiB trim and 16 MiB mmap thresholds set by :func:`atlasfit.engine.tune_allocator`) and cost
    ~25 MiB per worker; large enough that the J x K x block products run at BLAS speed.
    """
    bs = max(min_cells, (block_bytes or CELL_BLOCK_BYTES) // (8 * max(J, 1)))
    return [slice(a, min(n, a + bs)) for a in range(0, n, bs)]


def yhat_blocks(loc, B, Z, D, o):
    """``(slice, Ŷ block)`` over round D's cell blocks: Ŷ = (Z + Q_i) D B_g + (o + o_i)1ᵀ + 1 s_iᵀ, the
    one definition the Y update and a checkpoint restore share (same operations, same blocks, same bits)."""
    Y = loc["Y"]
    xp, dt = get_xp(Y), Y.dtype
    DB = _p(xp, D, dt)[:, None] * B
    W = _p(xp, Z, dt) + loc["Q"]
    off = (_p(xp, o, dt) + loc["oi"])[:, None]
    si = loc["si"]
    for sl in cell_blocks(Y.shape[1], Y.shape[0], Y_BLOCK_BYTES, 8):
        Yhat = W @ DB[:, sl]
        Yhat += off  # in place: the same sums as (W DB + off) + s_i, without two temporaries
        Yhat += si[None, sl]
        yield sl, Yhat


def digest_update(h, a) -> None:
    """Feed an array's bytes (host copy for CuPy) to the hash ``h``."""
    h.update(memoryview(np.ascontiguousarray(to_numpy(a))).cast("B"))


def y_update_sample(loc, B, p) -> tuple[float, float]:
    """Y update (§2.10) of one (sample, modality) in place, over blocks of cells; returns
    (‖E‖², V): the squared residual Σ(Y_new − Ŷ)² and the variance term of §2.11.

    ``loc`` holds ``Y``, ``raw``, ``Q``, ``oi``, ``si``; ``B`` is B_g; ``p`` the modality's
    ``Z``, ``D``, ``o``, ``sigma2`` and ``obs_type``, and ``solve_Y``: when true, count and paired-count
    Y is solved to its root from Ŷ and the data (:func:`solve_Y_counts`, :func:`solve_Y_paired`)
    instead of one Halley step from the previous Y. Ŷ = (Z + Q_i) D B_g + (o + o_i)1ᵀ + 1 s_iᵀ.
    """
    Y = loc["Y"]
    xp, dt = get_xp(Y), Y.dtype
    s2 = p["sigma2"]
    ot = p["obs_type"]
    raw = loc["raw"]
    esq = 0.0
    V = 0.0
    # CPU with SciPy sparse counts: the kernels read the stored entries only (same bits, no dense M)
    sparse = sparse_y_ok(Y, s2) and ot in ("M", "M_list") and all(
        scipy.sparse.issparse(v) and v.format == "csc" and v.has_canonical_format for v in raw.values())
    solve = bool(p.get("solve_Y")) and ot in ("M", "M_list")
    s2_dt = np.dtype(dt).type(s2)  # σ² in the fit's dtype: a restore recomputes the solve with the same bits
    yhat_digest = hashlib.sha256() if solve else None  # lets a checkpoint check Ŷ instead of solving again
    for sl, Yhat in yhat_blocks(loc, B, p["Z"], p["D"], p["o"]):
        Yb = Y[:, sl]
        if solve:
            digest_update(yhat_digest, Yhat)
        if solve and ot == "M":  # Y from Ŷ and the data alone (a checkpoint needs none of it)
            Mb = densify(raw["M"][:, sl], xp, dt)
            Yn = solve_Y_counts(Yhat, Mb, s2_dt)
            V += float(_f64(variance_counts(Yn, s2)))
        elif solve:
            M1 = densify(raw["M1"][:, sl], xp, dt)
            M2 = densify(raw["M2"][:, sl], xp, dt)
            Yn = solve_Y_paired(Yhat, M1, M2, s2_dt)
            V += float(_f64(variance_paired(Yn, M1, M2, s2)))
        elif ot == "M" and sparse:
            Yn = update_Y_counts_sparse(Yb, Yhat, csc_block_entries(raw["M"], sl, dt), s2)
            V += float(_f64(variance_counts(Yn, s2)))
        elif ot == "M":
            Mb = densify(raw["M"][:, sl], xp, dt)
            Yn = update_Y_counts(Yb, Yhat, Mb, s2)
            V += float(_f64(variance_counts(Yn, s2)))
        elif ot == "M_list" and sparse:
            e1, e2 = csc_block_entries(raw["M1"], sl, dt), csc_block_entries(raw["M2"], sl, dt)
            Yn = update_Y_paired_sparse(Yb, Yhat, e1, e2, s2)
            n12 = np.zeros(Yn.shape, dtype=dt)  # M1 + M2 entry by entry, as the dense sum
            n12[e1[0], e1[1]] = e1[2]
            n12[e2[0], e2[1]] += e2[2]
            V += float(_f64(variance_paired(Yn, n12, 0.0, s2)))
        elif ot == "M_list":
            M1 = densify(raw["M1"][:, sl], xp, dt)
            M2 = densify(raw["M2"][:, sl], xp, dt)
            Yn = update_Y_paired(Yb, Yhat, M1, M2, s2)
            V += float(_f64(variance_paired(Yn, M1, M2, s2)))
        elif ot == "Y":  # Y is observed: no update, V = 0 (§2.10, §2.11)
            Yn = Yb
        else:
            Yn = update_Y_binary(Yhat, raw["X"][:, sl])
        Yn = Yn.astype(dt, copy=False)
        E = Yn - Yhat
        esq += float(_f64(xp.sum(E * E)))
        Y[:, sl] = Yn
    # how a checkpoint can rebuild this Y (models/multigedi/_ckpt.py): from Ŷ, the data and σ² when solved
    loc["y_from"] = ("solved", float(s2), yhat_digest.digest()) if solve else None
    return esq, V


def round_D(state, params):
    """Y update (§2.10) with the new o and the old σ²; returns e_mg (§2.11), t_mg (§2.12), ‖E‖².

    Elementwise work runs over blocks of cells (:func:`cell_blocks`), so the temporaries of the
    Halley / probit steps stay a few MiB whatever the sample size; Y is updated in place.
    """
    out = []
    for g, m, loc in _items(state):
        Y = loc["Y"]
        xp = get_xp(Y)
        esq, V = y_update_sample(loc, state["B"][g], params[m])
        oi, Q = loc["oi"], loc["Q"]
        e = loc["lamO"] * float(_f64(xp.sum(oi * oi))) + loc["lamQ"] * float(_f64(xp.sum(Q * Q))) + esq + V
        ds = loc["si"] - loc["si0"]
        out.append((g, m, e, float(_f64(xp.sum(ds * ds))), esq))
    return out


# ---------------------------------------------------------------------------------------------
# outputs and checkpoints
# ---------------------------------------------------------------------------------------------


def b_gram(state):
    """Per-sample B_g B_gᵀ (K x K), for the joint SVD (§7.1)."""
    return [(g, _f64(state["B"][g] @ state["B"][g].T)) for g in state["samples"]]


def store_pca_rows(state, T):
    """Leave this shard's joint-PCA rows B_gᵀ T (N_g x K) in ``state["pca"][g]`` for a store writer."""
    state["pca"] = {}
    for g in state["samples"]:
        B = state["B"][g]
        state["pca"][g] = B.T @ _p(get_xp(B), T, B.dtype)
    return None


def pca_rows(state, T):
    """Per-sample joint-PCA rows B_gᵀ T (N_g x K) as float64 NumPy, nothing else."""
    return [(g, _f64(state["B"][g]).T @ np.asarray(T, dtype=np.float64)) for g in state["samples"]]


def collect_local(state, T=None):
    """Per-sample Q_i, o_i, s_i and B_g (and PCA rows B_gᵀ T when ``T`` is given) as float64 NumPy."""
    out = []
    for g in state["samples"]:
        d = {"B": _f64(state["B"][g])}
        if T is not None:
            d["pca"] = _f64(state["B"][g]).T @ np.asarray(T, dtype=np.float64)
        for m, per in state["mods"].items():
            if g in per:
                loc = per[g]
                d[f"{m}/Q"] = _f64(loc["Q"])
                d[f"{m}/o_i"] = _f64(loc["oi"])
                d[f"{m}/s_i"] = _f64(loc["si"])
        out.append((g, d))
    return out


def dump_local(state) -> dict:
    """Checkpoint payload of a shard: ``{sample: {name: array}}`` (B, and per modality Y, Q, o_i, s_i, s_i0).

    Y is included: it cannot be rebuilt from the small state. Raw data are not (re-read from the store).
    NumPy arrays are returned without copying (the checkpoint writer consumes them before the state
    changes; a copy would double a worker's memory during a checkpoint).

    Examples
    --------
    >>> st = {"samples": ("a",), "B": {"a": np.zeros((2, 3))}, "mods": {}, "tmp": {}}
    >>> sorted(dump_local(st)["a"])
    ['B']
    """
    out = {}
    for g in state["samples"]:
        d = {"B": to_numpy(state["B"][g])}
        for m, per in state["mods"].items():
            if g in per:
                for name in ("Y", "Q", "oi", "si", "si0"):
                    d[f"{m}/{name}"] = to_numpy(per[g][name])
        out[g] = d
    return out


def restore_local(state, data: dict) -> None:
    """Inverse of :func:`dump_local`: overwrite the shard's local arrays from ``data``.

    Examples
    --------
    >>> st = {"samples": ("a",), "B": {"a": np.zeros((2, 3))}, "mods": {}, "tmp": {}}
    >>> restore_local(st, {"a": {"B": np.ones((2, 3))}}); float(st["B"]["a"].sum())
    6.0
    """
    for g in state["samples"]:
        if g not in data:
            raise KeyError(f"restore_local: checkpoint has no sample {g!r}")
        d = data[g]
        B = state["B"][g]
        state["B"][g] = _p(get_xp(B), d["B"], B.dtype).copy()
        for m, per in state["mods"].items():
            if g in per:
                loc = per[g]
                xp, dt = get_xp(loc["Y"]), loc["Y"].dtype
                for name in ("Y", "Q", "oi", "si", "si0"):
                    key = f"{m}/{name}"
                    if key not in d:
                        raise KeyError(f"restore_local: checkpoint of sample {g!r} lacks {key!r}")
                    loc[name] = _p(xp, d[key], dt).copy()
    return None
