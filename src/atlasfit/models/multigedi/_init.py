"""Driver side of the MultiGEDI initialisation: data-derived priors (§5.1), the hashed rSVD test
matrix and the distributed randomised SVD (§5.3), the hub initialisation (§5.4), ``init_state``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ...engine._reduce import gather_by_sample, ordered_sum  # noqa: F401 - used here and by _fit/_outputs
from . import _shard as sh
from ._config import FitConfig, SamplePlan
from ._kernels import inv_sqrt_guard

OVERSAMPLE = 10  # rSVD oversampling p (MultiGEDI)
POWER_ITERS = 2  # rSVD power iterations q


def hashed_seed(seed: int, modality: str) -> int:
    """seed32 = first 4 bytes (little-endian uint32) of sha256(f"{seed}|{modality}") (§5.3).

    Examples
    --------
    >>> hashed_seed(0, "rna") == int.from_bytes(
    ...     hashlib.sha256(b"0|rna").digest()[:4], "little")
    True
    """
    return int.from_bytes(hashlib.sha256(f"{int(seed)}|{modality}".encode("utf-8")).digest()[:4], "little")


def sign_fix_columns(U):
    """Deterministic sign convention: the largest-|entry| of each column is made positive.

    Returns the sign vector (±1 per column).

    Examples
    --------
    >>> sign_fix_columns(np.array([[1.0, 0.5], [-3.0, 0.1]])).tolist()
    [-1.0, 1.0]
    """
    idx = np.argmax(np.abs(U), axis=0)
    vals = U[idx, np.arange(U.shape[1])]
    return np.where(vals < 0, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# priors
# ---------------------------------------------------------------------------------------------


def compute_priors(engine, plan: SamplePlan, config: FitConfig) -> dict:
    """Data-derived priors per modality (§5.1), in two map passes; sets s_i0 = s_i on the shards.

    M: s̃_n = (Σ_j M_jn + 0.01)/J, õ_j = (Σ_n M_jn/s̃_n + 1e-5)/N, s_0 = log s̃, o_0 = log õ,
    σ²_0 = Σ(log(1 + M) − s_0 − o_0)²/(NJ + 1). M_list: same on M1 and M2, log-ratios.
    X: s_0 = 0, o_0 = 0, σ²_0 = 1.

    Returns
    -------
    dict
        ``{modality: {"o0": J-vector, "sigma2": float}}``.

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
    >>> pri = compute_priors(eng, plan, cfg)
    >>> pri["rna"]["o0"].shape
    (20,)
    """
    obs = {mc.name: mc.obs_type for mc in config.modalities}
    p1 = gather_by_sample(engine.map(sh.prior_pass1, obs))
    o0 = {}
    for mc in config.modalities:
        m = mc.name
        if mc.obs_type == "X":
            continue
        N = plan.N(m)
        per = [_pick(p1[g], m) for g in _glob_order(plan, m)]
        otil = [(ordered_sum([s[k] for s in per]) + 1e-5) / N for k in range(len(per[0]))]
        o0[m] = np.log(otil[0]) if mc.obs_type == "M" else np.log(otil[0] / otil[1])
    p2 = gather_by_sample(engine.map(sh.prior_pass2, o0))
    out = {}
    for mc in config.modalities:
        m = mc.name
        J = plan.n_features[m]
        if mc.obs_type == "X":
            out[m] = {"o0": np.zeros(J), "sigma2": 1.0}
            continue
        ssr = ordered_sum([_pick(p2[g], m) for g in _glob_order(plan, m)])
        out[m] = {"o0": o0[m], "sigma2": float(ssr / (plan.N(m) * J + 1))}
    return out


def _glob_order(plan, m):
    """Samples of modality m in GLOBAL sample order (the driver's reduction order)."""
    mine = set(plan.mod_samples[m])
    return [g for g in plan.global_samples if g in mine]


def _pick(entries, m):
    """The statistic(s) of modality ``m`` among a sample's ``(m, stat, ...)`` entries."""
    for e in entries:
        if e[0] == m:
            return e[1:] if len(e) > 2 else e[1]
    raise KeyError(m)


# ---------------------------------------------------------------------------------------------
# randomised SVD
# ---------------------------------------------------------------------------------------------


def _orth_first_pass(G):
    """R⁻¹-like map of a first orthonormalisation pass from a Gram matrix (rank-revealing, eigh)."""
    lam, V = np.linalg.eigh(G)
    tol = max(lam.max(), 0.0) * G.shape[0] * np.finfo(np.float64).eps * 10
    keep = lam > tol
    V, lam = V[:, keep][:, ::-1], lam[keep][::-1]
    return V / np.sqrt(lam)[None, :]


def _orth_second_pass(G):
    """R⁻¹ of the Cholesky factor of a (near identity) Gram matrix: CholeskyQR second pass."""
    L = np.linalg.cholesky(G)
    return np.linalg.inv(L.T)


def _orth_tall(engine, m, o, mat, plan):
    """Orthonormal basis of the tall N x l matrix A·mat (A = Ypᵀ row-partitioned by sample).

    Two passes (eigh with rank truncation, then Cholesky) over summed Gram matrices; the basis stays
    on the shards. Returns ``rinv`` of the final pass (the shards still hold Y_g R₁⁻¹).
    """
    g1 = gather_by_sample(engine.map(sh.rsvd_project, m, o, mat))
    G = ordered_sum([g1[g][0][0] for g in _glob_order(plan, m)])
    r1 = _orth_first_pass(G)
    g2 = gather_by_sample(engine.map(sh.rsvd_rescale, m, r1))
    G2 = ordered_sum([g2[g][0][0] for g in _glob_order(plan, m)])
    return _orth_second_pass(G2)


def rsvd_modality(engine, plan: SamplePlan, config: FitConfig, m: str, o: np.ndarray):
    """Randomised SVD of Yp = [Ỹ_1 … Ỹ_I] for modality m (§5.3), distributed over samples.

    Returns the top-K left singular vectors (J x K, sign convention of :func:`sign_fix_columns`) and
    singular values. Flipped case (J < N): A = Ypᵀ, Ω = first J rows of the hashed O. Otherwise
    A = Yp and Ω = O, whose rows each shard draws for its own cells (local sample order).
    Call it after :func:`compute_priors` and ``engine.map(rsvd_set_oi, m, {m: o})`` (§5.3 step 1);
    :func:`initialize` does all of this.

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
    >>> from atlasfit.models.multigedi._shard import rsvd_set_oi
    >>> o = compute_priors(eng, plan, cfg)["rna"]["o0"]
    >>> eng.map(rsvd_set_oi, "rna", {"rna": o}) and None
    >>> U, sig = rsvd_modality(eng, plan, cfg, "rna", o)
    >>> U.shape, bool(np.all(np.diff(sig) <= 0))
    ((20, 3), True)
    """
    K = config.K
    ncol = K + OVERSAMPLE
    J = plan.n_features[m]
    N = plan.N(m)
    seed32 = hashed_seed(config.seed, m)
    order = _glob_order(plan, m)
    if J < N:
        mat = np.random.RandomState(seed32).standard_normal((J, ncol))
        for step in range(POWER_ITERS + 1):
            rinv = _orth_tall(engine, m, o, mat, plan)
            back = gather_by_sample(engine.map(sh.rsvd_back, m, o, rinv))
            AtQ = ordered_sum([back[g][0][0] for g in order])  # J x l  (= Aᵀ Q)
            if step < POWER_ITERS:
                mat = np.linalg.qr(AtQ)[0]
        # AtQ now holds (QᵀA)ᵀ = Bᵀ (J x l)
        _ub, sig, Vbt = np.linalg.svd(AtQ.T, full_matrices=False)
        U = Vbt.T[:, :K]
    else:
        local_order = list(plan.mod_samples[m])
        offsets = {g: plan.offset(m, g) for g in local_order}
        st = gather_by_sample(engine.map(sh.rsvd_nf_start, m, o, seed32, offsets, ncol))
        Y = ordered_sum([st[g][0][0] for g in order])
        for _ in range(POWER_ITERS):
            Q = np.linalg.qr(Y)[0]
            left = gather_by_sample(engine.map(sh.rsvd_nf_left, m, o, Q))
            AtQ = np.concatenate([left[g][0][0] for g in local_order], axis=0)
            Qp = np.linalg.qr(AtQ)[0]
            right = gather_by_sample(engine.map(sh.rsvd_nf_right, m, o, Qp, offsets))
            Y = ordered_sum([right[g][0][0] for g in order])
        Q = np.linalg.qr(Y)[0]
        left = gather_by_sample(engine.map(sh.rsvd_nf_left, m, o, Q))
        Bt = np.concatenate([left[g][0][0] for g in local_order], axis=0)  # (QᵀA)ᵀ, N x l
        Ub, sig, _vt = np.linalg.svd(Bt.T, full_matrices=False)
        U = Q @ Ub[:, :K]
    if U.shape[1] < K:
        raise ValueError(
            f"modality {m!r}: the data have rank {U.shape[1]} < K={K}; lower K or check the data"
        )
    sig = sig[:K]
    U = U * sign_fix_columns(U)[None, :]
    return U, sig


# ---------------------------------------------------------------------------------------------
# initialize
# ---------------------------------------------------------------------------------------------


def _D_init(config, plan, m):
    K = config.K
    if config.mode == "Bsphere":
        return np.full(K, np.sqrt(K / plan.N(m)))
    return np.ones(K)


def _new_shared(plan, config, priors):
    K = config.K
    shared = {"iteration": 0, "tracking/objective": np.zeros(0)}
    for mc in config.modalities:
        m = mc.name
        J = plan.n_features[m]
        N = plan.N(m)
        shared.update(
            {
                f"{m}/Z": np.zeros((J, K)),
                f"{m}/U": np.zeros((J, K)),
                f"{m}/S": np.ones(K),
                f"{m}/D": _D_init(config, plan, m),
                f"{m}/o": priors[m]["o0"].copy(),
                f"{m}/o0": priors[m]["o0"].copy(),
                f"{m}/sigma2": float(priors[m]["sigma2"]),
                f"{m}/S_o": 1.0 / N,
                f"{m}/S_si": 1.0 / J,
                f"{m}/tracking/sigma2": np.zeros(0),
                f"{m}/tracking/dZ": np.zeros(0),
            }
        )
    return shared


def set_D_from_rho(shared, plan, config, rho, scale):
    """D_m := inv_sqrt_guard(Σ_{g∈m} ρ_g) for adjustD modalities (§2.2 multimodal form).

    ``scale`` is the Bl2 row scale c (ρ_g ← c² ρ_g) or None.
    """
    for mc in config.modalities:
        if not mc.adjustD:
            continue
        m = mc.name
        rs = [rho[g] if scale is None else rho[g] * scale * scale for g in _glob_order(plan, m)]
        shared[f"{m}/D"] = inv_sqrt_guard(ordered_sum(rs))


def bl2_scale(plan, rho):
    """Bl2 hub normalisation: c = inv_sqrt_guard(Σ_all g ρ_g) (§3.4)."""
    return inv_sqrt_guard(ordered_sum([rho[g] for g in plan.global_samples]))


def initialize(engine, plan: SamplePlan, config: FitConfig, init_state: dict | None = None) -> dict:
    """Initialise a fit whose shards were created by ``engine.setup(load_shard, reader, plan, config)``.

    Computes the data-derived priors (§5.1) and starting values (§5.2); then either runs the hub
    initialisation (§5.4: rSVD of every modality that is the largest of some sample, B of each
    sample from its largest modality, hub normalisation, D_m, o_i with zero caches) or, given
    ``init_state`` (flat dict with the fixture key layout ``<mod>/Z``, ``<mod>/D``, ``<mod>/o``,
    ``<mod>/sigma2``, ``<mod>/U``, ``<mod>/S``, ``<mod>/Q/<g>``, ``<mod>/o_i/<g>``, ``<mod>/s_i/<g>``,
    ``B/<g>``; optional ``<mod>/o0``, ``<mod>/S_o``, ``<mod>/S_si``, ``<mod>/s_i0/<g>``), takes the
    state from it; missing entries keep the data-derived starting values.

    Returns
    -------
    dict
        The shared (driver) state: plain NumPy arrays and scalars.

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.engine import SerialEngine, plan_shards
    >>> from atlasfit.models.multigedi import (FitConfig, ModalityConfig, InMemoryReader, make_plan,
    ...     load_shard)
    >>> rng = np.random.default_rng(0); lab = np.repeat(["a", "b"], 30)
    >>> X = rng.poisson(2.0, (60, 20))
    >>> plan = make_plan({"rna": lab}, {"rna": 20})
    >>> cfg = FitConfig(K=3, modalities=[ModalityConfig("rna")])
    >>> eng = SerialEngine(plan_shards(plan.global_samples, [30, 30]))
    >>> eng.setup(load_shard, InMemoryReader({"rna": X}, {"rna": lab}), plan, cfg)
    >>> shared = initialize(eng, plan, cfg)
    >>> shared["rna/Z"].shape
    (20, 3)
    """
    priors = compute_priors(engine, plan, config)
    shared = _new_shared(plan, config, priors)
    if init_state is not None:
        return _from_init_state(engine, plan, config, shared, init_state)
    init_mods = plan.init_modalities()
    largest = {g: plan.largest_modality(g) for g in plan.global_samples}
    o = {m: shared[f"{m}/o"] for m in config.names}
    for m in init_mods:
        engine.map(sh.rsvd_set_oi, m, o)
        U, sig = rsvd_modality(engine, plan, config, m, o[m])
        shared[f"{m}/U"] = U
        shared[f"{m}/S"] = sig / 2.0
        shared[f"{m}/Z"] = U * (sig / 2.0)[None, :]
    params = {m: {"Z": shared[f"{m}/Z"], "D": shared[f"{m}/D"], "o": o[m]} for m in config.names}
    rho = {g: r[0][0] for g, r in gather_by_sample(
        engine.map(sh.init_B, params, set(init_mods), largest, config.mode)).items()}
    scale = bl2_scale(plan, rho) if config.mode == "Bl2" else None
    set_D_from_rho(shared, plan, config, rho, scale)
    engine.map(sh.init_finish, scale, o)
    return shared


def _from_init_state(engine, plan, config, shared, init_state):
    K = config.K
    for mc in config.modalities:
        m = mc.name
        J = plan.n_features[m]
        for key, shape in (("Z", (J, K)), ("U", (J, K)), ("S", (K,)), ("D", (K,)), ("o", (J,)),
                           ("o0", (J,))):
            k = f"{m}/{key}"
            if k in init_state:
                arr = np.array(init_state[k], dtype=np.float64)
                if arr.shape != shape:
                    raise ValueError(f"init_state[{k!r}] has shape {arr.shape}, expected {shape}")
                shared[k] = arr
        for key in ("sigma2", "S_o", "S_si"):
            k = f"{m}/{key}"
            if k in init_state:
                shared[k] = float(np.asarray(init_state[k]))
        if mc.obs_type == "X":
            shared[f"{m}/sigma2"] = 1.0
        if mc.orthoZ and f"{m}/Z" in init_state and f"{m}/S" not in init_state:
            # derive the polar parts of a given Z: S = column norms (1 where zero), U = Z / S
            Z = shared[f"{m}/Z"]
            nrm = np.linalg.norm(Z, axis=0)
            S = np.where(nrm > 0, nrm, 1.0)
            shared[f"{m}/S"] = S
            shared[f"{m}/U"] = Z / S[None, :]
    engine.map(sh.apply_init_state, init_state, K)
    return shared
