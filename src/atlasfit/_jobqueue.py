"""Checks for batch-scheduler (dask-jobqueue) clusters: the errors HPC users meet first.

* :func:`check_job_memory`: the job script asks the batch system for less memory than its Dask
  workers are allowed to use (``processes x --memory-limit`` above ``--mem``): the batch system would
  kill the job when the workers fill up, which looks like random worker loss;
* :func:`wait_for_workers`: no worker joined within a timeout; the error lists the batch jobs and why
  they are pending (``squeue``'s reason), or that they run but their workers do not connect.

Everything here is pure text processing plus ``squeue``/``qstat`` calls; ``dask_jobqueue`` is not
imported.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from typing import Any

# SLURM's memory units are powers of 1024 (``--mem=60G`` is 60 GiB); default unit: MiB
_SLURM_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _parse_slurm_mem(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the SLURM memory request {text!r}")
    return int(float(m.group(1)) * _SLURM_UNITS[(m.group(2) or "M").upper()])


def _parse_pbs_mem(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(b|w)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the PBS memory request {text!r}")
    return int(float(m.group(1)) * (_SLURM_UNITS[m.group(2).upper()] if m.group(2) else 1))


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def job_resources(script: str) -> dict[str, Any]:
    """What a dask-jobqueue job script asks of the batch system and gives its Dask workers.

    Returns ``{"job_memory": bytes or None, "job_cpus": int or None, "processes": int,
    "threads": int, "worker_memory_limit": bytes or None}``; the worker values are the last
    occurrence on the worker command line (the one that wins).

    Examples
    --------
    >>> s = ("#SBATCH --cpus-per-task=4\\n#SBATCH --mem=8G\\n"
    ...      "python -m distributed.cli.dask_worker tcp://x:1 --nthreads 1 --memory-limit 1.86GiB "
    ...      "--nworkers 4 --memory-limit 3GB")
    >>> r = job_resources(s)
    >>> r["job_memory"] == 8 * 2**30, r["processes"], r["worker_memory_limit"]
    (True, 4, 3000000000)
    """
    from dask.utils import parse_bytes

    job_memory = job_cpus = None
    worker_line = ""
    for line in script.splitlines():
        s = line.strip()
        if s.startswith("#SBATCH"):
            for tok in shlex.split(s[len("#SBATCH"):], comments=False):
                if tok.startswith("--mem="):
                    job_memory = _parse_slurm_mem(tok.split("=", 1)[1])
                elif tok.startswith("--cpus-per-task="):
                    job_cpus = int(tok.split("=", 1)[1])
        elif s.startswith("#PBS"):
            for m in re.finditer(r"\bmem=([0-9.]+[kKmMgGtT]?[bBwW]?)", s):
                job_memory = _parse_pbs_mem(m.group(1))
            for m in re.finditer(r"\bncpus=(\d+)", s):
                job_cpus = int(m.group(1))
        elif "dask_worker" in s or "dask-worker" in s or "dask-cuda-worker" in s or "dask_cuda_worker" in s:
            worker_line = s.split("#", 1)[0]
    toks = shlex.split(worker_line) if worker_line else []
    processes, threads, limit = 1, 1, None
    for i, tok in enumerate(toks):
        key, _, val = tok.partition("=")
        if not val and i + 1 < len(toks):
            val = toks[i + 1]
        if key in ("--nworkers", "--nprocs"):
            processes = int(val)
        elif key == "--nthreads":
            threads = int(val)
        elif key == "--memory-limit":
            limit = None if val.lower() in ("auto", "0", "none") else int(parse_bytes(val))
    return {"job_memory": job_memory, "job_cpus": job_cpus, "processes": processes, "threads": threads,
            "worker_memory_limit": limit}


def check_job_memory(script: str, where: str = "cluster profile") -> dict[str, Any]:
    """Refuse a job script whose Dask workers may use more memory than the job asks for.

    Parameters
    ----------
    script
        The job script (``cluster.job_script()``).
    where
        How to name the configuration in the error (e.g. the profile's path).

    Returns
    -------
    dict
        :func:`job_resources` of the script.

    Raises
    ------
    ValueError
        When ``processes x worker memory_limit`` exceeds the job's memory request.

    Examples
    --------
    >>> check_job_memory("#SBATCH --mem=4G\\npython -m distributed.cli.dask_worker tcp://x:1 "
    ...                  "--nworkers 2 --memory-limit 3GiB")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cluster profile: the job asks the batch system for 4.00 GiB (--mem / mem=) but starts 2 Dask worker(s) with memory_limit 3.00 GiB each (6.00 GiB in all)...
    """
    r = job_resources(script)
    mem, n, lim = r["job_memory"], r["processes"], r["worker_memory_limit"]
    if mem is not None and lim is not None and n * lim > mem:
        raise ValueError(
            f"{where}: the job asks the batch system for {_fmt(mem)} (--mem / mem=) but starts {n} Dask "
            f"worker(s) with memory_limit {_fmt(lim)} each ({_fmt(n * lim)} in all): the batch system "
            f"would kill the job before Dask spills or pauses, which looks like random worker loss. "
            f"Lower the worker limit (worker_extra_args: ['--memory-limit', '{mem / n * 0.95 / 2**30:.2f}GiB'] or "
            f"less) or raise the job's memory (cluster: memory: ...)."
        )
    return r


def job_ids(cluster: Any) -> list[str]:
    """Batch job ids of a dask-jobqueue cluster's submitted jobs (empty for other clusters)."""
    ids = []
    for job in list(getattr(cluster, "workers", {}).values()):
        jid = getattr(job, "job_id", None)
        if jid:
            ids.append(str(jid))
    return ids


def squeue_states(ids: list[str], *, timeout: float = 20.0) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from ``squeue`` for the jobs it still knows."""
    if not ids:
        return {}
    try:
        res = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"], capture_output=True,
                             text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def describe_jobs(ids: list[str], states: dict[str, tuple[str, str]], scheduler_address: str | None,
                  log_directory: str | None) -> str:
    """The batch jobs' story for a "no worker joined" error.

    Examples
    --------
    >>> print(describe_jobs(["7", "8", "9"], {"7": ("PENDING", "BeginTime"), "8": ("RUNNING", "None")},
    ...                     "tcp://10.0.0.1:8786", None))
    job 7: PENDING (BeginTime); job 8: RUNNING; job 9: not in squeue (ended or failed).
    Pending jobs wait for the batch system (reason: BeginTime): raise the timeout, or ask for less (fewer cores, less memory, a shorter walltime) or another queue. Running jobs whose workers never connected: read the job's output (log_directory in the profile) and check that the compute nodes can reach the scheduler at tcp://10.0.0.1:8786 (set `interface:` in the profile to the nodes' network). Jobs that ended: read their output (set log_directory in the profile to keep it).
    """
    if not ids:
        return "no batch job was submitted (scale the cluster: the profile's `scale: {jobs: N}` or `adapt:`)."
    parts = []
    for i in ids:
        if i in states:
            st, why = states[i]
            parts.append(f"job {i}: {st}" + (f" ({why})" if why and why != "None" else ""))
        else:
            parts.append(f"job {i}: not in squeue (ended or failed)")
    text = "; ".join(parts) + "."
    pending = sorted({why for st, why in states.values() if st == "PENDING"})
    if pending:
        text += (f"\nPending jobs wait for the batch system (reason: {', '.join(pending)}): raise the timeout, "
                 "or ask for less (fewer cores, less memory, a shorter walltime) or another queue.")
    if any(st in ("RUNNING", "COMPLETING", "CONFIGURING") for st, _ in states.values()):
        logs = f" in {log_directory}" if log_directory else " (log_directory in the profile)"
        text += (f" Running jobs whose workers never connected: read the job's output{logs} and check that the "
                 f"compute nodes can reach the scheduler at {scheduler_address} (set `interface:` in the profile "
                 f"to the nodes' network).")
    if any(i not in states for i in ids):
        text += (" Jobs that ended: read their output" +
                 (f" in {log_directory}." if log_directory else " (set log_directory in the profile to keep it)."))
    return text


def wait_for_workers(client: Any, n_workers: int, timeout: float, cluster: Any = None) -> None:
    """Wait until ``n_workers`` Dask workers are connected, or raise a :class:`TimeoutError` that
    says which batch jobs are pending and why (``squeue``).

    Parameters
    ----------
    client
        The ``distributed.Client``.
    n_workers
        Workers to wait for.
    timeout
        Seconds.
    cluster
        The cluster (default ``client.cluster``); for a dask-jobqueue cluster the error lists its jobs.
    """
    cluster = cluster if cluster is not None else getattr(client, "cluster", None)
    deadline = time.monotonic() + float(timeout)
    while True:
        have = len(client.scheduler_info(n_workers=-1)["workers"]) if _new_scheduler_info(client) \
            else len(client.scheduler_info()["workers"])
        if have >= n_workers:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ids = job_ids(cluster)
    states = squeue_states(ids) if type(cluster).__name__ == "SLURMCluster" else {}
    log_dir = getattr(cluster, "_job_kwargs", {}).get("log_directory") if cluster is not None else None
    addr = getattr(getattr(cluster, "scheduler", None), "address", None) or client.scheduler.address
    raise TimeoutError(
        f"{n_workers - have} of {n_workers} Dask worker(s) did not join within {timeout:g} s "
        f"({have} connected). " + (describe_jobs(ids, states, addr, log_dir) if cluster is not None
                                   and hasattr(cluster, "job_script") else "")
    )


def _new_scheduler_info(client: Any) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["check_job_memory", "describe_jobs", "job_ids", "job_resources", "squeue_states", "wait_for_workers"]
