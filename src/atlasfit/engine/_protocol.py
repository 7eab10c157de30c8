"""The contract between models and engines.

Models know nothing about Dask. A model holds its *shared* parameters on the driver and asks an
engine to run pure functions on every shard (a fixed group of whole samples) whose *local* state
lives wherever the engine keeps it (in process for :class:`SerialEngine`, on the owning worker for
the Dask engine).

A shard function has the signature ``fn(state: dict, *args, **kwargs) -> stats``. It may mutate
``state`` in place (that is the shard's local state, persisted by the engine between rounds) and
returns small statistics (NumPy arrays / scalars / dicts of them), independent of the number of
cells. ``engine.map`` returns the list of those statistics **in shard order**, so the driver can
reduce them in a fixed order: the same bits on any number of workers.

Shards are fixed by the data (see :func:`plan_shards`), never by the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ShardSpec:
    """One shard: an ordered group of whole samples.

    Attributes
    ----------
    index
        Position of the shard in the fixed shard order.
    samples
        Global sample names held by the shard, in global sample order.
    n_cells
        Cells per sample (same order as ``samples``), summed over nothing: one entry per sample.
    """

    index: int
    samples: tuple[str, ...]
    n_cells: tuple[int, ...] = field(default=())


class Engine(Protocol):
    """What a model (through :func:`~atlasfit.engine.run_fit`) may ask of an engine.

    ``load_fn`` passed to :meth:`setup` may carry a ``select_args(specs, args, kwargs) -> (args,
    kwargs)`` attribute: a distributed engine then calls ``load_fn`` on each worker with what that
    hook selects for the worker's shards (e.g. only their rows of an in-memory matrix) instead of
    the full arguments. A shard function may return ``None`` for a shard with nothing to report.
    """

    shards: Sequence[ShardSpec]

    def setup(self, load_fn: Callable[..., dict], *args: Any, **kwargs: Any) -> None:
        """Create every shard's local state as ``load_fn(shard_spec, *args, **kwargs)`` where it lives."""

    def map(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(state, *args, **kwargs)`` on every shard; return the results in shard order.

        Raises :class:`~atlasfit.engine.ShardLostError` when a shard's state was lost (a worker died)."""

    def map_spec(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Like :meth:`map` with the shard's :class:`ShardSpec`: ``fn(state, spec, *args, **kwargs)``."""

    def recover(self) -> list[int]:
        """Re-place and re-load (with the ``setup`` call) the shards whose state was lost; return
        their indices (``[]`` when nothing was lost). The caller then restores their local state,
        e.g. from a :class:`~atlasfit.engine.Checkpoint`."""

    def reload(self) -> None:
        """Rebuild every shard's state with the ``setup`` call where it lives (the state right after
        setup: :func:`~atlasfit.engine.run_fit` replays an interrupted initialisation from it)."""

    def close(self) -> None:
        """Release shard state."""


def plan_shards(
    sample_names: Sequence[str], n_cells: Sequence[int], max_shards: int = 64
) -> list[ShardSpec]:
    """Group samples (in the given global order) into at most ``max_shards`` contiguous shards.

    The plan depends only on the data (sample order and sizes), so reductions over shards give the
    same bits whatever the number of workers. With at most ``max_shards`` samples every sample is its
    own shard; otherwise consecutive samples are packed greedily to about equal cell counts.

    Examples
    --------
    >>> [s.samples for s in plan_shards(["a", "b", "c"], [10, 5, 7])]
    [('a',), ('b',), ('c',)]
    >>> [s.samples for s in plan_shards(["a", "b", "c", "d"], [10, 10, 10, 10], max_shards=2)]
    [('a', 'b'), ('c', 'd')]
    """
    names = [str(s) for s in sample_names]
    sizes = [int(n) for n in n_cells]
    if len(names) != len(sizes):
        raise ValueError("plan_shards: sample_names and n_cells differ in length")
    if max_shards < 1:
        raise ValueError("plan_shards: max_shards must be >= 1")
    if len(names) <= max_shards:
        return [ShardSpec(i, (n,), (c,)) for i, (n, c) in enumerate(zip(names, sizes))]
    total = sum(sizes)
    target = total / max_shards
    groups: list[list[int]] = [[]]
    acc = 0.0
    for i, c in enumerate(sizes):
        remaining_samples = len(sizes) - i
        remaining_slots = max_shards - len(groups)
        if groups[-1] and (acc + c / 2 > target * len(groups) or remaining_samples <= remaining_slots):
            if len(groups) < max_shards:
                groups.append([])
        groups[-1].append(i)
        acc += c
    return [
        ShardSpec(k, tuple(names[i] for i in g), tuple(sizes[i] for i in g))
        for k, g in enumerate(groups)
    ]
