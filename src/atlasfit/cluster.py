"""Get or start the Dask cluster a fit runs on.

Three ways to a :class:`distributed.Client`:

* :func:`get_client` reuses the active client if there is one, otherwise starts an embedded
  :class:`distributed.LocalCluster` sized to the machine (one single-threaded process worker per
  core), or a ``dask_cuda.LocalCUDACluster`` when GPUs are asked for and present;
* :func:`cluster_session` does the same as a context manager and closes only what it started;
* :func:`cluster_from_profile` builds a cluster from a YAML profile (SLURM / PBS through
  dask-jobqueue, or a local CPU / CUDA cluster), see :func:`load_profile`; before it submits jobs it
  checks the job script (memory of the job vs. its workers' ``memory_limit``; ``sbatch --test-only``);
* :func:`wait_for_workers` waits for the workers of a batch cluster and, when they do not come,
  says which jobs are pending and why (``squeue``).

Optional dependencies (``dask_cuda``, ``cupy``, ``dask_jobqueue``) are imported inside the
functions that need them, never at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import distributed

from ._jobqueue import check_job_memory, job_ids, job_resources, wait_for_workers
from .engine._device import gpu_available, resolve_device  # noqa: F401 - re-exported (they live in the engine)

logger = logging.getLogger("atlasfit.cluster")

#: Environment of every worker process started here: one BLAS/OpenMP thread per worker, so a
#: worker's results do not depend on the thread count and workers do not oversubscribe cores.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_SCHEDULERS = ("slurm", "pbs", "local", "localcuda")
_PROFILE_KEYS = {"scheduler", "cluster", "scale", "adapt", "extends", "startup_timeout"}
#: Seconds :func:`get_client` waits for a profile's workers by default (profile key ``startup_timeout``).
DEFAULT_STARTUP_TIMEOUT = 600.0

# Clusters started by this module, keyed by id(client): only these are closed by cluster_session.
_STARTED: dict[int, Any] = {}


def _n_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _active_client() -> distributed.Client | None:
    try:
        return distributed.default_client()
    except ValueError:
        return None


def _say(msg: str, quiet: bool) -> None:
    logger.info(msg)
    if not quiet:
        print(msg, flush=True)


def get_client(
    *,
    gpu: bool | str = False,
    n_workers: int | None = None,
    memory_limit: int | str | None = None,
    profile: str | os.PathLike | None = None,
    quiet: bool = False,
) -> distributed.Client:
    """Return the active Dask client, or start an embedded cluster and return its client.

    Parameters
    ----------
    gpu
        ``False``: CPU workers. ``True``: a ``dask_cuda.LocalCUDACluster`` (one worker per GPU);
        raises :class:`RuntimeError` when dask-cuda/CuPy or a CUDA device are missing.
        ``"auto"``: GPUs when available, otherwise CPU workers (with a log line).
    n_workers
        CPU workers to start (default: the number of usable cores, at least 1). Ignored when a
        client is already active.
    memory_limit
        Memory limit per worker (bytes or a string such as ``"4GiB"``); default about
        ``0.8 * total memory / n_workers``. Spilling to disk uses Dask's configured thresholds.
    profile
        Path or name of a YAML cluster profile (see :func:`load_profile`); when given (and no
        client is active) the cluster is built by :func:`cluster_from_profile`.
    quiet
        Do not print the start-up line (it is still logged).

    Returns
    -------
    distributed.Client
        The active client if there is one (no second cluster is started), otherwise a new
        client connected to the new cluster.

    Examples
    --------
    >>> from atlasfit.cluster import get_client
    >>> client = get_client(n_workers=1, quiet=True)  # doctest: +SKIP
    >>> client.close()  # doctest: +SKIP
    """
    if gpu not in (True, False, "auto"):
        raise ValueError(f"get_client: gpu must be True, False or 'auto', got {gpu!r}")
    client = _active_client()
    if client is not None:
        logger.info("atlasfit: using the active Dask client %s", client)
        return client

    if profile is not None:
        prof = load_profile(profile) if not isinstance(profile, Mapping) else dict(profile)
        cluster = cluster_from_profile(prof)
        client = distributed.Client(cluster)
        n = expected_workers(cluster, prof)
        timeout = float(prof.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT))
        ids = ", ".join(job_ids(cluster))
        _say(
            f"atlasfit: started a {type(cluster).__name__} from profile {str(profile)!r}"
            + (f" (jobs {ids})" if ids else "") + f"; waiting up to {timeout:g} s for {n} worker(s); "
            f"dashboard at {client.dashboard_link}",
            quiet,
        )
        try:
            wait_for_workers(client, n, timeout, cluster)
        except BaseException:
            client.close()
            cluster.close()
            raise
        _STARTED[id(client)] = cluster
        _say(f"atlasfit: {n} worker(s) joined", quiet)
        return client

    from ._spawn import check_main_guard  # noqa: PLC0415

    check_main_guard()  # a script's unguarded top level would re-run in every spawned worker
    if gpu is True or gpu == "auto":
        if gpu_available():
            from dask_cuda import LocalCUDACluster  # noqa: PLC0415 - optional GPU dependency

            kwargs: dict[str, Any] = {}
            if memory_limit is not None:
                kwargs["memory_limit"] = memory_limit
            cluster = LocalCUDACluster(**kwargs)
            client = distributed.Client(cluster)
            _STARTED[id(client)] = cluster
            n = len(cluster.workers)
            _say(
                f"atlasfit: started a LocalCUDACluster with {n} GPU worker(s); "
                f"dashboard at {client.dashboard_link}",
                quiet,
            )
            return client
        if gpu is True:
            raise RuntimeError(
                "get_client(gpu=True): no usable GPU: dask-cuda and CuPy must import and CuPy "
                "must see a CUDA device. Install the GPU extra matching your CUDA driver, e.g. "
                "`pip install 'atlasfit[gpu-cu12]'`, and check the driver with `nvidia-smi`; "
                "or call get_client(gpu='auto') / gpu=False to run on CPU workers."
            )
        _say("atlasfit: gpu='auto' found no usable GPU (dask-cuda/CuPy/CUDA); using CPU workers", True)

    n = _n_cores() if n_workers is None else int(n_workers)
    if n < 1:
        raise ValueError(f"get_client: n_workers must be >= 1, got {n_workers!r}")
    if memory_limit is None:
        memory_limit = int(0.8 * _total_memory() / n)
    cluster = distributed.LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",
        env=dict(WORKER_ENV),
    )
    client = distributed.Client(cluster)
    _STARTED[id(client)] = cluster
    mem = memory_limit if isinstance(memory_limit, str) else f"{memory_limit / 2**30:.1f} GiB"
    _say(
        f"atlasfit: started a LocalCluster with {n} workers (1 thread each, {mem} memory each); "
        f"dashboard at {client.dashboard_link}",
        quiet,
    )
    return client


@contextlib.contextmanager
def cluster_session(**kwargs: Any) -> Iterator[distributed.Client]:
    """Context manager around :func:`get_client` that closes only what it started.

    If a client is already active it is yielded and left open; otherwise the client and the
    cluster started for the block are closed on exit.

    Parameters
    ----------
    **kwargs
        Passed to :func:`get_client`.

    Examples
    --------
    >>> from atlasfit.cluster import cluster_session
    >>> with cluster_session(n_workers=1, quiet=True) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    before = _active_client()
    client = get_client(**kwargs)
    try:
        yield client
    finally:
        if before is None or client is not before:
            cluster = _STARTED.pop(id(client), None)
            client.close()
            if cluster is not None:
                cluster.close()


def _profile_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("ATLASFIT_PROFILE_PATH", "").split(os.pathsep) if p]
    dirs += [
        Path.cwd() / "deploy" / "profiles",
        Path.cwd() / "deploy",
        Path.home() / ".config" / "atlasfit" / "profiles",
    ]
    return dirs


def load_profile(path_or_name: str | os.PathLike) -> dict:
    """Read and check a YAML cluster profile.

    A profile has the keys ``scheduler`` (``slurm``, ``pbs``, ``local`` or ``localcuda``),
    ``cluster`` (keyword arguments of ``dask_jobqueue.SLURMCluster`` / ``PBSCluster`` /
    :class:`distributed.LocalCluster` / ``dask_cuda.LocalCUDACluster``) and at most one of
    ``scale`` (e.g. ``{jobs: 4}``) or ``adapt`` (e.g. ``{minimum_jobs: 1, maximum_jobs: 10}``).
    Optional: ``extends`` (another profile's name or path: its keys, with this profile's ``cluster``
    entries merged over its ``cluster``, and this profile's other keys replacing its) and
    ``startup_timeout`` (seconds :func:`get_client` waits for the workers, default 600).

    Parameters
    ----------
    path_or_name
        A path to a ``.yaml`` file, or a name looked up as ``<name>.yaml`` / ``<name>.yml`` in
        the directories of ``$ATLASFIT_PROFILE_PATH``, ``./deploy/profiles``, ``./deploy`` and
        ``~/.config/atlasfit/profiles`` (the repository ships profiles in ``deploy/profiles``).

    Returns
    -------
    dict
        The profile, with ``cluster`` defaulting to ``{}``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "laptop.yaml"
    >>> _ = p.write_text("scheduler: local\\ncluster: {n_workers: 2}\\n")
    >>> load_profile(p)["cluster"]
    {'n_workers': 2}
    """
    import yaml

    p = Path(path_or_name)
    if not p.is_file():
        tried = []
        for d in _profile_dirs():
            for suffix in (".yaml", ".yml"):
                cand = d / f"{path_or_name}{suffix}"
                tried.append(str(cand))
                if cand.is_file():
                    p = cand
                    break
            if p.is_file():
                break
        else:
            raise FileNotFoundError(
                f"cluster profile {str(path_or_name)!r} not found: not a file, and none of "
                f"{tried} exists. Pass a path to a YAML file or set ATLASFIT_PROFILE_PATH."
            )
    with open(p) as fh:
        prof = yaml.safe_load(fh)
    if not isinstance(prof, Mapping):
        raise ValueError(f"cluster profile {str(p)!r}: expected a YAML mapping, got {type(prof).__name__}")
    prof = dict(prof)
    unknown = set(prof) - _PROFILE_KEYS
    if unknown:
        raise ValueError(
            f"cluster profile {str(p)!r}: unknown key(s) {sorted(unknown)}; "
            f"allowed keys are {sorted(_PROFILE_KEYS)}"
        )
    if "extends" in prof:
        base = str(prof.pop("extends"))
        beside = p.parent / f"{base}.yaml"  # a name is looked up beside the profile first
        base_path = beside if beside.is_file() else base
        if Path(base_path).is_file() and Path(base_path).resolve() == p.resolve():
            raise ValueError(f"cluster profile {str(p)!r}: 'extends: {base}' names the profile itself")
        prof = merge_profiles(load_profile(base_path), prof)
    prof["source"] = str(p)
    sched = prof.get("scheduler")
    if sched not in _SCHEDULERS:
        raise ValueError(
            f"cluster profile {str(p)!r}: 'scheduler' must be one of {list(_SCHEDULERS)}, got {sched!r}"
        )
    prof["cluster"] = dict(prof.get("cluster") or {})
    if "startup_timeout" in prof and not (isinstance(prof["startup_timeout"], (int, float))
                                          and prof["startup_timeout"] > 0):
        raise ValueError(f"cluster profile {str(p)!r}: 'startup_timeout' must be a number of seconds > 0, "
                         f"got {prof['startup_timeout']!r}")
    if "scale" in prof and "adapt" in prof:
        raise ValueError(f"cluster profile {str(p)!r}: give 'scale' or 'adapt', not both")
    for key in ("scale", "adapt"):
        if key in prof and not isinstance(prof[key], Mapping):
            raise ValueError(
                f"cluster profile {str(p)!r}: {key!r} must be a mapping such as "
                + ("{jobs: 4}" if key == "scale" else "{minimum_jobs: 1, maximum_jobs: 8}")
            )
    return prof


def merge_profiles(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``: ``cluster`` entries merged, other keys replaced; giving ``scale``
    drops the base's ``adapt`` and vice versa.

    Examples
    --------
    >>> merge_profiles({"scheduler": "slurm", "cluster": {"cores": 16, "memory": "64GB"}, "scale": {"jobs": 4}},
    ...                {"cluster": {"cores": 1}, "adapt": {"minimum_jobs": 2}})
    {'scheduler': 'slurm', 'cluster': {'cores': 1, 'memory': '64GB'}, 'adapt': {'minimum_jobs': 2}}
    """
    out = {k: v for k, v in base.items() if k != "source"}
    for key, val in over.items():
        if key == "cluster":
            out["cluster"] = {**dict(base.get("cluster") or {}), **dict(val or {})}
        else:
            out[key] = val
            if key in ("scale", "adapt"):
                out.pop("adapt" if key == "scale" else "scale", None)
    return out


def expected_workers(cluster: Any, profile: Mapping) -> int:
    """Workers a profile's cluster should reach: its jobs (``scale.jobs`` or ``adapt.minimum_jobs``, at
    least 1) times the worker processes per job; for a local profile, its ``n_workers``/``scale.n``."""
    sched = profile.get("scheduler")
    scale, adapt = dict(profile.get("scale") or {}), dict(profile.get("adapt") or {})
    if sched in ("slurm", "pbs"):
        jobs = scale.get("jobs", scale.get("n")) if scale else adapt.get("minimum_jobs", adapt.get("minimum", 1))
        if scale.get("n") is not None and "jobs" not in scale:  # scale(n=...) counts workers
            return max(1, int(scale["n"]))
        return max(1, int(jobs or 1)) * job_resources(cluster.job_script())["processes"]
    if scale:
        return max(1, int(scale.get("n", scale.get("jobs", 1))))
    if adapt:
        return max(1, int(adapt.get("minimum", adapt.get("minimum_jobs", 1))))
    return max(1, len(getattr(cluster, "workers", {})) or 1)


def _sbatch_test_only(script: str, where: str) -> None:
    """Ask SLURM whether it would accept the job script (``sbatch --test-only``); raise if it refuses."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("sbatch") is None:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
    try:
        res = subprocess.run(["sbatch", "--test-only", fh.name], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return
    finally:
        os.unlink(fh.name)
    if res.returncode != 0:
        r = job_resources(script)
        why = (res.stderr or res.stdout).strip().replace("\n", " ")
        mem = f"{r['job_memory'] / 2**30:.1f} GiB" if r["job_memory"] else "default memory"
        raise ValueError(
            f"{where}: SLURM refuses the job script (sbatch --test-only: {why!r}). It asks for "
            f"{r['job_cpus'] or 1} CPU(s) and {mem} per job; compare with `sinfo -o '%P %c %m %l'` "
            "(partition, CPUs and memory per node, time limit) and lower cluster.cores / memory / walltime "
            "or pick another queue in the profile (a profile can `extends:` the shipped one and override them)."
        )


def cluster_from_profile(
    path_or_name: str | os.PathLike | Mapping,
    *,
    apply_scaling: bool = True,
    overrides: Mapping | None = None,
):
    """Build the cluster described by a profile (see :func:`load_profile`).

    Parameters
    ----------
    path_or_name
        Profile path or name, or an already loaded profile mapping.
    apply_scaling
        Apply the profile's ``scale`` / ``adapt`` (for SLURM/PBS this submits jobs). With
        ``False`` the cluster is built but no job is submitted, e.g. to inspect
        ``cluster.job_script()``.
    overrides
        A partial profile merged over the loaded one (:func:`merge_profiles`), e.g.
        ``{"cluster": {"cores": 1, "memory": "2GB"}, "adapt": {"minimum_jobs": 2, "maximum_jobs": 2}}``.

    Raises
    ------
    ValueError
        For SLURM/PBS, before any job is submitted: when the job's memory request is below
        ``processes x`` the workers' ``memory_limit`` (:func:`check_job_memory`), or when ``sbatch
        --test-only`` refuses the job script (e.g. more cores or memory than a node has).

    Returns
    -------
    distributed.deploy.Cluster
        A ``SLURMCluster``, ``PBSCluster``, ``LocalCluster`` or ``LocalCUDACluster``; connect with
        ``distributed.Client(cluster)`` and close it when done.

    Examples
    --------
    >>> cluster = cluster_from_profile(
    ...     {"scheduler": "slurm", "cluster": {"cores": 4, "memory": "16GB"}},
    ...     apply_scaling=False)  # doctest: +SKIP
    >>> print(cluster.job_script())  # doctest: +SKIP
    """
    if isinstance(path_or_name, Mapping):
        prof = dict(path_or_name)
        prof.setdefault("cluster", {})
        if prof.get("scheduler") not in _SCHEDULERS:
            raise ValueError(
                f"cluster profile: 'scheduler' must be one of {list(_SCHEDULERS)}, "
                f"got {prof.get('scheduler')!r}"
            )
    else:
        prof = load_profile(path_or_name)
    if overrides:
        prof = {**merge_profiles(prof, overrides), **({"source": prof["source"]} if "source" in prof else {})}
    where = f"cluster profile {prof.get('source', str(path_or_name) if not isinstance(path_or_name, Mapping) else '')!r}"
    sched = prof["scheduler"]
    kwargs = dict(prof["cluster"])
    if sched in ("slurm", "pbs"):
        try:
            import dask_jobqueue  # noqa: PLC0415 - optional HPC dependency
        except ImportError as e:
            raise ImportError(
                f"cluster profile with scheduler {sched!r} needs dask-jobqueue: "
                "`pip install 'atlasfit[hpc]'`"
            ) from e
        cls = dask_jobqueue.SLURMCluster if sched == "slurm" else dask_jobqueue.PBSCluster
        cluster = cls(**kwargs)
        try:
            script = cluster.job_script()
            check_job_memory(script, where)
            if apply_scaling and sched == "slurm":
                _sbatch_test_only(script, where)
        except BaseException:
            cluster.close()
            raise
    elif sched == "localcuda":
        if not gpu_available():
            raise RuntimeError(
                "cluster profile with scheduler 'localcuda' needs dask-cuda, CuPy and a CUDA device: "
                "`pip install 'atlasfit[gpu-cu12]'` and check the driver with `nvidia-smi`"
            )
        from dask_cuda import LocalCUDACluster  # noqa: PLC0415 - optional GPU dependency

        cluster = LocalCUDACluster(**kwargs)
    else:
        kwargs.setdefault("threads_per_worker", 1)
        kwargs.setdefault("processes", True)
        kwargs.setdefault("dashboard_address", ":0")
        if kwargs["processes"]:  # thread workers share this process's environment
            kwargs.setdefault("env", dict(WORKER_ENV))
        cluster = distributed.LocalCluster(**kwargs)
    if apply_scaling:
        if "scale" in prof:
            scale = dict(prof["scale"])
            if sched in ("local", "localcuda") and "jobs" in scale:
                scale["n"] = scale.pop("jobs")  # a local "job" is one worker
            cluster.scale(**scale)
        elif "adapt" in prof:
            cluster.adapt(**prof["adapt"])
    return cluster


__all__ = [
    "WORKER_ENV",
    "check_job_memory",
    "cluster_from_profile",
    "cluster_session",
    "expected_workers",
    "get_client",
    "gpu_available",
    "job_ids",
    "load_profile",
    "merge_profiles",
    "wait_for_workers",
]
