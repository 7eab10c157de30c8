"""atlasfit's topic model vs scvi-tools' AmortizedLDA: epoch throughput and held-out log-likelihood.

Same data for both: an RNA-only planted atlas (``bench_topic_planted.planted_topic_atlas`` with
``n_peaks=0``: 2,000 genes, K=10 planted topics, LogNormal(log 2000, 0.5) library sizes, 4 samples)
of 20k and 100k training cells plus 2,000 held-out cells. atlasfit is configured as AmortizedLDA
(read from scvi-tools 1.4.2's source in the peer venv):

* one ``multinomial`` modality, no background, entropy / topic-variance regularisers off;
* encoder: raw counts in (scvi's ``Encoder`` has no log1p / depth normalisation:
  ``normalize_encoder_inputs=False``), 1 layer, 128 hidden, BatchNorm (eps 1e-3, momentum 0.01),
  ReLU, dropout 0.1, ``var_eps`` 1e-4; priors :math:`\\alpha=1/K` for cells and topics;
* optimiser: pyro's Adam = torch Adam (betas 0.9/0.999, eps 1e-8, **no weight decay**:
  ``weight_decay=0``); lr 0.01; batch 256; KL warm-up ``"scvi400"`` (scvi's
  ``PyroTrainingPlan``: linear from 1e-6 to 1 over 400 epochs); same number of epochs;
* float32 on both sides (torch default).

Remaining difference, not configurable: scvi's guide samples the cell logits with standard
deviation :math:`v` (it passes ``scale**2`` as the Normal's scale), atlasfit with :math:`\\sqrt v`.

Throughput is the median over epochs of cells / epoch wall time (each tool timed inside its own
training loop: a Lightning callback for scvi, ``train_serial``'s epoch callback for atlasfit). The
held-out per-token log-likelihood :math:`\\sum x\\log(\\hat\\theta\\hat\\phi)/\\sum x` is computed here
for both from saved :math:`\\hat\\theta` (held-out cells) and :math:`\\hat\\phi`:

* ``ll_mc``: scvi ``get_latent_representation`` / ``get_feature_by_topic`` (Monte-Carlo means,
  1,000 draws), atlasfit ``topic_proportions`` / ``topic_feature_dist`` with 1,000 draws;
* ``ll_mean``: plug-in softmax of the encoder means and of the topic-logit means for both.

Runs are interleaved (scvi, atlasfit, scvi, atlasfit, ...), each in its own process with
``torch.set_num_threads(t)`` / ``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=t``; atlasfit
is one process with the serial engine.

Outputs ``benchmarks/results/topic_vs_scvi.csv`` (one row per run), ``topic_vs_scvi_summary.csv``
(medians and ratios per size and thread count), ``topic_vs_scvi.png`` and, with ``--profile``,
``topic_vs_scvi_profile.txt`` (cProfile of one atlasfit epoch). Reproduce::

    python benchmarks/bench_topic_vs_scvi.py --sizes 20000 100000 --epochs 10 3 --threads 1 --reps 2
    python benchmarks/bench_topic_vs_scvi.py --sizes 20000 --epochs 10 --threads 2 --reps 2 --tag topic_vs_scvi_2t
    python benchmarks/bench_topic_vs_scvi.py --profile-only
    python benchmarks/bench_topic_vs_scvi.py --rescore --tag topic_vs_scvi   # add recovery columns

Also recorded: ``rna_corr_mean``, the Hungarian-matched correlation of each tool's topic-feature
matrix with the planted one (``bench_topic_planted.matched_correlation``).

The peer venv (outside the repository, never an atlasfit dependency)::

    python3.11 -m venv /work/peers/scvi
    /work/peers/scvi/bin/pip install torch==2.13.0 && /work/peers/scvi/bin/pip install scvi-tools
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

PEER_PY = os.environ.get("SCVI_PEER_PYTHON", "/work/peers/scvi/bin/python")
RUNNER = os.path.join(_HERE, "peers", "scvi_lda_runner.py")


def _thread_env(t: int) -> dict:
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[v] = str(t)
    return env


def write_npz(atlas, path: str) -> None:
    d = {}
    for part, X in (("train", atlas.x_train["rna"]), ("test", atlas.x_test["rna"])):
        X = X.tocsr()
        d[f"{part}_data"], d[f"{part}_indices"], d[f"{part}_indptr"] = X.data.astype(np.float32), X.indices, X.indptr
        d[f"{part}_shape"] = np.array(X.shape)
    np.savez(path, **d)


def _load_csr(z, part):
    import scipy.sparse as sp

    return sp.csr_matrix((z[f"{part}_data"].astype(np.float64), z[f"{part}_indices"], z[f"{part}_indptr"]),
                         shape=tuple(z[f"{part}_shape"]))


def scvi_equivalent_config(n_features: int, n_topics: int, n_hidden: int = 128):
    """atlasfit ``TopicModelConfig`` equal to scvi-tools' AmortizedLDA defaults (module docstring)."""
    from atlasfit.models.topic import TopicModelConfig

    return TopicModelConfig(
        ("rna",), (n_features,), ("multinomial",), n_topics=n_topics, n_hidden=n_hidden, n_layers=1,
        dropout=0.1, bn_eps=1e-3, bn_momentum=0.01, var_eps=1e-4, cell_topic_prior=None,
        topic_feature_prior=None, use_feature_background=False, entropy_weight=0.0,
        topic_variance_weight=0.0, normalize_encoder_inputs=False,
    )


def atlasfit_worker(a) -> None:
    """One atlasfit run (own process, BLAS threads from the environment)."""
    from atlasfit.models.topic import topic_feature_dist, topic_proportions, train_serial

    z = np.load(a.data)
    Xtr, Xte = _load_csr(z, "train"), _load_csr(z, "test")
    cfg = scvi_equivalent_config(Xtr.shape[1], a.n_topics, a.n_hidden)
    stamps = []

    def cb(epoch, fit):
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    fit = train_serial({"rna": Xtr}, cfg, n_epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       weight_decay=0.0, kl_schedule="scvi400", seed=a.seed, dtype=np.float32, callback=cb,
                       decoder_init="zeros")  # as measured in results/topic_vs_scvi*.csv (before k-means init)
    train_wall = time.perf_counter() - t0
    epoch_s = list(np.diff([t0] + stamps))
    t1 = time.perf_counter()
    np.savez(
        os.path.splitext(a.out)[0] + ".npz",
        theta_mc=topic_proportions(fit, {"rna": Xte}, n_samples=a.eval_samples),
        phi_mc=topic_feature_dist(fit, "rna", n_samples=a.eval_samples),
        theta_mean=topic_proportions(fit, {"rna": Xte}, n_samples=0),
        phi_mean=topic_feature_dist(fit, "rna", n_samples=0),
    )
    res = {"tool": "atlasfit", "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "n_train": int(Xtr.shape[0]),
           "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "epoch_s": epoch_s,
           "train_wall_s": train_wall, "eval_wall_s": time.perf_counter() - t1}
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


def _run(tool: str, npz: str, out: str, *, threads: int, epochs: int, n_topics: int, lr: float,
         batch_size: int, seed: int, eval_samples: int) -> dict:
    common = ["--data", npz, "--out", out, "--n-topics", str(n_topics), "--epochs", str(epochs), "--lr", str(lr),
              "--batch-size", str(batch_size), "--seed", str(seed), "--eval-samples", str(eval_samples)]
    if tool == "scvi":
        cmd = [PEER_PY, RUNNER, *common, "--threads", str(threads)]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", *common]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=_thread_env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{tool} run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(out) as fh:
        res = json.load(fh)
    res["process_wall_s"] = time.perf_counter() - t
    return res


def _recovery(out_json: str, phi_true) -> dict:
    """Hungarian-matched correlation of the learned (MC-mean) topic-feature matrix with the planted one."""
    from benchmarks.bench_topic_planted import matched_correlation

    z = np.load(os.path.splitext(out_json)[0] + ".npz")
    r, _ = matched_correlation(z["phi_mc"], phi_true)
    return {"rna_corr_mean": float(r.mean()), "rna_corr_min": float(r.min())}


def _score(out_json: str, Xte, phi_true) -> dict:
    from benchmarks.bench_topic_planted import per_token_ll_sparse

    z = np.load(os.path.splitext(out_json)[0] + ".npz")
    out = {"ll_mc": per_token_ll_sparse(z["theta_mc"], z["phi_mc"], Xte),
           "ll_mean": per_token_ll_sparse(z["theta_mean"], z["phi_mean"], Xte)}
    out.update(_recovery(out_json, phi_true))
    return out


def summarise(df, reps: int, cmd: str):
    """Medians per (size, threads) and the atlasfit / scvi throughput ratio."""
    import pandas as pd

    summ = []
    for (n, t), g in df.groupby(["n_train", "threads"]):
        s, f = g[g["tool"] == "scvi"], g[g["tool"] == "atlasfit"]
        # ratio of each interleaved pair (same rep), then the median of the pair ratios
        pair = [float(f[f["rep"] == r]["cells_per_s"].iloc[0] / s[s["rep"] == r]["cells_per_s"].iloc[0])
                for r in sorted(set(s["rep"]) & set(f["rep"]))]
        row = {
            "n_train": n, "threads": t, "reps": reps, "epochs": int(g["epochs"].iloc[0]),
            "scvi_cells_per_s": s["cells_per_s"].median(), "atlasfit_cells_per_s": f["cells_per_s"].median(),
            "throughput_ratio": f["cells_per_s"].median() / s["cells_per_s"].median(),
            "pair_ratios": " ".join(f"{v:.2f}" for v in pair),
            "scvi_ll_mc": s["ll_mc"].median(), "atlasfit_ll_mc": f["ll_mc"].median(),
            "scvi_ll_mean": s["ll_mean"].median(), "atlasfit_ll_mean": f["ll_mean"].median(),
            "ll_planted": float(g["ll_planted"].iloc[0]),
        }
        if "rna_corr_mean" in g:
            row["scvi_rna_corr_mean"] = s["rna_corr_mean"].median()
            row["atlasfit_rna_corr_mean"] = f["rna_corr_mean"].median()
        row["command"] = cmd
        summ.append(row)
    return pd.DataFrame(summ)


def rescore(tag: str, workdir: str, seed: int, n_topics: int) -> None:
    """Add the topic-recovery columns to an existing result CSV from the saved estimates in ``workdir``."""
    import pandas as pd

    from benchmarks.bench_topic_planted import planted_topic_atlas

    path = os.path.join(_HERE, "results", f"{tag}.csv")
    df = pd.read_csv(path)
    # phi is drawn before any cell, from the seed only: the same for every atlas size
    phi = planted_topic_atlas(10, 10, n_peaks=0, n_topics=n_topics, seed=seed).phi["rna"]
    rec = [_recovery(os.path.join(workdir, f"{r.tool}_{r.n_train}_{r.threads}_{r.rep}.json"), phi)
           for r in df.itertuples()]
    for k in rec[0]:
        df[k] = [r[k] for r in rec]
    df.to_csv(path, index=False)
    sm = summarise(df, int(df["rep"].max()) + 1, str(df["command"].iloc[0]))
    sm.to_csv(os.path.join(_HERE, "results", f"{tag}_summary.csv"), index=False)
    plot(df, {int(n): float(v) for n, v in zip(df["n_train"], df["ll_planted"])},
         os.path.join(_HERE, "results", f"{tag}.png"))
    print(sm.drop(columns=["command"]).to_string(index=False))


def profile_epoch(n_cells: int, out_txt: str, n_topics: int = 10, seed: int = 0) -> None:
    """cProfile of one atlasfit epoch (same config) on ``n_cells`` cells; top functions by own time."""
    import cProfile
    import io
    import pstats

    from atlasfit.models.topic import train_serial
    from benchmarks.bench_topic_planted import planted_topic_atlas

    atlas = planted_topic_atlas(n_cells, 10, n_peaks=0, n_topics=n_topics, seed=seed)
    X = atlas.x_train["rna"]
    cfg = scvi_equivalent_config(X.shape[1], n_topics)
    pr = cProfile.Profile()
    pr.enable()
    train_serial({"rna": X}, cfg, n_epochs=1, batch_size=256, lr=0.01, weight_decay=0.0, kl_schedule="scvi400",
                 decoder_init="zeros",
                 dtype=np.float32)
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(30)
    with open(out_txt, "w") as fh:
        fh.write(f"# cProfile of one atlasfit epoch: {n_cells} cells, 2000 genes, K={n_topics}, batch 256, float32, "
                 f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}\n")
        fh.write(s.getvalue())
    print(s.getvalue()[:6000])


def plot(df, planted, path: str) -> None:
    """Three panels: cells/s of every run, atlasfit/scvi ratio of every interleaved pair, held-out LL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(int(n), int(t)) for n, t in zip(df["n_train"], df["threads"])})
    labels = [f"{n // 1000}k cells\n{t} thread{'s' if t > 1 else ''}" for n, t in keys]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    names = {"scvi": "scvi-tools AmortizedLDA", "atlasfit": "atlasfit"}
    for i, tool in enumerate(("scvi", "atlasfit")):
        for j, (n, t) in enumerate(keys):
            g = df[(df["tool"] == tool) & (df["n_train"] == n) & (df["threads"] == t)]
            x = j + (i - 0.5) * 0.3
            axes[0].scatter([x] * len(g), g["cells_per_s"], color=f"C{i}", label=names[tool] if j == 0 else None)
            axes[2].scatter([x] * len(g), g["ll_mc"], color=f"C{i}", label=names[tool] if j == 0 else None)
    for j, (n, t) in enumerate(keys):
        g = df[(df["n_train"] == n) & (df["threads"] == t)]
        s, f = g[g["tool"] == "scvi"], g[g["tool"] == "atlasfit"]
        ratios = [float(f[f["rep"] == r]["cells_per_s"].iloc[0] / s[s["rep"] == r]["cells_per_s"].iloc[0])
                  for r in sorted(set(s["rep"]) & set(f["rep"]))]
        axes[1].scatter([j] * len(ratios), ratios, color="C2")
        axes[1].hlines(np.median(ratios), j - 0.25, j + 0.25, colors="C2")
        axes[2].hlines(planted[n], j - 0.4, j + 0.4, colors="k", linestyles="--",
                       label="planted parameters" if j == 0 else None)
    axes[1].axhline(1.5, color="k", ls=":", lw=1, label="target 1.5x")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xticks(np.arange(len(keys)), labels)
        ax.set_xlim(-0.6, len(keys) - 0.4)
    axes[0].set_ylabel("cells / s (median over epochs)")
    axes[0].set_title("epoch throughput per run, batch 256")
    axes[1].set_ylim(bottom=0)
    axes[1].set_ylabel("atlasfit / scvi cells per s")
    axes[1].set_title("ratio per interleaved pair (bar: median)")
    axes[2].set_ylabel("held-out log-likelihood per token")
    axes[2].set_title("held-out per-token LL (MC means)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.suptitle("atlasfit topic model vs scvi-tools AmortizedLDA "
                 "(same model, same planted data; shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description="atlasfit topic model vs scvi-tools AmortizedLDA")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000])
    ap.add_argument("--epochs", type=int, nargs="*", default=[10, 3], help="one per size (or one for all)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=2_000)
    ap.add_argument("--n-topics", type=int, default=10)
    ap.add_argument("--n-hidden", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--tag", default="topic_vs_scvi")
    ap.add_argument("--workdir", default="/tmp/atlasfit_topic_vs_scvi")
    ap.add_argument("--profile", action="store_true", help="also write the cProfile of one atlasfit epoch")
    ap.add_argument("--profile-only", action="store_true")
    ap.add_argument("--rescore", action="store_true",
                    help="only add topic-recovery columns to results/<tag>.csv from the estimates in --workdir")
    a = ap.parse_args(argv)
    if a.worker:
        if a.epochs and isinstance(a.epochs, list):
            a.epochs = a.epochs[0]
        return atlasfit_worker(a)
    res_dir = os.path.join(_HERE, "results")
    os.makedirs(res_dir, exist_ok=True)
    if a.rescore:
        return rescore(a.tag, a.workdir, a.seed, a.n_topics)
    if a.profile or a.profile_only:
        os.environ.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        # BLAS reads the variables when it loads; numpy is already loaded here, so profile in a child
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {_ROOT!r}); "
                        "from benchmarks.bench_topic_vs_scvi import profile_epoch; "
                        f"profile_epoch(20000, {os.path.join(res_dir, 'topic_vs_scvi_profile.txt')!r})"],
                       env=_thread_env(1), check=True)
        if a.profile_only:
            return
    import pandas as pd

    from benchmarks.bench_topic_planted import planted_topic_atlas, planted_per_token_ll

    cmd = "python benchmarks/bench_topic_vs_scvi.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    epochs = a.epochs if len(a.epochs) == len(a.sizes) else [a.epochs[0]] * len(a.sizes)
    os.makedirs(a.workdir, exist_ok=True)
    rows, planted = [], {}
    for n, ep in zip(a.sizes, epochs):
        atlas = planted_topic_atlas(n, a.n_test, n_peaks=0, n_topics=a.n_topics, seed=a.seed)
        planted[n] = planted_per_token_ll(atlas, "rna")
        npz = os.path.join(a.workdir, f"data_{n}.npz")
        write_npz(atlas, npz)
        Xte, phi_true = atlas.x_test["rna"], atlas.phi["rna"]
        del atlas
        for t in a.threads:
            for rep in range(a.reps):
                for tool in ("scvi", "atlasfit"):  # interleaved: A B A B
                    out = os.path.join(a.workdir, f"{tool}_{n}_{t}_{rep}.json")
                    r = _run(tool, npz, out, threads=t, epochs=ep, n_topics=a.n_topics, lr=a.lr,
                             batch_size=a.batch_size, seed=a.seed + rep, eval_samples=a.eval_samples)
                    es = np.asarray(r["epoch_s"])
                    row = {"n_train": n, "n_test": a.n_test, "n_features": 2000, "n_topics": a.n_topics,
                           "tool": tool, "threads": t, "rep": rep, "epochs": ep, "batch_size": a.batch_size,
                           "lr": a.lr, "median_epoch_s": float(np.median(es)), "first_epoch_s": float(es[0]),
                           "cells_per_s": n / float(np.median(es)), "train_wall_s": r["train_wall_s"],
                           "process_wall_s": r["process_wall_s"], "epoch_s": " ".join(f"{v:.3f}" for v in es)}
                    row.update(_score(out, Xte, phi_true))
                    row["ll_planted"] = planted[n]
                    row["command"] = cmd
                    rows.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                           if k not in ("command", "epoch_s")}, flush=True)
                    pd.DataFrame(rows).to_csv(os.path.join(res_dir, f"{a.tag}.csv"), index=False)
    df = pd.DataFrame(rows)
    sm = summarise(df, a.reps, cmd)
    sm.to_csv(os.path.join(res_dir, f"{a.tag}_summary.csv"), index=False)
    plot(df, planted, os.path.join(res_dir, f"{a.tag}.png"))
    print(sm.drop(columns=["command"]).to_string(index=False))
    print("reproduce:", cmd)


if __name__ == "__main__":
    main()
