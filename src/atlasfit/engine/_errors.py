"""Errors shared by the engines and the iteration loop."""

from __future__ import annotations


class ShardLostError(RuntimeError):
    """Shard state was lost (its worker died, or restarted without the state).

    Raised by :meth:`DaskEngine.map` instead of hanging or returning partial results;
    :func:`atlasfit.engine.run_iterations` catches it, calls ``engine.recover()`` and rolls every
    shard back to the last checkpoint.

    Attributes
    ----------
    shards
        Indices of the shards known to be lost (may be empty when only the symptom is known;
        ``engine.recover()`` finds out which).
    """

    def __init__(self, message: str, shards: tuple[int, ...] = ()):
        super().__init__(message)
        self.shards = tuple(shards)

    def __reduce__(self):
        return (type(self), (self.args[0], self.shards))


class StateMissingError(RuntimeError):
    """Raised on a worker asked to run a shard whose state it does not hold."""

    def __init__(self, message: str, shard: int = -1):
        super().__init__(message)
        self.shard = shard

    def __reduce__(self):
        return (type(self), (self.args[0], self.shard))
