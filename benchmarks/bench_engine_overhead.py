"""Per-round overhead of the ways to keep shard state on Dask workers, side by side.

Workload (from the engine brief): 2 process workers (1 thread each), 20 shards, each holding a
20,000 x 100 float64 array on its worker; one map round runs ``fn(state, a)`` on every shard and
returns a 2,000 x 20 float64 statistic per shard (6.4 MB per round in total) to the driver.

Mechanisms (all in the same process and cluster, rounds interleaved in blocks so background load
hits them alike):

a. ``futures``: state futures chained per round (``fn`` returns ``(state, stats)``; two
   ``getitem`` tasks split them; the new state future replaces the old one).
b. ``actors``: one ``distributed`` Actor per shard holding the state; a round calls a method on
   every actor.
c. ``registry/per-shard``: worker-resident registry, one pinned task per shard
   (``DaskEngine(mode="per-shard")``).
d. ``registry/per-worker``: worker-resident registry, one pinned task per worker running all its
   shards (``DaskEngine()``, the default).

Also for (d): a small broadcast argument forced through ``client.scatter`` and an 8 MB
argument sent inline vs scattered. Writes ``benchmarks/results/engine_overhead.csv`` and ``.png``.

Run::

    python benchmarks/bench_engine_overhead.py            # ~1-2 min on 2 cores
    python benchmarks/bench_engine_overhead.py --rounds 60 --blocks 4
"""

from __future__ import annotations

import argparse
import csv
import operator
import os
import platform
import time
from pathlib import Path

import distributed
import numpy as np

from atlasfit.engine import DaskEngine, place_shards, plan_shards

ROWS, COLS = 20_000, 100
STAT = (2_000, 20)
RESULTS = Path(__file__).resolve().parent / "results"


def load(spec):
    return {"x": np.full((ROWS, COLS), float(spec.index))}


def fn(state, a):
    return state["x"][: STAT[0], : STAT[1]] * a[0]


# (a) chained futures ----------------------------------------------------------------------


def fn_chained(state, a):
    return state, fn(state, a)


class Chained:
    def __init__(self, client, shards, owners):
        self.client, self.shards, self.owners = client, shards, owners
        self.states = [
            client.submit(load, s, workers=[owners[s.index]], allow_other_workers=False, pure=False)
            for s in shards
        ]
        distributed.wait(self.states)

    def map(self, a):
        c = self.client
        new, stats = [], []
        for s, st in zip(self.shards, self.states):
            w = dict(workers=[self.owners[s.index]], allow_other_workers=False, pure=False)
            r = c.submit(fn_chained, st, a, **w)
            new.append(c.submit(operator.getitem, r, 0, **w))
            stats.append(c.submit(operator.getitem, r, 1, **w))
        out = c.gather(stats)
        self.states = new
        return out

    def close(self):
        self.client.cancel(self.states)


# (b) actors -------------------------------------------------------------------------------


class ShardActor:
    def __init__(self, spec):
        self.state = load(spec)

    def run(self, a):
        return fn(self.state, a)


class Actors:
    def __init__(self, client, shards, owners):
        futs = [
            client.submit(ShardActor, s, actor=True, workers=[owners[s.index]], allow_other_workers=False)
            for s in shards
        ]
        self.futs = futs
        self.actors = [f.result() for f in futs]

    def map(self, a):
        calls = [act.run(a) for act in self.actors]
        return [c.result() for c in calls]

    def close(self):
        del self.actors
        self.futs[0].client.cancel(self.futs)


# (c, d) the engine ------------------------------------------------------------------------


class Engine:
    def __init__(self, client, shards, mode, threshold):
        self.eng = DaskEngine(client, shards, mode=mode, broadcast_threshold=threshold)
        self.eng.setup(load)

    def map(self, a):
        return self.eng.map(fn, a)

    def close(self):
        self.eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="rounds per mechanism per block")
    ap.add_argument("--blocks", type=int, default=3, help="interleaved blocks")
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    cluster = distributed.LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
        memory_limit="4GiB",
    )
    client = distributed.Client(cluster)
    shards = plan_shards([f"s{i}" for i in range(args.shards)], [ROWS] * args.shards)
    owners = place_shards(shards, client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.workers)))
    small = np.array([1.0])
    big = np.ones(2**20)  # 8 MiB broadcast argument
    big[0] = 1.0

    cases = {
        "a futures chained": (lambda: Chained(client, shards, owners), small),
        "b actors": (lambda: Actors(client, shards, owners), small),
        "c registry per-shard": (lambda: Engine(client, shards, "per-shard", 8 * 2**20), small),
        "d registry per-worker": (lambda: Engine(client, shards, "per-worker", 8 * 2**20), small),
        "d per-worker, small arg scattered": (lambda: Engine(client, shards, "per-worker", 0), small),
        "d per-worker, 8 MiB arg inline": (lambda: Engine(client, shards, "per-worker", 2**40), big),
        "d per-worker, 8 MiB arg scattered": (lambda: Engine(client, shards, "per-worker", 0), big),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    load1: dict[str, list[float]] = {k: [] for k in cases}  # 1-min load average (shared machines)
    expected = [np.full(STAT, float(s.index)) for s in shards]
    for block in range(args.blocks):
        for name, (make, a) in cases.items():
            mech = make()
            try:
                out = mech.map(a)  # warm-up round (not timed), also checks the results
                assert all(np.array_equal(o, e) for o, e in zip(out, expected)), name
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    mech.map(a)
                    times[name].append(time.perf_counter() - t0)
            finally:
                mech.close()
            load1[name].append(os.getloadavg()[0])
            print(f"block {block}: {name:36s} median {1e3 * np.median(times[name]):7.1f} ms", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / "engine_overhead.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mechanism", "median_s", "p90_s", "min_s", "n_rounds", "n_workers", "n_shards",
                    "state_per_shard", "stat_per_shard", "cpu_count", "loadavg_1min", "python"])
        for name, ts in times.items():
            w.writerow([name, f"{np.median(ts):.5f}", f"{np.percentile(ts, 90):.5f}", f"{np.min(ts):.5f}",
                        len(ts), args.workers, args.shards, f"{ROWS}x{COLS} float64",
                        f"{STAT[0]}x{STAT[1]} float64", os.cpu_count(), f"{np.mean(load1[name]):.2f}",
                        platform.python_version()])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = list(times)
    ax.boxplot([np.array(times[n]) * 1e3 for n in names], showfliers=False, orientation="horizontal")
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.axvline(30, color="tab:red", ls="--", lw=1, label="target 30 ms")
    ax.set_xscale("log")
    ax.set_xlim(left=10)
    ax.set_xlabel("seconds per map round x 1000 (ms), log scale")
    ax.set_title(f"{args.shards} shards, {args.workers} process workers, {ROWS}x{COLS} state, "
                 f"{STAT[0]}x{STAT[1]} stat per shard\n{os.cpu_count()} cores, mean 1-min load average "
                 f"{np.mean([v for vs in load1.values() for v in vs]):.1f} during the run", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    png_path = RESULTS / "engine_overhead.png"
    fig.savefig(png_path, dpi=120)
    client.close()
    cluster.close()
    print(f"wrote {csv_path} and {png_path}")
    print("reproduce: python benchmarks/bench_engine_overhead.py "
          f"--rounds {args.rounds} --blocks {args.blocks} --shards {args.shards} --workers {args.workers}")


if __name__ == "__main__":
    main()
