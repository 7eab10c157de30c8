"""Run a benchmark grid (cells x workers x K x model x device x dtype) from a YAML file.

Each grid point is one fit in its own process (the summed RSS of that process tree — driver,
scheduler, workers — is sampled every 0.1 s), on a synthetic atlas of the given size (made once per
size, cached in the work folder). One CSV row per run: timings, peak memory, embedding quality on the
ground truth (kNN cell-type accuracy, sample mixing), versions, machine. Then the scaling plots.

    python deploy/sweep.py deploy/sweeps/tiny.yaml --out deploy/results/tiny

YAML::

    name: tiny
    iterations: 3
    n_samples: 4
    features: {rna: 200, splicing: 100}
    grid:
      cells: [2000, 4000]
      workers: [1, 2]
      K: [5]
      model: [multigedi]
      device: [cpu]
      dtype: [float64]

A grid point that cannot run here (``device: gpu`` without a GPU) is written with its reason.

``--profile NAME`` runs every fit on the workers of a cluster profile instead of a LocalCluster: with
``slurm-cpu`` (or a profile that ``extends:`` it) each fit submits SLURM jobs through dask-jobqueue,
scaled to ``workers`` Dask workers, and cancels them at its end::

    python deploy/sweep.py deploy/sweeps/tiny.yaml --profile slurm-cpu --out deploy/results/tiny_slurm

The peak RSS column then covers the driver and the Dask scheduler only (``rss_scope``): the workers are
processes of the batch jobs, not children of the fit. Alternatively submit this script itself as one
job per node size (the fits then use a LocalCluster inside the job).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _rss import run_and_sample  # noqa: E402
from bench_multigedi import knn_quality  # noqa: E402

RUNNER = ROOT / "benchmarks" / "_mg_atlasfit_run.py"
OBS_TYPES = {"rna": "M", "splicing": "M_list", "atac": "X"}


def versions() -> str:
    out = []
    for pkg in ("atlasfit", "numpy", "scipy", "dask", "distributed", "zarr", "anndata"):
        try:
            out.append(f"{pkg}={md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return " ".join(out)


def machine() -> str:
    import psutil

    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores {psutil.virtual_memory().total / 2**30:.0f} GiB"


def gpu_here() -> bool:
    from atlasfit.cluster import gpu_available

    return gpu_available()


def make_store(cfg, cells, work: Path):
    from atlasfit.datasets import synthetic_atlas
    from atlasfit.io import open_atlas

    store = work / f"atlas_{cells}.zarr"
    if not store.exists():
        synthetic_atlas(store, n_cells=cells, n_samples=cfg.get("n_samples", 16), features=cfg["features"],
                        overlap=cfg.get("overlap", {}), seed=cfg.get("seed", 0), overwrite=True,
                        n_threads=cfg.get("gen_threads", 1))
    atlas = open_atlas(store)
    first = atlas.modalities[0]
    obs = atlas.obs(first)
    truth = {"cell_type": obs["cell_type"].astype(str).to_numpy(),
             "sample": obs[atlas.sample_key].astype(str).to_numpy()}
    return store, truth


def run_point(cfg, point, store, truth, work: Path, profile=None) -> dict:
    cells, workers, K, model, device, dtype = point
    row = {"sweep": cfg.get("name", "sweep"), "cells": cells, "workers": workers, "K": K, "model": model,
           "device": device, "dtype": dtype, "iterations": cfg["iterations"],
           "cluster": Path(str(profile)).stem if profile else "local",
           "rss_scope": "driver+scheduler (workers in batch jobs)" if profile else "driver+scheduler+workers"}
    if model != "multigedi":
        return {**row, "status": f"skipped: model {model!r} has no distributed fit in this version"}
    if device == "gpu" and not gpu_here():
        return {**row, "status": "skipped: no CUDA device with CuPy on this machine"}
    mods = [{"name": m, "obs_type": OBS_TYPES.get(m, "M"),
             **({"layers": ["M1", "M2"]} if OBS_TYPES.get(m) == "M_list" else {})}
            for m in cfg["features"]]
    tag = f"{cells}_{workers}_{K}_{model}_{device}_{dtype}"
    fit_cfg = {"K": K, "iterations": cfg["iterations"], "dtype": dtype, "workers": workers,
               "modalities": mods, "memory_limit": cfg.get("memory_limit", "8GiB"),
               "checkpoint_every": cfg.get("checkpoint_every"), "profile": profile}
    cfgp = work / f"cfg_{tag}.json"
    cfgp.write_text(json.dumps(fit_cfg))
    out = work / f"run_{tag}"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    rc, wall, peak = run_and_sample([sys.executable, str(RUNNER), str(store), str(cfgp), str(out)],
                                    interval=0.1, env=env, timeout=cfg.get("timeout", 3600))
    row.update({"status": "ok" if rc == 0 else f"failed rc={rc}", "wall_s": round(wall, 3),
                "peak_rss_gb": round(peak / 1e9, 4)})
    if rc == 0:
        res = json.loads((out / "result.json").read_text())
        acc, mix = knn_quality(np.load(out / "pca.npy"), truth)
        row.update({"median_iter_s": res["median_iter_s"], "init_plus_first_iter_s": res["init_plus_first_iter_s"],
                    "knn_celltype_acc": round(acc, 4), "sample_mixing": round(mix, 4)})
    return row


def plot(rows, png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["workers"], r["K"], r["device"], r["dtype"]) for r in ok})
    for key in keys:
        rs = sorted((r for r in ok if (r["workers"], r["K"], r["device"], r["dtype"]) == key),
                    key=lambda r: r["cells"])
        label = f"{key[0]} workers, K={key[1]}, {key[2]}, {key[3]}"
        axes[0].plot([r["cells"] for r in rs], [r["median_iter_s"] for r in rs], marker="o", label=label)
        axes[1].plot([r["cells"] for r in rs], [r["peak_rss_gb"] for r in rs], marker="o", label=label)
    axes[0].set_ylabel("median s / iteration")
    axes[1].set_ylabel("peak RSS (GB, all processes)")
    for ax in axes:
        ax.set_xlabel("cells")
        ax.legend(fontsize=7)
    fig.suptitle(f"atlasfit sweep: {rows[0]['sweep'] if rows else ''}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="output prefix: writes <out>.csv and <out>.png")
    ap.add_argument("--work", default=None, help="scratch folder for stores and runs")
    ap.add_argument("--profile", default=None,
                    help="run the fits on the workers of this cluster profile (name in deploy/profiles or a "
                         "YAML path), e.g. slurm-cpu; default: a LocalCluster per fit")
    args = ap.parse_args(argv)
    profile = None
    if args.profile:
        from atlasfit.cluster import load_profile

        profile = load_profile(args.profile)["source"]  # fails here, naming the profile, when it is wrong
    cfg = yaml.safe_load(Path(args.config).read_text())
    for key in ("iterations", "features", "grid"):
        if key not in cfg:
            raise SystemExit(f"sweep config {args.config}: missing key {key!r}")
    g = cfg["grid"]
    axes = [g.get("cells", [10000]), g.get("workers", [2]), g.get("K", [10]), g.get("model", ["multigedi"]),
            g.get("device", ["cpu"]), g.get("dtype", ["float64"])]
    work = Path(args.work or (Path(args.out).parent / f".work_{cfg.get('name', 'sweep')}"))
    work.mkdir(parents=True, exist_ok=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows, common = [], {"versions": versions(), "machine": machine()}
    for cells, grp in itertools.groupby(itertools.product(*axes), key=lambda p: p[0]):
        t = time.perf_counter()
        store, truth = make_store(cfg, cells, work)
        print(f"[{cells} cells] store ready in {time.perf_counter() - t:.1f} s", flush=True)
        for point in grp:
            row = {**run_point(cfg, point, store, truth, work, profile), **common}
            rows.append(row)
            print("  " + ", ".join(f"{k}={row[k]}" for k in row if k not in common), flush=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{args.out}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    plot(rows, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.csv and {args.out}.png")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
