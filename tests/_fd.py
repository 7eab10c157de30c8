"""Test helper: finite differences for the gradient tests (topic model)."""

from __future__ import annotations

import numpy as np

#: Step of the five-point stencil: truncation O(H^4) ~ 1e-16, round-off ~ 1e-16 |L| / H.
H = 1e-4


def fd(f, arr, idx, h: float = H) -> float:
    """d f / d arr[idx] by the five-point central stencil
    (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / (12 h), each evaluation on a copy of ``arr``."""

    def at(d):
        a = arr.copy()
        a[idx] += d
        return f(a)

    return (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)


def check_sampled_gradients(loss, p: dict, om, g: dict, rng, *, per_array: int, rtol: float, atol: float,
                            check_shapes: bool = False) -> int:
    """Compare the analytic gradients ``g`` (of ``loss(params, omega)[0]``) with :func:`fd` at
    ``per_array`` random entries of every parameter (and of the per-cell ``omega`` rows for the key
    ``"omega_cell"``): ``|fd - an| <= rtol * max(|fd|, |an|) + atol``. Returns how many were checked."""
    checked = 0
    for k in sorted(g):
        arr = om if k == "omega_cell" else p[k]
        if check_shapes:
            assert g[k].shape == arr.shape, k
        idxs = list(np.ndindex(arr.shape))
        for s in rng.choice(len(idxs), size=min(per_array, len(idxs)), replace=False):
            i = idxs[s]
            if k == "omega_cell":
                v = fd(lambda a: loss(p, a)[0], arr, i)
            else:
                v = fd(lambda a, k=k: loss({**p, k: a})[0], arr, i)
            an = float(g[k][i])
            assert abs(v - an) <= rtol * max(abs(v), abs(an)) + atol, (k, i, v, an)
            checked += 1
    return checked
