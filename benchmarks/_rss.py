"""Peak resident-memory measurement for benchmarks.

Two tools, both summing the RSS of a whole *process tree* (a process plus every
descendant), sampled with :mod:`psutil` at a fixed interval:

* :func:`run_and_sample` runs a command as a child process and returns its exit
  code, wall time and the peak of the summed RSS of the child and its
  descendants (e.g. a peer implementation's OpenMP program, or a script that
  starts its own workers).
* :class:`PeakRSSSampler` is a context manager that samples the *current*
  process tree from a background thread: the driver plus LocalCluster
  scheduler / nanny / worker children started inside the ``with`` block.

Summed RSS double-counts pages shared between processes (e.g. copy-on-write
pages after ``fork``), so it is an upper bound on physical memory use; it is
the number a batch scheduler (cgroup accounting aside) would see per job.

Sampling misses spikes shorter than ``interval``; the default 0.1 s is enough
for allocations that live for a whole iteration.

Example
-------
>>> import sys
>>> from benchmarks._rss import run_and_sample
>>> rc, wall, peak = run_and_sample([sys.executable, "-c", "x = bytearray(10**7)"])
>>> rc, peak > 0
(0, True)
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

import psutil

__all__ = ["tree_rss", "run_and_sample", "PeakRSSSampler"]

_MAX_INTERVAL = 0.2


def _check_interval(interval: float) -> float:
    interval = float(interval)
    if not (0.0 < interval <= _MAX_INTERVAL):
        raise ValueError(
            f"interval={interval!r} s is out of range; use 0 < interval <= {_MAX_INTERVAL} s "
            "(coarser sampling misses short-lived peaks)"
        )
    return interval


def tree_rss(proc: psutil.Process) -> int:
    """Summed resident set size (bytes) of ``proc`` and all its descendants.

    Processes that exit between listing and reading are skipped.

    Parameters
    ----------
    proc
        Root of the process tree.

    Returns
    -------
    int
        Sum of RSS in bytes; 0 if the root has already exited.

    Examples
    --------
    >>> import psutil
    >>> from benchmarks._rss import tree_rss
    >>> tree_rss(psutil.Process()) > 0
    True
    """
    try:
        procs = [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def run_and_sample(
    cmd: Sequence[str],
    interval: float = 0.1,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
) -> tuple[int, float, int]:
    """Run ``cmd`` and sample the summed RSS of it and its descendants.

    Parameters
    ----------
    cmd
        Command and arguments (no shell).
    interval
        Sampling period in seconds, ``0 < interval <= 0.2``.
    env
        Environment for the child (``None``: inherit).
    cwd
        Working directory for the child.
    timeout
        Seconds after which the whole tree is killed; the return code is then
        the (negative) signal code, and the wall time is the time until kill.

    Returns
    -------
    returncode : int
        Exit status of ``cmd`` (negative signal number if it was killed).
    wall_s : float
        Wall-clock seconds from start to exit.
    peak_rss_bytes : int
        Maximum over samples of the summed RSS of the process tree.

    Examples
    --------
    >>> import sys
    >>> from benchmarks._rss import run_and_sample
    >>> rc, wall, peak = run_and_sample([sys.executable, "-c", "pass"], interval=0.05)
    >>> rc == 0 and wall > 0 and peak > 0
    True
    """
    interval = _check_interval(interval)
    if isinstance(cmd, str):
        raise TypeError(f"cmd must be a list of arguments, not the string {cmd!r}; use shlex.split")
    t0 = time.perf_counter()
    popen = subprocess.Popen(list(cmd), env=None if env is None else dict(env), cwd=cwd)
    peak = 0
    try:
        proc = psutil.Process(popen.pid)
    except psutil.NoSuchProcess:
        proc = None
    deadline = None if timeout is None else t0 + float(timeout)
    while True:
        if proc is not None:
            peak = max(peak, tree_rss(proc))
        if popen.poll() is not None:
            break
        if deadline is not None and time.perf_counter() > deadline:
            _kill_tree(proc, popen)
            break
        time.sleep(interval)
    rc = popen.wait()
    wall = time.perf_counter() - t0
    return rc, wall, peak


def _kill_tree(proc: psutil.Process | None, popen: subprocess.Popen) -> None:
    kids = []
    if proc is not None:
        try:
            kids = proc.children(recursive=True)
        except psutil.Error:
            kids = []
    for p in kids:
        try:
            p.kill()
        except psutil.Error:
            pass
    popen.kill()


class PeakRSSSampler:
    """Context manager sampling the peak summed RSS of the current process tree.

    A daemon thread reads the RSS of this process plus all its descendants
    (for example LocalCluster scheduler and worker processes) every
    ``interval`` seconds while the ``with`` block runs.

    Parameters
    ----------
    interval
        Sampling period in seconds, ``0 < interval <= 0.2``.
    pid
        Root of the tree to sample (default: the current process).

    Attributes
    ----------
    peak_rss_bytes : int
        Maximum summed RSS seen (also updated while running).
    baseline_rss_bytes : int
        Summed RSS at entry.
    wall_s : float
        Seconds spent inside the block (set on exit).
    n_samples : int
        Number of samples taken.

    Examples
    --------
    >>> from benchmarks._rss import PeakRSSSampler
    >>> with PeakRSSSampler(interval=0.05) as s:
    ...     buf = bytearray(20 * 2**20)
    >>> s.peak_rss_bytes >= s.baseline_rss_bytes > 0
    True
    """

    def __init__(self, interval: float = 0.1, pid: int | None = None) -> None:
        self.interval = _check_interval(interval)
        self._proc = psutil.Process(os.getpid() if pid is None else pid)
        self.peak_rss_bytes = 0
        self.baseline_rss_bytes = 0
        self.wall_s = 0.0
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _sample(self) -> None:
        rss = tree_rss(self._proc)
        self.n_samples += 1
        if rss > self.peak_rss_bytes:
            self.peak_rss_bytes = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSSSampler:
        self._stop.clear()
        self.baseline_rss_bytes = tree_rss(self._proc)
        self.peak_rss_bytes = self.baseline_rss_bytes
        self.n_samples = 1
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="PeakRSSSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.wall_s = time.perf_counter() - self._t0
        return None

    @property
    def peak_rss_mib(self) -> float:
        """Peak summed RSS in MiB."""
        return self.peak_rss_bytes / 2**20
