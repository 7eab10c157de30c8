#!/usr/bin/env python
"""Probe the reference MultiGEDI's speed and memory growth (both peer builds).

For each peer build (``/work/peers/mg-sse3``, ``/work/peers/mg-native``, see
``build_multigedi.sh``) and each data set, runs ``multigedi_ref_runner.py`` in
the peer venv under ``benchmarks/_rss.py::run_and_sample`` (summed RSS of the
process tree, sampled every 0.1 s) and records s/iteration and peak RSS.

Data sets:

* ``real5k``: the real 5,000-cell data of the shared fixture
  (``rna`` M, J=500; ``splicing`` M_list, J=1000; 27 samples);
* ``synth<N>``: synthetic, N cells in 16 samples, ``rna`` M (J=2000) and
  ``splicing`` M_list (J=1000), generated here with NumPy from a rank-8
  log-linear model: rna counts ~ Poisson(exp(o_j + s_n + (Z B)_jn)); splicing
  totals ~ Poisson(exp(a_j + s_n)) split binomially with inclusion probability
  logistic(c_j + (Z' B)_jn), i.e. M1 and M2 are Poisson counts too. Sparsity is
  tuned to the real data (~9% non-zero for rna, ~10% for M1).

Writes ``benchmarks/results/peer_multigedi_probe.csv`` and ``.png``.

Example (the command that produced the committed results)::

    python benchmarks/peers/probe_multigedi.py --cells 20000 50000 --iterations 3

Run it with the atlasfit venv's Python (needs NumPy, SciPy, psutil, matplotlib);
the peer itself runs in its own venv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import scipy.sparse as sp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks._rss import run_and_sample  # noqa: E402

RUNNER = os.path.join(HERE, "multigedi_ref_runner.py")
FIXTURE = "/work/shared/fixtures/multigedi_real5k.npz"
MODALITIES = [
    {"name": "rna", "obs_type": "M", "orthoZ": True},
    {"name": "splicing", "obs_type": "M_list", "orthoZ": True},
]


def make_synthetic(path: str, n_cells: int, n_samples: int = 16, j_m: int = 2000,
                   j_mlist: int = 1000, rank: int = 8, seed: int = 0) -> dict:
    """Write a synthetic two-modality input .npz (CSR parts); return its summary."""
    rng = np.random.default_rng(seed)
    sizes = np.full(n_samples, n_cells // n_samples)
    sizes[: n_cells - sizes.sum()] += 1
    sample = np.repeat(np.arange(n_samples), sizes)
    z_rna = rng.normal(0.0, 0.6, (j_m, rank))
    z_spl = rng.normal(0.0, 0.6, (j_mlist, rank))
    o_rna = rng.normal(-3.9, 1.3, j_m)
    a_spl = rng.normal(-1.9, 1.0, j_mlist)
    c_spl = rng.normal(0.0, 0.5, j_mlist)
    shift = rng.normal(0.0, 0.4, (n_samples, rank))  # sample (batch) effect on B
    parts = {"rna": [], "M1": [], "M2": []}
    for g in range(n_samples):
        n = sizes[g]
        b = rng.normal(0.0, 1.0, (rank, n)) + shift[g][:, None]
        s = rng.normal(0.0, 0.3, n)
        lam = np.exp(o_rna[:, None] + s[None, :] + z_rna @ b)
        parts["rna"].append(sp.csr_matrix(rng.poisson(lam).T.astype(np.int32)))
        tot = rng.poisson(np.exp(a_spl[:, None] + s[None, :]))
        p = 1.0 / (1.0 + np.exp(-(c_spl[:, None] + z_spl @ b)))
        m1 = rng.binomial(tot, p)
        parts["M1"].append(sp.csr_matrix(m1.T.astype(np.int32)))
        parts["M2"].append(sp.csr_matrix((tot - m1).T.astype(np.int32)))
    out, nnz = {}, {}
    for key, mod, field in (("rna", "rna", "X"), ("M1", "splicing", "M1"),
                            ("M2", "splicing", "M2")):
        m = sp.vstack(parts[key], format="csr")
        nnz[key] = int(m.nnz)
        for attr in ("data", "indices", "indptr"):
            out[f"{mod}/{field}/{attr}"] = getattr(m, attr)
        out[f"{mod}/{field}/shape"] = np.asarray(m.shape, dtype=np.int64)
    out["rna/sample"] = sample.astype(np.int16)
    out["splicing/sample"] = sample.astype(np.int16)
    np.savez(path, **out)
    return {"n_cells": n_cells, "n_samples": n_samples, "J_M": j_m, "J_Mlist": j_mlist,
            "nnz_rna": nnz["rna"], "nnz_M1": nnz["M1"], "nnz_M2": nnz["M2"],
            "density_rna": nnz["rna"] / (n_cells * j_m),
            "density_M1": nnz["M1"] / (n_cells * j_mlist)}


def run_one(peer_python: str, data: str, prefix: str, cfg: dict, tmp: str,
            timeout: float) -> dict:
    cfg_path = os.path.join(tmp, "config.json")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    out = os.path.join(tmp, "out")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [peer_python, RUNNER, data, cfg_path, out]
    if prefix:
        cmd += ["--prefix", prefix]
    env = dict(os.environ)
    # The reference parallelises with OpenMP through num_threads; keep BLAS single-threaded.
    env.update(OMP_NUM_THREADS=str(cfg["num_threads"]), OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    rc, wall, peak = run_and_sample(cmd, interval=0.1, env=env, timeout=timeout)
    res = {"returncode": rc, "wall_s": wall, "peak_rss_bytes": peak,
           # 1-min load average before / after: other jobs on a shared machine skew timings.
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    if rc == 0:
        with open(os.path.join(out, "result.json")) as fh:
            res["result"] = json.load(fh)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers-dir", default="/work/peers")
    ap.add_argument("--builds", nargs="+", default=["sse3", "native"])
    ap.add_argument("--cells", nargs="*", type=int, default=[20000, 50000])
    ap.add_argument("--no-real", action="store_true", help="skip the real 5k data set")
    ap.add_argument("--iterations", type=int, default=3, help="sweeps for synthetic data")
    ap.add_argument("--real-iterations", type=int, default=5)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "peer_multigedi_probe"))
    args = ap.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = []
        if not args.no_real:
            datasets.append(("real5k", FIXTURE, "input/", args.real_iterations,
                             {"n_cells": 5000, "n_samples": 27, "J_M": 500, "J_Mlist": 1000}))
        for n in args.cells:
            path = os.path.join(tmp, f"synth{n}.npz")
            info = make_synthetic(path, n)
            print(f"synthetic {n} cells: {json.dumps(info)}", flush=True)
            datasets.append((f"synth{n}", path, "", args.iterations, info))
        for name, path, prefix, iters, info in datasets:
            for build in args.builds:
                py = os.path.join(args.peers_dir, f"mg-{build}", "bin", "python")
                cfg = {"K": args.K, "mode": "Bsphere", "seed": 0, "iterations": iters,
                       "num_threads": args.num_threads, "modalities": MODALITIES}
                r = run_one(py, path, prefix, cfg, tmp, args.timeout)
                res = r.get("result", {})
                row = {
                    "dataset": name, "build": build, "n_cells": info["n_cells"],
                    "n_samples": info["n_samples"], "J_M": info["J_M"],
                    "J_Mlist": info["J_Mlist"], "K": args.K, "iterations": iters,
                    "num_threads": args.num_threads, "returncode": r["returncode"],
                    "add_modality_s": res.get("add_modality_s"),
                    "initialize_s": res.get("initialize_s"),
                    "median_iter_s": res.get("median_iter_s"),
                    "min_iter_s": min(res["iter_s"]) if res.get("iter_s") else None,
                    "median_iter_cpu_s": res.get("median_iter_cpu_s"),
                    "total_fit_s": res.get("total_fit_s"),
                    "wall_s": r["wall_s"],
                    "peak_rss_bytes": r["peak_rss_bytes"],
                    "peak_rss_gib": r["peak_rss_bytes"] / 2**30,
                    "ru_maxrss_bytes": res.get("ru_maxrss_bytes"),
                    "loadavg_before": r["loadavg_before"],
                    "loadavg_after": r["loadavg_after"],
                    "sigma2_rna": res.get("sigma2", {}).get("rna"),
                    "sigma2_splicing": res.get("sigma2", {}).get("splicing"),
                    "input_nnz": sum(info.get(k, 0) for k in ("nnz_rna", "nnz_M1", "nnz_M2"))
                    or None,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, args.out + ".png")
    print(f"wrote {args.out}.csv and {args.out}.png")
    print("reproduce: python benchmarks/peers/probe_multigedi.py "
          + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synth = [r for r in rows if r["dataset"].startswith("synth") and r["returncode"] == 0]
    if not synth:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for build in sorted({r["build"] for r in synth}):
        rs = sorted((r for r in synth if r["build"] == build), key=lambda r: r["n_cells"])
        x = [r["n_cells"] for r in rs]
        axes[0].plot(x, [r["median_iter_s"] for r in rs], "o-", label=build)
        axes[1].plot(x, [r["peak_rss_gib"] for r in rs], "o-", label=build)
    axes[0].set(xlabel="cells", ylabel="s / iteration (median)",
                title="multigedi 1.1.0, 2 threads")
    axes[1].set(xlabel="cells", ylabel="peak RSS (GiB, process tree)",
                title="J = 2000 M + 1000 M_list, K = %d" % synth[0]["K"])
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
