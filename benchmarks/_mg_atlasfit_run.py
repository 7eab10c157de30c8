"""One atlasfit MultiGEDI fit on an atlas store, in its own process (so that the benchmark can sample
the summed RSS of this driver, the scheduler and the workers). Writes ``result.json`` + ``pca.npy``.

With ``"in_memory": true`` in the config: the user's in-memory default instead: the store is read
into a MuData (``mudata.read_zarr``, as a user holding an ``.h5mu`` would) and ``MultiGEDI.fit(mdata)``
runs without a client, in this process (the default engine: one thread per core).

    python benchmarks/_mg_atlasfit_run.py STORE CONFIG.json OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(store, config_path, out_dir):
    import atlasfit

    cfg = json.loads(Path(config_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mods = {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in cfg["modalities"]}
    if cfg.get("in_memory"):
        return fit_in_memory(store, cfg, mods, out)
    import distributed

    if cfg.get("profile"):  # workers from a cluster profile (e.g. SLURM jobs), cfg["workers"] of them
        from atlasfit.cluster import cluster_from_profile, wait_for_workers

        cluster = cluster_from_profile(cfg["profile"], overrides={"scale": {"n": cfg.get("workers", 2)}})
        client = distributed.Client(cluster)
        wait_for_workers(client, cfg.get("workers", 2), cfg.get("startup_timeout", 600), cluster)
    else:
        cluster = distributed.LocalCluster(
            n_workers=cfg.get("workers", 2), threads_per_worker=1, processes=True, dashboard_address=None,
            memory_limit=cfg.get("memory_limit", "10GiB"),
            env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
        client = distributed.Client(cluster)
        client.wait_for_workers(cfg.get("workers", 2))
    model = atlasfit.MultiGEDI(mods, K=cfg["K"], mode=cfg.get("mode", "Bsphere"), seed=cfg.get("seed", 0),
                               dtype=cfg.get("dtype", "float64"))
    stamps = []

    def cb(it, shared):
        stamps.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    model.fit(store, max_iterations=cfg["iterations"], client=client, progress=False, callback=cb,
              checkpoint_every=cfg.get("checkpoint_every"),
              checkpoint_dir=cfg.get("checkpoint_dir"))
    t_total = time.perf_counter() - t0
    # stamps[0] ends initialisation + iteration 1; later differences are single iterations
    iters = np.diff(stamps).tolist()
    init_s = stamps[0] - t0 if stamps else float("nan")
    rounds = np.asarray(getattr(model._engine, "round_times", []), dtype=float).reshape(-1, 2)
    # engine overhead: round wall time minus the busiest worker's compute time, over all rounds
    overhead = float((rounds[:, 0] - rounds[:, 1]).sum() / rounds[:, 0].sum()) if len(rounds) else float("nan")
    t_emb = time.perf_counter()
    pca = model.embedding()
    emb_s = time.perf_counter() - t_emb
    np.save(out / "pca.npy", pca)
    res = {
        "impl": "atlasfit", "dtype": cfg.get("dtype", "float64"), "workers": cfg.get("workers", 2),
        "iter_s": iters, "median_iter_s": float(np.median(iters)) if iters else float("nan"),
        "init_plus_first_iter_s": init_s, "total_fit_s": t_total, "export_s": emb_s,
        "sigma2": {m: model.get_sigma2(m) for m in mods},
        "engine_overhead_fraction": overhead, "n_rounds": int(len(rounds)),
        "checkpoint_bytes": getattr(model.checkpoint_info_, "n_bytes", None),
        "checkpoint_s": getattr(model.checkpoint_info_, "seconds", None),
    }
    (out / "result.json").write_text(json.dumps(res, indent=1))
    model.close()
    client.close()
    cluster.close()


def fit_in_memory(store, cfg, mods, out):
    """The in-memory default: ``MultiGEDI(...).fit(mdata)``, no client, no extra code."""
    import warnings

    import mudata

    import atlasfit

    t_read = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = mudata.read_zarr(str(store))
    read_s = time.perf_counter() - t_read
    model = atlasfit.MultiGEDI(mods, sample_key="sample", K=cfg["K"], mode=cfg.get("mode", "Bsphere"),
                               seed=cfg.get("seed", 0), dtype=cfg.get("dtype", "float64"))
    stamps = []
    t0 = time.perf_counter()
    model.fit(mdata, max_iterations=cfg["iterations"], progress=False,
              callback=lambda it, shared: stamps.append(time.perf_counter()) and False)
    t_total = time.perf_counter() - t0
    iters = np.diff(stamps).tolist()
    t_emb = time.perf_counter()
    pca = model.embedding()
    emb_s = time.perf_counter() - t_emb
    np.save(out / "pca.npy", pca)  # rows: the MuData's cells, i.e. the store's order (as the truth labels)
    res = {
        "impl": "atlasfit-memory", "dtype": cfg.get("dtype", "float64"), "engine": type(model._engine).__name__,
        "threads": getattr(model._engine, "n_threads", 1),
        "iter_s": iters, "median_iter_s": float(np.median(iters)) if iters else float("nan"),
        "init_plus_first_iter_s": stamps[0] - t0 if stamps else float("nan"), "total_fit_s": t_total,
        "read_s": read_s, "export_s": emb_s, "sigma2": {m: model.get_sigma2(m) for m in mods},
    }
    (out / "result.json").write_text(json.dumps(res, indent=1))
    model.close()


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main(*sys.argv[1:4])
