"""Spatial encoders of the topic model on planted spatial atlases (issue 13 item 5).

The atlas is :func:`atlasfit.datasets._planted_spatial.planted_spatial_atlas` (cells on a grid per
sample, topic proportions smooth in space, about 6 tokens per cell split into a fitted half and a
held-out half, the 8-neighbour grid graph). Every run trains :class:`atlasfit.MultimodalAmortizedLDA`
(multinomial, K=4, n_hidden=32, batch 128, lr 0.01, in process) on the fitted halves and scores the
held-out halves (document completion, per-token log-likelihood); the plain encoder of the same atlas
is the peer, measured in the same run. Writes

* ``benchmarks/results/topic_spatial.csv``: one row per (atlas, epochs, seed, encoder): held-out LL
  per token, its difference to the plain encoder, the planted-parameter value, seconds;
* ``benchmarks/results/topic_spatial.png``: the differences per encoder and seed;
* with ``--speed``: ``benchmarks/results/topic_spatial_speed.csv``, seconds per training step of the
  graph encoders against the plain one (:func:`speed`).

Reproduce (13-15 min on this project's shared 2-core machine; the numbers are the same bits on any machine with the same
NumPy/BLAS)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_topic_spatial.py
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from atlasfit.datasets._planted_spatial import (
    completion_ll_per_token,
    planted_spatial_atlas,
)

RESULTS = Path(__file__).resolve().parent / "results"

GAT = dict(spatial_mode="gcn", gcn_conv_type="gatv2", gcn_sampling="approx", gcn_fan_out=4, gcn_alpha_init=0.2)
VARIANTS = {
    "gcn1-exact": dict(spatial_mode="gcn", gcn_alpha_init=0.2),
    "gcn2-exact": dict(spatial_mode="gcn", gcn_n_layers=2, gcn_alpha_init=0.2),
    "gcn2-sampled": dict(spatial_mode="gcn", gcn_n_layers=2, gcn_alpha_init=0.2, gcn_sampling="approx", gcn_fan_out=4),
    "gat1-sampled": GAT,
    "gat2-sampled": dict(GAT, gcn_n_layers=2, gcn_fan_out=(4, 4)),
    "gat3-sampled": dict(GAT, gcn_n_layers=3, gcn_fan_out=(4, 3, 2)),
}
#: (atlas name, generator arguments, epochs, seeds, encoders): the settings quoted in docs/topic_model.md
PLAN = [
    ("2x20x20", dict(n_samples=2, side=20), 40, range(5), ["gcn1-exact", "gcn2-exact", "gat1-sampled", "gat2-sampled"]),
    ("4x24x24", dict(n_samples=4, side=24), 60, range(3), list(VARIANTS)),
    ("4x24x24", dict(n_samples=4, side=24), 30, range(3), ["gcn1-exact", "gat1-sampled", "gat2-sampled"]),
]


def _anndata(atlas):
    import anndata as ad
    import pandas as pd

    n = atlas["x_fit"].shape[0]
    obs = pd.DataFrame({"sample": atlas["sample"]}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(atlas["x_fit"].astype(np.float32), obs=obs, obsp={"grid": atlas["graph"]})


def fit_and_score(atlas, epochs: int, **spatial) -> float:
    from atlasfit.models.topic import MultimodalAmortizedLDA

    m = MultimodalAmortizedLDA.from_data(_anndata(atlas), ["rna"], {"rna": "multinomial"}, sample_key="sample",
                                         n_topics=4, n_hidden=32, spatial_key="grid" if spatial else None, **spatial)
    m.train(max_epochs=epochs, batch_size=128, lr=0.01, validation_fraction=0.0, progress=False, client=False)
    Z = m._fit.params["dec/rna/Z_loc"]
    phi = np.exp(Z - Z.max(1, keepdims=True))
    return completion_ll_per_token(m.get_latent_representation(n_samples=0), phi / phi.sum(1, keepdims=True),
                                   atlas["x_held"])


def speed(side: int = 140, n_features: int = 2000, steps: int = 5):
    """Seconds per training step (forward + backward of one shard, batch 1024, float32, K=20, H=128)
    on a ``side`` x ``side`` grid of cells with sparse counts (5% stored), plain against the graph
    encoders (reference fan-out 10 per hop). Writes ``benchmarks/results/topic_spatial_speed.csv``."""
    import scipy.sparse as sps

    from atlasfit.datasets._planted_spatial import king_grid
    from atlasfit.engine import plan_shards
    from atlasfit.models.topic import TopicModelConfig, draw_global_noise, init_params, make_buffers
    from atlasfit.models.topic._shard import Layout, MemoryBlocks, load_shard
    from atlasfit.models.topic._train import _shard_backward, _shard_forward

    n = side * side
    rng = np.random.default_rng(0)
    X = sps.random(n, n_features, density=0.05, random_state=1, format="csr",
                   data_rvs=lambda k: rng.poisson(2, k) + 1.0)
    reader = MemoryBlocks({"rna": X}, {"s0": np.arange(n)}, graphs={"rna": king_grid(side)})
    layout = Layout(n={"s0": n}, index={"s0": 0}, sid={"s0": 0})
    spec = plan_shards(["s0"], [n], max_shards=1)[0]
    opt = {"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    encoders = {"plain": {}, "gcn1-exact": {"spatial_mode": "gcn"},
                "gat1-exact": {"spatial_mode": "gcn", "gcn_conv_type": "gatv2"},
                "gcn2-sampled": {"spatial_mode": "gcn", "gcn_n_layers": 2, "gcn_sampling": "approx"},
                "gat2-sampled": {"spatial_mode": "gcn", "gcn_n_layers": 2, "gcn_conv_type": "gatv2",
                                 "gcn_sampling": "approx"}}
    rows = []
    n_steps = n // 1024
    for name, kw in encoders.items():
        cfg = TopicModelConfig(("rna",), (n_features,), ("multinomial",), n_topics=20, n_hidden=128, **kw)
        state = load_shard(spec, reader, layout, cfg, np.float32)
        p = {k: v.astype(np.float32) for k, v in init_params(cfg).items()}
        buf, gn = make_buffers(cfg), draw_global_noise(cfg, (0,), np.float32)

        def step(s, state=state, p=p, buf=buf, gn=gn):
            st = _shard_forward(state, p, gn, buf, 0, 0, s, n_steps, {"rna": 200.0}, None)
            _shard_backward(state, float(n_steps), 1.0, int(st["n"]), st["theta_sum"] / st["n"], 1, opt)

        step(0)
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            step(s)
        sec = (time.perf_counter() - t0) / steps
        rows.append({"encoder": name, "cells": n, "features": n_features, "seconds_per_step": sec,
                     "cells_per_second": 1024 / sec})
        print(f"{name:13s} {sec * 1e3:8.1f} ms/step ({1024 / sec:,.0f} cells/s)", flush=True)
    base = rows[0]["seconds_per_step"]
    for r in rows:
        r["x_plain"] = r["seconds_per_step"] / base
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "topic_spatial_speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first plan entry, seeds 0-1 only (a smoke run)")
    ap.add_argument("--speed", action="store_true", help="only the step-time comparison (speed())")
    args = ap.parse_args(argv)
    if args.speed:
        speed()
        return
    plan = PLAN[:1] if args.quick else PLAN
    rows = []
    for name, gen, epochs, seeds, encoders in plan:
        for seed in (list(seeds)[:2] if args.quick else seeds):
            atlas = planted_spatial_atlas(seed=seed, **gen)
            oracle = completion_ll_per_token(atlas["theta"], atlas["phi"], atlas["x_held"])
            t0 = time.perf_counter()
            plain = fit_and_score(atlas, epochs)
            rows.append(dict(atlas=name, epochs=epochs, seed=seed, encoder="plain", ll_per_token=plain, delta=0.0,
                             planted=oracle, seconds=time.perf_counter() - t0))
            for enc in encoders:
                t0 = time.perf_counter()
                ll = fit_and_score(atlas, epochs, **VARIANTS[enc])
                rows.append(dict(atlas=name, epochs=epochs, seed=seed, encoder=enc, ll_per_token=ll, delta=ll - plain,
                                 planted=oracle, seconds=time.perf_counter() - t0))
                print(f"{name} {epochs} ep seed {seed}: {enc:13s} {ll - plain:+.4f} (plain {plain:.4f})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("topic_spatial_quick.csv" if args.quick else "topic_spatial.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    _plot(rows, out.with_suffix(".png"))
    print("wrote", out)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["atlas"], r["epochs"]) for r in rows}, key=lambda t: (t[0], -t[1]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (atlas, ep) in zip(axes[0], groups):
        sel = [r for r in rows if r["atlas"] == atlas and r["epochs"] == ep and r["encoder"] != "plain"]
        encs = list(dict.fromkeys(r["encoder"] for r in sel))
        for i, e in enumerate(encs):
            d = [r["delta"] for r in sel if r["encoder"] == e]
            ax.scatter(np.full(len(d), i), d, s=18)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(encs)), encs, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{atlas}, {ep} epochs", fontsize=9)
        ax.set_ylabel("held-out LL per token - plain (nats)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
