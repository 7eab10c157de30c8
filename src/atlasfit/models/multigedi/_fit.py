"""Driver side of one MultiGEDI BCD iteration: rounds A-D of the spec's Appendix A.

Each round maps a shard function over the engine, gathers the per-sample statistics, sums them in
global sample order and computes the shared parameters.
"""

from __future__ import annotations

import numpy as np

from . import _shard as sh
from ._config import FitConfig, SamplePlan
from ._init import _glob_order, _pick, bl2_scale, gather_by_sample, ordered_sum, set_D_from_rho
from ._kernels import update_hyperpriors, update_o, update_sigma2, update_Z_ortho, update_Z_regular

LAM_Z = 1.0  # 1/S_Z (MultiGEDI default)


def _params(shared, config, keys):
    out = {}
    for mc in config.modalities:
        m = mc.name
        d = {k: shared[f"{m}/{k}"] for k in keys}
        d["lam_s"] = 1.0 / shared[f"{m}/S_si"]
        d["is_si_fixed"] = mc.is_si_fixed
        d["obs_type"] = mc.obs_type
        out[m] = d
    return out


def dof(plan: SamplePlan, config: FitConfig, m: str) -> int:
    """dof = J(N + I) + IJK + KJ for modality m (§2.11, P = L = 0).

    Examples
    --------
    >>> from atlasfit.models.multigedi import FitConfig, ModalityConfig, make_plan
    >>> plan = make_plan({"rna": ["a", "a", "b"]}, {"rna": 4})
    >>> dof(plan, FitConfig(K=2, modalities=[ModalityConfig("rna")]), "rna")  # 4*(3+2) + 2*4*2 + 2*4
    44
    """
    J, N, I, K = plan.n_features[m], plan.N(m), len(plan.mod_samples[m]), config.K
    return J * (N + I) + I * J * K + K * J


def iterate(engine, shared: dict, it: int | None = None, *, plan: SamplePlan, config: FitConfig,
            solve_Y_every: int | None = None) -> dict:
    """One MultiGEDI BCD iteration (§3.2): shared B, normalisation, then every spoke's step.

    Round A: B_g (§3.3), Bsphere columns / Bl2 rows (§3.4), D_m (§2.2).
    Round B: Z_m (§2.3) from G_m = Σ_g R^Z DBᵀ.  Round C: Q_i, o_i, s_i on the shards, o_m (§2.7).
    Round D: Y (§2.10), σ²_m (§2.11), hyperpriors (§2.12). Tracking appends σ²_m,
    dZ_m = ‖Z − Z_prev‖/sqrt(JK) and a plottable objective: Σ_m of the penalised objective of §1.3
    without the observation term, [‖Z‖²/S_Z + Σ_i e_i + ‖o − o_0‖²/S_o + Σ_i‖s_i − s_i0‖²/S_si]/(2σ²)
    + (dof/2) log σ² (e_i of §2.11, including its Laplace term V_i).

    ``functools.partial(iterate, plan=plan, config=config)`` is a ``step(engine, shared, it)``.

    Parameters
    ----------
    engine
        Engine whose shards were set up with :func:`load_shard` and initialised by :func:`initialize`.
    shared
        Shared state from :func:`initialize` or the previous iteration (not modified).
    it
        Iteration index (informational).
    solve_Y_every
        When given, the iterations whose number (``shared["iteration"] + 1``) is a multiple of it solve
        count and paired-count Y to the root of its stationarity condition from Ŷ and the data
        (:func:`~._kernels.solve_Y_counts`, :func:`~._kernels.solve_Y_paired`) instead of one Halley
        step from the previous Y, so that a checkpoint written after them needs no Y (``_ckpt.py``;
        ``MultiGEDI(solve_Y_every=)``).
        ``None``: the reference's update at every iteration.

    Returns
    -------
    dict
        The new shared state.

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.engine import SerialEngine, plan_shards
    >>> from atlasfit.models.multigedi import (FitConfig, ModalityConfig, InMemoryReader, make_plan,
    ...     load_shard, initialize)
    >>> rng = np.random.default_rng(0); lab = np.repeat(["a", "b"], 30)
    >>> X = rng.poisson(2.0, (60, 20))
    >>> plan = make_plan({"rna": lab}, {"rna": 20})
    >>> cfg = FitConfig(K=3, modalities=[ModalityConfig("rna")])
    >>> eng = SerialEngine(plan_shards(plan.global_samples, [30, 30]))
    >>> eng.setup(load_shard, InMemoryReader({"rna": X}, {"rna": lab}), plan, cfg)
    >>> shared = iterate(eng, initialize(eng, plan, cfg), 0, plan=plan, config=cfg)
    >>> shared["rna/tracking/sigma2"].shape
    (1,)
    """
    shared = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in shared.items()}
    names = config.names

    # ---- round A: shared B, hub normalisation, D
    pa = _params(shared, config, ("Z", "D", "o", "sigma2"))
    res = gather_by_sample(engine.map(sh.round_A, pa, config.mode))
    rho = {g: r[0][0] for g, r in res.items()}
    scale = bl2_scale(plan, rho) if config.mode == "Bl2" else None
    set_D_from_rho(shared, plan, config, rho, scale)

    # ---- round B: Z
    pb = _params(shared, config, ("D", "o"))
    need_H = {mc.name: not mc.orthoZ for mc in config.modalities}
    res = gather_by_sample(engine.map(sh.round_B, pb, scale, need_H))
    for mc in config.modalities:
        m = mc.name
        order = _glob_order(plan, m)
        stats = [_pick(res[g], m) for g in order]
        G = ordered_sum([s[0] for s in stats])
        Zprev = shared[f"{m}/Z"]
        if mc.orthoZ:
            U, S, Z = update_Z_ortho(G, shared[f"{m}/S"], LAM_Z)
            shared[f"{m}/U"], shared[f"{m}/S"] = U, S
        else:
            Z = update_Z_regular(G, ordered_sum([s[1] for s in stats]), LAM_Z)
        shared[f"{m}/Z"] = Z
        dz = np.linalg.norm(Z - Zprev) / np.sqrt(Z.size)
        shared[f"{m}/tracking/dZ"] = np.append(shared[f"{m}/tracking/dZ"], dz)

    # ---- round C: Q_i, o_i, s_i; o
    pc = _params(shared, config, ("Z", "D", "o"))
    res = gather_by_sample(engine.map(sh.round_C, pc))
    for m in names:
        v = ordered_sum([_pick(res[g], m) for g in _glob_order(plan, m)])
        shared[f"{m}/o"] = update_o(v, plan.N(m), 1.0 / shared[f"{m}/S_o"], shared[f"{m}/o0"])

    # ---- round D: Y, sigma2, hyperpriors
    pd = _params(shared, config, ("Z", "D", "o", "sigma2"))
    solve = bool(solve_Y_every) and (int(shared["iteration"]) + 1) % int(solve_Y_every) == 0
    for m in names:
        pd[m]["solve_Y"] = solve
    res = gather_by_sample(engine.map(sh.round_D, pd))
    obj = 0.0
    for mc in config.modalities:
        m = mc.name
        stats = [_pick(res[g], m) for g in _glob_order(plan, m)]
        e_sum = float(ordered_sum([np.float64(s[0]) for s in stats]))
        t_sum = float(ordered_sum([np.float64(s[1]) for s in stats]))
        Z = shared[f"{m}/Z"]
        zsq = float(np.sum(Z * Z))
        if mc.obs_type == "X":
            s2 = 1.0
        else:
            s2 = update_sigma2(zsq, e_sum, dof(plan, config, m), LAM_Z)
        o = shared[f"{m}/o"]
        do = o - shared[f"{m}/o0"]
        obj += (LAM_Z * zsq + e_sum + float(do @ do) / shared[f"{m}/S_o"] + t_sum / shared[f"{m}/S_si"]) / (
            2.0 * s2
        ) + 0.5 * dof(plan, config, m) * np.log(s2)
        shared[f"{m}/sigma2"] = s2
        o0, S_o, S_si = update_hyperpriors(o, s2, t_sum, plan.N(m))
        shared[f"{m}/o0"], shared[f"{m}/S_o"], shared[f"{m}/S_si"] = o0, S_o, S_si
        shared[f"{m}/tracking/sigma2"] = np.append(shared[f"{m}/tracking/sigma2"], s2)
    shared["tracking/objective"] = np.append(shared["tracking/objective"], obj)
    shared["iteration"] = int(shared["iteration"]) + 1
    return shared


def fit(engine, shared: dict, n_iter: int, *, plan: SamplePlan, config: FitConfig) -> dict:
    """Run ``n_iter`` iterations of :func:`iterate` (no convergence test, as the reference).

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.engine import SerialEngine, plan_shards
    >>> from atlasfit.models.multigedi import (FitConfig, ModalityConfig, InMemoryReader, make_plan,
    ...     load_shard, initialize, iterate)
    >>> rng = np.random.default_rng(0); lab = np.repeat(["a", "b"], 30)
    >>> X = rng.poisson(2.0, (60, 20))
    >>> plan = make_plan({"rna": lab}, {"rna": 20})
    >>> cfg = FitConfig(K=3, modalities=[ModalityConfig("rna")])
    >>> eng = SerialEngine(plan_shards(plan.global_samples, [30, 30]))
    >>> eng.setup(load_shard, InMemoryReader({"rna": X}, {"rna": lab}), plan, cfg)
    >>> shared = fit(eng, initialize(eng, plan, cfg), 3, plan=plan, config=cfg)
    >>> shared["iteration"], shared["rna/tracking/sigma2"].shape
    (3, (3,))
    """
    for it in range(int(n_iter)):
        shared = iterate(engine, shared, it, plan=plan, config=config)
    return shared
