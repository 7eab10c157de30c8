"""MultiGEDI: atlasfit vs the reference multigedi 1.1.0, side by side, on the same synthetic atlas.

For each size (cells): a synthetic atlas (16 samples; 2,000-gene counts ``rna`` (M) + 1,000-event
paired counts ``splicing`` (M_list); ground-truth cell types) is written to a store; the same counts
are exported to an ``.npz`` for the reference. Then, each in its own process while the summed RSS
of that process tree (driver, scheduler, workers) is sampled every 0.1 s:

* atlasfit on an embedded LocalCluster (2 process workers x 1 thread), float64 and float32
  (``atlasfit-float64``, ``atlasfit-float32``: the store path);
* atlasfit's in-memory default (``atlasfit-memory``, float64; ``atlasfit-memory-float32``): the store
  read into a MuData, then ``MultiGEDI(...).fit(mdata)`` with no client, as a user coming from
  multigedi would call it (in process, one thread per core: ``ThreadedEngine``);
* the reference ``MultiGEDIModel`` with ``num_threads=2``, as published (SSE3 flags) and built with
  ``-march=native`` (venvs from ``benchmarks/peers/build_multigedi.sh``).

Reported per run: median seconds per iteration (iterations 2..n), peak RSS, and embedding quality on
the ground truth: kNN (k=15) cell-type accuracy and cross-sample mixing (mean entropy of sample labels
among the 15 neighbours / log(#samples)). A run that dies (e.g. out of memory) is recorded as such.

    python benchmarks/bench_multigedi.py --cells 20000 50000 100000 --iterations 20 --K 20
    python benchmarks/bench_multigedi.py --cells 20000 50000 --impls atlasfit-memory ref-sse3 ref-native \
        --out benchmarks/results/multigedi_in_memory_vs_reference

Writes ``benchmarks/results/multigedi_vs_reference.csv`` and ``.png`` and prints ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _rss import run_and_sample  # noqa: E402

RESULTS = HERE / "results"
PEERS = {"ref-sse3": "/work/peers/mg-sse3/bin/python", "ref-native": "/work/peers/mg-native/bin/python"}
FEATURES = {"rna": 2000, "splicing": 1000}
MODS = [{"name": "rna", "obs_type": "M", "orthoZ": True},
        {"name": "splicing", "obs_type": "M_list", "orthoZ": True, "layers": ["M1", "M2"]}]


def make_data(n_cells, work: Path, seed=0):
    """Synthetic store + the same counts as npz (store row order) + truth labels."""
    import scipy.sparse as sp

    from atlasfit.datasets import synthetic_atlas
    from atlasfit.io import open_atlas

    store = work / f"synth_{n_cells}.zarr"
    if not store.exists():
        synthetic_atlas(store, n_cells=n_cells, n_samples=16, features=FEATURES, seed=seed,
                        overlap={}, overwrite=True)
    atlas = open_atlas(store)
    npz = work / f"synth_{n_cells}.npz"
    obs = atlas.obs("rna")
    if not npz.exists():
        arrays = {}
        for m, layers in (("rna", [None]), ("splicing", ["M1", "M2"])):
            for lay in layers:
                blocks = [atlas.read_block(m, g, lay) for g in atlas.sample_slices(m)]
                X = sp.vstack(blocks).tocsr()
                key = f"{m}/X" if lay is None else f"{m}/{lay}"
                arrays[f"{key}/data"] = X.data
                arrays[f"{key}/indices"] = X.indices
                arrays[f"{key}/indptr"] = X.indptr
                arrays[f"{key}/shape"] = np.asarray(X.shape)
            arrays[f"{m}/sample"] = atlas.obs(m)[atlas.sample_key].astype(str).to_numpy().astype("U")
        np.savez(npz, **arrays)
    truth = {"cell_type": obs["cell_type"].astype(str).to_numpy(),
             "sample": obs[atlas.sample_key].astype(str).to_numpy()}
    return store, npz, truth


def knn_quality(emb, truth, k=15, max_cells=20000, seed=0):
    """kNN cell-type accuracy (leave-one-out majority vote) and sample mixing entropy."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    n = emb.shape[0]
    idx = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
    X = emb[idx]
    ct = truth["cell_type"][idx]
    sm = truth["sample"][idx]
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    nb = nn.kneighbors(X, return_distance=False)[:, 1:]
    codes, ct_i = np.unique(ct, return_inverse=True)
    votes = np.zeros((len(idx), len(codes)))
    np.add.at(votes, (np.repeat(np.arange(len(idx)), k), ct_i[nb].ravel()), 1.0)
    acc = float(np.mean(votes.argmax(1) == ct_i))
    scodes, sm_i = np.unique(sm, return_inverse=True)
    cnt = np.zeros((len(idx), len(scodes)))
    np.add.at(cnt, (np.repeat(np.arange(len(idx)), k), sm_i[nb].ravel()), 1.0)
    p = cnt / k
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return acc, float(np.mean(ent) / np.log(len(scodes)))


def run_atlasfit(store, n_cells, dtype, args, work, in_memory=False):
    tag = f"{'mem_' if in_memory else ''}{n_cells}_{dtype}"
    out = work / f"af_{tag}"
    cfg = {"K": args.K, "iterations": args.iterations, "seed": 0, "mode": "Bsphere", "dtype": dtype,
           "workers": args.workers, "modalities": MODS, "in_memory": in_memory}
    cfgp = work / f"af_{tag}.json"
    cfgp.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(HERE / "_mg_atlasfit_run.py"), str(store), str(cfgp), str(out)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    rc, wall, peak = run_and_sample(cmd, interval=0.1, env=env, timeout=args.timeout)
    res = json.loads((out / "result.json").read_text()) if rc == 0 else {}
    emb = np.load(out / "pca.npy") if rc == 0 else None
    return rc, wall, peak, res, emb


def run_reference(npz, n_cells, peer, args, work):
    out = work / f"{peer}_{n_cells}"
    cfg = {"K": args.K, "mode": "Bsphere", "seed": 0, "iterations": args.iterations, "num_threads": 2,
           "modalities": [{k: v for k, v in m.items() if k != "layers"} for m in MODS]}
    cfgp = work / f"{peer}_{n_cells}.json"
    cfgp.write_text(json.dumps(cfg))
    cmd = [PEERS[peer], str(HERE / "peers" / "multigedi_ref_runner.py"), str(npz), str(cfgp), str(out)]
    rc, wall, peak = run_and_sample(cmd, interval=0.1, timeout=args.timeout)
    res = json.loads((out / "result.json").read_text()) if rc == 0 and (out / "result.json").exists() else {}
    emb = np.load(out / "pca.npy") if rc == 0 and (out / "pca.npy").exists() else None
    return rc, wall, peak, res, emb


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for impl in impls:
        rs = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        if not rs:
            continue
        x = [r["cells"] for r in rs]
        axes[0].plot(x, [r["median_iter_s"] for r in rs], marker="o", label=impl)
        axes[1].plot(x, [r["peak_rss_gb"] for r in rs], marker="o", label=impl)
    for r in rows:
        if r["status"] != "ok":
            axes[1].annotate(f"{r['impl']}: {r['status']}", (r["cells"], 0), fontsize=7, rotation=90)
    axes[0].set_ylabel("median s / iteration")
    axes[1].set_ylabel("peak RSS of the fit (GB, all processes)")
    for ax in axes:
        ax.set_xlabel("cells (16 samples, 2,000 M + 1,000 M_list, K=20)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("MultiGEDI: atlasfit (store: 2 workers x 1 thread; memory: in process, 1 thread per core) vs "
                 "multigedi 1.1.0 (num_threads=2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[20000, 50000, 100000])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--K", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--impls", nargs="+", default=["atlasfit-float64", "atlasfit-float32", "atlasfit-memory",
                                                    "ref-sse3", "ref-native"],
                    help="atlasfit-float64 / -float32 (store, 2 workers), atlasfit-memory[-float32] (in-memory "
                         "default), ref-sse3, ref-native")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "multigedi_vs_reference"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="atlasfit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    rows = []
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    for n in args.cells:
        t = time.perf_counter()
        store, npz, truth = make_data(n, work)
        print(f"[{n} cells] data ready in {time.perf_counter() - t:.0f} s", flush=True)
        for impl in args.impls:
            if impl.startswith("atlasfit-memory"):
                dtype = "float32" if impl.endswith("float32") else "float64"
                rc, wall, peak, res, emb = run_atlasfit(store, n, dtype, args, work, in_memory=True)
            elif impl.startswith("atlasfit"):
                rc, wall, peak, res, emb = run_atlasfit(store, n, impl.split("-")[1], args, work)
            else:
                if not Path(PEERS[impl]).exists():
                    print(f"  {impl}: peer venv missing (run benchmarks/peers/build_multigedi.sh)")
                    continue
                rc, wall, peak, res, emb = run_reference(npz, n, impl, args, work)
            status = "ok" if rc == 0 else ("out of memory" if rc in (-9, 137) else f"failed rc={rc}")
            acc = mix = float("nan")
            if emb is not None:
                acc, mix = knn_quality(emb, truth)
            row = {"cells": n, "impl": impl, "status": status, "iterations": args.iterations, "K": args.K,
                   "median_iter_s": res.get("median_iter_s", float("nan")),
                   "peak_rss_gb": peak / 1e9, "wall_s": wall, "knn_celltype_acc": acc,
                   "engine_overhead_fraction": res.get("engine_overhead_fraction", float("nan")),
                   "checkpoint_gb": (res.get("checkpoint_bytes") or float("nan")) / 1e9,
                   "checkpoint_s": res.get("checkpoint_s") or float("nan"),
                   "sample_mixing": mix, "machine": machine,
                   "engine": res.get("engine", "DaskEngine" if impl.startswith("atlasfit") else ""),
                   "threads": res.get("threads", float("nan")), "load1_after": os.getloadavg()[0]}
            rows.append(row)
            print(f"  {impl:<17} {status:<14} {row['median_iter_s']:.3f} s/it  peak {row['peak_rss_gb']:.2f} GB"
                  f"  kNN acc {acc:.3f}  mixing {mix:.3f}", flush=True)
        ref = {r["impl"]: r for r in rows if r["cells"] == n}
        for peer in ("ref-sse3", "ref-native"):
            if peer not in ref or ref[peer]["status"] != "ok":
                continue
            for impl in (i for i in args.impls if i.startswith("atlasfit")):
                if impl in ref and ref[impl]["status"] == "ok":
                    r = ref[impl]
                    print(f"  ratio {impl}/{peer}: time {r['median_iter_s'] / ref[peer]['median_iter_s']:.2f}x"
                          f"  memory {r['peak_rss_gb'] / ref[peer]['peak_rss_gb']:.2f}x")
        with open(args.out + ".csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, args.out + ".png")
    print(f"wrote {args.out}.csv and .png\nreproduce: python benchmarks/bench_multigedi.py --cells "
          f"{' '.join(map(str, args.cells))} --iterations {args.iterations} --K {args.K} --impls {' '.join(args.impls)}"
          f" --out {args.out}")


if __name__ == "__main__":
    main()
