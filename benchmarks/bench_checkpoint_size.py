"""Benchmark: disk used by MultiGEDI's default checkpoints next to the atlas store they fit.

For each data set, dtype and ``solve_Y_every`` (the iterations whose latent Y is solved from Ŷ and
the data, so that a checkpoint written then holds no Y: default 10; 0 = multigedi 1.1.0's Y update at
every iteration, Y saved in full), a MultiGEDI fit (K=10, ``--iterations``, the default checkpoint
policy of a store fit on the embedded 2-worker LocalCluster: ``<store>.checkpoints/multigedi-<digest>``,
a save at iteration 0, every 10 iterations and at the end) runs on a fresh store, while a thread polls
the size of the checkpoint directory every 0.2 s (``peak``: two versions exist while a save runs).
Recorded per row:

* ``store_mb``: the atlas store's bytes on disk before the fit (its data; the fit's results add
  ~1-3%);
* ``ck_mb``: the checkpoint directory after the fit (the one version kept), ``ck_over_store`` its
  ratio to the store (issue 12's target: <= 2), ``raw_mb`` the arrays it holds uncompressed,
  ``compressed_over_raw`` the compression ratio, ``dense_y_mb`` the dense latent state Y (cells x
  features of every modality in the fit's dtype: about what a checkpoint held before issue 12, which
  wrote every array raw and Y in full);
* ``peak_ck_mb``: the largest size seen during the fit; ``versions_kept``: versions left;
* ``z_rel_diff_vs_reference``: with ``--solve-y-every 10 0``, for the solved fit, max over modalities
  of ‖Z − Z_ref‖/‖Z_ref‖ against the fit with the reference's Y update (same data, dtype, iterations).

Data: ``real5k`` (``atlasfit.datasets.multigedi_real_5k``: 5,000 cells, 27 samples, rna 500 genes
M + splicing 1,000 events M_list) and ``synthetic`` (``synthetic_atlas``: 16 samples, rna 2,000 M +
splicing 1,000 M_list + atac 500 X, ``--n-cells``).

Writes (appends to) ``benchmarks/results/checkpoint_size.csv``; ``codec`` names the compression of
the local arrays (the two lz4 rows: a comparison run with ``_compressor`` switched to lz4, not kept).
Rows with an empty ``solve_y_every`` predate it (every iteration a Halley step, as ``0``).

Reproduce (from the repository root, in the project venv)::

    python benchmarks/bench_checkpoint_size.py --data real5k --dtypes float64 float32 --iterations 30 --solve-y-every 10 0
    python benchmarks/bench_checkpoint_size.py --data synthetic --n-cells 100000 --dtypes float64 float32 --iterations 10
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CSV_NAME = "checkpoint_size.csv"
FIELDS = ["data", "n_cells", "features", "dtype", "iterations", "solve_y_every", "store_mb", "ck_mb", "ck_over_store",
          "raw_mb", "dense_y_mb", "compressed_over_raw", "peak_ck_mb", "versions_kept", "last_save_s",
          "fit_s", "target_2x_met", "z_rel_diff_vs_reference", "workers", "codec", "load_avg_1min", "commit",
          "date_utc"]


def du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class Poll(threading.Thread):
    """Largest size of a directory seen every ``every`` seconds."""

    def __init__(self, path: Path, every: float = 0.2):
        super().__init__(daemon=True)
        self.path, self.every, self.peak = path, every, 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, du(self.path))


def make_store(data: str, n_cells: int, work: Path) -> tuple[Path, dict]:
    import atlasfit

    store = work / f"{data}.zarr"
    if data == "real5k":
        from atlasfit.datasets import multigedi_real_5k

        atlasfit.io.convert(multigedi_real_5k(), store, sample_key="sample", overwrite=True)
        mods = {"rna": {"obs_type": "M"}, "splicing": {"obs_type": "M_list", "layers": ("M1", "M2")}}
    else:
        from atlasfit.datasets import synthetic_atlas

        synthetic_atlas(store, n_cells=n_cells, n_samples=16, seed=0, overwrite=True)
        mods = {"rna": {"obs_type": "M"}, "splicing": {"obs_type": "M_list", "layers": ("M1", "M2")},
                "atac": {"obs_type": "X"}}
    return store, mods


def run_one(data: str, store: Path, mods: dict, dtype: str, iterations: int, solve: int, client) -> dict:
    import atlasfit
    from atlasfit.engine._checkpoint import CODEC
    from atlasfit.io import open_atlas

    atlas = open_atlas(store)
    shutil.rmtree(store.with_name(store.name + ".checkpoints"), ignore_errors=True)
    store_bytes = du(store)
    model = atlasfit.MultiGEDI(modalities=mods, sample_key="sample", K=10, seed=0, dtype=dtype, solve_Y_every=solve)
    ck_root = store.with_name(store.name + ".checkpoints")
    poll = Poll(ck_root)
    poll.start()
    t0 = time.perf_counter()
    model.fit(store, max_iterations=iterations, client=client, progress=False)
    fit_s = time.perf_counter() - t0
    poll.stop.set()
    poll.join()
    info = model.checkpoint_info_
    Z = {m: np.asarray(model.get_Z(m), dtype=np.float64) for m in mods}
    model.close()
    ck_dir = Path(info.path).parent
    ck_bytes = du(ck_root)
    itemsize = 4 if dtype == "float32" else 8
    dense = sum(int(atlas.samples[m].sum()) * int(atlas.var(m).shape[0]) for m in mods) * itemsize
    n_cells = int(atlas.samples[next(iter(mods))].sum())
    return {
        "data": data, "n_cells": n_cells,
        "features": "+".join(f"{m}:{atlas.var(m).shape[0]}:{c['obs_type']}" for m, c in mods.items()),
        "dtype": dtype, "iterations": iterations, "solve_y_every": solve, "store_mb": round(store_bytes / 1e6, 2),
        "ck_mb": round(ck_bytes / 1e6, 2), "ck_over_store": round(ck_bytes / store_bytes, 2),
        "raw_mb": round(info.raw_bytes / 1e6, 2), "dense_y_mb": round(dense / 1e6, 2),
        "compressed_over_raw": round(info.n_bytes / info.raw_bytes, 3),
        "peak_ck_mb": round(max(poll.peak, ck_bytes) / 1e6, 2),
        "versions_kept": sum(1 for d in ck_dir.iterdir() if d.is_dir() and d.name.startswith("v")),
        "last_save_s": round(info.seconds, 2), "fit_s": round(fit_s, 1),
        "target_2x_met": ck_bytes <= 2 * store_bytes, "workers": len(client.scheduler_info()["workers"]),
        "codec": CODEC, "load_avg_1min": round(os.getloadavg()[0], 2), "_Z": Z,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=["real5k", "synthetic"], default="real5k")
    ap.add_argument("--n-cells", type=int, default=100_000, help="synthetic only")
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--solve-y-every", type=int, nargs="+", default=[10],
                    help="MultiGEDI(solve_Y_every=) values to run (0: the reference's Y update)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / CSV_NAME))
    args = ap.parse_args(argv)

    from atlasfit.cluster import cluster_session

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="atlasfit_ck_") as tmp:
        store, mods = make_store(args.data, args.n_cells, Path(tmp))
        with cluster_session(n_workers=args.workers, quiet=True) as client:
            for dtype in args.dtypes:
                by_solve = {}
                for solve in args.solve_y_every:
                    row = run_one(args.data, store, mods, dtype, args.iterations, solve, client)
                    row.update(commit=commit,
                               date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                    by_solve[solve] = row
                    rows.append(row)
                ref = by_solve.get(0)
                for solve, row in by_solve.items():
                    if ref is not None and solve:
                        row["z_rel_diff_vs_reference"] = "%.3g" % max(
                            np.linalg.norm(row["_Z"][m] - ref["_Z"][m]) / np.linalg.norm(ref["_Z"][m]) for m in mods)
                    print(", ".join(f"{k}={row.get(k, '')}" for k in FIELDS), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old_rows = []
    if out.exists():  # an older header: rewrite the file with the new columns (left empty in old rows)
        with open(out, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames != FIELDS:
                old_rows = list(reader)
    with open(out, "w" if old_rows else "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if old_rows or fh.tell() == 0:
            w.writeheader()
        w.writerows(old_rows)
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
