"""Per-feature moments of the imputed latent values Ŷ (spec §7.3: ``tl.variance``, ``tl.dispersion``)
from small per-sample statistics: no J x N array is formed, none leaves a shard.

Within sample i, Ŷ_i = W_i B_i + (o + o_i)1ᵀ + 1 s_iᵀ with W_i = (Z + Q_i) diag(D). With the cell means
b̄ = B_i 1/n, s̄ = s_iᵀ 1/n and the centred B_c = B_i − b̄1ᵀ, s_c = s_i − s̄1:

    mean_j = w_jᵀ b̄ + o_j + o_ij + s̄
    M2_j   = Σ_n (Ŷ_jn − mean_j)² = w_jᵀ C w_j + 2 w_jᵀ c + c_ss,
    C = B_c B_cᵀ (K x K), c = B_c s_c (K), c_ss = s_cᵀ s_c,

O(K² N_i + J K²) per sample instead of O(J K N_i). The driver merges the per-sample (n, mean, M2) in
global sample order with the pairwise update of Chan et al. (deterministic for any sharding).
"""

from __future__ import annotations

import numpy as np

from ...engine._reduce import gather_by_sample
from ._shard import _f64


def sample_feature_moments(W, B, s, offset):
    """(n, mean, M2) over the cells of one sample of Ŷ = W B + offset 1ᵀ + 1 sᵀ (module docstring).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> W, B, s, o = rng.normal(size=(4, 2)), rng.normal(size=(2, 9)), rng.normal(size=9), rng.normal(size=4)
    >>> Y = W @ B + o[:, None] + s[None, :]
    >>> n, mean, M2 = sample_feature_moments(W, B, s, o)
    >>> np.allclose(mean, Y.mean(1)), np.allclose(M2, ((Y - Y.mean(1)[:, None]) ** 2).sum(1))
    (True, True)
    """
    n = int(B.shape[1])
    b = B.mean(axis=1)
    sbar = s.mean()
    Bc = B - b[:, None]
    sc = s - sbar
    C, c, css = _f64(Bc @ Bc.T), _f64(Bc @ sc), float(_f64(sc @ sc))
    W = _f64(W)
    mean = W @ _f64(b) + _f64(offset) + float(_f64(sbar))
    M2 = np.einsum("jk,kl,jl->j", W, C, W) + 2.0 * (W @ c) + css
    return n, mean, np.clip(M2, 0.0, None)


def imputed_moments(state, m, Z, D, o):
    """Shard function: ``[(g, n, mean, M2)]`` for every sample of the shard that holds modality ``m``."""
    out = []
    Z = np.asarray(Z, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    o = np.asarray(o, dtype=np.float64)
    for g in state["samples"]:
        loc = state["mods"].get(m, {}).get(g)
        if loc is None:
            continue
        W = (Z + _f64(loc["Q"])) * D[None, :]
        B = state["B"][g]
        out.append((g,) + sample_feature_moments(W, B, loc["si"], o + _f64(loc["oi"])))
    return out


def merge_moments(parts):
    """Merge per-sample ``(n, mean, M2)`` in the given order (Chan et al.'s pairwise update):
    δ = mean_b − mean_a; mean = mean_a + δ n_b/n; M2 = M2_a + M2_b + δ² n_a n_b / n.

    Examples
    --------
    >>> x = np.arange(10.0)[None, :]
    >>> a = (4, x[:, :4].mean(1), ((x[:, :4] - x[:, :4].mean()) ** 2).sum(1))
    >>> b = (6, x[:, 4:].mean(1), ((x[:, 4:] - x[:, 4:].mean()) ** 2).sum(1))
    >>> n, mean, M2 = merge_moments([a, b])
    >>> n, float(mean[0]), float(M2[0] / n) == float(x.var())
    (10, 4.5, True)
    """
    n, mean, M2 = None, None, None
    for nb, mb, M2b in parts:
        if n is None:
            n, mean, M2 = int(nb), np.array(mb, dtype=np.float64), np.array(M2b, dtype=np.float64)
            continue
        tot = n + nb
        d = mb - mean
        mean = mean + d * (nb / tot)
        M2 = M2 + M2b + d * d * (n * nb / tot)
        n = tot
    return n, mean, M2


def feature_stats(engine, shared: dict, samples, modality: str) -> dict:
    """Per-feature ``mean``, ``variance`` (population, over the modality's cells) and ``dispersion``
    (variance / mean, 0 where mean ≤ 0; the reference's ``tl.dispersion``) of the imputed Ŷ."""
    res = gather_by_sample(engine.map(imputed_moments, modality, shared[f"{modality}/Z"],
                                      shared[f"{modality}/D"], shared[f"{modality}/o"]))
    n, mean, M2 = merge_moments([res[g][0] for g in samples])
    var = M2 / n
    disp = np.zeros_like(var)
    np.divide(var, mean, out=disp, where=mean > 0)
    return {"mean": mean, "variance": var, "dispersion": disp, "n_cells": n}


class LocalStates:
    """The shard-function interface (``map``) over one in-memory state dict: runs the distributed
    downstream code on a saved / loaded model or on what ``tl.multigedi`` wrote into a MuData.

    Examples
    --------
    >>> LocalStates({"samples": ("a",), "B": {"a": np.eye(2)}, "mods": {}}).map(lambda st: st["samples"])
    [('a',)]
    """

    def __init__(self, state: dict):
        self.state = state

    def map(self, fn, *args, **kwargs):
        return [fn(self.state, *args, **kwargs)]


def state_from_export(st: dict, plan, names) -> dict:
    """A shard-state dict holding every sample, from :func:`export_state`'s flat dict."""
    return {
        "samples": tuple(plan.global_samples),
        "B": {g: st[f"B/{g}"] for g in plan.global_samples},
        "mods": {m: {g: {"Q": st[f"{m}/Q/{g}"], "oi": st[f"{m}/o_i/{g}"], "si": st[f"{m}/s_i/{g}"]}
                     for g in plan.mod_samples[m]} for m in names},
    }
