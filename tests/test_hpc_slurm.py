"""Fits through dask-jobqueue on a real single-node SLURM (issue 14), marker ``hpc`` (``pytest -m hpc``;
``.ci/run`` installs slurm-wlm + munge and runs them).

The ``local_slurm`` fixture starts munged, slurmctld and slurmd with a generated ``slurm.conf`` that
describes this machine (its CPUs and memory from ``slurmd -C``; no cgroups), and skips when the
binaries (Debian ``slurm-wlm``, ``munge``) or root are missing. Every cluster is built from the shipped
``deploy/profiles/slurm-cpu.yaml`` with small overrides (1 core and 2 GB per job: the node has 2 CPUs),
so jobs really go through ``sbatch`` and the workers are processes started by ``slurmd``.

Reference results: the same fit in this process (``client=False``); a fit gives the same bits on any
number of workers (docs/engine.md), so every SLURM fit must equal it bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.hpc, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")

import atlasfit  # noqa: E402
from atlasfit.cluster import cluster_from_profile, job_ids, wait_for_workers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("atlasfit_local_slurm", ROOT / "deploy" / "local_slurm.py")
local_slurm_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_slurm_mod)

MODS = {"rna": "M", "atac": "X"}


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A running single-node SLURM (``SLURM_CONF`` set for this process and its children)."""
    why = local_slurm_mod.unavailable_reason()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    slurm = local_slurm_mod.LocalSlurm(root).start()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm.conf)
    try:
        yield slurm
    finally:
        slurm.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    """Over slurm-cpu: one core, 2 GB and one worker per job; logs and worker scratch in a temp dir."""
    d = tmp_path_factory.mktemp("jobs")
    return {"cluster": {"cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:20:00",
                        "job_extra_directives": [], "worker_extra_args": ["--memory-limit", "1.8GB"],
                        "local_directory": str(d / "scratch"), "log_directory": str(d / "logs")},
            "scale": {"jobs": 2}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("hpc_store") / "atlas.zarr"
    atlasfit.datasets.synthetic_atlas(path, n_cells=800, n_samples=4, features={"rna": 60, "atac": 40},
                                      obs_types=MODS, overlap={}, seed=0)  # every modality in every sample
    return path


@pytest.fixture(scope="module")
def topic_store(tmp_path_factory):
    """RNA counts (Poisson 2) + ATAC peaks (Bernoulli 0.3) on the same 240 cells in 4 samples."""
    import anndata as ad
    import mudata as md

    rng = np.random.default_rng(11)
    n = 240
    obs = pd.DataFrame({"s": np.repeat(["a", "b", "c", "d"], n // 4)}, index=[f"c{i}" for i in range(n)])
    rna = ad.AnnData(rng.poisson(2.0, (n, 30)).astype(np.float32), obs=obs.copy())
    atac = ad.AnnData((rng.random((n, 20)) < 0.3).astype(np.float32), obs=obs.copy())
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["s"] = obs["s"]
    return atlasfit.io.convert(mdata, tmp_path_factory.mktemp("topic") / "t.zarr", sample_key="s",
                               modalities={"rna": "counts", "atac": "binary"})


def _mg():
    return atlasfit.MultiGEDI({m: {"obs_type": t} for m, t in MODS.items()}, sample_key="sample", K=4, seed=1)


def _mg_state(model) -> dict:
    st = model.export_state()
    model.close()
    return st


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True)]
    assert not differ, f"{len(differ)} of {len(a)} arrays differ, e.g. {differ[:5]}"


@pytest.fixture(scope="module")
def mg_local(store):
    return _mg_state(_mg().fit(store, max_iterations=5, client=False, progress=False))


def _squeue() -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()}


class _SlurmClient:
    """``cluster_from_profile("slurm-cpu", overrides)`` + a client that is not the default one."""

    def __init__(self, overrides, **more):
        prof = {**overrides, **more}
        self.cluster = cluster_from_profile(ROOT / "deploy" / "profiles" / "slurm-cpu.yaml", overrides=prof)
        self.client = distributed.Client(self.cluster, set_as_default=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        ids = job_ids(self.cluster)
        self.client.close()
        self.cluster.close()
        deadline = time.monotonic() + 30
        while set(ids) & set(_squeue()) and time.monotonic() < deadline:
            time.sleep(0.5)


def test_multigedi_fit_on_sbatch_workers_same_bits_as_local(local_slurm, overrides, store, mg_local):
    with _SlurmClient(overrides) as s:
        script = s.cluster.job_script()
        assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=" in script
        wait_for_workers(s.client, 2, 120)
        ids = job_ids(s.cluster)
        queue = _squeue()
        assert len(ids) == 2 and all(queue.get(i) == "RUNNING" for i in ids), (ids, queue)
        # the workers are processes that slurmd started: SLURM_JOB_ID in their environment
        seen = sorted(s.client.run(lambda: os.environ.get("SLURM_JOB_ID"), on_error="ignore").values())
        assert seen == sorted(ids)
        got = _mg_state(_mg().fit(store, max_iterations=5, client=s.client, progress=False))
    _same_bits(mg_local, got)


def test_topic_model_trains_on_sbatch_workers_same_bits_as_local(local_slurm, overrides, topic_store):
    from atlasfit.models.topic import MultimodalAmortizedLDA

    train = dict(max_epochs=2, batch_size=40, lr=0.02, seed=2, progress=False, steps_per_round=4)

    def model():
        return MultimodalAmortizedLDA.from_data(str(topic_store), n_topics=3, n_hidden=8, weight_mode="cell")

    ref = model().train(client=False, **train)
    with _SlurmClient(overrides) as s:
        wait_for_workers(s.client, 2, 120)
        got = model().train(client=s.client, **train)
        assert got.device_ == "cpu"
    for k, v in ref._fit.params.items():
        np.testing.assert_array_equal(got._fit.params[k], v, err_msg=k)
    for x, y in zip(ref._omega, got._omega):
        np.testing.assert_array_equal(x, y)
    pd.testing.assert_frame_equal(ref.history_.drop(columns=[c for c in ref.history_ if "time" in c]),
                                  got.history_.drop(columns=[c for c in got.history_ if "time" in c]))


def test_scancelled_worker_job_is_survived_and_adapt_brings_a_replacement(local_slurm, overrides, store, mg_local,
                                                                         tmp_path):
    """Walltime / preemption: a worker job ends mid-fit (scancel). The engine recovers its shards from the
    store and the checkpoint, the fit ends with the same bits, and adaptive scaling submits a new job."""
    import dask

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}), \
            _SlurmClient(overrides, adapt={"minimum_jobs": 2, "maximum_jobs": 2}) as s:
        wait_for_workers(s.client, 2, 120)
        first = job_ids(s.cluster)
        cancelled = []

        def cancel_at_2(it, shared):
            if it == 2 and not cancelled:
                victim = first[0]
                subprocess.run(["scancel", victim], check=True)
                cancelled.append(victim)
                deadline = time.monotonic() + 60  # until the scheduler has lost that worker
                while time.monotonic() < deadline:
                    jobs = s.client.run(lambda: os.environ.get("SLURM_JOB_ID"), on_error="ignore")
                    if victim not in jobs.values():
                        break
                    time.sleep(0.2)
                else:
                    raise AssertionError(f"the worker of cancelled job {victim} is still connected")
            return False

        got = _mg_state(_mg().fit(store, max_iterations=5, client=s.client, progress=False, callback=cancel_at_2,
                                  checkpoint_every=1, checkpoint_dir=tmp_path / "ck"))
        assert cancelled
        # the adaptive cluster replaces the job: a new job id whose worker joins
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            jobs = set(s.client.run(lambda: os.environ.get("SLURM_JOB_ID"), on_error="ignore").values())
            if len(jobs) == 2 and jobs - set(first):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no replacement job joined within 90 s; jobs now {jobs}, squeue {_squeue()}")
        assert cancelled[0] not in jobs
    _same_bits(mg_local, got)


def test_pending_jobs_time_out_with_their_ids_and_squeue_reason(local_slurm, overrides):
    from atlasfit.cluster import get_client

    if distributed.client._get_global_client() is not None:
        pytest.skip("a default Dask client is active (get_client would reuse it)")
    prof = atlasfit.cluster.merge_profiles(atlasfit.cluster.load_profile(ROOT / "deploy/profiles/slurm-cpu.yaml"),
                                           overrides)
    prof["cluster"]["job_extra_directives"] = ["--begin=now+3600"]  # held by the batch system for an hour
    prof["scale"] = {"jobs": 1}
    prof["startup_timeout"] = 6
    before = set(_squeue())
    with pytest.raises(TimeoutError) as err:
        get_client(profile=prof, quiet=True)
    msg = str(err.value)
    assert "1 of 1 Dask worker(s) did not join within 6 s" in msg, msg
    m = re.search(r"job (\d+): PENDING \(BeginTime\)", msg)
    assert m and "raise the timeout" in msg, msg
    assert m.group(1) not in before
    deadline = time.monotonic() + 20
    while m.group(1) in _squeue() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert m.group(1) not in _squeue(), "the pending job was not cancelled when the start failed"


def test_sbatch_test_only_refuses_a_job_bigger_than_the_node(local_slurm, overrides):
    big = {**overrides, "cluster": {**overrides["cluster"], "cores": 1000, "processes": 1}}
    before = set(_squeue())
    with pytest.raises(ValueError, match=r"SLURM refuses the job script \(sbatch --test-only"):
        cluster_from_profile("slurm-cpu", overrides=big)
    assert set(_squeue()) == before  # nothing was submitted


def test_cli_fit_with_a_profile_that_extends_slurm_cpu(local_slurm, overrides, store, tmp_path, mg_local):
    import shutil

    import yaml

    st = tmp_path / "cli.zarr"
    shutil.copytree(store, st)
    prof = tmp_path / "slurm-here.yaml"
    prof.write_text(yaml.safe_dump({"extends": str(ROOT / "deploy" / "profiles" / "slurm-cpu.yaml"),
                                    "cluster": overrides["cluster"], "scale": {"jobs": 2},
                                    "startup_timeout": 120}))
    cmd = [sys.executable, "-m", "atlasfit.cli", "fit", str(st), "--profile", str(prof), "--K", "4",
           "--iterations", "5", "--seed", "1", "--modality", "rna:M", "--modality", "atac:X"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SLURMCluster" in res.stdout and "2 worker(s) joined" in res.stdout
    import anndata as ad

    for m in MODS:  # the metagenes the command wrote into the store, against the local fit's
        written = ad.read_zarr(str(st / "mod" / m)).varm["multigedi_Z"]
        assert np.array_equal(np.asarray(written), np.asarray(mg_local[f"{m}/Z"])), m
