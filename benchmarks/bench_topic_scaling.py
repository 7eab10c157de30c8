"""Topic model on the Dask engine: 1 -> 2 worker scaling and the effect of local steps.

Planted data (generated here, seeded): ``--cells`` training cells (default 200,000) plus
``--heldout`` held-out cells in 4 samples, ``--genes`` genes (2,000), K=10 planted topics,
:math:`\\theta_n\\sim\\mathrm{Dir}(0.1)`, :math:`\\phi_k\\sim\\mathrm{Dir}(0.05)`, library
:math:`\\ell_n\\sim\\mathrm{LogNormal}(\\log 1000, 0.5)`, counts :math:`x_{nf}\\sim\\mathrm{Poisson}(\\ell_n(\\theta_n\\phi)_f)`
(multinomial given the cell total). Model: one multinomial modality, K=10, 128 hidden units, float32,
AdamW lr ``--lr`` (3e-2), constant KL weight, batch 1024, ``--epochs`` epochs.

Runs, interleaved (A B A B ...) so that the machine's background load hits them alike:

* ``timing``: ``steps_per_round`` = 1 (one round per step, ``theta_bar_sync="lagged"``) and
  each value of ``--best-s`` (comma-separated), each on a LocalCluster with 1 and with 2 process
  workers (1 thread each, OMP/OPENBLAS/MKL threads 1); both clusters stay up for the whole run.
  Cells/s of every epoch (timed from the first training round, so data shipping and setup are
  excluded); medians and the 2-worker / 1-worker ratio.
* ``quality`` (``--quality``): extra 2-worker runs, ``steps_per_round`` = 1 with
  ``theta_bar_sync="exact"`` (two rounds per step) and ``steps_per_round`` = 4. Held-out per-token log-likelihood of every run
  (posterior mean :math:`\\hat\\theta` with 20 samples, :math:`\\hat\\phi` at the variational mean)
  next to the planted-parameter value. 1- and 2-worker runs of one setting give the same bits, so
  their held-out values must agree (checked).

Writes ``benchmarks/results/topic_scaling.csv`` and ``.png`` (the committed CSV holds four runs, with
a ``run`` column added: 1 = ``--best-s 16`` at load 1.4-2.1; 2 = the defaults at load 2.2-3.8;
3 = ``--best-s 16,32 --quality ''`` at load 1.3-2.4; 4 = the same as 3 with nothing else running,
after the k-means decoder start, whose PNG is committed). Run::

    python benchmarks/bench_topic_scaling.py                      # ~13 min on 2 cores (load ~2-3)
    python benchmarks/bench_topic_scaling.py --cells 20000 --epochs 1 --reps 1 --out /tmp/x   # smoke
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _k, _v in WORKER_ENV.items():  # the driver too: it shares the 2 cores with the workers
    os.environ.setdefault(_k, _v)

import distributed  # noqa: E402

from atlasfit.engine import DaskEngine  # noqa: E402
from atlasfit.models.topic import (  # noqa: E402
    TopicModelConfig,
    per_token_log_likelihood,
    topic_feature_dist,
    topic_proportions,
    train_serial,
)

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
N_SAMPLES = 4


def planted(n_train: int, n_held: int, n_genes: int, seed: int):
    """Planted multinomial topic data; returns (X_train, sample, X_held, theta_held, phi)."""
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(n_genes, 0.05), K)
    n = n_train + n_held
    blocks, thetas = [], []
    for lo in range(0, n, 10_000):
        m = min(n, lo + 10_000) - lo
        th = rng.dirichlet(np.full(K, 0.1), m)
        lib = rng.lognormal(np.log(1000.0), 0.5, m)
        blocks.append(sp.csr_matrix(rng.poisson(lib[:, None] * (th @ phi)).astype(np.float32)))
        thetas.append(th)
    X = sp.vstack(blocks, format="csr")
    theta = np.vstack(thetas)
    keep = np.flatnonzero(np.asarray(X.sum(axis=1)).ravel() > 0)  # no empty cells
    train = keep[keep < n_train]
    held = keep[keep >= n_train]
    sample = np.repeat([f"s{i}" for i in range(N_SAMPLES)], -(-len(train) // N_SAMPLES))[: len(train)]
    return X[train], sample, X[held], theta[held], phi


class TimedEngine(DaskEngine):
    """DaskEngine that notes when training starts (after the setup and data-statistics rounds)."""

    t_ready = None

    def map(self, fn, *args, **kwargs):
        out = super().map(fn, *args, **kwargs)
        if fn.__name__ in ("_shard_data_stats", "shard_pop_stats"):  # the data-statistics round (old / new name)
            self.t_ready = time.perf_counter()
        return out


def run_one(client, X, sample, cfg, args, S, sync):
    engines, marks = [], []

    def factory(shards):
        engines.append(TimedEngine(client, shards))
        return engines[-1]

    def cb(epoch, fit):
        marks.append(time.perf_counter())

    fit = train_serial(
        {"rna": X}, cfg, sample=sample, n_epochs=args.epochs, batch_size=args.batch, lr=args.lr,
        kl_schedule="constant", seed=args.seed, dtype=np.float32, engine_factory=factory, callback=cb,
        steps_per_round=S, theta_bar_sync=sync,
    )
    eng = engines[0]
    t = [eng.t_ready] + marks
    secs = [b - a for a, b in zip(t[:-1], t[1:])]
    wall = sum(w for w, _ in eng.round_times)
    busy = sum(b for _, b in eng.round_times)
    return fit, secs, len(eng.round_times), (wall - busy) / wall


def heldout_ll(fit, Xh):
    th = topic_proportions(fit, {"rna": Xh}, n_samples=20, seed=0)
    return per_token_log_likelihood(th, topic_feature_dist(fit, "rna"), Xh)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--heldout", type=int, default=10_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the timing runs")
    ap.add_argument("--best-s", default="16,32", help="comma-separated steps_per_round values to time besides 1")
    ap.add_argument("--quality", default="exact1,4", help="extra 2-worker runs: exact1 and/or S values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "topic_scaling"), help="output path without extension")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/bench_topic_scaling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    t0 = time.perf_counter()
    X, sample, Xh, theta_h, phi = planted(args.cells, args.heldout, args.genes, args.seed)
    print(f"data: {X.shape[0]} train + {Xh.shape[0]} held-out cells, {X.nnz / X.shape[0]:.0f} nnz/cell, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    ll_planted = per_token_log_likelihood(theta_h, phi, Xh)
    cfg = TopicModelConfig(("rna",), (args.genes,), ("multinomial",), n_topics=K, n_hidden=128)

    rows = []
    lls: dict = {}
    kw = dict(threads_per_worker=1, processes=True, dashboard_address=None, env=dict(WORKER_ENV),
              memory_limit="6GiB")
    with distributed.LocalCluster(n_workers=1, **kw) as c1, distributed.LocalCluster(n_workers=2, **kw) as c2, \
            distributed.Client(c1) as k1, distributed.Client(c2) as k2:
        clients = {1: k1, 2: k2}
        plan = []
        for rep in range(args.reps):
            for S in [1] + [int(v) for v in args.best_s.split(",") if v]:
                for w in (1, 2):
                    plan.append(("timing", rep, w, S, "lagged"))
        for q in [q for q in args.quality.split(",") if q]:
            plan.append(("quality", 0, 2, 1, "exact") if q == "exact1" else ("quality", 0, 2, int(q), "lagged"))
        for kind, rep, w, S, sync in plan:
            load0 = os.getloadavg()[0]
            fit, secs, n_rounds, ovh = run_one(clients[w], X, sample, cfg, args, S, sync)
            ll = heldout_ll(fit, Xh)
            lls.setdefault((S, sync), []).append(ll)
            load1 = os.getloadavg()[0]
            for e, s in enumerate(secs):
                rows.append(dict(kind=kind, workers=w, steps_per_round=S, theta_bar_sync=sync, rep=rep, epoch=e,
                                 seconds=round(s, 3), cells_per_s=round(X.shape[0] / s, 1),
                                 rounds=n_rounds, engine_overhead_fraction=round(ovh, 3),
                                 heldout_ll=round(ll, 5), load1_before=round(load0, 2), load1_after=round(load1, 2)))
            print(f"{kind} rep={rep} workers={w} S={S} sync={sync}: epochs {[round(s, 1) for s in secs]} s, "
                  f"{n_rounds} rounds, overhead {ovh:.2f}, held-out LL {ll:.4f}, load {load0:.1f}->{load1:.1f}",
                  flush=True)

    for key, v in lls.items():  # same bits on 1 and 2 workers -> same held-out value
        if max(v) - min(v) > 1e-9:
            raise SystemExit(f"held-out LL differs between runs of {key}: {v}")
    summary = []
    timing = [r for r in rows if r["kind"] == "timing"]
    for S in sorted({r["steps_per_round"] for r in timing}):
        med = {w: statistics.median(r["cells_per_s"] for r in timing if r["steps_per_round"] == S and r["workers"] == w)
               for w in (1, 2)}
        loads = [r[k] for r in timing if r["steps_per_round"] == S for k in ("load1_before", "load1_after")]
        summary.append(dict(kind="summary", steps_per_round=S, theta_bar_sync="lagged",
                            cells_per_s_1w=round(med[1], 1), cells_per_s_2w=round(med[2], 1),
                            ratio_2w_1w=round(med[2] / med[1], 3), heldout_ll=round(lls[(S, "lagged")][0], 5),
                            planted_ll=round(ll_planted, 5), load1_median=round(statistics.median(loads), 2)))
    for (S, sync), v in sorted(lls.items()):
        if not any(s["steps_per_round"] == S and s["theta_bar_sync"] == sync for s in summary):
            summary.append(dict(kind="summary", steps_per_round=S, theta_bar_sync=sync, heldout_ll=round(v[0], 5),
                                planted_ll=round(ll_planted, 5)))
    for s in summary:
        print(s)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["kind", "workers", "steps_per_round", "theta_bar_sync", "rep", "epoch", "seconds", "cells_per_s",
              "rounds", "engine_overhead_fraction", "heldout_ll", "load1_before", "load1_after",
              "cells_per_s_1w", "cells_per_s_2w", "ratio_2w_1w", "planted_ll", "load1_median",
              "cells", "genes", "batch", "epochs", "lr", "host", "command"]
    meta = dict(cells=X.shape[0], genes=args.genes, batch=args.batch, epochs=args.epochs, lr=args.lr, host=platform.node(),
                command=cmd)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows + summary:
            wr.writerow({**meta, **r})
    plot(rows, summary, ll_planted, out.with_suffix(".png"), args)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    print(f"reproduce: {cmd}")


def plot(rows, summary, ll_planted, path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    timed = [s for s in summary if "ratio_2w_1w" in s]
    xs = np.arange(len(timed))
    a1.bar(xs - 0.2, [s["cells_per_s_1w"] for s in timed], 0.4, label="1 worker")
    a1.bar(xs + 0.2, [s["cells_per_s_2w"] for s in timed], 0.4, label="2 workers")
    for x, s in zip(xs, timed):
        a1.text(x + 0.2, s["cells_per_s_2w"], f"{s['ratio_2w_1w']:.2f}x", ha="center", va="bottom")
    a1.set_xticks(xs, [f"steps_per_round={s['steps_per_round']}" for s in timed])
    a1.set_ylabel("training cells/s (median epoch)")
    a1.set_title(f"{args.cells:,} cells, batch {args.batch}, 2 cores")
    a1.legend()
    q = sorted(summary, key=lambda s: (s["steps_per_round"], s["theta_bar_sync"] != "exact"))
    labels = [f"S={s['steps_per_round']}" + (" exact" if s["theta_bar_sync"] == "exact" else "") for s in q]
    a2.plot(range(len(q)), [s["heldout_ll"] for s in q], "o-", label="fitted")
    a2.axhline(ll_planted, color="k", ls="--", label="planted parameters")
    a2.set_xticks(range(len(q)), labels)
    a2.set_ylabel("held-out per-token log-likelihood")
    a2.set_title(f"after {args.epochs} epochs")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
