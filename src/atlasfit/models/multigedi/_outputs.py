"""Outputs of a MultiGEDI fit: the flat state dict and the joint SVD / PCA (§7.1) without gathering
cells on the driver (K x K reductions; per-sample projections on the shards)."""

from __future__ import annotations

import numpy as np

from . import _shard as sh
from ._config import FitConfig, SamplePlan
from ._init import gather_by_sample
from ._svd import modality_svd


def joint_svd(engine, shared: dict, plan: SamplePlan, config: FitConfig) -> dict:
    """Joint SVD of X B with X = [Z_m diag(D_m)]_m stacked and B = [B_g]_g (§7.1), distributed.

    X = U_x diag(s_x) V_xᵀ on the driver; BBᵀ = Σ_g B_g B_gᵀ = F Fᵀ (eigh) replaces V_b diag(s_b);
    M = diag(s_x) V_xᵀ F = U_M diag(d) W; U = U_x U_M. The PCA rows of sample g are
    B_gᵀ T with T = V_x diag(s_x) U_M (= Bᵀ Xᵀ U = V diag(d)). Column signs: the largest-magnitude entry of each
    column of U positive.

    Returns
    -------
    dict
        ``{"d": K, "u": ΣJ x K, "T": K x K}``.

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
    >>> shared = initialize(eng, plan, cfg)
    >>> joint_svd(eng, shared, plan, cfg)["u"].shape
    (20, 3)
    """
    return modality_svd(engine, shared, plan, config, None)


def with_joint_svd(engine, shared: dict, *, plan: SamplePlan, config: FitConfig) -> dict:
    """The fit's final phase (``run_fit(finish=...)``): ``shared`` plus ``"svd"``, its :func:`joint_svd`.
    Run by the fit driver, which replays it from the final checkpoint when a worker is lost."""
    return {**shared, "svd": joint_svd(engine, shared, plan, config)}


def store_pca(engine, shared: dict, plan: SamplePlan, config: FitConfig, svd: dict | None = None) -> dict:
    """Leave each sample's joint-PCA rows in its shard state (``state["pca"][g]``) for a store
    writer; returns the joint SVD dict of :func:`joint_svd` (``svd``: reuse one already computed).

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
    >>> shared = initialize(eng, plan, cfg)
    >>> _ = store_pca(eng, shared, plan, cfg)
    >>> eng.states[0]["pca"]["a"].shape
    (30, 3)
    """
    svd = joint_svd(engine, shared, plan, config) if svd is None else svd
    engine.map(sh.store_pca_rows, svd["T"])
    return svd


def export_state(engine, shared: dict, plan: SamplePlan, config: FitConfig, svd: dict | None = None) -> dict:
    """The fitted state as a flat dict (the fixtures' key layout without ``iter<t>/``).

    Keys: ``<mod>/Z``, ``<mod>/U``, ``<mod>/S``, ``<mod>/D``, ``<mod>/o``, ``<mod>/sigma2``,
    ``<mod>/Q/<g>``, ``<mod>/o_i/<g>``, ``<mod>/s_i/<g>``, ``B/<g>``, ``tracking/<mod>/sigma2``,
    ``tracking/<mod>/dZ``, ``tracking/objective``, ``svd/d``, ``svd/u`` and ``X_multigedi_pca``
    (N_total x K, rows in the caller's cell order, ``plan.cells``).

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
    >>> shared = iterate(eng, initialize(eng, plan, cfg), 0, plan=plan, config=cfg)
    >>> out = export_state(eng, shared, plan, cfg)
    >>> out["X_multigedi_pca"].shape, out["rna/Q/b"].shape, out["tracking/rna/dZ"].shape
    ((60, 3), (20, 3), (1,))
    """
    svd = joint_svd(engine, shared, plan, config) if svd is None else svd
    out: dict = {}
    for m in config.names:
        for k in ("Z", "U", "S", "D", "o"):
            out[f"{m}/{k}"] = np.asarray(shared[f"{m}/{k}"], dtype=np.float64).copy()
        out[f"{m}/sigma2"] = np.float64(shared[f"{m}/sigma2"])
        out[f"tracking/{m}/sigma2"] = np.asarray(shared[f"{m}/tracking/sigma2"]).copy()
        out[f"tracking/{m}/dZ"] = np.asarray(shared[f"{m}/tracking/dZ"]).copy()
    out["tracking/objective"] = np.asarray(shared["tracking/objective"]).copy()
    loc = gather_by_sample(engine.map(sh.collect_local, svd["T"]))
    pca = np.zeros((plan.n_total, config.K))
    for g in plan.global_samples:
        d = loc[g][0][0]
        out[f"B/{g}"] = d["B"]
        pca[plan.cells[g]] = d["pca"]
        for m in config.names:
            if f"{m}/Q" in d:
                out[f"{m}/Q/{g}"] = d[f"{m}/Q"]
                out[f"{m}/o_i/{g}"] = d[f"{m}/o_i"]
                out[f"{m}/s_i/{g}"] = d[f"{m}/s_i"]
    out["X_multigedi_pca"] = pca
    out["svd/d"] = svd["d"]
    out["svd/u"] = svd["u"]
    return out
