"""The multimodal topic model at atlas size, and side by side with topomics and scvi-tools (issue 10, item 6).

Data: the planted RNA + peaks topic atlas of :func:`atlasfit.datasets.planted_topic_atlas` (K = 10
topics, 2,000 genes with multinomial counts at a LogNormal(log 2000, 0.5) library, 5,000 binarised-
Poisson peaks at LogNormal(log 200, 0.5) fragments, Dir(0.1)-like cell topics tilted per sample,
small per-sample feature shifts), written sample by sample into a sample-chunked atlas store by
:func:`atlasfit.datasets.write_planted_topic_store` (peaks stored as CSR 0/1). ``--cells`` counts all
drawn cells; ``--held-out`` of each sample's cells stay out of the store and go to the side file
``<store>.planted.npz`` with the planted parameters. Stores are written once per setting under
``--data-dir`` (default ``$ATLASFIT_BENCH_DATA`` or ``/tmp/atlasfit_bench``) and reused.

Three modes (run them on a quiet machine; every run records the 1-minute load average before/after):

``--atlas`` (default ``--cells 1000000 --samples 32 --held-out 0.01 --epochs 3 --batch-size 1024``)
    Write (or reuse) the store, then in a fresh process train
    ``MultimodalAmortizedLDA.from_data(store, n_topics=10, likelihoods={"rna": "multinomial",
    "atac": "bernoulli"}, dtype="float32")`` with ``train(max_epochs=3, batch_size=1024,
    validation_fraction=0, client=Client(LocalCluster(n_workers=2, threads_per_worker=1)))``
    (``--workers 0``: serial engine). Writes ``topic_atlas_1m.csv`` (one row) and ``.png`` (RSS over
    time with the epoch ends; epoch times).
``--side-by-side`` (default ``--cells 100000 --samples 4 --held-out 0.1 --epochs 5``)
    The same planted model; the training cells are also exported as CSR ``.npz`` for the peers.
    One after another, each in its own process, peak RSS of its whole process tree sampled from
    outside every 0.1 s (``benchmarks/_rss.py``):

    1. ``atlasfit-serial``: atlasfit, serial engine, batch 1024, BLAS threads ``--threads`` (2);
    2. ``atlasfit-2w``: atlasfit on a 2-worker LocalCluster (1 thread each), batch 1024, default
       training settings (``steps_per_round`` 1; ``--steps-per-round`` changes it);
    3. ``topomics``: topomics 0.0.1 ``MultimodalAmortizedLDA`` on rna + atac, its defaults,
       batch 256, torch threads ``--threads`` (``benchmarks/peers/topomics_lda_runner.py``);
    4. ``scvi``: scvi-tools ``AmortizedLDA`` on rna only, batch 256, torch threads ``--threads``
       (``benchmarks/peers/scvi_lda_runner.py``);
    5. (ask with ``--runs``) the paths a user gets without choosing: ``atlasfit-default``, the store
       with ``train()`` and no client (the embedded LocalCluster), and ``atlasfit-memory``, the same
       cells as an in-memory MuData (``obs["sample"]``) with ``train()`` and no client (this process).

    ``--repeats N`` runs the list N times, interleaved (serial, 2 workers, serial, ...): every fit is a
    row of the CSV (column ``repeat``); the table, the ratios and the PNG use each run's median repeat.

    Same data and epochs for all; every learning rate at its library's default (atlasfit 1e-3,
    topomics 1e-3, scvi-tools 1e-3) unless ``--lr`` is given (then all use it). Writes
    ``topic_side_by_side.csv`` and ``.png`` and prints the ratios (atlasfit / topomics throughput,
    peak-RSS ratio, atlasfit 2 workers / serial).
``--driver-rss`` (default ``--cells 60000 --samples 4 --epochs 2``, nothing held out)
    2-worker LocalCluster, train 2 epochs; the driver's RSS before ``train()`` and its peak during
    ``train()`` (a sampling thread in the driver, every 0.05 s), against the issue's target "driver
    RSS grows by <= 300 MB during training on a 60k-cell store". Writes ``topic_driver_rss.csv``.

Commands (real runs; ``--tag`` / ``--results-dir`` rename the outputs)::

    python benchmarks/bench_topic_atlas.py --atlas
    python benchmarks/bench_topic_atlas.py --side-by-side
    python benchmarks/bench_topic_atlas.py --driver-rss
    python benchmarks/bench_topic_atlas.py --pool benchmarks/results/a.csv,benchmarks/results/b.csv
        # several --side-by-side runs pooled: paired ratios per pair -> topic_pooled_ratios.csv
    python benchmarks/bench_topic_atlas.py --side-by-side --cells 4000 --epochs 2 \\
        --results-dir /tmp/tiny --tag tiny      # a smoke test of every runner (timings meaningless)

Columns (one row per fit):

* ``run``, ``tool``, ``engine`` (serial / dask-2w / torch), ``n_train``, ``n_heldout``, ``epochs``,
  ``batch_size``, ``lr`` (empty: library default), ``dtype``, ``threads``;
* ``epoch_s``: wall seconds of every epoch (``;``-separated; atlasfit: between ``callback`` calls, the
  first from the start of ``train()``, so it includes the engine setup and the k-means start; peers:
  Lightning's epoch start/end); ``median_epoch_s``: median over epochs 2..E (epoch 1 when E = 1);
  ``cells_per_s`` = ``n_train / median_epoch_s``; ``first_epoch_s``; ``train_s`` (the whole
  ``train()`` call), ``load_s`` (``from_data`` / peer construction), ``eval_s`` (held-out inference),
  ``wall_s`` (the process);
* ``peak_rss_tree_mib``: peak summed RSS of the fit's whole process tree (driver + LocalCluster
  scheduler/nanny/worker processes), sampled from outside; ``peak_rss_driver_train_mib`` /
  ``rss_driver_before_train_mib`` / ``rss_driver_growth_train_mib`` (atlasfit only: the driver process
  alone, sampled in the driver), ``peak_rss_tree_train_mib`` (the tree during ``train()``, sampled
  in the driver);
* ``ll_rna_dc``: held-out RNA per-token log-likelihood by **document completion**: each held-out cell's
  counts are split 50/50 by binomial thinning (fixed seed); :math:`\\hat\\theta` is inferred from the
  observed half (with the cell's full peaks for the multimodal models) and the other half is scored,
  :math:`\\sum x\\log(\\hat\\theta\\hat\\phi)/\\sum x`; ``ll_rna_recon``: reconstruction (theta from the
  full cell, the full cell scored); ``ll_atac_recon``: the same formula on the open peaks (the ones of
  the held-out peak matrix as tokens, theta from the full cell; the "peaks LL" of docs/topic_model.md),
  multimodal models only. All three by ONE NumPy scorer in this script (:func:`per_token_ll`) from
  each library's :math:`\\hat\\theta` (Monte-Carlo means, ``--eval-samples`` draws: atlasfit
  ``get_latent_representation(held_out)`` / ``get_feature_topic_dist(m, include_background=True)``,
  topomics ``get_cell_topic_dist`` / ``get_feature_topic_dist``, scvi ``get_latent_representation`` /
  ``get_feature_by_topic``). ``oracle_*``: the same scorer on the planted :math:`\\theta` and the cells'
  sample-shifted planted :math:`\\phi`;
* ``rna_corr`` / ``atac_corr`` (and ``_min``): Hungarian-matched Pearson correlation of each topic's
  :math:`\\hat\\phi` with the planted :math:`\\phi` (``atlasfit.datasets.matched_correlation``), mean
  (worst) over the planted topics;
* ``load_before`` / ``load_after``: ``/proc/loadavg`` (1, 5, 15 min) around the fit.

Peers (own venvs, never atlasfit dependencies; recipes in ``/work/shared/peers/results_topic_peers.md``)::

    python3.12 -m venv /work/peers/topomics
    /work/peers/topomics/bin/pip install -U pip && /work/peers/topomics/bin/pip install topomics==0.0.1 torch-geometric
    python3.11 -m venv /work/peers/scvi
    /work/peers/scvi/bin/pip install torch==2.13.0 && /work/peers/scvi/bin/pip install scvi-tools

(``--py-topomics`` / ``--py-scvi`` or ``TOPOMICS_PEER_PYTHON`` / ``SCVI_PEER_PYTHON`` point elsewhere.)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

PY_TOPOMICS = os.environ.get("TOPOMICS_PEER_PYTHON", "/work/peers/topomics/bin/python")
PY_SCVI = os.environ.get("SCVI_PEER_PYTHON", "/work/peers/scvi/bin/python")
MIB = 2**20

MODES = {  # mode -> defaults
    "atlas": dict(cells=1_000_000, samples=32, held_out=0.01, epochs=3, tag="topic_atlas"),
    "side": dict(cells=100_000, samples=4, held_out=0.1, epochs=5, tag="topic_side_by_side"),
    "driver": dict(cells=60_000, samples=4, held_out=0.0, epochs=2, tag="topic_driver_rss"),
}


# --------------------------------------------------------------------------- small helpers


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def thread_env(t: int) -> dict:
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[v] = str(t)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def per_token_ll(theta, phi, X) -> float:
    """The shared scorer: :math:`\\sum_{nf}x_{nf}\\log(\\theta_n\\phi)_f/\\sum x` over the non-zeros of the
    sparse ``X`` (cells x features), ``theta`` (cells x K), ``phi`` (K x features), in float64."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X)
    theta = np.asarray(theta, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    total, tokens = 0.0, float(X.data.sum())
    for lo in range(0, X.shape[0], 4096):  # blocks of cells: the rates stay small
        Xb = X[lo: lo + 4096].tocoo()
        rate = np.einsum("ik,ki->i", theta[lo: lo + 4096][Xb.row], phi[:, Xb.col])
        total += float((Xb.data * np.log(np.clip(rate, 1e-300, None))).sum())
    return total / tokens if tokens else float("nan")


def oracle_ll(side, X, theta=None) -> float:
    """The scorer on the planted theta of the held-out cells and each cell's sample-shifted planted phi."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X)
    mod = "rna" if X.shape[1] == side.phi["rna"].shape[1] else "atac"
    theta = side.theta_test if theta is None else theta
    total = 0.0
    for s in np.unique(side.sample_test):
        rows = np.flatnonzero(side.sample_test == s)
        Xs = X[rows]
        total += per_token_ll(theta[rows], side.phi_sample[mod][s], Xs) * float(Xs.data.sum())
    return total / float(X.data.sum())


def matched(phi_hat, phi_true):
    from atlasfit.datasets import matched_correlation

    r, _ = matched_correlation(np.asarray(phi_hat, dtype=np.float64), phi_true)
    return float(np.mean(r)), float(np.min(r))


class RSSThread:
    """Samples this process's RSS and its whole tree's (driver + LocalCluster children) in a thread,
    keeping per-phase peaks and a coarse timeline."""

    def __init__(self, interval: float = 0.05, timeline_every: float = 0.5):
        import psutil

        self.proc = psutil.Process()
        self.interval, self.timeline_every = interval, timeline_every
        self.phase = "start"
        self.peaks: dict = {}
        self.timeline: list = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self):
        from benchmarks._rss import tree_rss

        d = self.proc.memory_info().rss
        t = tree_rss(self.proc)
        pk = self.peaks.setdefault(self.phase, [0, 0])
        pk[0], pk[1] = max(pk[0], d), max(pk[1], t)
        return d, t

    def _loop(self):
        last = -1e9
        while not self._stop.wait(self.interval):
            d, t = self.sample()
            now = time.perf_counter() - self._t0
            if now - last >= self.timeline_every:
                self.timeline.append((round(now, 3), d / MIB, t / MIB))
                last = now

    def set_phase(self, name):
        self.sample()
        self.phase = name
        d, t = self.sample()
        return d

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.sample()
        self._stop.set()
        self._thread.join()

    def now(self):
        return time.perf_counter() - self._t0


# --------------------------------------------------------------------------- data


def store_paths(a):
    name = f"planted_{a.cells}c_{a.samples}s_ho{a.held_out:g}_seed{a.seed}.zarr"
    store = os.path.join(a.data_dir, name)
    return store, store + ".planted.npz", store + ".export"


def worker_generate(a) -> None:
    """(own process) write the store + side file."""
    from atlasfit.datasets import write_planted_topic_store

    t0 = time.perf_counter()
    write_planted_topic_store(a.store, a.cells, n_samples=a.samples, n_topics=a.n_topics, seed=a.seed,
                              held_out_fraction=a.held_out, overwrite=True)
    print(json.dumps({"generate_s": time.perf_counter() - t0}))


def ensure_store(a) -> dict:
    from benchmarks._rss import run_and_sample

    store, side, _ = store_paths(a)
    info = {"store": store}
    if os.path.exists(os.path.join(store, "uns")) and os.path.exists(side) and not a.regenerate:
        print(f"reusing {store}", flush=True)
        info.update(generate_s=float("nan"), generate_peak_rss_mib=float("nan"))
        return info
    os.makedirs(a.data_dir, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "generate", "--store", store,
           "--cells", str(a.cells), "--samples", str(a.samples), "--held-out", str(a.held_out),
           "--seed", str(a.seed), "--n-topics", str(a.n_topics)]
    print(f"writing {store} ({a.cells} cells, {a.samples} samples) ...", flush=True)
    rc, wall, peak = run_and_sample(cmd, env=thread_env(1))
    if rc != 0:
        raise SystemExit(f"store generation failed (rc {rc})")
    print(f"  written in {wall:.1f} s, peak RSS {peak / MIB:.0f} MiB", flush=True)
    info.update(generate_s=wall, generate_peak_rss_mib=peak / MIB)
    return info


def export(a, train: bool) -> str:
    """Held-out cells (+ the DC split) and, with ``train``, the training cells as scipy ``.npz``."""
    import scipy.sparse as sp

    from atlasfit.datasets import read_planted_side
    from atlasfit.datasets._planted_store import read_store_matrix

    store, side_path, out = store_paths(a)
    os.makedirs(out, exist_ok=True)
    side = read_planted_side(side_path)
    if not os.path.exists(os.path.join(out, "rna_ho_hid.npz")):
        rng = np.random.default_rng(np.random.SeedSequence([a.seed, 11]))
        rna = side.x_test["rna"].tocsr()
        obs = rna.copy()
        obs.data = rng.binomial(rna.data.astype(np.int64), 0.5).astype(np.float32)
        hid = rna.copy()
        hid.data = (rna.data - obs.data).astype(np.float32)
        obs.eliminate_zeros()
        hid.eliminate_zeros()
        sp.save_npz(os.path.join(out, "rna_ho.npz"), rna)
        sp.save_npz(os.path.join(out, "atac_ho.npz"), side.x_test["atac"].tocsr())
        sp.save_npz(os.path.join(out, "rna_ho_obs.npz"), obs)
        sp.save_npz(os.path.join(out, "rna_ho_hid.npz"), hid)
    if train:
        for m in ("rna", "atac"):
            f = os.path.join(out, f"{m}_train.npz")
            if not os.path.exists(f):
                sp.save_npz(f, read_store_matrix(store, m))
    return out


# --------------------------------------------------------------------------- atlasfit fit (own process)


def memory_mudata(store: str):
    """The store's cells (every modality, store order) as an in-memory MuData with ``obs["sample"]``."""
    import anndata as ad
    import mudata as md
    import pandas as pd

    from atlasfit.datasets._planted_store import read_store_matrix
    from atlasfit.io import open_atlas

    counts = open_atlas(store).samples["rna"]
    labels = pd.Categorical(np.repeat(counts.index.astype(str), counts.to_numpy()))
    mods = {}
    for m in ("rna", "atac"):
        x = read_store_matrix(store, m)
        mods[m] = ad.AnnData(x, obs=pd.DataFrame({"sample": labels}, index=[f"c{i}" for i in range(x.shape[0])]))
    return md.MuData(mods)


def worker_atlasfit(a) -> None:
    """One atlasfit fit on the store: timings, driver/tree RSS by phase, held-out theta and phi."""
    rss = RSSThread().start()
    rec: dict = {"tool": "atlasfit", "load_before": loadavg()}
    import scipy.sparse as sp

    import atlasfit

    rec["rss_driver_start_mib"] = rss.set_phase("load") / MIB
    t0 = time.perf_counter()
    dkw = {} if a.dtype is None else {"dtype": a.dtype}  # None: the model's default dtype
    liks = {"rna": "multinomial", "atac": "bernoulli"}
    if a.in_memory:  # the store's training cells as an in-memory MuData (obs "sample"), as a user's
        model = atlasfit.MultimodalAmortizedLDA.from_mudata(
            memory_mudata(a.store), n_topics=a.n_topics, likelihoods=liks, sample_key="sample", **dkw)
    else:
        model = atlasfit.MultimodalAmortizedLDA.from_data(a.store, n_topics=a.n_topics, likelihoods=liks, **dkw)
    rec["load_s"] = time.perf_counter() - t0
    client = cluster = None  # --workers -1: the default (store: the embedded LocalCluster; in memory: this process)
    import atlasfit.engine

    if a.workers == 0 and hasattr(atlasfit.engine, "make_engine"):
        client = False  # in this process (a store's default is the embedded cluster); dff5f1b: None is serial
    if a.workers > 0:
        import distributed

        cluster = distributed.LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        client.wait_for_workers(a.workers)
    stamps: list = []

    def cb(epoch, record):
        stamps.append(time.perf_counter())
        rss.timeline.append((round(rss.now(), 3), float("nan"), float("nan")))  # epoch mark
        print(f"  epoch {epoch}: {stamps[-1] - (stamps[-2] if len(stamps) > 1 else t_train):.1f} s", flush=True)
        return False

    kw = {} if a.lr is None else {"lr": a.lr}
    if a.steps_per_round > 0:
        kw["steps_per_round"] = a.steps_per_round
    rec["rss_driver_before_train_mib"] = rss.set_phase("train") / MIB
    rec["t_train_start"] = rss.now()
    t_train = time.perf_counter()
    error = None
    try:
        model.train(max_epochs=a.epochs, batch_size=a.batch_size, validation_fraction=0.0, client=client,
                    progress=False, callback=cb, seed=a.seed, **kw)
    except Exception as e:  # noqa: BLE001 - recorded: the model is being reworked concurrently
        import traceback

        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    rec["train_s"] = time.perf_counter() - t_train
    rss.set_phase("eval")
    if cluster is not None:
        client.close()
        cluster.close()
    ep = [b - a_ for a_, b in zip([t_train] + stamps[:-1], stamps)]
    rec.update(epoch_s=ep, n_train=int(model.train_indices_.size) if error is None else None, error=error)
    if error is None and a.export:
        t0 = time.perf_counter()

        def load(name):
            return sp.load_npz(os.path.join(a.export, name)).tocsr()

        rna, atac, rna_obs = load("rna_ho.npz"), load("atac_ho.npz"), load("rna_ho_obs.npz")
        S = a.eval_samples
        arrays = {
            "theta_recon": model.get_latent_representation({"rna": rna, "atac": atac}, n_samples=S),
            "theta_dc": model.get_latent_representation({"rna": rna_obs, "atac": atac}, n_samples=S),
        }
        for m in ("rna", "atac"):
            arrays[f"phi_{m}"] = model.get_feature_topic_dist(m, include_background=True, n_samples=S).to_numpy().T
        rec["eval_s"] = time.perf_counter() - t0
        np.savez(os.path.splitext(a.out)[0] + ".npz", **arrays)
    rss.stop()
    pk = rss.peaks
    rec.update(
        peak_rss_driver_load_mib=pk["load"][0] / MIB, peak_rss_driver_train_mib=pk["train"][0] / MIB,
        peak_rss_tree_train_mib=pk["train"][1] / MIB,
        peak_rss_driver_eval_mib=pk.get("eval", [0, 0])[0] / MIB,
        rss_driver_growth_train_mib=pk["train"][0] / MIB - rec["rss_driver_before_train_mib"],
        timeline=rss.timeline, load_after=loadavg(), dtype=str(np.dtype(getattr(model, "dtype", a.dtype))),
        workers=a.workers,
        batch_size=a.batch_size, epochs=a.epochs, lr=a.lr, steps_per_round=a.steps_per_round,
        version=getattr(atlasfit, "__version__", ""),
    )
    with open(a.out, "w") as fh:
        json.dump(rec, fh, indent=1)


# --------------------------------------------------------------------------- driver side


def run_fit(label, cmd, env, out_json, a) -> dict:
    """Run one fit in its own process tree (RSS sampled from outside) and read its JSON."""
    from benchmarks._rss import run_and_sample

    before = loadavg()
    print(f"[{label}] load {before}: {' '.join(cmd[:3])} ...", flush=True)
    if os.path.exists(out_json):
        os.remove(out_json)
    rc, wall, peak = run_and_sample(cmd, env=env, timeout=a.timeout)
    after = loadavg()
    res = {}
    if os.path.exists(out_json):
        with open(out_json) as fh:
            res = json.load(fh)
    res.update(run=label, rc=rc, wall_s=wall, peak_rss_tree_mib=peak / MIB, load_before=before, load_after=after)
    if rc != 0 and not res.get("error"):
        res["error"] = f"exit code {rc}"
    print(f"[{label}] rc {rc}, {wall:.1f} s, peak tree RSS {peak / MIB:.0f} MiB, load after {after}", flush=True)
    return res


def atlasfit_cmd(a, store, export_dir, out, workers, epochs, batch_size, in_memory=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "atlasfit", "--store", store, "--out", out,
           "--workers", str(workers), "--epochs", str(epochs), "--batch-size", str(batch_size),
           *(["--in-memory"] if in_memory else []),
           "--eval-samples", str(a.eval_samples), "--seed", str(a.seed),
           "--n-topics", str(a.n_topics), "--steps-per-round", str(a.steps_per_round)]
    if a.dtype is not None:
        cmd += ["--dtype", a.dtype]
    if export_dir:
        cmd += ["--export", export_dir]
    if a.lr is not None:
        cmd += ["--lr", str(a.lr)]
    return cmd


def summarise(res: dict, side, export_dir, multimodal: bool) -> dict:
    """Timing summary + the shared scorer on the saved theta / phi."""
    import scipy.sparse as sp

    ep = res.get("epoch_s") or []
    res["first_epoch_s"] = ep[0] if ep else float("nan")
    tail = ep[1:] if len(ep) > 1 else ep
    res["median_epoch_s"] = float(np.median(tail)) if tail else float("nan")
    n = res.get("n_train")
    res["cells_per_s"] = n / res["median_epoch_s"] if n and tail else float("nan")
    npz = res.get("_npz")
    if side is None or export_dir is None or not npz or not os.path.exists(npz):
        return res
    z = dict(np.load(npz))
    rna = sp.load_npz(os.path.join(export_dir, "rna_ho.npz"))
    hid = sp.load_npz(os.path.join(export_dir, "rna_ho_hid.npz"))
    theta_recon = z.get("theta_recon", z.get("theta_mc"))
    theta_dc = z.get("theta_dc", z.get("theta_dc_mc"))
    phi_rna = z.get("phi_rna", z.get("phi_mc"))
    res["ll_rna_dc"] = per_token_ll(theta_dc, phi_rna, hid)
    res["ll_rna_recon"] = per_token_ll(theta_recon, phi_rna, rna)
    res["rna_corr"], res["rna_corr_min"] = matched(phi_rna, side.phi["rna"])
    if multimodal and "phi_atac" in z:
        atac = sp.load_npz(os.path.join(export_dir, "atac_ho.npz"))
        res["ll_atac_recon"] = per_token_ll(theta_recon, z["phi_atac"], atac)
        res["atac_corr"], res["atac_corr_min"] = matched(z["phi_atac"], side.phi["atac"])
    return res


def oracle(side, export_dir) -> dict:
    import scipy.sparse as sp

    rna = sp.load_npz(os.path.join(export_dir, "rna_ho.npz"))
    hid = sp.load_npz(os.path.join(export_dir, "rna_ho_hid.npz"))
    atac = sp.load_npz(os.path.join(export_dir, "atac_ho.npz"))
    return {"oracle_ll_rna_dc": oracle_ll(side, hid), "oracle_ll_rna_recon": oracle_ll(side, rna),
            "oracle_ll_atac_recon": oracle_ll(side, atac)}


COLUMNS = ["run", "tool", "engine", "n_train", "n_heldout", "epochs", "batch_size", "lr", "dtype", "threads",
           "median_epoch_s", "cells_per_s", "first_epoch_s", "epoch_s", "train_s", "load_s", "eval_s", "wall_s",
           "peak_rss_tree_mib", "peak_rss_tree_train_mib", "rss_driver_before_train_mib",
           "peak_rss_driver_train_mib", "rss_driver_growth_train_mib", "peak_rss_driver_load_mib",
           "ll_rna_dc", "ll_rna_recon", "ll_atac_recon", "oracle_ll_rna_dc", "oracle_ll_rna_recon",
           "oracle_ll_atac_recon", "rna_corr", "rna_corr_min", "atac_corr", "atac_corr_min",
           "generate_s", "generate_peak_rss_mib", "load_before", "load_after", "rc", "error", "repeat"]


def write_csv(path, rows, columns=COLUMNS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = dict(r)
            for k in ("epoch_s", "per_repeat"):
                if isinstance(r.get(k), list):
                    r[k] = ";".join(f"{v:.3f}" for v in r[k])
            for k, v in r.items():
                if isinstance(v, float):
                    r[k] = f"{v:.6g}"
            w.writerow(r)
    print(f"wrote {path}")


def _fmt(v, f="{:.3f}"):
    try:
        return f.format(v) if v is not None and np.isfinite(v) else "–"
    except (TypeError, ValueError):
        return "–"


def _median_runs(runs: list) -> dict:
    """``{run: row}`` with, for every run label, the repeat whose throughput is the median (the lower
    middle one for an even count), so that ratios compare medians of interleaved repeats."""
    out = {}
    for label in dict.fromkeys(r["run"] for r in runs):
        rows = sorted((r for r in runs if r["run"] == label), key=lambda r: (r.get("cells_per_s") or 0.0))
        out[label] = rows[(len(rows) - 1) // 2]
    return out


def run_side_by_side(a) -> None:
    from atlasfit.datasets import read_planted_side

    gen = ensure_store(a)
    store, side_path, _ = store_paths(a)
    exp = export(a, train=True)
    side = read_planted_side(side_path)
    orc = oracle(side, exp)
    n_ho = int(side.theta_test.shape[0])
    work = os.path.join(exp, "runs")
    os.makedirs(work, exist_ok=True)
    runs = []
    for rep, label in [(r, x) for r in range(a.repeats) for x in a.runs.split(",")]:  # interleaved repeats
        out = os.path.join(work, f"{label}.json")
        if label == "atlasfit-serial":
            cmd, env, meta = (atlasfit_cmd(a, store, exp, out, 0, a.epochs, a.batch_size_atlasfit),
                              thread_env(a.threads), dict(tool="atlasfit", engine="serial", threads=a.threads,
                                                          batch_size=a.batch_size_atlasfit))
        elif label == "atlasfit-2w":
            cmd, env, meta = (atlasfit_cmd(a, store, exp, out, 2, a.epochs, a.batch_size_atlasfit),
                              thread_env(1), dict(tool="atlasfit", engine="dask-2w", threads="2x1",
                                                  batch_size=a.batch_size_atlasfit))
        elif label == "atlasfit-default":  # the store, train() without a client: the embedded LocalCluster
            cmd, env, meta = (atlasfit_cmd(a, store, exp, out, -1, a.epochs, a.batch_size_atlasfit),
                              thread_env(a.threads), dict(tool="atlasfit", engine="default (embedded LocalCluster)",
                                                  threads="default", batch_size=a.batch_size_atlasfit))
        elif label == "atlasfit-memory":  # in-memory MuData, train() without a client: this process
            cmd, env, meta = (atlasfit_cmd(a, store, exp, out, -1, a.epochs, a.batch_size_atlasfit, in_memory=True),
                              thread_env(a.threads), dict(tool="atlasfit", engine="default (in process, in memory)",
                                                          threads=a.threads, batch_size=a.batch_size_atlasfit))
        elif label == "atlasfit-dff5f1b":  # the code before issue 10, serial, its own defaults (float64)
            if not a.baseline_src or not os.path.isdir(os.path.join(a.baseline_src, "atlasfit")):
                raise SystemExit("run atlasfit-dff5f1b needs --baseline-src DIR/src of a checkout of dff5f1b "
                                 "(git worktree add /tmp/atlasfit_dff5f1b dff5f1b)")
            import copy

            b = copy.copy(a)
            b.dtype = "float64"
            cmd = atlasfit_cmd(b, store, exp, out, 0, a.epochs, a.batch_size_atlasfit)
            env = thread_env(a.threads)
            env["PYTHONPATH"] = a.baseline_src + os.pathsep + env["PYTHONPATH"]
            meta = dict(tool="atlasfit@dff5f1b", engine="serial", threads=a.threads, batch_size=a.batch_size_atlasfit)
        elif label == "topomics":
            cmd = [a.py_topomics, os.path.join(_HERE, "peers", "topomics_lda_runner.py"), "--data", exp, "--out", out,
                   "--n-topics", str(a.n_topics), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size_peers),
                   "--threads", str(a.threads), "--seed", str(a.seed), "--eval-samples", str(a.eval_samples)]
            if a.lr is not None:
                cmd += ["--lr", str(a.lr)]
            env, meta = thread_env(a.threads), dict(tool="topomics 0.0.1", engine="torch", threads=a.threads,
                                                    batch_size=a.batch_size_peers)
        elif label == "scvi":
            cmd = [a.py_scvi, os.path.join(_HERE, "peers", "scvi_lda_runner.py"), "--data", exp, "--out", out,
                   "--n-topics", str(a.n_topics), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size_peers),
                   "--threads", str(a.threads), "--seed", str(a.seed), "--eval-samples", str(a.eval_samples)]
            cmd += ["--default-lr"] if a.lr is None else ["--lr", str(a.lr)]
            env, meta = thread_env(a.threads), dict(tool="scvi-tools AmortizedLDA (rna only)", engine="torch",
                                                    threads=a.threads, batch_size=a.batch_size_peers)
        else:
            raise SystemExit(f"unknown run {label!r}")
        res = run_fit(label, cmd, env, out, a)
        res.update(meta)
        res.setdefault("tool", meta["tool"])
        res["tool"] = meta["tool"]
        res["_npz"] = os.path.splitext(out)[0] + ".npz"
        res.update(n_heldout=n_ho, epochs=a.epochs, lr=a.lr,
                   dtype=res.get("dtype") or (a.dtype if label.startswith("atlasfit") else "float32"),
                   **orc, **{k: v for k, v in gen.items() if k != "store"})
        res = summarise(res, side, exp, multimodal=label != "scvi")
        res["repeat"] = rep
        runs.append(res)
    tag = a.tag or MODES["side"]["tag"]
    write_csv(os.path.join(a.results_dir, f"{tag}.csv"), runs)
    by = _median_runs(runs)  # one row per run: the repeat with the median throughput
    if a.repeats > 1:
        print("\nrepeats (cells/s): " + "; ".join(
            f"{x}: " + ", ".join(_fmt(r.get("cells_per_s"), "{:,.0f}") for r in runs if r["run"] == x) for x in by))
    all_runs, runs = runs, list(by.values())
    print("\n| run | s/epoch (median 2..E) | cells/s | peak RSS MiB | LL rna DC | LL rna recon | LL atac | rna r | atac r |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['run']} | {_fmt(r.get('median_epoch_s'), '{:.2f}')} | {_fmt(r.get('cells_per_s'), '{:,.0f}')} | "
              f"{_fmt(r.get('peak_rss_tree_mib'), '{:,.0f}')} | {_fmt(r.get('ll_rna_dc'))} | "
              f"{_fmt(r.get('ll_rna_recon'))} | {_fmt(r.get('ll_atac_recon'))} | {_fmt(r.get('rna_corr'))} | "
              f"{_fmt(r.get('atac_corr'))} |" + (f" ERROR {r['error']}" if r.get("error") else ""))
    print(f"| planted | | | | {_fmt(orc['oracle_ll_rna_dc'])} | {_fmt(orc['oracle_ll_rna_recon'])} | "
          f"{_fmt(orc['oracle_ll_atac_recon'])} | | |")

    pairs = ratio_rows(all_runs, by)
    write_csv(os.path.join(a.results_dir, f"{tag}_ratios.csv"), pairs, RATIO_COLUMNS)
    print("\nratios (of the median-throughput repeats; per repeat, repeat r over repeat r, in brackets):")
    for q in pairs:
        per = " / ".join(_fmt(x, "{:.2f}") for x in q["per_repeat"])
        print(f"  {q['numerator']} / {q['denominator']}: {q['quantity']} {_fmt(q['ratio'], '{:.2f}')}x"
              + (f" ({per})" if len(q["per_repeat"]) > 1 else ""))
    plot_side(runs, orc, os.path.join(a.results_dir, f"{tag}.png"), a)


#: The ratios the side-by-side run reports, where both runs are in it: (numerator, denominator, quantity).
RATIO_PAIRS = (
    ("atlasfit-serial", "atlasfit-dff5f1b", "cells_per_s"),
    ("atlasfit-serial", "topomics", "cells_per_s"),
    ("atlasfit-serial", "topomics", "peak_rss_tree_mib"),
    ("atlasfit-serial", "scvi", "cells_per_s"),
    ("atlasfit-2w", "topomics", "cells_per_s"),
    ("atlasfit-2w", "topomics", "peak_rss_tree_mib"),
    ("atlasfit-2w", "scvi", "cells_per_s"),
    ("atlasfit-2w", "atlasfit-serial", "cells_per_s"),
    ("atlasfit-default", "atlasfit-memory", "cells_per_s"),
    ("atlasfit-default", "atlasfit-serial", "cells_per_s"),
    ("atlasfit-memory", "atlasfit-serial", "cells_per_s"),
    ("atlasfit-memory", "topomics", "cells_per_s"),
    ("atlasfit-default", "topomics", "cells_per_s"),
    ("atlasfit-default", "topomics", "peak_rss_tree_mib"),
)


RATIO_COLUMNS = ["numerator", "denominator", "quantity", "ratio", "median_of_per_repeat", "per_repeat"]


def ratio_rows(runs: list, by: dict, pairs=RATIO_PAIRS) -> list:
    """One row per ``pairs`` entry (``(numerator, denominator, quantity)``) whose two runs were
    measured: the ratio of their median-throughput repeats (``by``) and, repeat by repeat, of the
    same repeat's two fits (interleaved, so they ran under the same conditions)."""
    rows = []
    for x, y, key in pairs:
        if x not in by or y not in by:
            continue

        def val(r):
            v = r.get(key)
            return float(v) if isinstance(v, (int, float)) else float("nan")

        reps = sorted({r["repeat"] for r in runs if r["run"] in (x, y)})
        per = []
        for rep in reps:
            num = [val(r) for r in runs if r["run"] == x and r["repeat"] == rep]
            den = [val(r) for r in runs if r["run"] == y and r["repeat"] == rep]
            per.append(num[0] / den[0] if num and den and den[0] else float("nan"))
        med = val(by[y])
        rows.append({"numerator": x, "denominator": y, "quantity": key,
                     "ratio": val(by[x]) / med if med else float("nan"), "per_repeat": per,
                     "median_of_per_repeat": float(np.nanmedian(per)) if per else float("nan")})
    return rows


def pool_results(paths: list, results_dir: str, tag: str) -> list:
    """Pool the fits of several side-by-side CSVs (each an interleaved run): for every
    :data:`RATIO_PAIRS` entry, over the repeats that measured both runs, the ratio of the two runs'
    median values and the ratios fit by fit within one CSV and repeat (the two fits ran back to back). Writes ``<tag>.csv`` (the pooled
    ratios, column ``n`` = paired repeats). Returns the rows."""
    runs = []
    for i, path in enumerate(paths):
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                row = {"run": r["run"], "repeat": f"{i}:{r.get('repeat') or 0}"}
                for k in ("cells_per_s", "peak_rss_tree_mib"):
                    try:
                        row[k] = float(r[k])
                    except (KeyError, TypeError, ValueError):
                        row[k] = float("nan")
                runs.append(row)
    keys = ("cells_per_s", "peak_rss_tree_mib")

    def medians(rs):
        return {x: {k: float(np.nanmedian([r[k] for r in rs if r["run"] == x])) for k in keys}
                for x in dict.fromkeys(r["run"] for r in rs)}

    rows = []
    for x, y, key in RATIO_PAIRS:  # each pair over the repeats that measured both (never across files)
        both = {r["repeat"] for r in runs if r["run"] == x} & {r["repeat"] for r in runs if r["run"] == y}
        paired = [r for r in runs if r["repeat"] in both and r["run"] in (x, y)]
        for q in ratio_rows(paired, medians(paired), pairs=[(x, y, key)]):
            q["n"] = int(np.isfinite(q["per_repeat"]).sum())
            rows.append(q)
    by = medians(runs)
    write_csv(os.path.join(results_dir, f"{tag}.csv"), rows, RATIO_COLUMNS + ["n"])
    print(f"pooled {len(runs)} fits from {len(paths)} files:")
    for x, v in by.items():
        print(f"  {x}: median {_fmt(v['cells_per_s'], '{:,.0f}')} cells/s over "
              f"{sum(r['run'] == x for r in runs)} fits")
    for q in rows:
        print(f"  {q['numerator']} / {q['denominator']}: {q['quantity']} {_fmt(q['ratio'], '{:.3f}')}x "
              f"(median of {q['n']} paired repeats {_fmt(q['median_of_per_repeat'], '{:.3f}')}x, "
              f"min {_fmt(float(np.nanmin(q['per_repeat'])), '{:.2f}')}, max {_fmt(float(np.nanmax(q['per_repeat'])), '{:.2f}')})")
    return rows


def plot_side(runs, orc, path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["run"] for r in runs]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].bar(labels, [r.get("cells_per_s", np.nan) for r in runs], color="C0")
    ax[0].set_ylabel("training cells / s (median epoch 2..E)")
    ax[1].bar(labels, [r.get("peak_rss_tree_mib", np.nan) / 1024 for r in runs], color="C1")
    ax[1].set_ylabel("peak RSS of the process tree (GiB)")
    ax[2].plot(labels, [r.get("ll_rna_dc", np.nan) for r in runs], "o", color="C2", label="document completion")
    ax[2].plot(labels, [r.get("ll_rna_recon", np.nan) for r in runs], "x", color="C3", label="reconstruction")
    ax[2].axhline(orc["oracle_ll_rna_dc"], color="k", ls="--", lw=1, label="planted")
    vals = [r.get("ll_rna_dc", np.nan) for r in runs] + [orc["oracle_ll_rna_dc"]]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if vals:
        ax[2].set_ylim(min(vals) - 0.2, max(vals) + 0.1)
    ax[2].set_ylabel("held-out RNA LL / token")
    ax[2].legend(fontsize=8)
    for x in ax:
        x.tick_params(axis="x", rotation=20, labelsize=8)
    n = runs[0].get("n_train") or 0
    fig.suptitle(f"planted RNA + peaks atlas, {n:,} training cells, {a.epochs} epochs "
                 f"(atlasfit batch {a.batch_size_atlasfit}, peers 256)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def run_atlas(a, driver_mode: bool = False) -> None:
    from atlasfit.datasets import read_planted_side

    gen = ensure_store(a)
    store, side_path, _ = store_paths(a)
    side = read_planted_side(side_path)
    exp = export(a, train=False) if side.theta_test.shape[0] > 0 else None
    out = os.path.join(store + ".export", "runs", f"atlas_{a.workers}w.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = thread_env(1 if a.workers > 0 else a.threads)
    res = run_fit(f"atlasfit-{a.workers}w" if a.workers else "atlasfit-serial",
                  atlasfit_cmd(a, store, exp, out, a.workers, a.epochs, a.batch_size_atlasfit), env, out, a)
    res.update(tool="atlasfit", engine=f"dask-{a.workers}w" if a.workers else "serial",
               threads="2x1" if a.workers else a.threads, n_heldout=int(side.theta_test.shape[0]), epochs=a.epochs,
               lr=a.lr, batch_size=a.batch_size_atlasfit, _npz=os.path.splitext(out)[0] + ".npz",
               **{k: v for k, v in gen.items() if k != "store"})
    if exp is not None:
        res.update(oracle(side, exp))
    res = summarise(res, side, exp, multimodal=True)
    tag = a.tag or (MODES["driver"]["tag"] if driver_mode else
                    ("topic_atlas_1m" if a.cells == 1_000_000 else f"topic_atlas_{a.cells}"))
    write_csv(os.path.join(a.results_dir, f"{tag}.csv"), [res])
    print(f"\nepochs (s): {', '.join(_fmt(v, '{:.1f}') for v in res.get('epoch_s') or [])}; "
          f"{_fmt(res.get('cells_per_s'), '{:,.0f}')} cells/s (median epoch 2..E)")
    print(f"driver RSS before train {_fmt(res.get('rss_driver_before_train_mib'), '{:,.0f}')} MiB, peak during train "
          f"{_fmt(res.get('peak_rss_driver_train_mib'), '{:,.0f}')} MiB (growth "
          f"{_fmt(res.get('rss_driver_growth_train_mib'), '{:,.0f}')} MiB = "
          f"{_fmt((res.get('rss_driver_growth_train_mib') or np.nan) * MIB / 1e6, '{:,.0f}')} MB"
          + ("; target <= 300 MB)" if driver_mode else ")"))
    print(f"peak RSS all processes {_fmt(res.get('peak_rss_tree_mib'), '{:,.0f}')} MiB (sampled from outside), "
          f"during train {_fmt(res.get('peak_rss_tree_train_mib'), '{:,.0f}')} MiB")
    if exp is not None:
        print(f"held-out LL/token rna (DC) {_fmt(res.get('ll_rna_dc'))} vs planted {_fmt(res.get('oracle_ll_rna_dc'))}; "
              f"rna recon {_fmt(res.get('ll_rna_recon'))} vs {_fmt(res.get('oracle_ll_rna_recon'))}; atac "
              f"{_fmt(res.get('ll_atac_recon'))} vs {_fmt(res.get('oracle_ll_atac_recon'))}; matched r rna "
              f"{_fmt(res.get('rna_corr'))} (min {_fmt(res.get('rna_corr_min'))}), atac {_fmt(res.get('atac_corr'))} "
              f"(min {_fmt(res.get('atac_corr_min'))})")
    if res.get("error"):
        print(f"ERROR: {res['error']}")
    if not driver_mode:
        plot_atlas(res, os.path.join(a.results_dir, f"{tag}.png"), a)


def plot_atlas(res, path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = np.asarray([t for t in res.get("timeline", [])], dtype=float).reshape(-1, 3)
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    mark = np.isnan(tl[:, 1]) if tl.size else np.zeros(0, bool)
    ax[0].plot(tl[~mark, 0], tl[~mark, 2] / 1024, label="all processes (driver + workers)")
    ax[0].plot(tl[~mark, 0], tl[~mark, 1] / 1024, label="driver")
    if "t_train_start" in res:
        ax[0].axvline(res["t_train_start"], color="k", lw=0.8, ls=":", label="train() starts")
    for t in tl[mark, 0]:
        ax[0].axvline(t, color="grey", lw=0.8, ls="--")
    ax[0].set_xlabel("s since the fit process started (dashed: epoch ends)")
    ax[0].set_ylabel("RSS (GiB)")
    ax[0].legend(fontsize=8)
    ep = res.get("epoch_s") or []
    ax[1].bar([str(i + 1) for i in range(len(ep))], ep, color="C2")
    ax[1].set_xlabel("epoch (1 includes setup)")
    ax[1].set_ylabel("wall s")
    n = res.get("n_train") or 0
    fig.suptitle(f"atlasfit MultimodalAmortizedLDA, {n:,} training cells in {a.samples} samples, "
                 f"{res.get('engine')}, batch {a.batch_size_atlasfit}: "
                 f"{_fmt(res.get('cells_per_s'), '{:,.0f}')} cells/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--atlas", action="store_true", help="atlas-size fit on a 2-worker LocalCluster (default mode)")
    g.add_argument("--side-by-side", action="store_true", help="atlasfit serial / 2 workers vs topomics vs scvi")
    g.add_argument("--driver-rss", action="store_true", help="driver RSS growth during train() on a 60k store")
    g.add_argument("--pool", metavar="CSV,CSV,...", help="pool the fits of several --side-by-side CSVs: per-run medians "
                   "and paired per-repeat ratios, written to <tag>.csv (default tag topic_pooled_ratios)")
    g.add_argument("--worker", choices=["generate", "atlasfit"], help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, default=None, help="cells drawn (training + held out)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--held-out", type=float, default=None, help="fraction of each sample's cells held out")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n-topics", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every tool (default: each library's)")
    p.add_argument("--batch-size-atlasfit", type=int, default=1024)
    p.add_argument("--batch-size-peers", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="--atlas / --driver-rss: LocalCluster workers (0: serial)")
    p.add_argument("--steps-per-round", type=int, default=0, help="atlasfit: local steps per round (0: the model's default)")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads of serial atlasfit, torch threads of peers")
    p.add_argument("--dtype", default=None, help="atlasfit's dtype (default: the model's default)")
    p.add_argument("--eval-samples", type=int, default=1000, help="Monte-Carlo draws of theta / phi, every tool")
    p.add_argument("--runs", default="atlasfit-serial,atlasfit-2w,topomics,scvi")
    p.add_argument("--repeats", type=int, default=1,
                   help="--side-by-side: run the list this many times, interleaved; every fit is a CSV row "
                        "(column repeat), the table, ratios and PNG use each run's median-throughput repeat")
    p.add_argument("--data-dir", default=os.environ.get("ATLASFIT_BENCH_DATA", "/tmp/atlasfit_bench"))
    p.add_argument("--results-dir", default=os.path.join(_HERE, "results"))
    p.add_argument("--tag", default=None, help="output file stem")
    p.add_argument("--regenerate", action="store_true", help="rewrite the store even if it exists")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per fit before its tree is killed")
    p.add_argument("--py-topomics", default=PY_TOPOMICS)
    p.add_argument("--py-scvi", default=PY_SCVI)
    p.add_argument("--baseline-src", default=os.environ.get("ATLASFIT_BASELINE_SRC"),
                   help="src/ of a checkout of dff5f1b for the run atlasfit-dff5f1b (the code before issue 10)")
    # worker-only
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1024, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "generate":
        return worker_generate(a)
    if a.worker == "atlasfit":
        return worker_atlasfit(a)
    if a.pool:
        pool_results(a.pool.split(","), a.results_dir, a.tag or "topic_pooled_ratios")
        return
    mode = "side" if a.side_by_side else "driver" if a.driver_rss else "atlas"
    for k, v in MODES[mode].items():
        if k != "tag" and getattr(a, k.replace("-", "_")) is None:
            setattr(a, k, v)
    print(f"mode {mode}: {a.cells} cells, {a.samples} samples, held out {a.held_out}, {a.epochs} epochs; "
          f"load {loadavg()}", flush=True)
    if mode == "side":
        run_side_by_side(a)
    else:
        run_atlas(a, driver_mode=mode == "driver")


if __name__ == "__main__":
    main()
