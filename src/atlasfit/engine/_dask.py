"""Dask engine: shard state resident on its owning worker, one task per worker per round.

Mechanism (chosen by measurement, see ``docs/engine.md`` and
``benchmarks/bench_engine_overhead.py``): every worker process keeps a registry (a dict attached
to its :class:`distributed.Worker`) of the shard states it owns, keyed by ``(engine id, shard
index)``. A map round submits one task per owning worker, pinned there with
``workers=[owner], allow_other_workers=False, pure=False``; the task runs the shard function on
each of that worker's shards in shard order and returns the small statistics. State never travels
to the driver and is never serialised.

While waiting for a round the driver polls the scheduler for the owners; a lost owner (or a
restarted worker without the state) makes :meth:`DaskEngine.map` raise
:class:`~atlasfit.engine.ShardLostError` rather than wait forever for a task that can only run
on a dead worker. :meth:`DaskEngine.recover` then re-places and re-loads the lost shards.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from typing import Any

import distributed
from dask.sizeof import sizeof
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from .._compat import stop_worker_profiler
from ._determinism import blas_single_thread, realign
from ._errors import ShardLostError, StateMissingError
from ._protocol import ShardSpec
from ._threaded import trim_heap

_REGISTRY_ATTR = "_atlasfit_shard_states"
# Used only when a task runs outside a Dask worker (never in normal use).
_PROCESS_REGISTRY: dict = {}

_LOSS_ERRORS = (KilledWorker, CommClosedError, StateMissingError, CancelledError, ConnectionError)


# --------------------------------------------------------------------------- worker-side functions


def _registry(worker=None) -> dict:
    if worker is None:
        try:
            worker = distributed.get_worker()
        except ValueError:
            return _PROCESS_REGISTRY
    reg = getattr(worker, _REGISTRY_ATTR, None)
    if reg is None:
        reg = {}
        setattr(worker, _REGISTRY_ATTR, reg)
    return reg


_ALLOCATOR_TUNED = False


def tune_allocator(mmap_threshold: int = 16 * 2**20, trim_threshold: int = 64 * 2**20) -> bool:
    """Let glibc serve large temporaries from the heap and keep freed memory for reuse.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's
    mmap threshold at its 128 KiB default: every per-sample temporary (a J x N_g float array) is then
    mmapped, page-faulted and unmapped on each use. Measured on the real 5k atlas (2 workers): the
    MultiGEDI Y-update round took 0.90 s per iteration with the nanny's setting and 0.21 s after this
    call; on a 20k-cell synthetic atlas (K=20) a whole iteration took 4.8 s without and 2.2 s with
    it, for 1.42 vs 1.75 GB peak RSS of the fit. The mmap threshold is 16 MiB: round temporaries
    (blocks of ~2 MiB, :func:`atlasfit.models.multigedi._shard.cell_blocks`) are reused from the heap,
    sample-sized arrays (Y, one-off initialisation products) get their own mappings and go back to the
    system when freed instead of fragmenting the heap (at 64 MiB the 50k-cell float64 benchmark kept
    ~0.6 GB of freed heap: 2.96 vs 2.35 GB peak). The trim threshold of 64 MiB bounds what the heap keeps.
    Returns False where glibc's ``mallopt`` is unavailable (not Linux/glibc) or when the environment
    sets ``ATLASFIT_MALLOC_TUNE=0``. Runs once per worker process, from the engine's setup task.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("ATLASFIT_MALLOC_TUNE", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, int(mmap_threshold))) and bool(libc.mallopt(-1, int(trim_threshold)))
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


_LIBC = None
_DRIVER_TUNED = False


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt  # noqa: B018 - glibc only
            _LIBC.malloc_trim  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def tune_driver_allocator(mmap_threshold: int = 256 * 2**10, trim_threshold: int = 16 * 2**20) -> bool:
    """Let the driver give round results' memory back to the system (glibc ``mallopt``).

    Every round brings the shards' results to the driver (for the topic model's local steps: each
    shard's parameters and Adam moments, ~12 MiB per shard in float32), and the next round frees
    them. glibc's default mmap threshold is dynamic: once a large buffer is freed, buffers up to that
    size come from the heap arenas (Dask deserialises on its communication thread, which has an arena
    of its own), where freed space stays mapped and fragments. Measured on a 60k-cell store
    (2 workers, 2 epochs, float32, 16 local steps per round): the driver's peak RSS grew by
    400-435 MiB during ``train()`` with glibc's defaults and by 270-340 MiB with a fixed 256 KiB mmap
    threshold (every buffer of a quarter MiB or more in its own mapping, returned when freed) and a
    ``malloc_trim`` after each round (:func:`~._threaded.trim_heap`); the rest is fragmentation of the
    small objects of each round. Called once when a :class:`DaskEngine` is created; ``ATLASFIT_MALLOC_TUNE=0`` turns it
    off. Returns False where glibc is unavailable.
    """
    global _DRIVER_TUNED
    if _DRIVER_TUNED:
        return True
    if os.environ.get("ATLASFIT_MALLOC_TUNE", "1") == "0" or not _libc():
        return False
    ok = bool(_LIBC.mallopt(-3, int(mmap_threshold))) and bool(_LIBC.mallopt(-1, int(trim_threshold)))
    _DRIVER_TUNED = ok
    return ok


#: A worker returns its freed heap (glibc ``malloc_trim``, :func:`~._threaded.trim_heap`) after loading its
#: shards and after rounds at least this long: loading and long rounds free ~130 MiB of temporaries per
#: worker on the 100k-cell topic benchmark, which glibc keeps in the heap unless asked.
TRIM_AFTER_S = 1.0


@functools.lru_cache(maxsize=256)
def _is_local_address(addr: str) -> bool:
    """Whether a Dask address (``tcp://host:port``, ``inproc://...``) is on this machine."""
    import socket

    if addr.startswith("inproc://"):
        return True
    host = distributed.comm.get_address_host(addr)
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return True
    try:
        return host in {socket.gethostname(), socket.getfqdn(), *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        return False


def payload_nbytes(obj, _depth: int = 0) -> int:
    """Bytes of ``obj`` counting every array in it: arrays (anything with an integer ``nbytes``) in
    dicts, lists and tuples are summed exactly, other objects by :func:`dask.sizeof.sizeof`.

    ``dask.sizeof`` samples 10 entries of a larger dict or list and extrapolates, so a dict of a few
    large weight matrices among many small vectors (a model's parameters) was often estimated at a
    fraction of its size, and a 12 MiB round payload went into the task graph ("Sending large graph")
    instead of being scattered once to the workers.

    Examples
    --------
    >>> import numpy as np
    >>> d = {f"b{i}": np.zeros(4) for i in range(40)} | {"W": np.zeros((1000, 100))}
    >>> payload_nbytes(d) >= 800_000 + 40 * 32
    True
    """
    nb = getattr(obj, "nbytes", None)
    if isinstance(nb, int):
        return nb
    if _depth < 8 and isinstance(obj, dict):
        return sum(payload_nbytes(v, _depth + 1) for v in obj.values()) + 64 * len(obj)
    if _depth < 8 and isinstance(obj, (list, tuple)):
        return sum(payload_nbytes(v, _depth + 1) for v in obj) + 8 * len(obj)
    return int(sizeof(obj))


def _w_setup(eid: str, specs: Sequence[ShardSpec], load_fn, args, kwargs) -> list[int]:
    tune_allocator()
    try:
        stop_worker_profiler(distributed.get_worker())
    except ValueError:  # not on a worker
        pass
    reg = _registry()
    args, kwargs = realign((args, kwargs))  # arrays out of the message: aligned, as in process
    with blas_single_thread():  # the same kernels as in process and on any worker (_determinism)
        for spec in specs:
            reg[(eid, spec.index)] = load_fn(spec, *args, **kwargs)
    trim_heap()  # loading leaves freed temporaries (read buffers, dtype copies) in the heap
    return [s.index for s in specs]


def _w_map(eid: str, items: Sequence, fn, payload, with_spec: bool) -> tuple[float, list]:
    t0 = time.perf_counter()
    args, kwargs = realign(payload)  # arrays out of the message: aligned, as in process
    reg = _registry()
    out = []
    with blas_single_thread():  # the same kernels as in process and on any worker (_determinism)
        _w_map_items(eid, items, fn, args, kwargs, with_spec, reg, out)
    dt = time.perf_counter() - t0
    if dt >= TRIM_AFTER_S:
        trim_heap()
    return dt, out


def _w_map_items(eid, items, fn, args, kwargs, with_spec, reg, out) -> None:
    for item in items:
        index = item.index if with_spec else item
        try:
            state = reg[(eid, index)]
        except KeyError:
            raise StateMissingError(
                f"shard {index} of engine {eid!r} has no state on this worker "
                "(the worker restarted?)",
                index,
            ) from None
        out.append(fn(state, item, *args, **kwargs) if with_spec else fn(state, *args, **kwargs))


def _w_held(eid: str, dask_worker=None) -> list[int]:
    return sorted(i for (e, i) in _registry(dask_worker) if e == eid)


def _w_drop(eid: str, dask_worker=None) -> int:
    reg = _registry(dask_worker)
    keys = [k for k in reg if k[0] == eid]
    for k in keys:
        del reg[k]
    return len(keys)


def _s_workers(dask_scheduler=None) -> list[str]:
    return sorted(
        addr for addr, ws in dask_scheduler.workers.items() if str(ws.status) in ("running", "Status.running")
    )


# --------------------------------------------------------------------------- placement


def place_shards(
    shards: Sequence[ShardSpec],
    workers: Sequence[str],
    load: dict[str, float] | None = None,
) -> dict[int, str]:
    """Assign shards to workers, balancing cell counts; deterministic given the inputs.

    Shards are taken largest first (ties by shard index) and each goes to the worker with the
    fewest cells so far (ties by worker address order).

    Parameters
    ----------
    shards
        The shards to place.
    workers
        Candidate worker addresses (sorted internally).
    load
        Cells already held per worker (e.g. shards kept after a failure).

    Returns
    -------
    dict
        Shard index -> worker address.

    Examples
    --------
    >>> from atlasfit.engine import plan_shards, place_shards
    >>> sh = plan_shards(["a", "b", "c"], [10, 6, 5])
    >>> place_shards(sh, ["tcp://w2", "tcp://w1"])
    {0: 'tcp://w1', 1: 'tcp://w2', 2: 'tcp://w2'}
    """
    ws = sorted(workers)
    if not ws:
        raise RuntimeError("place_shards: no worker to place shards on; is the cluster running?")
    acc = {w: float((load or {}).get(w, 0.0)) for w in ws}
    order = sorted(shards, key=lambda s: (-max(1, sum(s.n_cells)), s.index))
    out: dict[int, str] = {}
    for s in order:
        w = min(ws, key=lambda a: (acc[a], ws.index(a)))
        out[s.index] = w
        acc[w] += max(1, sum(s.n_cells))
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- engine


class DaskEngine:
    """Run shard functions on Dask workers that hold the shards' state.

    Parameters
    ----------
    client
        A connected :class:`distributed.Client` (see :func:`atlasfit.cluster.get_client`).
    shards
        The fixed shard plan (:func:`~atlasfit.engine.plan_shards`); ``shards[k].index == k``.
    name
        A readable prefix for task keys and the registry (a unique suffix is added).
    mode
        ``"per-worker"`` (default): one task per worker per round runs all of that worker's
        shards. ``"per-shard"``: one task per shard (kept for the overhead benchmark).
    broadcast_threshold
        Arguments of a round larger than this many bytes (:func:`payload_nbytes`) are
        scattered once to the owners (``broadcast=True, hash=False``) instead of being sent
        inline with each task.
    poll_interval
        Seconds between checks that the owners are alive while a round is running.

    Examples
    --------
    >>> import distributed
    >>> from atlasfit.engine import DaskEngine, plan_shards
    >>> client = distributed.Client(processes=False, n_workers=1)  # doctest: +SKIP
    >>> eng = DaskEngine(client, plan_shards(["a", "b"], [2, 3]))  # doctest: +SKIP
    >>> eng.setup(lambda spec: {"n": sum(spec.n_cells)})  # doctest: +SKIP
    >>> eng.map(lambda state, k: state["n"] * k, 10)  # doctest: +SKIP
    [20, 30]
    """

    def __init__(
        self,
        client: distributed.Client,
        shards: Sequence[ShardSpec],
        *,
        name: str | None = None,
        mode: str = "per-worker",
        broadcast_threshold: int = 8 * 2**20,
        poll_interval: float = 0.5,
        direct: bool | None = None,
    ):
        if mode not in ("per-worker", "per-shard"):
            raise ValueError(f"DaskEngine: mode must be 'per-worker' or 'per-shard', got {mode!r}")
        self.client = client
        self.shards = list(shards)
        for k, s in enumerate(self.shards):
            if s.index != k:
                raise ValueError(
                    f"DaskEngine: shards[{k}].index is {s.index}; pass the list from plan_shards "
                    "unchanged (shard k must have index k)"
                )
        self.name = name or "atlasfit"
        self.id = f"{self.name}-{uuid.uuid4().hex[:10]}"
        self.mode = mode
        self.broadcast_threshold = int(broadcast_threshold)
        self.poll_interval = float(poll_interval)
        env = os.environ.get("ATLASFIT_DIRECT_TRANSFERS")
        if direct is None and env in ("0", "1"):
            direct = env == "1"
        self._direct = direct  # None: decided from the workers' hosts at setup (_use_direct)
        self.owners: dict[int, str] = {}
        self._setup_call: tuple | None = None
        # (wall seconds, busiest worker's compute seconds) of every map round: the difference is
        # the engine's overhead (scheduling, transfer, (de)serialisation)
        self.round_times: list[tuple[float, float]] = []
        self._round = 0
        self._received = 0  # bytes of round results since the driver's heap was last trimmed
        tune_driver_allocator()

    # ------------------------------------------------------------------ helpers

    def live_workers(self) -> list[str]:
        """Addresses of the running workers, sorted (asked from the scheduler)."""
        return self.client.run_on_scheduler(_s_workers)

    def _use_direct(self) -> bool:
        """Round payloads and results travel straight between driver and workers (not through the
        scheduler) when every worker runs on this host: Dask's default from a driver goes through the
        scheduler (a batch node may not reach the workers), which on the 100k topic benchmark
        (2 workers, ~12 MiB each way per round) spent ~0.14 s of every round in a scheduler process
        competing for the same cores. ``direct=`` or ``ATLASFIT_DIRECT_TRANSFERS=0/1`` decide instead."""
        if self._direct is not None:
            return self._direct
        return bool(self.owners) and all(_is_local_address(w) for w in set(self.owners.values()))

    def _submit(self, func, *args, worker: str, tag: str):
        self._round += 1
        return self.client.submit(
            func,
            *args,
            key=f"{self.id}-{tag}-{self._round}-{worker.rsplit(':', 1)[-1]}",
            workers=[worker],
            allow_other_workers=False,
            pure=False,
        )

    def _groups(self, indices: Sequence[int] | None = None) -> list[tuple[str, list[int]]]:
        idx = range(len(self.shards)) if indices is None else indices
        if self.mode == "per-shard":
            return [(self.owners[i], [i]) for i in idx]
        groups: dict[str, list[int]] = {}
        for i in idx:
            groups.setdefault(self.owners[i], []).append(i)
        # in order of each group's first shard: a round's futures (and the error it reports when
        # several shards fail, see _collect) follow the shard order, not the workers' addresses
        return sorted(groups.items(), key=lambda g: (min(g[1]), g[0]))

    def _collect(self, futs: list, owners: list[str]) -> list:
        """Wait for ``futs`` (one per owner); raise ShardLostError if an owner goes away."""
        while True:
            try:
                with self.client.as_current():  # wait() uses the current client; ours may not be the default
                    distributed.wait(futs, timeout=self.poll_interval)
                break
            except TimeoutError:
                self._raise_if_owner_died(futs, owners, "during a round")
        for f in futs:  # several shards failed (e.g. bad data): report the first in shard order, every run
            if f.status == "error":
                exc = f.exception()
                if not isinstance(exc, _LOSS_ERRORS):
                    raise exc
                break
        try:
            return self._gather(futs, owners)
        except _LOSS_ERRORS as e:
            alive = set(self.live_workers())
            self._abort(futs, owners, alive)
            shard = getattr(e, "shard", -1)
            raise ShardLostError(
                f"engine {self.id!r}: a round failed because shard state was lost "
                f"({type(e).__name__}: {e})",
                (shard,) if shard >= 0 else (),
            ) from e

    def _gather(self, futs: list, owners: list[str]) -> list:
        # The results are ready; fetch them with a time limit so that an owner dying between
        # "done" and "fetched" (the result is then recomputed, which a pinned task cannot do
        # elsewhere) raises instead of hanging. Slow transfers on live owners are retried.
        limit = max(10.0, 20 * self.poll_interval)
        while True:
            try:
                return self.client.sync(self.client._gather, futs, direct=self._use_direct(),
                                        callback_timeout=limit)
            except TimeoutError:
                self._raise_if_owner_died(futs, owners, "before their results were fetched")

    def _raise_if_owner_died(self, futs: list, owners: list[str], when: str) -> None:
        """Raise ShardLostError (after aborting the round) if an owner of ``futs`` left."""
        alive = set(self.live_workers())
        dead = sorted(set(owners) - alive)
        if dead:
            self._abort(futs, owners, alive)
            lost = tuple(i for i, w in sorted(self.owners.items()) if w in dead)
            raise ShardLostError(
                f"engine {self.id!r}: worker(s) {dead} left the cluster {when}; shards {list(lost)} lost",
                lost,
            ) from None

    def _abort(self, futs: list, owners: list[str], alive: set) -> None:
        # Let tasks on surviving workers finish (so they do not touch state after a rollback),
        # then drop every future of the round.
        live = [f for f, w in zip(futs, owners) if w in alive and not f.done()]
        if live:
            try:
                with self.client.as_current():
                    distributed.wait(live, timeout=60)
            except TimeoutError:
                pass
        self.client.cancel(futs)

    def _run(self, fn, args, kwargs, *, with_spec: bool) -> list:
        if not self.owners or self._setup_call is None:
            raise RuntimeError(f"DaskEngine {self.id!r}: map called before setup()")
        payload: Any = (args, kwargs)
        groups = self._groups()
        scattered = None
        if (args or kwargs) and payload_nbytes(payload) > self.broadcast_threshold:
            scattered = self.client.scatter(
                payload, workers=sorted({w for w, _ in groups}), broadcast=True, hash=False,
                direct=self._use_direct(),
            )
            payload = scattered
        futs, owners = [], []
        for w, idx in groups:
            items = [self.shards[i] for i in idx] if with_spec else idx
            futs.append(self._submit(_w_map, self.id, items, fn, payload, with_spec, worker=w, tag="map"))
            owners.append(w)
        try:
            t_round = time.perf_counter()
            timed = self._collect(futs, owners)
            wall = time.perf_counter() - t_round
            busy = max(t for t, _ in timed)
            parts = [p for _, p in timed]
            self.round_times.append((wall, busy))
        finally:
            if scattered is not None:
                self.client.cancel([scattered])
        out: list = [None] * len(self.shards)
        for (_, idx), res in zip(groups, parts):
            for i, r in zip(idx, res):
                out[i] = realign(r)  # arrays out of the message: aligned, as in process
        self._received += payload_nbytes(parts)
        if self._received >= 2**20:  # previous rounds' results are garbage by now: return their memory
            trim_heap()
            self._received = 0
        return out

    # ------------------------------------------------------------------ protocol

    def setup(self, load_fn: Callable[..., dict], *args: Any, **kwargs: Any) -> None:
        """Create every shard's state as ``load_fn(spec, *args, **kwargs)`` on its owner.

        Shards are placed on the running workers (balanced by cell count, deterministic by
        worker address order); the call is remembered so lost shards can be re-loaded.

        If ``load_fn`` has an attribute ``select_args(specs, args, kwargs) -> (args, kwargs)``, each
        worker is sent only what that returns for its shards (e.g. the rows of in-memory data its
        samples own) instead of the whole ``args``.
        """
        if self.owners:
            self.client.run(_w_drop, self.id, on_error="ignore")
        self.client.wait_for_workers(1, timeout=120)
        self.owners = place_shards(self.shards, self.live_workers())
        self._setup_call = (load_fn, args, kwargs)
        self._load(list(range(len(self.shards))))

    def _load(self, indices: list[int]) -> None:
        load_fn, args, kwargs = self._setup_call
        groups: dict[str, list[int]] = {}
        for i in indices:
            groups.setdefault(self.owners[i], []).append(i)
        futs, owners = [], []
        select = getattr(load_fn, "select_args", None)
        for w, idx in sorted(groups.items()):
            specs = [self.shards[i] for i in idx]
            a, kw = select(specs, args, kwargs) if select is not None else (args, kwargs)
            futs.append(self._submit(_w_setup, self.id, specs, load_fn, a, kw, worker=w, tag="setup"))
            owners.append(w)
        self._collect(futs, owners)

    def reload(self) -> None:
        """Rebuild every shard's state where it lives with the ``load_fn`` given to :meth:`setup`
        (after :meth:`recover`: the state as right after setup, e.g. to replay an interrupted
        initialisation)."""
        if self._setup_call is None:
            raise RuntimeError(f"DaskEngine {self.id!r}: reload called before setup()")
        self._load(list(range(len(self.shards))))

    def map(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(state, *args, **kwargs)`` on every shard's owner; results in shard order."""
        return self._run(fn, args, kwargs, with_spec=False)

    def map_spec(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Like :meth:`map` but calls ``fn(state, spec, *args, **kwargs)`` (spec: the ShardSpec)."""
        return self._run(fn, args, kwargs, with_spec=True)

    def recover(self, timeout: float = 120.0) -> list[int]:
        """Re-place and re-load shards whose state is gone; return their indices.

        A shard is lost when its owner is no longer running or no longer holds its state (a
        restarted worker). Lost shards go to the running workers, balanced by cells on top of
        the shards kept; their state is rebuilt with the ``load_fn`` given to :meth:`setup`.
        The caller then restores every shard's mutable state (e.g. from a checkpoint).
        """
        if self._setup_call is None:
            raise RuntimeError(f"DaskEngine {self.id!r}: recover called before setup()")
        deadline = time.monotonic() + timeout
        while True:
            self.client.wait_for_workers(1, timeout=max(1.0, deadline - time.monotonic()))
            alive = self.live_workers()
            held = self.client.run(_w_held, self.id, workers=alive, on_error="return")
            usable = [w for w in alive if isinstance(held.get(w), list)]
            if usable:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"DaskEngine {self.id!r}: no reachable worker after {timeout} s")
            time.sleep(0.2)
        lost = [
            i for i, w in sorted(self.owners.items()) if w not in usable or i not in set(held[w])
        ]
        if lost:
            load: dict[str, float] = {}
            for i, w in self.owners.items():
                if i not in lost:
                    load[w] = load.get(w, 0.0) + max(1, sum(self.shards[i].n_cells))
            self.owners.update(place_shards([self.shards[i] for i in lost], usable, load))
            self._load(lost)
        return lost

    def close(self) -> None:
        """Drop this engine's shard states from every worker."""
        if self.owners and self.client.status == "running":
            self.client.run(_w_drop, self.id, on_error="ignore")
        self.owners = {}
        self._setup_call = None

    def __enter__(self) -> DaskEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        n_w = len(set(self.owners.values()))
        return f"DaskEngine(id={self.id!r}, shards={len(self.shards)}, workers={n_w}, mode={self.mode!r})"
