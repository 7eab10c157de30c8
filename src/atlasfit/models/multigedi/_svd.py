"""Factorised SVD / PCA of a rank-K reconstruction X B (spec §7.1): joint (X = the stack of every
modality's Z_m diag(D_m)) or per modality (X = Z_m diag(D_m), B over that modality's samples).

The SVD needs X (on the driver) and the K x K Gram B Bᵀ = Σ_g B_g B_gᵀ (a reduction of per-sample
statistics): no cell-sized array reaches the driver. A cell's PCA row is B_gᵀ T with a K x K matrix
T, computed on the shard that holds the cell.
"""

from __future__ import annotations

import numpy as np

from ...engine._reduce import gather_by_sample, ordered_sum
from . import _shard as sh
from ._config import FitConfig, SamplePlan
from ._init import sign_fix_columns


def factorized_svd(X, gram) -> dict:
    """SVD of the product X B from X (J x K) and the Gram G = B Bᵀ (K x K) (spec §7.1).

    X = U_x diag(s_x) V_xᵀ; G = F Fᵀ (eigh, F = V diag(sqrt λ)) stands for V_b diag(s_b), since
    M Mᵀ with M = diag(s_x) V_xᵀ F equals (diag(s_x) V_xᵀ B)(…)ᵀ; M = U_M diag(d) W; U = U_x U_M. The
    PCA rows (X B)ᵀ U = V diag(d) of the cells are Bᵀ T with T = V_x diag(s_x) U_M. Column signs:
    the largest-magnitude entry of each column of U positive.

    Returns
    -------
    dict
        ``{"d": singular values, "u": J x r left singular vectors, "T": K x r}`` (r = min(J, K)).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X, B = rng.normal(size=(6, 3)), rng.normal(size=(3, 40))
    >>> out = factorized_svd(X, B @ B.T)
    >>> np.allclose(out["d"], np.linalg.svd(X @ B, compute_uv=False)[:3])
    True
    >>> np.allclose(B.T @ out["T"], (X @ B).T @ out["u"])
    True
    """
    X = np.asarray(X, dtype=np.float64)
    Ux, sx, Vxt = np.linalg.svd(X, full_matrices=False)
    lam, V = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
    F = V * np.sqrt(np.clip(lam, 0.0, None))[None, :]
    M = (sx[:, None] * Vxt) @ F
    Um, d, _ = np.linalg.svd(M)
    U = Ux @ Um
    sgn = sign_fix_columns(U)
    U = U * sgn[None, :]
    Um = Um * sgn[None, :]
    T = Vxt.T @ (sx[:, None] * Um)
    return {"d": d, "u": U, "T": T}


def loadings(shared: dict, config: FitConfig, modality: str | None = None) -> np.ndarray:
    """X of §7.1: Z_m diag(D_m) of ``modality``, or the stack over every modality (``None``)."""
    names = config.names if modality is None else [modality]
    return np.concatenate([np.asarray(shared[f"{m}/Z"], dtype=np.float64)
                           * np.asarray(shared[f"{m}/D"], dtype=np.float64)[None, :] for m in names], axis=0)


def check_modality(config: FitConfig, modality: str | None, what: str) -> None:
    if modality is not None and modality not in config.names:
        raise KeyError(f"MultiGEDI.{what}: unknown modality {modality!r}; the model has {config.names}")


def modality_svd(engine, shared: dict, plan: SamplePlan, config: FitConfig, modality: str | None = None) -> dict:
    """Distributed SVD / PCA of §7.1: joint (``modality=None``: X stacks every modality's Z_m D_m,
    B spans every global sample) or per modality (``tl.svd(modality=m)`` of the reference:
    X = Z_m diag(D_m), B over the samples of ``m`` only). Only the K x K Grams B_g B_gᵀ travel.

    Returns
    -------
    dict
        ``{"d", "u", "T"}`` of :func:`factorized_svd`.

    Examples
    --------
    >>> from atlasfit.engine import SerialEngine, plan_shards
    >>> from atlasfit.models.multigedi import (FitConfig, ModalityConfig, InMemoryReader, make_plan,
    ...     load_shard, initialize)
    >>> rng = np.random.default_rng(0); lab = np.repeat(["a", "b"], 30)
    >>> plan = make_plan({"rna": lab}, {"rna": 20})
    >>> cfg = FitConfig(K=3, modalities=[ModalityConfig("rna")])
    >>> eng = SerialEngine(plan_shards(plan.global_samples, [30, 30]))
    >>> eng.setup(load_shard, InMemoryReader({"rna": rng.poisson(2.0, (60, 20))}, {"rna": lab}), plan, cfg)
    >>> modality_svd(eng, initialize(eng, plan, cfg), plan, cfg, "rna")["u"].shape
    (20, 3)
    """
    check_modality(config, modality, "svd")
    samples = plan.global_samples if modality is None else plan.mod_samples[modality]
    grams = gather_by_sample(engine.map(sh.b_gram))
    G = ordered_sum([grams[g][0][0] for g in samples])
    return factorized_svd(loadings(shared, config, modality), G)


def sample_rows(state, T, samples=None):
    """Shard function: per sample (of ``samples``, default all) the rows B_gᵀ T (N_g x r), float64."""
    keep = None if samples is None else set(samples)
    T = np.ascontiguousarray(T, dtype=np.float64)  # one memory layout, one BLAS path: the same bits anywhere
    return [(g, sh._f64(state["B"][g]).T @ T)
            for g in state["samples"] if keep is None or g in keep]


def gather_rows(engine, plan: SamplePlan, T, samples) -> dict:
    """``{g: B_gᵀ T}`` for the given samples (the output rows: N_g x r per sample)."""
    return {g: v[0][0] for g, v in gather_by_sample(engine.map(sample_rows, T, list(samples))).items()}
