"""Benchmark: wall time and peak RSS of the synthetic atlas generator.

For each size, a fresh subprocess runs either

* ``store``: ``atlasfit.datasets.synthetic_atlas`` into a Zarr atlas store (generator + writer), or
* ``generate``: ``iter_synthetic_atlas`` alone (each sample generated and dropped),

while :func:`benchmarks._rss.run_and_sample` samples the summed RSS of that process tree every
0.1 s. Features 2,000 (rna, counts) + 1,000 (splicing, paired counts) + 500 (atac, binary in 70%
of the samples), 16 samples, seed 0.

Writes ``benchmarks/results/synthetic_generation.csv`` and ``synthetic_generation.png``.

Reproduce (from the repository root, in the project venv)::

    python benchmarks/bench_synthetic.py --sizes 100000 1000000 --modes store generate --threads 2
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._rss import run_and_sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CSV_NAME = "synthetic_generation.csv"
PNG_NAME = "synthetic_generation.png"
FEATURES = {"rna": 2000, "splicing": 1000, "atac": 500}
N_SAMPLES = 16
LIMIT_GB = 4.0

_CHILD = r"""
import json, sys
from atlasfit.datasets import iter_synthetic_atlas, synthetic_atlas
cfg = json.loads(sys.argv[1])
kw = dict(n_cells=cfg["n_cells"], n_samples=cfg["n_samples"], features=cfg["features"], seed=0,
          n_threads=cfg["threads"])
if cfg["mode"] == "store":
    synthetic_atlas(cfg["store"], overwrite=True, **kw)
else:
    nnz = 0
    for _name, mods in iter_synthetic_atlas(**kw):
        for a in mods.values():
            nnz += getattr(a.X, "nnz", 0)
        del mods
"""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(n_cells: int, mode: str, workdir: Path, threads: int = 1) -> dict:
    store = workdir / f"synthetic_{n_cells}.zarr"
    cfg = {"n_cells": n_cells, "n_samples": N_SAMPLES, "features": FEATURES, "mode": mode,
           "store": str(store), "threads": threads}
    rc, wall, peak = run_and_sample([sys.executable, "-c", _CHILD, json.dumps(cfg)], interval=0.1)
    if rc != 0:
        raise RuntimeError(f"benchmark child failed (rc={rc}) for n_cells={n_cells}, mode={mode}")
    store_gb = _dir_bytes(store) / 1e9 if mode == "store" and store.exists() else float("nan")
    if store.exists():
        shutil.rmtree(store)
    from atlasfit.datasets import synthetic_truth

    sizes = synthetic_truth(n_cells=n_cells, n_samples=N_SAMPLES, features=FEATURES)["sample_sizes"]
    return {
        "n_cells": n_cells,
        "n_samples": N_SAMPLES,
        "features": "+".join(f"{m}:{j}" for m, j in FEATURES.items()),
        "mode": mode,
        "threads": threads,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peak / 1e9, 3),
        "store_gb": round(store_gb, 3),
        "cells_per_s": round(n_cells / wall, 1),
        "largest_sample_cells": int(sizes.max()),
        "under_4gb": peak / 1e9 < LIMIT_GB,
        "cpus": os.cpu_count(),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("store", "o"), ("generate", "s")):
        sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["n_cells"])
        if not sel:
            continue
        x = [r["n_cells"] for r in sel]
        axes[0].plot(x, [r["wall_s"] for r in sel], marker=marker, label=mode)
        axes[1].plot(x, [r["peak_rss_gb"] for r in sel], marker=marker, label=mode)
    axes[1].axhline(LIMIT_GB, color="red", ls="--", lw=1, label="4 GB target")
    for ax, lab in zip(axes, ("wall time (s)", "peak RSS of process tree (GB)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("cells (16 samples; 2,000 + 1,000 + 500 features)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle("atlasfit synthetic atlas generation (store = generator + write_atlas)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--modes", nargs="+", default=["store", "generate"], choices=["store", "generate"])
    ap.add_argument("--threads", type=int, default=1, help="n_threads of the generator")
    ap.add_argument("--workdir", default=None, help="where the temporary stores go (default: tmp)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing CSV (rows with the same size/mode/threads replaced)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="atlasfit-bench-synth-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        for mode in args.modes:
            row = run_one(n, mode, workdir, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    csv_path = out / CSV_NAME
    if args.append and csv_path.exists():
        with open(csv_path, newline="") as fh:
            old = list(csv.DictReader(fh))
        new_keys = {(r["n_cells"], r["mode"], r["threads"]) for r in rows}
        for r in old:
            for k in ("n_cells", "threads", "wall_s", "peak_rss_gb", "store_gb"):
                r[k] = (int if k in ("n_cells", "threads") else float)(r[k])
            if (r["n_cells"], r["mode"], r["threads"]) not in new_keys:
                rows.append(r)
        rows.sort(key=lambda r: (r["n_cells"], r["mode"], r["threads"]))
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / PNG_NAME)
    cmd = "python benchmarks/bench_synthetic.py --sizes " + " ".join(map(str, args.sizes))
    cmd += " --modes " + " ".join(args.modes) + f" --threads {args.threads}"
    print(f"wrote {csv_path} and {out / PNG_NAME}")
    print(f"reproduce: {cmd}")


if __name__ == "__main__":
    main()
