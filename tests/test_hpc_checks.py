"""HPC errors that need no batch system (issue 14): job memory below the workers' memory_limit,
profiles that extend a shipped one, the "no worker joined" story from squeue, and a store that a
worker does not see (a real Dask worker in its own mount namespace, where the store's folder is
hidden by an empty tmpfs: the node-local-path failure of HPC clusters).

The fits on a running SLURM are in tests/test_hpc_slurm.py (marker hpc).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import atlasfit
from atlasfit._jobqueue import check_job_memory, describe_jobs, job_resources
from atlasfit.cluster import cluster_from_profile, load_profile, merge_profiles
from atlasfit.engine._preflight import StoreNotVisibleError, preflight_store, probe_store, visibility_problems

ROOT = Path(__file__).resolve().parents[1]


def _script(name, **cluster):
    pytest.importorskip("dask_jobqueue")
    c = cluster_from_profile(name if not cluster else ROOT / "deploy" / "profiles" / f"{name}.yaml",
                             apply_scaling=False, overrides={"cluster": cluster} if cluster else None)
    try:
        return c.job_script()
    finally:
        c.close()


def test_shipped_slurm_profile_fits_its_workers_in_the_job_memory(monkeypatch):
    monkeypatch.chdir(ROOT)
    r = job_resources(_script("slurm-cpu"))
    # slurm-cpu.yaml: memory 64GB -> dask-jobqueue writes --mem=60G (GiB, rounded up); 16 workers x 3.8GB
    assert r["job_memory"] == 60 * 2**30 and r["processes"] == 16 and r["worker_memory_limit"] == 3_800_000_000
    assert r["processes"] * r["worker_memory_limit"] <= r["job_memory"]


def test_job_memory_below_the_workers_memory_limit_is_refused_before_any_job(monkeypatch):
    monkeypatch.chdir(ROOT)
    pytest.importorskip("dask_jobqueue")
    with pytest.raises(ValueError) as err:
        cluster_from_profile("slurm-cpu", overrides={"cluster": {"worker_extra_args": ["--memory-limit", "8GB"]}})
    msg = str(err.value)
    # 16 workers x 8 GB = 119.21 GiB against the job's 60 GiB
    assert "slurm-cpu.yaml" in msg and "60.00 GiB" in msg and "16 Dask worker(s)" in msg and "119.21 GiB" in msg
    assert "--memory-limit" in msg and "memory:" in msg  # both fixes named
    with pytest.raises(ValueError, match="asks the batch system for 4.00 GiB"):
        check_job_memory("#PBS -l select=1:ncpus=4:mem=4GB\ndask-worker tcp://x:1 --nworkers 4 --memory-limit 2GiB")


def test_profile_extends_a_shipped_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    p = tmp_path / "mine.yaml"
    p.write_text("extends: slurm-cpu\ncluster: {cores: 2, processes: 2, memory: 8GB}\n"
                 "adapt: {minimum_jobs: 1, maximum_jobs: 3}\nstartup_timeout: 30\n")
    prof = load_profile(p)
    base = load_profile("slurm-cpu")
    assert prof["scheduler"] == "slurm" and prof["startup_timeout"] == 30
    assert prof["cluster"]["cores"] == 2 and prof["cluster"]["walltime"] == base["cluster"]["walltime"]
    assert "scale" not in prof and prof["adapt"] == {"minimum_jobs": 1, "maximum_jobs": 3}
    assert merge_profiles(base, {"scale": {"jobs": 1}})["cluster"] == base["cluster"]
    p.write_text("extends: mine\n")
    with pytest.raises(ValueError, match="names the profile itself"):
        load_profile(p)
    p.write_text("scheduler: slurm\nstartup_timeout: -1\n")
    with pytest.raises(ValueError, match="startup_timeout"):
        load_profile(p)


def test_no_worker_story_names_pending_jobs_and_their_reasons():
    text = describe_jobs(["41", "42"], {"41": ("PENDING", "Resources"), "42": ("PENDING", "Priority")},
                         "tcp://10.1.2.3:8786", "/scratch/logs")
    assert "job 41: PENDING (Resources); job 42: PENDING (Priority)." in text
    assert "reason: Priority, Resources" in text and "raise the timeout" in text
    text = describe_jobs(["43"], {"43": ("RUNNING", "None")}, "tcp://10.1.2.3:8786", "/scratch/logs")
    assert "job 43: RUNNING." in text and "/scratch/logs" in text and "tcp://10.1.2.3:8786" in text
    assert "no batch job was submitted" in describe_jobs([], {}, None, None)


def test_store_visibility_lines_name_worker_host_and_problem(tmp_path):
    me = probe_store(str(tmp_path))
    assert me["exists"] and me["digest"] is None  # a folder without zarr metadata
    other = dict(me, digest="0" * 64)
    lines = visibility_problems(str(tmp_path), dict(me, digest="f" * 64),
                                {"tcp://a:1": me | {"host": "n1"}, "tcp://b:2": other | {"host": "n2"},
                                 "tcp://c:3": {"host": "n3", "exists": False, "digest": None, "error": None},
                                 "tcp://d:4": {"host": "n4", "exists": False, "digest": None,
                                               "error": "PermissionError: denied"}})
    assert lines == [f"worker tcp://a:1 on n1: {str(tmp_path)!r} holds another store (its root metadata differs "
                     "from the driver's copy)",
                     f"worker tcp://b:2 on n2: {str(tmp_path)!r} holds another store (its root metadata differs "
                     "from the driver's copy)",
                     f"worker tcp://c:3 on n3: no directory {str(tmp_path)!r} there",
                     f"worker tcp://d:4 on n4: cannot read {str(tmp_path)!r} (PermissionError: denied)"]


def _can_hide_folders() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    d = Path("/tmp")
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount -t tmpfs none {d} && true"], capture_output=True)
    return res.returncode == 0


@pytest.mark.skipif(not _can_hide_folders(), reason="needs root and unshare/mount (a private mount namespace)")
def test_a_worker_that_does_not_see_the_store_stops_the_fit_before_any_work(tmp_path):
    """One worker sees the store, the other runs in a mount namespace where the store's folder is an
    empty tmpfs (as on a compute node that lacks the login node's disk): the fit is refused, naming it."""
    distributed = pytest.importorskip("distributed")
    hidden = tmp_path / "login-node-disk"
    store = atlasfit.datasets.synthetic_atlas(hidden / "a.zarr", n_cells=120, n_samples=2,
                                              features={"rna": 10}, obs_types={"rna": "M"}, seed=0)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                                  dashboard_address=None) as lc, \
            distributed.Client(lc, set_as_default=False) as client:
        cmd = (f"mount -t tmpfs none {hidden} && exec {sys.executable} -m distributed.cli.dask_worker "
               f"{lc.scheduler_address} --nthreads 1 --nworkers 1 --no-dashboard --name node-without-store")
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            client.wait_for_workers(2, timeout=60)
            model = atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, K=2, seed=0)
            t0 = time.perf_counter()
            with pytest.raises(StoreNotVisibleError) as err:
                model.fit(store, max_iterations=1, client=client, progress=False, checkpoint_every=0)
            msg = str(err.value)
            assert f"the atlas store {str(store)!r} is not visible to 1 of 2 Dask worker(s)" in msg
            assert f"no directory {str(store)!r} there" in msg and "file system every node mounts" in msg
            assert time.perf_counter() - t0 < 30
            proc.terminate()
            proc.wait(20)
            client.wait_for_workers(1)
            deadline = time.monotonic() + 30
            while len(client.scheduler_info()["workers"]) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            engine = type("Engine", (), {"client": client})()
            preflight_store(engine, store)  # the worker that sees the store passes
        finally:
            proc.terminate()
            proc.wait(20)
