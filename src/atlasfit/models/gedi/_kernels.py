"""Single-modality GEDI block updates that differ from MultiGEDI's (spec §2.1, §2.4-2.5 with prior
means, §2.8-2.9, §2.11 with P, L > 0, §7.4-7.5), one short function per update, written against
``xp``. Shared updates run on the driver in NumPy on reduced statistics.

Notation of ``shared/specs/multigedi.md``: Y_i is J x N_i, DB_i = diag(D) B_i, C is J x P (pathway
prior), H is L x I (sample covariates, column h_i per sample), A is P x K, R_k (k = 1..K) and R_o are
J x L; R is stored as one J x K x L array with R[:, k, :] = R_k.
"""

from __future__ import annotations

import numpy as np

from ..._xp import get_xp
from .._factor import project_Ytilde, residual_DBt


def solve_B_single(W, Y, o_oi, si):
    """Single-modal cell embedding (§2.1): B_i = (W_iᵀ W_i)⁻¹ W_iᵀ Ỹ_i — no ridge, no σ² weight.

    W_i = (Z + Q_i) diag(D),  Ỹ_i = Y_i − (o + o_i)1ᵀ − 1 s_iᵀ (WᵀỸ formed without Ỹ).

    Examples
    --------
    >>> W = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> Y = np.array([[4.0], [3.0], [0.0]])
    >>> solve_B_single(W, Y, np.zeros(3), np.zeros(1)).ravel().tolist()
    [2.0, 3.0]
    """
    xp = get_xp(W)
    WtW = W.T @ W
    rhs = project_Ytilde(W, Y, o_oi, si)
    try:
        return xp.linalg.solve(WtW, rhs)
    except np.linalg.LinAlgError as exc:
        raise np.linalg.LinAlgError(
            "GEDI: W_iᵀW_i of the single-modal B solve is singular (a factor's metagene (Z + Q_i) "
            "diag(D) is zero); lower K or use more genes"
        ) from exc


def update_Q_prior(mom, Z, o_oi, lamQ, Qhat):
    """Sample metagene deviation with a covariate prior mean (§2.4):

    Q_i := (R^Q_i DB_iᵀ + λ_Qi Q̂_i)(DB_i DB_iᵀ + λ_Qi I_K)⁻¹,
    R^Q_i = Y_i − Z DB_i − (o + o_i)1ᵀ − 1 s_iᵀ,  Q̂_i[:, k] = R_k h_i (0 without H).

    ``mom`` holds the sample moments Y DBᵀ, DB DBᵀ, DB 1, DB s_i (MultiGEDI's ``sample_moments``).

    Examples
    --------
    >>> mom = {"YDBt": np.array([[2.0]]), "H": np.array([[1.0]]), "DB1": np.zeros(1),
    ...        "DBs": np.zeros(1)}
    >>> update_Q_prior(mom, np.zeros((1, 1)), np.zeros(1), 1.0, np.array([[2.0]])).tolist()
    [[2.0]]
    """
    xp = get_xp(Z)
    Hm = mom["H"]
    lhs = Hm + lamQ * xp.eye(Hm.shape[0], dtype=Hm.dtype)
    rhs = residual_DBt(mom, Z, o_oi) + lamQ * Qhat
    return xp.linalg.solve(lhs, rhs.T).T


def update_oi_prior(rT, N, o, si, lamO, ohat):
    """Sample feature offset with a covariate prior mean (§2.5):

    o_i := (rowsum(Y_i − (Z + Q_i)DB_i − o1ᵀ − 1s_iᵀ) + λ_oi ô_i)/(N_i + λ_oi),  ô_i = R_o h_i.

    ``rT`` is rowsum(Y_i − (Z + Q_i) DB_i).

    Examples
    --------
    >>> update_oi_prior(np.array([10.0]), 2, np.array([1.0]), np.array([1.0, 2.0]), 2.0,
    ...                 np.array([1.0])).tolist()
    [1.75]
    """
    return (rT - N * o - si.sum() + lamO * ohat) / (N + lamO)


def qhat_from_R(R, h):
    """Prior means of one sample (§1.1): Q̂_i[:, k] = R_k h_i (J x K) from R (J x K x L).

    Examples
    --------
    >>> R = np.ones((2, 3, 1)); qhat_from_R(R, np.array([2.0])).tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    return R @ h


def pathway_solver(C, lamA=1.0):
    """(CᵀC + λ_A I_P)⁻¹ Cᵀ (P x J), precomputed once when C is set (§2.8, λ_A = 1/S_A = 1).

    Examples
    --------
    >>> pathway_solver(np.array([[1.0], [1.0], [0.0]])).round(6).tolist()
    [[0.333333, 0.333333, 0.0]]
    """
    C = np.asarray(C, dtype=np.float64)
    P = C.shape[1]
    return np.linalg.solve(C.T @ C + lamA * np.eye(P), C.T)


def update_A(solver, Z):
    """Pathway coefficients (§2.8): A := (CᵀC + λ_A I_P)⁻¹ Cᵀ Z  (P x K), ``solver`` from
    :func:`pathway_solver`.

    Examples
    --------
    >>> update_A(pathway_solver(np.array([[1.0], [1.0]])), np.array([[3.0], [3.0]])).tolist()
    [[2.0]]
    """
    return solver @ np.asarray(Z, dtype=np.float64)


def update_R(T, Hw, lamR=1.0):
    """Covariate effects (§2.9): R_k := (Σ_i w_i Q_i[:, k] h_iᵀ)(Σ_i w_i h_i h_iᵀ + λ_R I_L)⁻¹.

    ``T`` is Σ_i w_i Q_i ⊗ h_i (J x K x L) — or Σ_i u_i o_i h_iᵀ (J x L) for R_o — and ``Hw`` the
    L x L matrix Σ_i w_i h_i h_iᵀ; λ_R = 1/(S̄_Qi S_R) = 1.

    Examples
    --------
    >>> update_R(np.array([[4.0]]), np.array([[1.0]])).tolist()
    [[2.0]]
    """
    T = np.asarray(T, dtype=np.float64)
    L = Hw.shape[0]
    Minv = np.linalg.inv(np.asarray(Hw, dtype=np.float64) + lamR * np.eye(L))
    return T @ Minv  # Minv symmetric: (T_k M⁻¹) for every k at once


def gedi_dof(J, N, I, K, P, L):
    """dof = J(N + I) + IJK + (K + 1)JL + K(J + P)  (§2.11).

    Examples
    --------
    >>> gedi_dof(4, 3, 2, 2, 0, 0)  # 4*5 + 2*4*2 + 0 + 2*4
    44
    """
    return J * (N + I) + I * J * K + (K + 1) * J * L + K * (J + P)


def update_sigma2_gedi(Z, C, A, R, Ro, e_sum, dof, lamZ=1.0, lamA=1.0, lamR=1.0):
    """Residual variance (§2.11), driver-side, single-modal:

    σ² := [λ_Z‖Z − CA‖² + λ_Z λ_A‖A‖² + Σ_i e_i + λ_R Σ_k‖R_k‖² + λ_R‖R_o‖²] / dof,
    e_i = λ_oi‖o_i − ô_i‖² + λ_Qi‖Q_i − Q̂_i‖² + ‖E_i‖² + V_i  (λ = 1/S; ``C``/``R`` None when absent).

    Examples
    --------
    >>> update_sigma2_gedi(np.ones((1, 1)), None, None, None, None, 9.0, 5)
    2.0
    """
    Z = np.asarray(Z, dtype=np.float64)
    dz = Z if C is None else Z - np.asarray(C, dtype=np.float64) @ A
    num = lamZ * float(np.sum(dz * dz)) + e_sum
    if C is not None:
        num += lamZ * lamA * float(np.sum(A * A))
    if R is not None:
        num += lamR * (float(np.sum(R * R)) + float(np.sum(Ro * Ro)))
    return float(num / dof)


# ---------------------------------------------------------------------------------------------
# outputs (§7.4, §7.5)
# ---------------------------------------------------------------------------------------------


def diff_Q(R, hc):
    """Metagene effect of a contrast (§7.4): diffQ = [R_1 h_c, …, R_K h_c] (J x K).

    Examples
    --------
    >>> diff_Q(np.ones((2, 1, 2)), np.array([1.0, -1.0])).tolist()
    [[0.0], [0.0]]
    """
    return np.asarray(R, dtype=np.float64) @ np.asarray(hc, dtype=np.float64)


def diff_O(Ro, hc):
    """Offset effect of a contrast (§7.4): diffO = R_o h_c (J).

    Examples
    --------
    >>> diff_O(np.array([[1.0, 2.0]]), np.array([1.0, 1.0])).tolist()
    [3.0]
    """
    return np.asarray(Ro, dtype=np.float64) @ np.asarray(hc, dtype=np.float64)


def diff_exp(dQ, DB):
    """Cell-level differential expression (§7.4): diffExp = Σ_k (R_k h_c)(D_k B[k, :]) = diffQ · DB
    (J x N, log scale).

    Examples
    --------
    >>> diff_exp(np.array([[1.0, 2.0]]), np.array([[1.0], [1.0]])).tolist()
    [[3.0]]
    """
    return dQ @ DB
