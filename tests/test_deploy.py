"""deploy/: the sweep runner on a LocalCluster, and the job scripts of the HPC profiles."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_sweep_writes_csv_and_png(tmp_path):
    sweep = _load("atlasfit_deploy_sweep", ROOT / "deploy" / "sweep.py")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "name: t\niterations: 2\nn_samples: 3\nfeatures: {rna: 40, splicing: 30}\n"
        "grid:\n  cells: [600]\n  workers: [1]\n  K: [3]\n  model: [multigedi, topic]\n"
        "  device: [cpu, gpu]\n  dtype: [float64]\n"
    )
    out = tmp_path / "res" / "t"
    assert sweep.main([str(cfg), "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert len(rows) == 4  # 2 models x 2 devices
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1 and ok[0]["model"] == "multigedi" and ok[0]["device"] == "cpu"
    assert float(ok[0]["median_iter_s"]) > 0 and float(ok[0]["peak_rss_gb"]) > 0.05
    assert 0.0 <= float(ok[0]["knn_celltype_acc"]) <= 1.0
    assert all(r["status"].startswith("skipped") for r in rows if r is not ok[0])
    assert Path(f"{out}.png").stat().st_size > 1000
    assert "atlasfit=" in ok[0]["versions"]


@pytest.mark.parametrize("name, needles", [
    ("slurm-cpu", ["#SBATCH", "--cpus-per-task=16", "--exclusive", "OMP_NUM_THREADS=1"]),
    ("slurm-gpu", ["#SBATCH", "--gres=gpu:4", "dask-cuda-worker"]),
    ("pbs-cpu", ["#PBS", "select=1:ncpus=16:mem=64GB"]),
    ("pbs-gpu", ["#PBS", "ngpus=4", "dask-cuda-worker"]),
])
def test_profiles_generate_job_scripts(name, needles, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    from atlasfit.cluster import cluster_from_profile

    monkeypatch.chdir(ROOT)
    cluster = cluster_from_profile(name, apply_scaling=False)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for needle in needles:
        assert needle in script, f"{name}: {needle!r} not in job script:\n{script}"
