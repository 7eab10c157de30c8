"""The fit driver every model goes through.

A model hands the driver its shard plan, its shard loader, its ``init`` and ``step`` functions and
the functions that dump / restore its per-sample state; the driver

* picks the engine: the caller's ``client`` (a :class:`DaskEngine` on its workers), the embedded
  cluster of :func:`atlasfit.cluster.get_client` for a store fit without a client, or in process for
  in-memory data without a client (:class:`SerialEngine`, or :class:`ThreadedEngine` with
  ``threads=None``: one thread per core);
* resolves the device (NumPy or CuPy kernels, :func:`resolve_device`);
* owns the checkpoint policy (where, how often, resume) and runs :func:`run_iterations` with
  checkpoints, resume and worker-loss recovery.

Models therefore import nothing from :mod:`distributed` or :mod:`atlasfit.cluster`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._checkpoint import Checkpoint
from ._determinism import blas_single_thread
from ._device import resolve_device
from ._errors import ShardLostError
from ._guard import CheckpointLock, describe_differences, fingerprint_differences, fingerprint_digest, mismatch_error
from ._loop import run_iterations
from ._serial import SerialEngine
from ._threaded import ThreadedEngine, resolve_threads

logger = logging.getLogger("atlasfit.engine")

def make_engine(
    shards,
    *,
    client: Any = None,
    store: bool = False,
    device: str = "cpu",
    who: str = "atlasfit",
    name: str = "atlasfit",
    threads: int | None = 1,
):
    """The engine a fit runs on, and whether its kernels run on the GPU.

    Parameters
    ----------
    shards
        The shard plan (:func:`~atlasfit.engine.plan_shards`).
    client
        A ``distributed.Client``: shards live on its workers. ``None``: the embedded cluster
        (:func:`atlasfit.cluster.get_client`, which reuses an active client) for a store fit,
        in process for in-memory data. ``False``: in process for any data (a store's samples are
        then read by this process).
    store
        Whether the fit reads an atlas store (so the workers can read their own samples).
    device
        ``"cpu"``, ``"gpu"`` or ``"auto"`` (:func:`resolve_device`); ``"gpu"``/``"auto"`` start a
        LocalCUDACluster when a cluster has to be started.
    who, name
        The model's name in errors, and the engine's task-key prefix.
    threads
        In-process fits: the shard functions of a round run on this many threads
        (:class:`ThreadedEngine`; ``None``: ``ATLASFIT_THREADS`` when set, else one per usable core);
        ``1`` (the default): :class:`SerialEngine`, one shard after the other. The same bits either
        way. MultiGEDI and GEDI pass ``None`` (their rounds are a few long per-sample tasks); the
        topic model keeps ``1`` (in process it runs one short round per minibatch step). A GPU fit
        in process runs serially (its kernels queue on one device). Ignored with a Dask client.

    Returns
    -------
    tuple
        ``(engine, gpu)``.

    Examples
    --------
    >>> from atlasfit.engine import make_engine, plan_shards
    >>> eng, gpu = make_engine(plan_shards(["a", "b"], [3, 4]), threads=2)
    >>> type(eng).__name__, eng.n_threads, gpu
    ('ThreadedEngine', 2, False)
    >>> type(make_engine(plan_shards(["a"], [3]), client=False, store=True, threads=1)[0]).__name__
    'SerialEngine'
    """
    if client is False or (client is None and not store):
        n = resolve_threads(threads, who)
        gpu = resolve_device(device, who, distributed=False)
        engine = SerialEngine(shards) if n == 1 or gpu or len(shards) <= 1 else ThreadedEngine(shards, n)
        return engine, gpu
    from ..cluster import get_client  # noqa: PLC0415 - only when a cluster is needed
    from ._dask import DaskEngine  # noqa: PLC0415

    if client is None:
        client = get_client(gpu=device if device != "cpu" else False)
    engine = DaskEngine(client, shards, name=name)
    gpu = resolve_device(device, who, distributed=True)
    return engine, gpu


def is_distributed(engine) -> bool:
    """Whether ``engine`` runs its shards outside this process."""
    return not isinstance(engine, (SerialEngine, ThreadedEngine))


def default_checkpoint_dir(store_path: str | os.PathLike, model: str, fingerprint: Mapping | None = None) -> Path:
    """``<store>.checkpoints/<model>`` beside the store (not inside it: anndata/mudata read or warn
    about every top-level entry of a store); with a fit's ``fingerprint``,
    ``<store>.checkpoints/<model>-<8 hex digits of the fingerprint>``: one directory per fit, so fits of
    other settings on one store never share (or overwrite) a checkpoint.

    Examples
    --------
    >>> default_checkpoint_dir("/data/atlas.zarr", "topic").as_posix()
    '/data/atlas.zarr.checkpoints/topic'
    >>> default_checkpoint_dir("/data/atlas.zarr", "topic", {"seed": 0}).name.startswith("topic-")
    True
    """
    p = Path(store_path)
    name = model if fingerprint is None else f"{model}-{fingerprint_digest(fingerprint)}"
    return p.with_name(p.name + ".checkpoints") / name


@dataclass
class CheckpointPolicy:
    """Where and how often a fit checkpoints.

    Attributes
    ----------
    checkpoint
        The :class:`Checkpoint`, or ``None`` (no fault tolerance).
    every
        Save every this many iterations (``None``: only at the start and the end).
    resume
        Continue from the checkpoint's last iteration.
    """

    checkpoint: Checkpoint | None
    every: int | None
    resume: bool = False

    def release(self) -> None:
        """Release the lock on the checkpoint directory (idempotent; :func:`run_fit` does it at its end)."""
        if self.checkpoint is not None and self.checkpoint.lock is not None:
            self.checkpoint.lock.release()

    def __enter__(self) -> CheckpointPolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def checkpoint_policy(
    who: str,
    *,
    store_path: str | os.PathLike | None,
    model: str,
    distributed: bool,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    default_every: int = 10,
    fingerprint: Mapping | None = None,
) -> CheckpointPolicy:
    """The checkpoint policy shared by every model.

    * ``checkpoint_every=0`` (and no ``resume``): no checkpoints, no fault tolerance.
    * A ``checkpoint_dir``, ``resume=True``, or a store fit on a Dask cluster: checkpoints in
      ``checkpoint_dir`` (default :func:`default_checkpoint_dir` of the store), every
      ``checkpoint_every`` iterations (default ``default_every``), so a lost worker costs at most
      that many iterations.
    * Otherwise (in-memory or in-process fits): none.

    ``resume=True`` needs an existing checkpoint (clear error otherwise).

    ``fingerprint``: the model's description of the fit, a small dict of named parts of plain data
    (``{"model": ..., "config": {...}, "data": {...}, "seed": ...}``), recorded by every save. With it

    * the default directory is per fit: ``<store>.checkpoints/<model>-<digest>``;
    * ``resume=True`` compares it with the checkpoint's before any work and raises
      :class:`~atlasfit.engine.CheckpointMismatchError` naming every differing part (for the default
      directory, against the most recent checkpoint of this model beside the store);
    * a fresh fit into a directory holding another fit's checkpoint warns, then replaces it.

    A policy with a checkpoint holds the directory's :class:`~atlasfit.engine.CheckpointLock` (a second
    fit on it gets :class:`~atlasfit.engine.CheckpointLockedError`) until :func:`run_fit` ends or
    :meth:`CheckpointPolicy.release` (also a context manager: ``with checkpoint_policy(...) as p:``).

    Examples
    --------
    >>> checkpoint_policy("M", store_path=None, model="m", distributed=False).checkpoint is None
    True
    """
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or int(checkpoint_every) < 0):
        raise ValueError(f"{who}: checkpoint_every must be >= 0 (0: no checkpoints), got {checkpoint_every!r}")
    if checkpoint_every == 0 and not resume:
        return CheckpointPolicy(None, None, False)
    if checkpoint_dir is None and not resume and not (store_path is not None and distributed):
        return CheckpointPolicy(None, None, False)
    defaulted = checkpoint_dir is None
    if defaulted:
        if store_path is None:
            raise ValueError(f"{who}: give checkpoint_dir= to checkpoint (or resume) an in-memory fit")
        checkpoint_dir = default_checkpoint_dir(store_path, model, fingerprint)
    ck = Checkpoint(checkpoint_dir, fingerprint=fingerprint)
    if resume and ck.iteration is None:
        if defaulted and fingerprint is not None:
            _refuse_sibling(who, Path(checkpoint_dir), model, fingerprint)
        raise FileNotFoundError(
            f"{who}: no checkpoint to resume from in {str(checkpoint_dir)!r}; start without resume_from_checkpoint"
        )
    ck.lock = CheckpointLock(ck.path, who).acquire()
    try:
        _check_owner(who, ck, fingerprint, resume)
    except BaseException:
        ck.lock.release()
        raise
    every = default_every if not checkpoint_every else int(checkpoint_every)
    return CheckpointPolicy(ck, every, bool(resume))


def _check_owner(who: str, ck: Checkpoint, fingerprint: Mapping | None, resume: bool) -> None:
    """With the lock held: a resume must match the checkpoint's fingerprint; a fresh fit over another
    fit's checkpoint warns that it replaces it."""
    if fingerprint is None or ck.iteration is None:
        return
    saved = ck.saved_fingerprint()
    if saved is None:
        msg = (f"{who}: the checkpoint in {str(ck.path)!r} records no fingerprint (written by an older atlasfit); "
               "it cannot be checked against this fit")
        warnings.warn(msg + (": resuming it as it is" if resume else "; this fit replaces it"), stacklevel=3)
        return
    diffs = fingerprint_differences(saved, fingerprint)
    if not diffs:
        return
    if resume:
        raise mismatch_error(who, ck.path, saved, fingerprint)
    warnings.warn(
        f"{who}: checkpoint_dir {str(ck.path)!r} holds the checkpoint of another fit; this fit replaces it at its "
        f"first save. What differs:\n{describe_differences(diffs)}\nGive another checkpoint_dir= to keep it.",
        stacklevel=3,
    )


def _refuse_sibling(who: str, directory: Path, model: str, fingerprint: Mapping) -> None:
    """A resume whose per-fit default directory holds no checkpoint: when other fits of this model left
    checkpoints beside the store, refuse, naming what differs from the most recent one."""
    found = []
    if directory.parent.is_dir():
        for d in directory.parent.iterdir():
            if d != directory and (d.name == model or d.name.startswith(model + "-")) and (d / "LATEST.json").is_file():
                found.append(((d / "LATEST.json").stat().st_mtime, d.name, d))
    if not found:
        return
    found.sort()
    latest = found[-1][2]
    others = [name for _, name, _ in found[:-1]]
    extra = (f"(The most recent of {len(found)} checkpoints of this model beside the store; the others: "
             f"{', '.join(others)}.)\n" if others else "")
    saved = Checkpoint(latest).saved_fingerprint()
    if saved is None:
        raise FileNotFoundError(
            f"{who}: no checkpoint of this fit in {str(directory)!r}; beside the store lies {str(latest)!r}, written "
            "by an older atlasfit without a fingerprint, so it cannot be checked against this fit. To resume it as it "
            f"is, pass checkpoint_dir={str(latest)!r} with the settings of that fit; or start without "
            "resume_from_checkpoint"
        )
    raise mismatch_error(who, latest, saved, fingerprint, extra=extra)


def run_fit(
    engine,
    *,
    init: Callable[[Any], Mapping],
    step: Callable[[Any, dict, int], Mapping],
    stop: int,
    start: int = 0,
    policy: CheckpointPolicy | None = None,
    dump_local: Callable | None = None,
    restore_local: Callable | None = None,
    progress: Any = None,
    callback: Callable[[int, dict], Any] | None = None,
    desc: str = "atlasfit",
    finish: Callable[[Any, dict], Mapping] | None = None,
    max_recoveries: int = 5,
) -> dict:
    """Initialise (or resume), iterate and finish a fit on a set-up engine, surviving worker loss in
    every phase.

    ``init(engine) -> shared`` builds the driver's state before iteration ``start`` (0, or where an
    earlier call of a continued fit stopped; skipped when the policy resumes: the checkpoint's
    shards, shared state and iteration are restored instead);
    ``step(engine, shared, it) -> shared`` is one iteration; ``finish(engine, shared) -> shared``
    (optional) is a last phase after the final checkpoint, e.g. an output decomposition (MultiGEDI's
    joint SVD), and its result is what ``run_fit`` returns. Checkpoints, worker-loss rollback and
    progress of the iterations are those of :func:`run_iterations`.

    A worker lost (:class:`ShardLostError`) during ``init``: the engine re-places the lost shards
    (``engine.recover()``), rebuilds every shard's state as right after setup (``engine.reload()``)
    and ``init`` runs again (it is deterministic given the data and the seed); no checkpoint is needed.
    During ``finish``: every shard is restored from the final checkpoint and ``finish`` runs again
    (without a checkpoint the error is raised). Either way the result has the bits of an
    uninterrupted fit. Everything runs with BLAS on one thread (see docs/engine.md, "Determinism").
    The policy's lock on the checkpoint directory is released when the call ends, normally or not.

    Examples
    --------
    >>> from atlasfit.engine import SerialEngine, plan_shards, run_fit
    >>> eng = SerialEngine(plan_shards(["a", "b"], [2, 3]))
    >>> eng.setup(lambda spec: {"n": sum(spec.n_cells)})
    >>> run_fit(eng, init=lambda e: {"t": 0}, step=lambda e, s, it: {"t": s["t"] + sum(e.map(lambda st: st["n"]))},
    ...         stop=2, progress=False)
    {'t': 10}
    """
    policy = policy or CheckpointPolicy(None, None, False)
    try:
        return _run_fit(engine, init, step, stop, start, policy, dump_local, restore_local, progress, callback,
                        desc, finish, max_recoveries)
    finally:
        policy.release()  # the checkpoint directory's lock: at the end and on any error


def _run_fit(engine, init, step, stop, start, policy, dump_local, restore_local, progress, callback, desc, finish,
             max_recoveries) -> dict:
    ck = policy.checkpoint
    with blas_single_thread():  # the driver's linear algebra as the workers': the same bits anywhere
        if policy.resume:
            start, shared = ck.restore(engine, restore_local)
        else:
            shared = _replaying(engine, lambda: dict(init(engine)), engine.reload, "initialisation", desc,
                                max_recoveries)
        if stop < start:
            raise ValueError(
                f"{desc}: the checkpoint is at iteration {start}, past the requested stop ({stop}); "
                f"ask for more iterations than {start}"
            )
        shared = run_iterations(
            engine, step, shared, start=start, stop=int(stop),
            checkpoint_every=policy.every if ck is not None else None,
            checkpoint=ck,
            dump_local=dump_local if ck is not None else None,
            restore_local=restore_local if ck is not None else None,
            progress=progress, callback=callback, desc=desc, max_recoveries=max_recoveries,
        )
        if finish is None:
            return shared
        final = {"shared": shared}

        def from_final_checkpoint() -> None:
            final["shared"] = dict(ck.restore(engine, restore_local)[1])

        return _replaying(engine, lambda: dict(finish(engine, final["shared"])),
                          from_final_checkpoint if ck is not None and ck.owned_iteration is not None else None,
                          "final phase", desc, max_recoveries)


def _replaying(engine, run: Callable[[], dict], rollback: Callable[[], None] | None, phase: str, desc: str,
               max_recoveries: int) -> dict:
    """``run()``; after a :class:`ShardLostError`: ``engine.recover()``, ``rollback()`` and ``run()``
    again, at most ``max_recoveries`` times (``rollback=None``: nothing to restore from, raise)."""
    recoveries = 0
    while True:
        try:
            return run()
        except ShardLostError as e:
            if rollback is None:
                raise ShardLostError(
                    f"{e} -- during the {phase}, and the fit has no checkpoint to restore the shards "
                    "from; pass checkpoint_dir= (or leave checkpoints on) to survive worker loss there",
                    e.shards,
                ) from e
            err = e
        while True:  # a worker may also die while we recover: try again
            recoveries += 1
            if recoveries > max_recoveries:
                raise err
            try:
                lost = engine.recover()
                rollback()
                break
            except ShardLostError as again:
                err = again
        logger.warning("%s: lost shard state during the %s (%s); re-loaded shards %s, replaying the %s "
                       "(recovery %d/%d)", desc, phase, err, lost, phase, recoveries, max_recoveries)


def check_count(value: Any, name: str, who: str) -> int:
    """An iteration / epoch count given by a user: an integer >= 0 (0: initialise only), else a clear
    error naming the argument.

    Examples
    --------
    >>> check_count(3, "max_iterations", "MultiGEDI.fit")
    3
    >>> check_count(-3, "max_iterations", "MultiGEDI.fit")
    Traceback (most recent call last):
    ...
    ValueError: MultiGEDI.fit: max_iterations must be an integer >= 0 (0: initialise only), got -3
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{who}: {name} must be an integer >= 0 (0: initialise only), got {value!r}")
    return int(value)


def config_fingerprint(obj: Any) -> str:
    """A short stable hash of a model's configuration (``repr`` of plain data), to tell whether a
    checkpoint belongs to this model.

    Examples
    --------
    >>> config_fingerprint({"K": 10}) == config_fingerprint({"K": 10}) != config_fingerprint({"K": 11})
    True
    """
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]
