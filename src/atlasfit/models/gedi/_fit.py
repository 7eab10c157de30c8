"""Driver side of a single-modality GEDI fit: initialisation (§5.5 with §5.3) and one BCD iteration
(§2, single-modal order) as map → reduce rounds on the engine.

Round A: B_i (§2.1) and the normalisation statistic → D (Bsphere) or the row scale (Bl2) (§2.2).
Round B: G = Σ_i R^Z_i DB_iᵀ (MultiGEDI's round B) → Z with the pathway prior C A (§2.3).
Round C: Q_i, o_i, s_i on the shards (prior means Q̂_i, ô_i from H) → o (§2.7).
Round D: Y and the σ² statistics → σ² (§2.11), hyperpriors (§2.12), then A (§2.8) and R_k, R_o (§2.9).
Statistics are summed in global sample order: the same bits for any grouping of samples into shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...engine import gather_by_sample, ordered_sum
from .._factor import inv_sqrt_guard, msh, rsvd_modality, update_hyperpriors, update_o, update_Z_ortho, update_Z_regular
from . import _shard as sh
from ._kernels import gedi_dof, update_A, update_R, update_sigma2_gedi


@dataclass(frozen=True)
class GediContext:
    """Fixed settings and inputs of one GEDI fit (driver side).

    Attributes
    ----------
    modality
        Modality name (the hashed rSVD seed uses it, §5.3).
    obs_type, orthoZ, is_si_fixed, mode, K
        As in :class:`atlasfit.models.multigedi.ModalityConfig` / ``FitConfig``.
    C, solver
        Gene-level prior J x P and (CᵀC + λ_A I)⁻¹Cᵀ (P x J); ``None`` without C.
    H
        Covariates L x I, columns in global sample order; ``None`` without H.
    lamQ, lamO
        λ_Qi = 1/S_Qi and λ_oi = 1/S_oi (single-modal defaults 1, §1.4).
    """

    modality: str
    obs_type: str
    orthoZ: bool
    is_si_fixed: bool
    mode: str
    K: int
    C: Any = None
    solver: Any = None
    H: Any = None
    lamQ: float = 1.0
    lamO: float = 1.0
    lamZ: float = 1.0
    lamA: float = 1.0
    lamR: float = 1.0

    @property
    def P(self) -> int:
        return 0 if self.C is None else int(self.C.shape[1])

    @property
    def L(self) -> int:
        return 0 if self.H is None else int(self.H.shape[0])


def _per_sample(results, plan, m):
    """``{g: entry}`` from shard results, and the modality's samples in global order."""
    res = gather_by_sample(results)
    mine = set(plan.mod_samples[m])
    order = [g for g in plan.global_samples if g in mine]
    return {g: res[g][0] for g in order}, order


def initialize_gedi(engine, plan, config, ctx: GediContext) -> dict:
    """Single-modal initialisation (§5.5): o = 0, s_i = 0, σ² = 1, D = 1, S_o = S_si = 1, o_0 = 0;
    then the randomised SVD of §5.3 (o_i with zero caches, rSVD of Ỹ, Z = U diag(σ/2), Q_i := Z,
    B_i by least squares with W = 2 Z diag(D)) and the single-modal normalisation (§2.2).
    A = 0 and R = 0 (so Q̂_i = ô_i = 0) until their first update at the end of iteration 1.

    The rSVD test matrix is standard normal from the hashed seed sha256("{seed}|{modality}")
    (MultiGEDI's convention, §5.3), so the start is deterministic; the reference's single-modal
    initialiser draws it from an unseeded generator.

    Returns
    -------
    dict
        The shared (driver) state.

    Examples
    --------
    >>> from atlasfit.engine import SerialEngine, plan_shards
    >>> from atlasfit.models.multigedi import FitConfig, ModalityConfig, InMemoryReader, make_plan
    >>> from atlasfit.models.gedi._shard import load_gedi_shard
    >>> rng = np.random.default_rng(0); lab = np.repeat(["a", "b"], 30)
    >>> plan = make_plan({"rna": lab}, {"rna": 20})
    >>> cfg = FitConfig(K=3, modalities=[ModalityConfig("rna")])
    >>> ctx = GediContext("rna", "M", True, False, "Bsphere", 3)
    >>> eng = SerialEngine(plan_shards(plan.global_samples, [30, 30]))
    >>> eng.setup(load_gedi_shard, InMemoryReader({"rna": rng.poisson(2.0, (60, 20))}, {"rna": lab}),
    ...           plan, cfg, 1.0, 1.0, {"a": np.zeros(0), "b": np.zeros(0)})
    >>> shared = initialize_gedi(eng, plan, cfg, ctx)
    >>> shared = iterate_gedi(eng, shared, 0, plan=plan, config=cfg, ctx=ctx)
    >>> shared["Z"].shape, shared["iteration"]
    ((20, 3), 1)
    """
    m, K = ctx.modality, ctx.K
    J = plan.n_features[m]
    shared = {
        "iteration": 0,
        "Z": np.zeros((J, K)), "U": np.zeros((J, K)), "S": np.ones(K), "D": np.ones(K),
        "o": np.zeros(J), "o0": np.zeros(J), "sigma2": 1.0, "S_o": 1.0, "S_si": 1.0,
        "tracking/sigma2": np.zeros(0), "tracking/dZ": np.zeros(0), "tracking/dA": np.zeros(0),
        "tracking/dR": np.zeros(0),
    }
    if ctx.C is not None:
        shared["A"] = np.zeros((ctx.P, K))
    if ctx.H is not None:
        shared["R"] = np.zeros((J, K, ctx.L))
        shared["Ro"] = np.zeros((J, ctx.L))
    o = {m: shared["o"]}
    engine.map(msh.rsvd_set_oi, m, o)
    U, sig = rsvd_modality(engine, plan, config, m, o[m])
    shared["U"], shared["S"] = U, sig / 2.0
    shared["Z"] = U * (sig / 2.0)[None, :]
    params = {m: {"Z": shared["Z"], "D": shared["D"], "o": o[m]}}
    largest = {g: m for g in plan.global_samples}
    rho, order = _per_sample(engine.map(msh.init_B, params, {m}, largest, ctx.mode), plan, m)
    c = inv_sqrt_guard(ordered_sum([rho[g][0] for g in order]))
    if ctx.mode == "Bsphere":
        shared["D"] = c
        scale = None
    else:
        scale = c  # Bl2: rescale the rows of B, D unchanged
    engine.map(msh.init_finish, scale, o)
    return shared


def iterate_gedi(engine, shared: dict, it: int | None = None, *, plan, config, ctx: GediContext,
                 solve_Y_every: int | None = None) -> dict:
    """One single-modal GEDI iteration (§2, order B → normalise → Z → Q_i → o_i → s_i → o → Y → σ²
    → hyperpriors → A → R_k, R_o). Tracking appends σ², dZ = ‖Z − Z_prev‖/sqrt(JK),
    dA = ‖A − A_prev‖/sqrt(PK) and dR = ‖R − R_prev‖/sqrt(JKL) (NaN when absent).

    ``functools.partial(iterate_gedi, plan=plan, config=config, ctx=ctx)`` is a
    ``step(engine, shared, it)`` for :func:`atlasfit.engine.run_iterations`; see
    :func:`initialize_gedi` for an example. ``solve_Y_every``: as MultiGEDI's
    (:func:`atlasfit.models.multigedi.iterate`): the iterations whose number is a multiple of it
    solve count and paired-count Y from Ŷ and the data, so a checkpoint then needs no Y.
    """
    shared = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in shared.items()}
    m = ctx.modality
    J, N, I, K = plan.n_features[m], plan.N(m), len(plan.mod_samples[m]), ctx.K

    # ---- round A: B_i, normalisation
    pa = {"Z": shared["Z"], "D": shared["D"], "o": shared["o"]}
    rho, order = _per_sample(engine.map(sh.round_A_single, pa, ctx.mode), plan, m)
    c = inv_sqrt_guard(ordered_sum([rho[g][0] for g in order]))
    if ctx.mode == "Bsphere":
        shared["D"] = c
        scale = None
    else:
        scale = c

    # ---- round B: Z (with the pathway prior C A)
    pb = {m: {"D": shared["D"], "o": shared["o"]}}
    res = gather_by_sample(engine.map(msh.round_B, pb, scale, {m: not ctx.orthoZ}))
    stats = [res[g][0] for g in order]  # (m, G, H)
    G = ordered_sum([s[1] for s in stats])
    if ctx.C is not None:
        G = G + ctx.lamZ * (ctx.C @ shared["A"])
    Zprev = shared["Z"]
    if ctx.orthoZ:
        U, S, Z = update_Z_ortho(G, shared["S"], ctx.lamZ)
        shared["U"], shared["S"] = U, S
    else:
        Z = update_Z_regular(G, ordered_sum([s[2] for s in stats]), ctx.lamZ)
    shared["Z"] = Z
    shared["tracking/dZ"] = np.append(shared["tracking/dZ"], np.linalg.norm(Z - Zprev) / np.sqrt(Z.size))

    # ---- round C: Q_i, o_i, s_i; o
    pc = {"Z": Z, "D": shared["D"], "o": shared["o"], "lam_s": 1.0 / shared["S_si"],
          "is_si_fixed": ctx.is_si_fixed, "R": shared.get("R"), "Ro": shared.get("Ro")}
    resC, _ = _per_sample(engine.map(sh.round_C_gedi, pc), plan, m)
    v = ordered_sum([resC[g][0] for g in order])
    shared["o"] = update_o(v, N, 1.0 / shared["S_o"], shared["o0"])

    # ---- round D: Y, sigma2, hyperpriors
    pdd = {"Z": Z, "D": shared["D"], "o": shared["o"], "sigma2": shared["sigma2"],
           "obs_type": ctx.obs_type,
           "solve_Y": bool(solve_Y_every) and (int(shared["iteration"]) + 1) % int(solve_Y_every) == 0}
    resD, _ = _per_sample(engine.map(sh.round_D_gedi, pdd), plan, m)
    e_sum = float(ordered_sum([np.float64(resD[g][0]) for g in order]))
    t_sum = float(ordered_sum([np.float64(resD[g][1]) for g in order]))
    if ctx.obs_type == "X":
        s2 = 1.0
    else:
        dof = gedi_dof(J, N, I, K, ctx.P, ctx.L)
        s2 = update_sigma2_gedi(Z, ctx.C, shared.get("A"), shared.get("R"), shared.get("Ro"), e_sum, dof,
                                ctx.lamZ, ctx.lamA, ctx.lamR)
    shared["sigma2"] = s2
    shared["o0"], shared["S_o"], shared["S_si"] = update_hyperpriors(shared["o"], s2, t_sum, N)
    shared["tracking/sigma2"] = np.append(shared["tracking/sigma2"], s2)

    # ---- A (§2.8), R_k and R_o (§2.9)
    dA = np.nan
    if ctx.C is not None:
        A = update_A(ctx.solver, Z)
        dA = np.linalg.norm(A - shared["A"]) / np.sqrt(A.size)
        shared["A"] = A
    shared["tracking/dA"] = np.append(shared["tracking/dA"], dA)
    dR = np.nan
    if ctx.H is not None:
        cols = {g: ctx.H[:, i] for i, g in enumerate(plan.global_samples)}
        TQ = ordered_sum([ctx.lamQ * resC[g][1][:, :, None] * cols[g][None, None, :] for g in order])
        To = ordered_sum([ctx.lamO * np.outer(resC[g][2], cols[g]) for g in order])
        Hs = np.stack([cols[g] for g in order], axis=1)  # L x I
        R = update_R(TQ, ctx.lamQ * (Hs @ Hs.T), ctx.lamR)
        Ro = update_R(To, ctx.lamO * (Hs @ Hs.T), ctx.lamR)
        dR = np.linalg.norm(R - shared["R"]) / np.sqrt(R.size)
        shared["R"], shared["Ro"] = R, Ro
    shared["tracking/dR"] = np.append(shared["tracking/dR"], dR)
    shared["iteration"] = int(shared["iteration"]) + 1
    return shared
