"""Deterministic reductions of shard results on the driver.

Every model sums its per-sample statistics in a fixed (global sample) order, never in the order
the workers answered, so a fit gives the same bits on any number of workers.
"""

from __future__ import annotations

import numpy as np


def gather_by_sample(results) -> dict:
    """Flatten shard results ``[[(g, ...), ...], ...]`` into ``{g: [(...), ...]}`` keeping order.

    Examples
    --------
    >>> gather_by_sample([[("a", 1), ("b", 2)], None, [("a", 3)]])
    {'a': [(1,), (3,)], 'b': [(2,)]}
    """
    out: dict = {}
    for shard_res in results:
        if shard_res is None:
            continue
        for item in shard_res:
            out.setdefault(item[0], []).append(item[1:])
    return out


def ordered_sum(arrays):
    """Sum in the given (global sample) order in float64: deterministic bits for any shard grouping.

    Examples
    --------
    >>> ordered_sum([np.ones(2), np.full(2, 0.5)]).tolist()
    [1.5, 1.5]
    """
    acc = None
    for a in arrays:
        acc = np.array(a, dtype=np.float64, copy=True) if acc is None else acc + a
    return acc

