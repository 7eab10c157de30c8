#!/usr/bin/env python
"""Time the reference MultiGEDI (PyPI ``multigedi`` 1.1.0) on one input.

Runs inside a PEER venv (``/work/peers/mg-sse3`` or ``/work/peers/mg-native``,
built by ``build_multigedi.sh``), never inside the atlasfit venv: atlasfit does
not depend on ``multigedi``. Peak memory is measured from outside with
``benchmarks/_rss.py::run_and_sample``; this script reports only its own
``ru_maxrss`` as a cross-check.

Input ``.npz`` (cells x features, one group of keys per modality ``<mod>``,
optionally under a common ``--prefix`` such as ``input/`` for the shared
fixtures):

* ``<mod>/X`` dense array, or CSR components ``<mod>/X/data``,
  ``<mod>/X/indices``, ``<mod>/X/indptr``, ``<mod>/X/shape`` (obs_type ``M``
  counts, or obs_type ``X`` values in {0, 1, NaN}, dense only);
* ``<mod>/M1`` and ``<mod>/M2`` in the same two forms (obs_type ``M_list``);
* ``<mod>/sample``: one sample label per cell (converted with ``str``);
* ``<mod>/cells`` (optional): global cell id per row. Default: row index, i.e.
  every modality holds the same cells in the same order.

Config JSON::

    {"K": 8, "mode": "Bsphere", "seed": 0, "iterations": 5, "num_threads": 2,
     "modalities": [{"name": "rna", "obs_type": "M", "orthoZ": true}, ...]}

Matrices are handed to the model exactly as in the fixtures' recipe
(``shared/fixtures/README.md``): features x cells, ``scipy.sparse`` CSC float64
for counts, dense float64 for ``X``; ``adjustD=True``, ``is_si_fixed=False``.

Outputs in ``OUT_DIR``:

* ``result.json``: timings (``add_modality_s``, ``setup_s``, ``initialize_s``,
  ``iter_s`` per sweep, ``median_iter_s``, ``iter_cpu_s`` / ``median_iter_cpu_s``
  (process CPU seconds, all threads), ``total_fit_s``), final ``sigma2``
  and the ``sigma2`` trace per modality, ``ru_maxrss_bytes``, shapes, versions;
* ``pca.npy``: joint PCA (N_total x K, rows = global cell id), computed with the
  package's own joint-SVD helper (the one ``multigedi.tl.multigedi`` uses);
* with ``--save-fit``: ``fit.npz`` holding ``<mod>/Z``, ``<mod>/D``,
  ``<mod>/o``, ``<mod>/sigma2`` and ``B/<sample>`` (K x N_g, cells in input
  order within the sample), plus ``pca_sample_grouped``.

Example::

    /work/peers/mg-sse3/bin/python benchmarks/peers/multigedi_ref_runner.py \
        data.npz config.json out/ --save-fit

Each sweep is a separate ``optimize(1)`` call; the fixtures README states that
this gives bit-identical states to one ``optimize(t)`` call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import scipy.sparse as sp


def _load_matrix(f, key: str) -> sp.csc_matrix | np.ndarray:
    """Return the cells x features matrix stored under ``key`` (dense or CSR parts)."""
    if key in f.files:
        return np.asarray(f[key])
    parts = [f"{key}/{p}" for p in ("data", "indices", "indptr", "shape")]
    missing = [p for p in parts if p not in f.files]
    if missing:
        raise KeyError(
            f"input has neither a dense '{key}' nor its CSR parts (missing {missing}); "
            "store a dense array or data/indices/indptr/shape"
        )
    data, indices, indptr, shape = (f[p] for p in parts)
    return sp.csr_matrix((data, indices, indptr), shape=tuple(int(s) for s in shape))


def _features_by_cells_counts(x, name: str, key: str) -> sp.csc_matrix:
    """Cells x features counts -> features x cells CSC float64 (fixtures' recipe)."""
    if sp.issparse(x):
        out = sp.csc_matrix(x.T, dtype=np.float64)
    else:
        out = sp.csc_matrix(np.asarray(x, dtype=np.float64).T)
    if out.nnz and (out.data.min() < 0 or not np.all(np.isfinite(out.data))):
        raise ValueError(
            f"modality '{name}' input '{key}' has negative or non-finite counts; "
            "obs_type M / M_list need finite counts >= 0"
        )
    return out


def _build_model(f, cfg: dict, prefix: str):
    import multigedi

    model = multigedi.MultiGEDIModel(
        K=int(cfg["K"]),
        mode=str(cfg.get("mode", "Bsphere")),
        seed=int(cfg.get("seed", 0)),
        num_threads=int(cfg.get("num_threads", 1)),
        verbose=0,
    )
    shapes, mod_cells, mod_samples = {}, {}, {}
    for mcfg in cfg["modalities"]:
        name, obs_type = mcfg["name"], mcfg["obs_type"]
        p = f"{prefix}{name}"
        samples = np.asarray([str(s) for s in f[f"{p}/sample"].tolist()])
        if obs_type == "M":
            data = _features_by_cells_counts(_load_matrix(f, f"{p}/X"), name, f"{p}/X")
            J, N = data.shape
        elif obs_type == "M_list":
            m1 = _features_by_cells_counts(_load_matrix(f, f"{p}/M1"), name, f"{p}/M1")
            m2 = _features_by_cells_counts(_load_matrix(f, f"{p}/M2"), name, f"{p}/M2")
            if m1.shape != m2.shape:
                raise ValueError(f"modality '{name}': M1 {m1.shape} and M2 {m2.shape} differ")
            data = (m1, m2)
            J, N = m1.shape
        elif obs_type == "X":
            x = _load_matrix(f, f"{p}/X")
            x = x.toarray() if sp.issparse(x) else x
            data = np.asfortranarray(np.asarray(x, dtype=np.float64).T)
            J, N = data.shape
        else:
            raise ValueError(
                f"modality '{name}': obs_type {obs_type!r} unsupported; use 'M', 'M_list' or 'X'"
            )
        if samples.shape[0] != N:
            raise ValueError(
                f"modality '{name}': {samples.shape[0]} sample labels for {N} cells"
            )
        cells = (
            np.asarray(f[f"{p}/cells"], dtype=np.int64)
            if f"{p}/cells" in f.files
            else np.arange(N, dtype=np.int64)
        )
        model.add_modality(
            name,
            data,
            samples,
            obs_type=obs_type,
            orthoZ=bool(mcfg.get("orthoZ", True)),
            adjustD=True,
            is_si_fixed=False,
        )
        del data
        shapes[name] = {"J": int(J), "N": int(N), "obs_type": obs_type}
        mod_cells[name], mod_samples[name] = cells, samples
    return model, shapes, mod_cells, mod_samples


def _sample_grouped_cells(model, cfg, mod_cells, mod_samples) -> np.ndarray:
    """Global cell ids in the package's sample-grouped row order."""
    out = []
    for g in model.global_sample_names:
        for mcfg in cfg["modalities"]:
            s = mod_samples[mcfg["name"]]
            sel = s == g
            if sel.any():
                out.append(mod_cells[mcfg["name"]][sel])
                break
    return np.concatenate(out)


def _joint_pca(model, names):
    """Joint PCA V diag(d) from the package's own helper (sample-grouped rows)."""
    from multigedi.tools._embeddings import _compute_multimodal_svd

    model_dict = {"joint": {"Bi": model.get_shared_Bi()}}
    for n in names:
        model_dict[n] = {"Z": model.get_Z(n), "D": model.get_D(n)}
    svd = _compute_multimodal_svd(model_dict, modality="joint")
    return svd["v"] * svd["d"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="input .npz")
    ap.add_argument("config", help="config .json")
    ap.add_argument("out_dir", help="output folder (created)")
    ap.add_argument("--prefix", default="", help="key prefix in the npz, e.g. 'input/'")
    ap.add_argument("--save-fit", action="store_true", help="also write fit.npz (Z, D, o, B)")
    args = ap.parse_args(argv)

    with open(args.config) as fh:
        cfg = json.load(fh)
    for k in ("K", "iterations", "modalities"):
        if k not in cfg:
            raise KeyError(f"config {args.config!r} lacks '{k}'")
    os.makedirs(args.out_dir, exist_ok=True)
    import multigedi

    t_start = time.perf_counter()
    f = np.load(args.input, allow_pickle=False)
    t0 = time.perf_counter()
    model, shapes, mod_cells, mod_samples = _build_model(f, cfg, args.prefix)
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.setup()
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.initialize()
    t_init = time.perf_counter() - t0

    names = [m["name"] for m in cfg["modalities"]]
    iter_s, iter_cpu_s, sigma2_trace = [], [], {n: [] for n in names}
    for _ in range(int(cfg["iterations"])):
        t0, c0 = time.perf_counter(), time.process_time()
        model.optimize(1, track_interval=1)
        iter_s.append(time.perf_counter() - t0)
        # CPU seconds of all threads: robust to other load on a shared machine.
        iter_cpu_s.append(time.process_time() - c0)
        for n in names:
            sigma2_trace[n].append(model.get_sigma2(n))
    t_fit = t_add + t_setup + t_init + sum(iter_s)

    t0 = time.perf_counter()
    pca_grouped = _joint_pca(model, names)
    grouped_ids = _sample_grouped_cells(model, cfg, mod_cells, mod_samples)
    n_total = int(grouped_ids.max()) + 1
    pca = np.full((n_total, pca_grouped.shape[1]), np.nan)
    pca[grouped_ids] = pca_grouped
    t_pca = time.perf_counter() - t0
    np.save(os.path.join(args.out_dir, "pca.npy"), pca)

    if args.save_fit:
        fit = {"pca_sample_grouped": pca_grouped, "cells_sample_grouped": grouped_ids}
        for n in names:
            fit[f"{n}/Z"] = model.get_Z(n)
            fit[f"{n}/D"] = model.get_D(n)
            fit[f"{n}/o"] = model.get_o(n)
            fit[f"{n}/sigma2"] = np.float64(model.get_sigma2(n))
        for g, b in zip(model.global_sample_names, model.get_shared_Bi()):
            fit[f"B/{g}"] = np.asarray(b)
        np.savez(os.path.join(args.out_dir, "fit.npz"), **fit)

    result = {
        "package": "multigedi",
        "version": getattr(multigedi, "__version__", "unknown"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "input": os.path.abspath(args.input),
        "config": cfg,
        "shapes": shapes,
        "N_total": n_total,
        "n_global_samples": len(model.global_sample_names),
        "add_modality_s": t_add,
        "setup_s": t_setup,
        "initialize_s": t_init,
        "iter_s": iter_s,
        "median_iter_s": float(np.median(iter_s)) if iter_s else None,
        "iter_cpu_s": iter_cpu_s,
        "median_iter_cpu_s": float(np.median(iter_cpu_s)) if iter_cpu_s else None,
        "total_fit_s": t_fit,
        "pca_s": t_pca,
        "wall_in_script_s": time.perf_counter() - t_start,
        "sigma2": {n: model.get_sigma2(n) for n in names},
        "sigma2_trace": sigma2_trace,
        # Linux reports ru_maxrss in KiB: this process only (no children).
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(os.path.join(args.out_dir, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(
        f"multigedi {result['version']}: init {t_init:.2f} s, "
        f"median {result['median_iter_s']} s/iter over {len(iter_s)} sweeps, "
        f"sigma2 {result['sigma2']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
