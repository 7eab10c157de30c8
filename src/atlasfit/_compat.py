"""Work-arounds for bugs in the Python / Dask versions atlasfit supports.

CPython 3.11.0–3.11.8 can deadlock a whole process when ``sys._current_frames()`` runs while
another thread triggers the garbage collector (a lock-ordering bug between the runtime's thread
list lock and the GIL: CPython gh-106883 / gh-116969, fixed in 3.11.9; reported for Dask as
dask/distributed#8616). A Dask worker's statistical profiler calls ``sys._current_frames()`` every
10 ms while a task runs, so on those Python versions a worker can freeze mid-task: no heartbeat, and
after ``distributed.scheduler.worker-ttl`` the scheduler restarts it. We hit exactly this in CI
(Python 3.11.7: a 600-cell fit froze during shard loading for 10 minutes).

:func:`guard_worker_profiler` switches the worker profiler off in the Dask configuration on the
affected versions; :class:`distributed.Nanny` copies the configuration into the worker processes it
starts, so every cluster created after ``import atlasfit`` (``LocalCluster``, ``LocalCUDACluster``,
atlasfit's own helpers) is covered. Workers started elsewhere (dask-jobqueue job scripts, a
scheduler someone else runs) get ``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False`` in their
environment from the ``deploy/profiles`` files, and :func:`stop_worker_profiler` stops the profiler
of a running worker from inside atlasfit's first task on it. Only the dashboard's profile page is
lost. Set ``ATLASFIT_KEEP_DASK_PROFILER=1`` to leave the profiler alone.
"""

from __future__ import annotations

import os
import sys

#: Python versions with the ``sys._current_frames()`` / GC deadlock (fixed in 3.11.9).
AFFECTED = (3, 11, 0) <= sys.version_info[:3] < (3, 11, 9)


def profiler_unsafe() -> bool:
    """True when this Python can deadlock in Dask's worker profiler and the user has not opted out.

    Examples
    --------
    >>> isinstance(profiler_unsafe(), bool)
    True
    """
    return AFFECTED and os.environ.get("ATLASFIT_KEEP_DASK_PROFILER", "0") in ("", "0")


def guard_worker_profiler() -> bool:
    """Disable Dask's worker profiler in the global Dask config on affected Pythons.

    Returns whether it changed the configuration.

    Examples
    --------
    >>> import dask
    >>> changed = guard_worker_profiler()
    >>> changed == profiler_unsafe() or not dask.config.get("distributed.worker.profile.enabled")
    True
    """
    if not profiler_unsafe():
        return False
    import dask.config  # noqa: PLC0415

    dask.config.set({"distributed.worker.profile.enabled": False})
    return True


def stop_worker_profiler(worker) -> bool:
    """Stop the profiler of a running ``distributed.Worker`` (called from a task on that worker).

    The stop is scheduled on the worker's event loop; returns whether there was a profiler to stop.
    """
    if not profiler_unsafe() or worker is None:
        return False
    pcs = getattr(worker, "periodic_callbacks", {}) or {}
    stopped = False
    for name in ("profile", "profile-cycle"):
        pc = pcs.get(name)
        if pc is not None:
            worker.loop.add_callback(pc.stop)
            stopped = True
    return stopped
