"""In-process engine: shard states in a list, maps run one after the other.

Used for in-memory fits (``atlasfit.tl``), tests and as the reference for the Dask engine: both
must give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._determinism import blas_single_thread
from ._protocol import ShardSpec


class SerialEngine:
    """Run shard functions in this process, in shard order.

    Examples
    --------
    >>> from atlasfit.engine import SerialEngine, plan_shards
    >>> eng = SerialEngine(plan_shards(["a", "b"], [2, 3]))
    >>> eng.setup(lambda spec: {"n": sum(spec.n_cells)})
    >>> eng.map(lambda state, k: state["n"] * k, 10)
    [20, 30]
    """

    def __init__(self, shards: Sequence[ShardSpec]):
        self.shards = list(shards)
        self._states: list[dict] | None = None
        self._setup_call: tuple | None = None

    def setup(self, load_fn: Callable[..., dict], *args: Any, **kwargs: Any) -> None:
        self._setup_call = (load_fn, args, kwargs)
        with blas_single_thread():  # the kernels of a Dask worker: the same bits (_determinism)
            self._states = [load_fn(spec, *args, **kwargs) for spec in self.shards]

    def reload(self) -> None:
        """Rebuild every shard's state with the ``load_fn`` given to :meth:`setup`."""
        if self._states is None:
            raise RuntimeError("SerialEngine.reload called before setup()")
        self.setup(self._setup_call[0], *self._setup_call[1], **self._setup_call[2])

    def map(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        if self._states is None:
            raise RuntimeError("SerialEngine.map called before setup()")
        with blas_single_thread():  # the kernels of a Dask worker: the same bits (_determinism)
            return [fn(state, *args, **kwargs) for state in self._states]

    def map_spec(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Like :meth:`map` but calls ``fn(state, spec, *args, **kwargs)`` (spec: the ShardSpec)."""
        if self._states is None:
            raise RuntimeError("SerialEngine.map_spec called before setup()")
        with blas_single_thread():
            return [fn(state, spec, *args, **kwargs) for state, spec in zip(self._states, self.shards)]

    def recover(self) -> list[int]:
        """Nothing is ever lost in process: returns ``[]`` (same interface as DaskEngine)."""
        if self._states is None:
            raise RuntimeError("SerialEngine.recover called before setup()")
        return []

    @property
    def states(self) -> list[dict]:
        """The shard states (in-process only; useful in tests)."""
        if self._states is None:
            raise RuntimeError("SerialEngine has no state before setup()")
        return self._states

    def close(self) -> None:
        self._states = None
