"""The generic iteration loop: steps, checkpoints, rollback after a lost worker, progress."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._checkpoint import Checkpoint
from ._errors import ShardLostError

logger = logging.getLogger("atlasfit.engine")


class _Progress:
    """tqdm bar on a terminal, otherwise a log line every ``every`` iterations."""

    def __init__(self, progress: Any, start: int, stop: int, desc: str):
        self.start, self.stop, self.desc = start, stop, desc
        self.bar = None
        self.every = 0
        self.t0 = time.perf_counter()
        total = max(0, stop - start)
        if progress is False or total == 0:
            return
        interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        if progress is True or (progress in (None, "auto") and interactive):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=stop, initial=start, desc=desc, disable=False, leave=True)
        elif isinstance(progress, int) and not isinstance(progress, bool):
            self.every = max(1, progress)
        elif progress in (None, "auto"):
            self.every = max(1, total // 10)
        else:
            raise ValueError(
                f"run_iterations: progress must be None/'auto', True, False or an int, got {progress!r}"
            )

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        elif self.every and ((done - self.start) % self.every == 0 or done == self.stop):
            logger.info(
                "%s: iteration %d/%d (%.1f s)", self.desc, done, self.stop, time.perf_counter() - self.t0
            )

    def note(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        logger.warning(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def resume(engine, checkpoint: Checkpoint, restore_local: Callable | None) -> tuple[int, dict]:
    """Restore an engine's shards and the driver's shared state from a checkpoint.

    Use after a driver restart: re-create the engine with the same shard plan, ``setup`` it with
    the same ``load_fn``, then continue with
    ``run_iterations(engine, step, shared, start=it, stop=...)``.

    Parameters
    ----------
    engine
        A set-up engine (:class:`SerialEngine` or :class:`DaskEngine`) with the checkpoint's plan.
    checkpoint
        The :class:`Checkpoint` written by the interrupted fit.
    restore_local
        ``restore_local(state, {sample: {array_name: ndarray}})``, run on every shard.

    Returns
    -------
    tuple
        ``(iteration, shared)``: the loop continues at ``iteration``.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from atlasfit.engine import Checkpoint, SerialEngine, plan_shards, resume
    >>> eng = SerialEngine(plan_shards(["a"], [3]))
    >>> eng.setup(lambda spec: {"y": np.zeros(3)})
    >>> ck = Checkpoint(tempfile.mkdtemp())
    >>> _ = ck.save(eng, 4, {"v": 1.5}, lambda st: {"a": {"y": st["y"] + 1}})
    >>> it, shared = resume(eng, ck, lambda st, d: st.update(y=d["a"]["y"]))
    >>> it, shared, eng.states[0]["y"].tolist()
    (4, {'v': 1.5}, [1.0, 1.0, 1.0])
    """
    return checkpoint.restore(engine, restore_local)


def run_iterations(
    engine,
    step: Callable[[Any, dict, int], dict],
    shared: Mapping,
    *,
    start: int,
    stop: int,
    checkpoint_every: int | None = None,
    checkpoint: Checkpoint | None = None,
    dump_local: Callable | None = None,
    restore_local: Callable | None = None,
    progress: Any = None,
    callback: Callable[[int, dict], Any] | None = None,
    max_recoveries: int = 5,
    desc: str = "atlasfit",
) -> dict:
    """Run ``shared = step(engine, shared, it)`` for ``it`` in ``[start, stop)``, fault tolerant.

    With a ``checkpoint`` the state after ``start`` (unless this checkpoint object already holds
    exactly that iteration, e.g. after :func:`resume`), every ``checkpoint_every`` iterations
    and at the end is saved. When shard state is lost (a worker died:
    :class:`ShardLostError`), the engine re-places and re-loads the lost shards
    (``engine.recover()``), every shard is rolled back with ``restore_local`` from the last
    checkpoint, ``shared`` is reloaded, and the loop replays from the checkpoint's iteration;
    with deterministic steps the result equals the uninterrupted run bit for bit.

    Parameters
    ----------
    engine
        :class:`SerialEngine` or :class:`DaskEngine`, already set up.
    step
        ``step(engine, shared, it) -> shared``; runs one iteration (a few ``engine.map`` rounds
        and the driver's reductions). ``shared`` is small: dicts of arrays / scalars.
    shared
        The driver's state before iteration ``start``.
    start, stop
        Iteration range (``stop`` excluded).
    checkpoint_every
        Save every this many completed iterations (``None``: only at start and end).
    checkpoint
        A :class:`Checkpoint`, or ``None`` for no fault tolerance (a lost worker then raises).
    dump_local, restore_local
        ``dump_local(state) -> {sample: {array_name: ndarray}}`` and
        ``restore_local(state, {sample: {array_name: ndarray}})``: the mutable local state.
    progress
        ``None``/``"auto"``: a tqdm bar on a terminal, otherwise a log line (logger
        ``atlasfit.engine``, level INFO) every tenth of the run; ``True``: always a bar; ``False``:
        nothing; an int ``n``: a log line every ``n`` iterations.
    callback
        ``callback(it, shared)`` after each iteration (``it`` counts completed iterations); a
        truthy return stops the loop early (e.g. converged), after a final checkpoint.
    max_recoveries
        Give up (re-raise) after this many rollbacks in one call.
    desc
        Label of the progress bar / log lines.

    Returns
    -------
    dict
        The shared state after the last iteration.

    Examples
    --------
    >>> from atlasfit.engine import SerialEngine, plan_shards, run_iterations
    >>> eng = SerialEngine(plan_shards(["a", "b"], [2, 3]))
    >>> eng.setup(lambda spec: {"n": sum(spec.n_cells)})
    >>> def step(engine, shared, it):
    ...     return {"t": shared["t"] + sum(engine.map(lambda st: st["n"]))}
    >>> run_iterations(eng, step, {"t": 0}, start=0, stop=3, progress=False)
    {'t': 15}
    """
    if stop < start:
        raise ValueError(f"run_iterations: stop ({stop}) < start ({start})")
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise ValueError(f"run_iterations: checkpoint_every must be >= 1 or None, got {checkpoint_every!r}")
    if checkpoint is not None and (dump_local is None) != (restore_local is None):
        raise ValueError("run_iterations: give both dump_local and restore_local, or neither")
    shared = dict(shared)
    bar = _Progress(progress, start, stop, desc)
    recoveries = 0
    it = start

    announced = []

    def save(done: int) -> None:
        if not announced:  # once per call: where this fit's checkpoints go, and what is kept
            announced.append(True)
            logger.info("%s: checkpoints go to %s (at iteration %d, every %s iterations and at the end; only the "
                        "last complete one is kept)", desc, checkpoint.path, done, checkpoint_every or "-")
        info = checkpoint.save(engine, done, shared, dump_local)
        logger.info(
            "%s: checkpoint at iteration %d: %.1f MB (%.1f MB uncompressed) in %.2f s; %s holds %.1f MB",
            desc, done, info.n_bytes / 1e6, info.raw_bytes / 1e6, info.seconds, checkpoint.path, info.dir_bytes / 1e6,
        )

    try:
        while True:
            try:
                if checkpoint is not None and it == start and checkpoint.owned_iteration != start:
                    save(start)
                stopped = False
                while it < stop and not stopped:
                    shared = dict(step(engine, shared, it))
                    it += 1
                    bar.update(it)
                    if callback is not None and callback(it, shared):
                        stopped = True
                    if checkpoint is not None and (
                        it == stop or stopped or (checkpoint_every and it % int(checkpoint_every) == 0)
                    ):
                        save(it)
                return shared
            except ShardLostError as e:
                if checkpoint is None:
                    raise ShardLostError(
                        f"{e} -- no checkpoint was given, so the fit cannot roll back; pass "
                        "checkpoint=Checkpoint(path) (and dump_local/restore_local) to survive "
                        "worker loss",
                        e.shards,
                    ) from e
                if checkpoint.owned_iteration is None:
                    raise ShardLostError(
                        f"{e} -- before the first checkpoint of this fit was complete; restart the fit",
                        e.shards,
                    ) from e
                while True:  # a worker may also die while we recover: try again
                    recoveries += 1
                    if recoveries > max_recoveries:
                        raise e
                    try:
                        lost = engine.recover()
                        it, shared = checkpoint.restore(engine, restore_local)
                        break
                    except ShardLostError as again:
                        e = again
                shared = dict(shared)
                bar.note(
                    f"{desc}: lost shard state ({e}); re-loaded shards {lost}, rolled back to "
                    f"iteration {it} (recovery {recoveries}/{max_recoveries})"
                )
                bar.update(it)
    finally:
        bar.close()
