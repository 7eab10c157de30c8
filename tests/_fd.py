"""Test helper: finite differences for the gradient tests (topic model)."""

from __future__ import annotations

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
