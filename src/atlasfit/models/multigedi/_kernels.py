"""MultiGEDI block updates, one short function per update, written once against ``xp``.

Notation of ``shared/specs/multigedi.md``: for one sample i of one modality, Y is J x N_i (features x
cells), DB = diag(D) B (K x N_i), o and o_i are J-vectors, s_i is an N_i-vector. Shared updates
(``update_Z_*``, ``update_o``, ``update_sigma2``, ``update_hyperpriors``) run on the driver in NumPy
on reduced statistics; local ones run on the shard's arrays (NumPy or CuPy).
"""

from __future__ import annotations

import numpy as np

from ..._xp import get_xp, is_cupy

NORM_EPS = 1e-10  # norms <= this are not inverted (spec §2.2, §3.4)
LOG_EPS = 1e-10  # lower Y bound for counts: log(M + 1e-10) (spec §2.10)


def densify(block, xp=np, dtype=np.float64):
    """Dense ``xp`` array of ``block`` (NumPy/CuPy array, scipy.sparse or cupyx.scipy.sparse).

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> densify(sp.csr_matrix([[0, 2]])).tolist()
    [[0.0, 2.0]]
    """
    if hasattr(block, "toarray") and not isinstance(block, np.ndarray) and not is_cupy(block):
        block = block.toarray()
    return xp.asarray(block, dtype=dtype)


def _special(xp):
    if xp is np:
        import scipy.special as sc
    else:  # pragma: no cover - GPU only
        import cupyx.scipy.special as sc  # noqa: PLC0415
    return sc


# ---------------------------------------------------------------------------------------------
# Round A: shared B, normalisation, D
# ---------------------------------------------------------------------------------------------


def project_Ytilde(W, Y, o_oi, si):
    """Wᵀ Ỹ without forming Ỹ (§3.3): Wᵀ Y − (Wᵀ(o + o_i)) 1ᵀ − (Wᵀ 1_J) s_iᵀ.

    Examples
    --------
    >>> import numpy as np
    >>> W, Y = np.eye(2), np.array([[3.0], [5.0]])
    >>> project_Ytilde(W, Y, np.array([1.0, 1.0]), np.array([1.0])).ravel().tolist()
    [1.0, 3.0]
    """
    return W.T @ Y - (W.T @ o_oi)[:, None] - W.sum(axis=0)[:, None] * si[None, :]


def solve_shared_B(W_list, WtYt_list, inv_sigma2_list):
    """Shared embedding of one global sample (spec §3.3).

    B_g = ( I_K + Σ_m σ_m⁻² W_mᵀ W_m )⁻¹ ( Σ_m σ_m⁻² W_mᵀ Ỹ_m ),  W_m = (Z_m + Q_m) diag(D_m),
    Ỹ_m = Y_m − (o_m + o_m,i)1ᵀ − 1 s_m,iᵀ  (W_mᵀỸ_m given, see :func:`project_Ytilde`).

    Examples
    --------
    >>> import numpy as np
    >>> W = np.eye(2); WtYt = np.array([[2.0], [4.0]])
    >>> solve_shared_B([W], [WtYt], [1.0]).ravel().tolist()
    [1.0, 2.0]
    """
    xp = get_xp(W_list[0])
    K = W_list[0].shape[1]
    L = xp.eye(K, dtype=W_list[0].dtype)
    R = None
    for W, WtYt, w in zip(W_list, WtYt_list, inv_sigma2_list):
        L = L + (W.T @ W) * w
        r = WtYt * w
        R = r if R is None else R + r
    return xp.linalg.solve(L, R)


def normalize_B_columns(B):
    """Bsphere: scale every cell column of B to unit norm (columns with norm <= 1e-10 kept), §3.4.

    Examples
    --------
    >>> import numpy as np
    >>> normalize_B_columns(np.array([[3.0, 0.0], [4.0, 0.0]])).tolist()
    [[0.6, 0.0], [0.8, 0.0]]
    """
    xp = get_xp(B)
    nrm = xp.sqrt(xp.sum(B * B, axis=0))
    return B / xp.where(nrm > NORM_EPS, nrm, 1.0)[None, :]


def row_sumsq(B):
    """ρ = row sums of squares of B (K-vector), the per-sample statistic of §2.2."""
    xp = get_xp(B)
    return xp.sum(B * B, axis=1)


def inv_sqrt_guard(rho):
    """c_k = 1/sqrt(ρ_k) if sqrt(ρ_k) > 1e-10 else 1 (spec §2.2); driver-side, NumPy.

    Examples
    --------
    >>> inv_sqrt_guard(np.array([4.0, 0.0])).tolist()
    [0.5, 1.0]
    """
    r = np.sqrt(np.asarray(rho, dtype=np.float64))
    out = np.ones_like(r)
    ok = r > NORM_EPS
    out[ok] = 1.0 / r[ok]
    return out


# ---------------------------------------------------------------------------------------------
# Round B: Z
# ---------------------------------------------------------------------------------------------


def sample_moments(Y, DB, si):
    """Small products of one sample reused by the Z and Q_i updates (Y and DB fixed in between).

    Returns Y DBᵀ (J x K), H = DB DBᵀ (K x K), DB 1 (K) and DB s_i (K).
    """
    return {"YDBt": Y @ DB.T, "H": DB @ DB.T, "DB1": DB.sum(axis=1), "DBs": DB @ si}


def residual_DBt(mom, X, o_oi):
    """(Y − X DB − (o + o_i)1ᵀ − 1 s_iᵀ) DBᵀ = Y DBᵀ − X H − (o + o_i)(DB1)ᵀ − 1_J (DB s_i)ᵀ."""
    return mom["YDBt"] - X @ mom["H"] - o_oi[:, None] * mom["DB1"][None, :] - mom["DBs"][None, :]


def z_statistics(mom, Q, o, oi):
    """Per-sample statistic of the Z update (§2.3): G_i = R^Z_i DB_iᵀ (H_i = DB_i DB_iᵀ is ``mom["H"]``).

    R^Z_i = Y_i − Q_i DB_i − (o + o_i)1ᵀ − 1 s_iᵀ (expanded, :func:`residual_DBt`).
    """
    return residual_DBt(mom, Q, o + oi)


def update_Z_ortho(G, S_old, lamZ=1.0):
    """Orthogonal Z update (§2.3a), driver-side.

    U₁ Σ V₁ᵀ = svd(G diag(S_old));  U := U₁ V₁ᵀ;  S_k := u_kᵀ g_k / (1 + λ_Z);  Z := U diag(S).

    Returns
    -------
    U, S, Z

    Examples
    --------
    >>> G = np.array([[2.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    >>> U, S, Z = update_Z_ortho(G, np.ones(2))
    >>> S.tolist()
    [1.0, 2.0]
    """
    G = np.asarray(G, dtype=np.float64)
    U1, _, V1t = np.linalg.svd(G * np.asarray(S_old, dtype=np.float64)[None, :], full_matrices=False)
    U = U1 @ V1t
    S = np.sum(U * G, axis=0) / (1.0 + lamZ)
    return U, S, U * S[None, :]


def update_Z_regular(G, H, lamZ=1.0):
    """Ridge Z update (§2.3b), driver-side:  Z := G (H + λ_Z I_K)⁻¹.

    Examples
    --------
    >>> update_Z_regular(np.array([[2.0]]), np.array([[1.0]])).tolist()
    [[1.0]]
    """
    G = np.asarray(G, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    K = H.shape[0]
    return np.linalg.solve(H + lamZ * np.eye(K), G.T).T


# ---------------------------------------------------------------------------------------------
# Round C: Q_i, o_i, s_i and the o statistic
# ---------------------------------------------------------------------------------------------


def update_Q(mom, Z, o, oi, lamQ):
    """Sample metagene deviation (§2.4), with the new Z and previous o, o_i, s_i.

    Q_i := R^Q_i DB_iᵀ (DB_i DB_iᵀ + λ_Qi I_K)⁻¹,  R^Q_i = Y_i − Z DB_i − (o + o_i)1ᵀ − 1 s_iᵀ
    (R^Q_i DB_iᵀ expanded, :func:`residual_DBt`).
    """
    xp = get_xp(Z)
    H = mom["H"]
    A = H + lamQ * xp.eye(H.shape[0], dtype=H.dtype)
    return xp.linalg.solve(A, residual_DBt(mom, Z, o + oi).T).T


def update_oi(rT, N, o, si, lamO):
    """Sample feature offset (§2.5): o_i := rowsum(Y_i − (Z + Q_i)DB_i − o1ᵀ − 1s_iᵀ)/(N_i + λ_oi).

    ``rT`` is rowsum(Y_i − (Z + Q_i) DB_i) (rowsum(Y_i) when the caches are taken as zero, §5.3).

    Examples
    --------
    >>> update_oi(np.array([10.0]), 2, np.array([1.0]), np.array([1.0, 2.0]), 2.0).tolist()
    [1.25]
    """
    return (rT - N * o - si.sum()) / (N + lamO)


def update_si(cT, J, o, oi, si0, lamS):
    """Per-cell offset (§2.6): s_i := (colsum(Y_i − (Z + Q_i)DB_i − (o + o_i)1ᵀ) + λ_s s_i0)/(J + λ_s).

    ``cT`` is colsum(Y_i − (Z + Q_i) DB_i).
    """
    return (cT - (o + oi).sum() + lamS * si0) / (J + lamS)


def o_statistic(rT, N, oi, si):
    """Per-sample statistic of the o update (§2.7): v_i = rowsum(Y_i − (Z + Q_i)DB_i − o_i1ᵀ − 1s_iᵀ)."""
    return rT - N * oi - si.sum()


def update_o(v_sum, N, lam_o, o0):
    """Global feature offset (§2.7), driver-side: o := (Σ_i v_i + λ_o o_0)/(N + λ_o).

    Examples
    --------
    >>> update_o(np.array([6.0]), 2, 1.0, np.array([0.0])).tolist()
    [2.0]
    """
    return (np.asarray(v_sum, dtype=np.float64) + lam_o * np.asarray(o0, dtype=np.float64)) / (N + lam_o)


# ---------------------------------------------------------------------------------------------
# Round D: Y, sigma2, hyperpriors
# ---------------------------------------------------------------------------------------------


def _halley(f, fp, fpp):
    return 2.0 * f * fp / (2.0 * fp * fp - f * fpp)


def update_Y_counts(Y, Yhat, M, sigma2):
    """One safeguarded Halley step for Poisson-log-normal Y (§2.10, obs type M).

    Root of g(y) = y − Ŷ − σ²M + σ²eʸ from y₀ = Y:  y₁ = y₀ − 2ff′/(2f′² − ff″), with
    a = y₀ − Ŷ − σ²M and (y₀ > 0) f = σ² + e^{−y₀}a, f′ = σ² + e^{−y₀}, f″ = σ²;
    (y₀ <= 0) f = σ²e^{y₀} + a, f′ = σ²e^{y₀} + 1, f″ = σ²e^{y₀}. Then clamp y₁ to
    [min(ℓ, Ŷ), max(ℓ, Ŷ)], ℓ = log(M + 1e-10).

    Examples
    --------
    >>> y = update_Y_counts(np.array([1.0]), np.array([1.0]), np.array([3.0]), 0.5)
    >>> bool(np.log(3.0 + 1e-10) > y[0] > 1.0)
    True
    """
    xp = get_xp(Y)
    a = Y - Yhat - sigma2 * M
    y1 = _counts_halley(Y, a, sigma2, xp)
    ell = xp.log(M + LOG_EPS)
    return xp.minimum(xp.maximum(y1, xp.minimum(ell, Yhat)), xp.maximum(ell, Yhat))


def _counts_halley(Y, a, sigma2, xp):
    """The Halley step of :func:`update_Y_counts` given a = Y − Ŷ − σ²M (shared by the dense and sparse kernels)."""
    pos = Y > 0
    e = xp.exp(-xp.abs(Y))  # e^{-y} if y > 0 else e^{y}; never overflows
    c1 = xp.where(pos, 1.0, e)  # the two branches as one expression (exact: 1*x == x)
    c2 = xp.where(pos, e, 1.0)
    s1 = sigma2 * c1
    f = s1 + c2 * a
    fp = s1 + c2
    return Y - _halley(f, fp, s1)


def update_Y_paired(Y, Yhat, M1, M2, sigma2):
    """One safeguarded Halley step for binomial-logit-normal Y (§2.10, obs type M_list).

    α = Ŷ − σ²M2, β = Ŷ + σ²M1; root of F(y) = (y − α) + e^{−y}(y − β). For y₀ > 0:
    f = y₀ − α + (y₀ − β)e^{−y₀}, f′ = 1 + e^{−y₀}(β − y₀ + 1), f″ = e^{−y₀}(y₀ − β − 2);
    else (scaled by e^{y₀}): f = e^{y₀}(y₀ − α) + y₀ − β, f′ = e^{y₀} + β − y₀ + 1, f″ = y₀ − β − 2.
    Halley step, then clamp to [α, β].

    Examples
    --------
    >>> y = update_Y_paired(np.array([0.0]), np.array([0.0]), np.array([5.0]), np.array([1.0]), 1.0)
    >>> bool(-1.0 <= y[0] <= 5.0)
    True
    """
    xp = get_xp(Y)
    alpha = Yhat - sigma2 * M2
    beta = Yhat + sigma2 * M1
    return _paired_halley(Y, alpha, beta, xp)


def _paired_halley(Y, alpha, beta, xp):
    """The Halley step and clamp of :func:`update_Y_paired` given α, β (shared by the dense and sparse kernels)."""
    pos = Y > 0
    e = xp.exp(-xp.abs(Y))
    c1 = xp.where(pos, 1.0, e)  # y > 0: (c1, c2) = (1, e^{-y}); else (e^{y}, 1)
    c2 = xp.where(pos, e, 1.0)
    a = Y - alpha
    b = Y - beta
    f = c1 * a + c2 * b
    fp = c1 + c2 * (1.0 - b)
    fpp = c2 * (b - 2.0)
    y1 = Y - _halley(f, fp, fpp)
    return xp.minimum(xp.maximum(y1, alpha), beta)  # alpha <= beta since M1, M2 >= 0, sigma2 > 0


def csc_block_entries(csc, sl: slice, dtype):
    """``(rows, cols, values)`` of the stored entries of columns ``sl`` of a canonical SciPy CSC
    matrix (cols relative to ``sl.start``), values in ``dtype``; read straight from ``indptr`` (no
    SciPy slice object per block)."""
    ip = csc.indptr
    lo, hi = int(ip[sl.start]), int(ip[sl.stop])
    counts = np.diff(ip[sl.start:sl.stop + 1])
    cols = np.repeat(np.arange(sl.stop - sl.start, dtype=np.intp), counts)
    return csc.indices[lo:hi].astype(np.intp, copy=False), cols, csc.data[lo:hi].astype(dtype, copy=False)


def _log_eps_fill(shape, dtype):
    """log(0 + LOG_EPS) in ``dtype``, evaluated by the same elementwise log as the dense path."""
    v = np.log(np.full(8, LOG_EPS, dtype=dtype) + np.zeros(8, dtype=dtype))[0]
    return np.full(shape, v, dtype=dtype)


def sparse_y_ok(Y, sigma2) -> bool:
    """Whether :func:`update_Y_counts_sparse` / :func:`update_Y_paired_sparse` give the dense kernels'
    bits for this ``Y``: NumPy arrays, and σ² times a ``Y.dtype`` array stays in ``Y.dtype`` (a NumPy
    float64 σ² would lift a float32 fit's dense temporaries to float64)."""
    return isinstance(Y, np.ndarray) and (sigma2 * np.ones(1, dtype=Y.dtype)).dtype == Y.dtype


def update_Y_counts_sparse(Y, Yhat, M, sigma2):
    """:func:`update_Y_counts` with the counts ``M`` given by their stored entries ``(rows, cols,
    values)`` (:func:`csc_block_entries`; values in ``Y.dtype``): the same bits.

    σ²M and log(M + ε) are evaluated only at the stored entries (a zero count contributes
    ``x − σ²·0 = x`` and log ε, a constant), so the block is never densified and the logarithm, the
    costliest pass of the step, runs on the non-zeros only. (Halley step and clamps as the dense kernel.)
    """
    r, c, d = M
    a = Y - Yhat
    a[r, c] -= sigma2 * d
    y1 = _counts_halley(Y, a, sigma2, np)
    ell = _log_eps_fill(Y.shape, Y.dtype)
    ell[r, c] = np.log(d + LOG_EPS)
    return np.minimum(np.maximum(y1, np.minimum(ell, Yhat)), np.maximum(ell, Yhat))


def update_Y_paired_sparse(Y, Yhat, M1, M2, sigma2):
    """:func:`update_Y_paired` with ``M1``, ``M2`` as stored entries ``(rows, cols, values)``: the same bits, without
    densifying either (α = Ŷ − σ²M2 and β = Ŷ + σ²M1 differ from Ŷ only at stored entries; β is
    first Ŷ + 0, which turns −0 into +0 exactly as the dense sum does)."""
    r1, c1, d1 = M1
    r2, c2, d2 = M2
    alpha = Yhat.copy()
    alpha[r2, c2] = Yhat[r2, c2] - sigma2 * d2
    beta = Yhat + 0.0
    beta[r1, c1] = Yhat[r1, c1] + sigma2 * d1
    return _paired_halley(Y, alpha, beta, np)


def update_Y_binary(Yhat, X):
    """Probit Y (§2.10, obs type X): Y := E[Y* | X, Ŷ], Y* ~ N(Ŷ, 1).

    X = 1: Ŷ + φ(Ŷ)/Φ(Ŷ);  X = 0: Ŷ − φ(Ŷ)/Φ(−Ŷ);  any other value (NaN): Ŷ.
    The ratios are evaluated as exp(log φ − log Φ) with ``log_ndtr`` (no underflow).

    Examples
    --------
    >>> from scipy.stats import truncnorm
    >>> y = update_Y_binary(np.array([0.3]), np.array([1.0]))
    >>> bool(abs(y[0] - truncnorm.mean(-0.3, np.inf, loc=0.3)) < 1e-12)
    True
    """
    xp = get_xp(Yhat)
    sc = _special(xp)
    log_phi = -0.5 * Yhat * Yhat - float(0.5 * np.log(2.0 * np.pi))
    up = Yhat + xp.exp(log_phi - sc.log_ndtr(Yhat))
    down = Yhat - xp.exp(log_phi - sc.log_ndtr(-Yhat))
    return xp.where(X == 1, up, xp.where(X == 0, down, Yhat))


def variance_counts(Y, sigma2_old):
    """Laplace correction of σ² for obs type M (§2.11): V = Σ 1/(e^Y + 1/σ²_old)."""
    xp = get_xp(Y)
    return xp.sum(1.0 / (xp.exp(Y) + 1.0 / sigma2_old))


def variance_paired(Y, M1, M2, sigma2_old):
    """Laplace correction for M_list (§2.11): V = Σ 1/((M1+M2) q + 1/σ²_old), q = e^{−|Y|}/(1+e^{−|Y|})²."""
    xp = get_xp(Y)
    e = xp.exp(-xp.abs(Y))
    q = e / ((1.0 + e) * (1.0 + e))
    return xp.sum(1.0 / ((M1 + M2) * q + 1.0 / sigma2_old))


def update_sigma2(Z_sqnorm, e_sum, dof, lamZ=1.0):
    """Residual variance (§2.11), driver-side: σ² := (‖Z‖²/S_Z + Σ_i e_i) / dof.

    e_i = λ_oi‖o_i‖² + λ_Qi‖Q_i‖² + ‖E_i‖² + V_i;  dof = J(N + I) + IJK + KJ.

    Examples
    --------
    >>> update_sigma2(1.0, 9.0, 5)
    2.0
    """
    return float((lamZ * Z_sqnorm + e_sum) / dof)


def update_hyperpriors(o, sigma2, t_sum, N):
    """Hyperpriors (§2.12), driver-side.

    ō = mean(o); o_0 := ō 1; S_o := (‖o − ō1‖² + 2)/(σ²(J + 2)); S_si := (Σ_i‖s_i − s_i0‖²/σ² + 2)/(N + 2).

    Returns
    -------
    o0, S_o, S_si

    Examples
    --------
    >>> o0, S_o, S_si = update_hyperpriors(np.array([1.0, 3.0]), 1.0, 2.0, 2)
    >>> o0.tolist(), S_o, S_si
    ([2.0, 2.0], 1.0, 1.0)
    """
    o = np.asarray(o, dtype=np.float64)
    J = o.size
    obar = o.mean()
    d = o - obar
    S_o = (float(d @ d) + 2.0) / (sigma2 * (J + 2))
    S_si = (t_sum / sigma2 + 2.0) / (N + 2)
    return np.full(J, obar), float(S_o), float(S_si)


# ---------------------------------------------------------------------------------------------
# Y solved to its conditional optimum (the checkpoint iterations of a compact-checkpoint fit)
# ---------------------------------------------------------------------------------------------

SOLVE_MAX_STEPS = 80  # safeguarded Halley/bisection steps; 1e-300-wide brackets need ~70 bisections at worst


def _bracketed_root(lo, hi, start, params, fgh, xp):
    """Root of an increasing function in [lo, hi] by Halley steps kept inside a shrinking bracket.

    ``fgh(y, *params) -> (f, f', f'')`` of a positive multiple of the function (so f has its sign),
    entry by entry (``params``: arrays of the shape of ``lo``). A step that leaves the open bracket
    is replaced by bisection. An entry whose Halley step leaves it unchanged is a fixed point of the
    iteration (its next step is the same), as is one whose bracket has collapsed to adjacent floats;
    such entries leave the working set, and the loop ends when none is left: the result is that of
    :data:`SOLVE_MAX_STEPS` steps, entry by entry, whatever the other entries of the block.
    """
    shape = lo.shape
    lo, hi = lo.ravel(), hi.ravel()
    out = xp.minimum(xp.maximum(start.ravel(), lo), hi)
    idx = xp.nonzero(lo < hi)[0]  # a collapsed bracket (e.g. paired counts both 0: α = β = Ŷ) is the root
    y, lo, hi = out[idx], lo[idx], hi[idx]
    params = [p.ravel()[idx] for p in params]
    for _ in range(SOLVE_MAX_STEPS):
        if idx.size == 0:
            break
        f, fp, fpp = fgh(y, *params)
        lo = xp.where(f < 0, y, lo)
        hi = xp.where(f > 0, y, hi)
        cand = y - _halley(f, fp, fpp)
        inside = (cand > lo) & (cand < hi)
        mid = 0.5 * lo + 0.5 * hi  # no overflow
        y_new = xp.where((cand == y) | (f == 0), y, xp.where(inside, cand, mid))
        out[idx] = y_new
        moving = xp.nonzero(y_new != y)[0]
        idx = idx[moving]
        y, lo, hi = y_new[moving], lo[moving], hi[moving]
        params = [p[moving] for p in params]
    return out.reshape(shape)


def solve_Y_counts(Yhat, M, sigma2):
    """Y = the root of g(y) = y − Ŷ − σ²M + σ²eʸ (§2.10, obs type M) to working precision, from Ŷ and
    the data alone: the exact minimiser of the Y block for the current Ŷ and σ², where the
    reference takes one Halley step from the previous Y. Same scaled (f, f′, f″) as
    :func:`update_Y_counts`; bracket [min(ℓ, Ŷ), max(ℓ, Ŷ)], ℓ = log(M + 1e-10).

    Examples
    --------
    >>> y = solve_Y_counts(np.array([1.0, -3.0]), np.array([3.0, 0.0]), 0.5)
    >>> g = y - np.array([1.0, -3.0]) - 0.5 * np.array([3.0, 0.0]) + 0.5 * np.exp(y)
    >>> bool(np.all(np.abs(g) < 1e-12))
    True
    """
    xp = get_xp(Yhat)
    ell = xp.log(M + LOG_EPS)
    c = Yhat + sigma2 * M

    def fgh(y, c):
        pos = y > 0
        e = xp.exp(-xp.abs(y))
        c1 = xp.where(pos, 1.0, e)
        c2 = xp.where(pos, e, 1.0)
        s1 = sigma2 * c1
        return s1 + c2 * (y - c), s1 + c2, s1

    return _bracketed_root(xp.minimum(ell, Yhat), xp.maximum(ell, Yhat), Yhat, [c], fgh, xp)


def solve_Y_paired(Yhat, M1, M2, sigma2):
    """Y = the root of F(y) = (y − α) + e^{−y}(y − β) in [α, β] (§2.10, obs type M_list; α = Ŷ − σ²M2,
    β = Ŷ + σ²M1) to working precision, from Ŷ and the data alone. F = (1 + e^{−y})·h with
    h(y) = y − (1 − p)β − pα increasing (h′ = 1 + p′(β − α) > 0), so F has the sign of an increasing
    function. Same scaled (f, f′, f″) as :func:`update_Y_paired`.

    Examples
    --------
    >>> y = solve_Y_paired(np.array([0.0]), np.array([5.0]), np.array([1.0]), 1.0)
    >>> a, b = 0.0 - 1.0, 0.0 + 5.0
    >>> bool(abs((y[0] - a) + np.exp(-y[0]) * (y[0] - b)) < 1e-12)
    True
    """
    xp = get_xp(Yhat)
    alpha = Yhat - sigma2 * M2
    beta = Yhat + sigma2 * M1

    def fgh(y, alpha, beta):
        pos = y > 0
        e = xp.exp(-xp.abs(y))
        c1 = xp.where(pos, 1.0, e)
        c2 = xp.where(pos, e, 1.0)
        b = y - beta
        return c1 * (y - alpha) + c2 * b, c1 + c2 * (1.0 - b), c2 * (b - 2.0)

    return _bracketed_root(alpha, beta, Yhat, [alpha, beta], fgh, xp)
