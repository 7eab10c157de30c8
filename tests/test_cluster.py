"""Cluster layer: reuse or start a client, GPU checks, jobqueue profiles (nothing is submitted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import distributed
import pytest

from atlasfit import cluster as ac


def test_get_client_reuses_the_active_client():
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as lc:
        with distributed.Client(lc) as c:
            assert ac.get_client(quiet=True) is c
            with ac.cluster_session(quiet=True) as c2:
                assert c2 is c
            assert c.status == "running"  # the session did not close what it did not start


def test_cluster_session_starts_sized_cluster_and_closes_it(capsys):
    if ac._active_client() is not None:
        pytest.skip("another test module left a Dask client active; get_client would reuse it")
    with ac.cluster_session(n_workers=1, memory_limit="1GiB", gpu="auto" if not ac.gpu_available() else False) as c:
        info = c.scheduler_info()["workers"]
        assert len(info) == 1
        (w,) = info.values()
        assert w["nthreads"] == 1 and w["memory_limit"] == 2**30
        env = c.run(lambda: {k: os.environ.get(k) for k in ac.WORKER_ENV})
        assert list(env.values()) == [dict(ac.WORKER_ENV)]
        assert c.run(os.getpid) != {"": os.getpid()}  # process workers
        assert ac.get_client(quiet=True) is c  # no second cluster
        cluster = ac._STARTED[id(c)]
    out = capsys.readouterr().out
    assert "atlasfit: started a LocalCluster with 1 workers" in out and "dashboard at" in out
    assert c.status == "closed" and cluster.status.name == "closed"
    assert ac._active_client() is not c


def test_default_memory_limit_is_80_percent_split():
    import psutil

    lim = {}

    class FakeCluster:
        def __init__(self, **kw):
            lim.update(kw)
            raise RuntimeError("stop here")

    orig = distributed.LocalCluster
    distributed.LocalCluster = FakeCluster
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            ac.get_client(n_workers=4, quiet=True)
    finally:
        distributed.LocalCluster = orig
    # 0.8 x total memory / 4 workers (the brief's sizing rule)
    assert lim["memory_limit"] == int(0.8 * psutil.virtual_memory().total / 4)
    assert lim["threads_per_worker"] == 1 and lim["processes"] is True


@pytest.mark.skipif(ac.gpu_available(), reason="a GPU is present")
def test_gpu_true_without_gpu_names_the_fix():
    with pytest.raises(RuntimeError, match=r"atlasfit\[gpu-cu12\]"):
        ac.get_client(gpu=True, quiet=True)
    with pytest.raises(ValueError, match="gpu must be"):
        ac.get_client(gpu="yes", quiet=True)


SLURM = """
scheduler: slurm
cluster:
  cores: 8
  processes: 2
  memory: 32GB
  walltime: "02:30:00"
  queue: normal
  scheduler_options: {dashboard_address: ":0"}
scale:
  jobs: 4
"""

PBS = """
scheduler: pbs
cluster:
  cores: 16
  memory: 64GB
  walltime: "04:00:00"
  scheduler_options: {dashboard_address: ":0"}
adapt:
  minimum_jobs: 1
  maximum_jobs: 5
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        (SLURM, ["#SBATCH --cpus-per-task=8", "#SBATCH -t 02:30:00", "#SBATCH --mem=30G", "-p normal"]),
        (PBS, ["ncpus=16", "mem=60GB", "walltime=04:00:00"]),
    ],
)
def test_jobqueue_profiles_build_job_scripts(tmp_path, text, expected):
    p = tmp_path / "hpc.yaml"
    p.write_text(text)
    prof = ac.load_profile(p)
    assert prof["scheduler"] in ("slurm", "pbs")
    cluster = ac.cluster_from_profile(p, apply_scaling=False)
    try:
        script = cluster.job_script()
        for line in expected:  # dask-jobqueue writes memory in GiB-rounded units (32GB -> 30G)
            assert line in script, (line, script)
        assert len(cluster.worker_spec) == 0 and len(cluster.workers) == 0  # nothing submitted
    finally:
        cluster.close()


def test_profile_lookup_by_name_and_local_scale(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(
        "scheduler: local\ncluster: {n_workers: 0, processes: false}\nscale: {jobs: 1}\n"
    )
    monkeypatch.setenv("ATLASFIT_PROFILE_PATH", str(tmp_path))
    assert ac.load_profile("tiny")["scale"] == {"jobs": 1}
    cluster = ac.cluster_from_profile("tiny")
    try:
        with distributed.Client(cluster) as c:
            c.wait_for_workers(1, timeout=30)
            assert c.submit(sum, [1, 2]).result() == 3
    finally:
        cluster.close()


@pytest.mark.parametrize(
    "text, match",
    [
        ("scheduler: lsf\n", "must be one of"),
        ("scheduler: slurm\nworkers: 3\n", "unknown key"),
        ("scheduler: slurm\nscale: {jobs: 1}\nadapt: {maximum_jobs: 2}\n", "not both"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_profiles(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        ac.load_profile(p)


def test_missing_profile_and_missing_jobqueue(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLASFIT_PROFILE_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ac.load_profile("nowhere")
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if the hpc extra were absent
    with pytest.raises(ImportError, match=r"atlasfit\[hpc\]"):
        ac.cluster_from_profile({"scheduler": "slurm", "cluster": {"cores": 1, "memory": "1GB"}})


DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "profiles"


@pytest.mark.skipif(not DEPLOY.is_dir(), reason="no deploy/profiles in this checkout")
def test_shipped_profiles_load_and_hpc_ones_build_scripts():
    files = sorted(DEPLOY.glob("*.yaml"))
    assert files
    for f in files:
        prof = ac.load_profile(f)
        if prof["scheduler"] not in ("slurm", "pbs"):
            continue
        prof["cluster"].setdefault("scheduler_options", {"dashboard_address": ":0"})
        cluster = ac.cluster_from_profile(prof, apply_scaling=False)
        try:
            script = cluster.job_script()
            assert "distributed.cli.dask_worker" in script or "dask-cuda-worker" in script, f.name
            assert str(prof["cluster"]["walltime"]) in script, f.name
            # every HPC profile switches off Dask's worker profiler (atlasfit._compat: CPython < 3.11.9 deadlock)
            assert "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False" in script, f.name
            assert len(cluster.worker_spec) == 0  # nothing submitted
        finally:
            cluster.close()


def test_worker_profiler_is_off_on_pythons_with_the_frames_gc_deadlock():
    """CPython 3.11.0-3.11.8 can deadlock in sys._current_frames() + GC (gh-116969, dask/distributed#8616);
    importing atlasfit must switch Dask's worker profiler off there, so clusters started afterwards have none."""
    from atlasfit import _compat

    if not _compat.profiler_unsafe():
        assert not _compat.guard_worker_profiler()  # nothing changed on safe Pythons
        pytest.skip(f"Python {sys.version.split()[0]} is not affected")
    import dask

    assert dask.config.get("distributed.worker.profile.enabled") is False
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        has = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert list(has.values()) == [False]


def test_engine_setup_stops_a_running_worker_profiler(monkeypatch):
    """A worker started with its profiler on (someone else's cluster) loses it at atlasfit's first task."""
    import dask

    from atlasfit import _compat
    from atlasfit.engine import DaskEngine, plan_shards

    if not _compat.profiler_unsafe():
        pytest.skip(f"Python {sys.version.split()[0]} is not affected")
    with dask.config.set({"distributed.worker.profile.enabled": True}), distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        before = client.run(lambda dask_worker: dask_worker.periodic_callbacks["profile"].is_running())
        eng = DaskEngine(client, plan_shards(["a"], [3]))
        eng.setup(lambda spec: {"n": 1})
        import time

        time.sleep(0.2)  # the stop runs on the worker's event loop
        after = client.run(lambda dask_worker: dask_worker.periodic_callbacks["profile"].is_running())
        eng.close()
    assert list(before.values()) == [True] and list(after.values()) == [False]
