"""The planted topic atlas of :func:`~atlasfit.datasets.planted_topic_atlas`, written straight into an
atlas store sample by sample (atlas-size benchmarks: 10^6 cells on a small machine).

Layout of what :func:`write_planted_topic_store` writes:

* ``<path>`` — a sample-chunked atlas store (:func:`atlasfit.io.write_atlas`) with the training cells
  only: modalities ``rna`` (counts, CSR float32) and ``atac`` (0/1 peaks, CSR float32, store kind
  ``"counts"`` by default, see ``peaks_kind``), obs ``sample``, obsm ``theta_true`` (float32, the
  planted :math:`\\theta_n`).
* ``<path>.planted.npz`` (:func:`planted_store_side_path`) — the held-out cells (CSR parts per
  modality), their planted :math:`\\theta` and sample codes, and the planted parameters
  (:math:`\\phi_m`, the per-sample :math:`\\phi^{(s)}_m`, :math:`\\alpha_s`, sample names).
  :func:`read_planted_side` returns it as a :class:`~atlasfit.datasets.PlantedAtlas` whose test part
  is the held-out cells (its training part is empty), so
  :func:`~atlasfit.datasets._planted.planted_per_token_ll` scores it directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._planted import PlantedAtlas, _planted_params

__all__ = ["write_planted_topic_store", "iter_planted_topic_samples", "read_planted_side",
           "planted_store_side_path", "read_store_matrix"]

_CHUNK = 2000  # cells per generation block (rates are dense: chunk x features float64)


def planted_store_side_path(path) -> Path:
    """Path of the side file of a planted store: ``<path>.planted.npz`` (next to the store)."""
    p = Path(path)
    return p.with_name(p.name + ".planted.npz")


def _sample_sizes(n_cells: int, n_samples: int) -> np.ndarray:
    base = np.full(n_samples, n_cells // n_samples, dtype=np.int64)
    base[: n_cells % n_samples] += 1
    return base


def _draw_sample(rng, n, alpha, phis: dict, kinds: dict, lib_median, frag_median):
    """``n`` cells of one sample: theta (n, K) and {modality: CSR float32}, in blocks of ``_CHUNK``."""
    theta = rng.dirichlet(alpha, size=n)
    out = {m: [] for m in phis}
    for lo in range(0, n, _CHUNK):
        th = theta[lo: lo + _CHUNK]
        b = th.shape[0]
        for m, ph in phis.items():
            rho = th @ ph
            rho /= rho.sum(axis=1, keepdims=True)
            if kinds[m] == "counts":
                lib = np.maximum(np.rint(rng.lognormal(np.log(lib_median), 0.5, size=b)), 1).astype(np.int64)
                X = rng.multinomial(lib, rho)
            else:
                d = rng.lognormal(np.log(frag_median), 0.5, size=b)
                X = rng.poisson(d[:, None] * rho) > 0
            out[m].append(sp.csr_matrix(X, dtype=np.float32))
    return theta, {m: sp.vstack(v, format="csr") for m, v in out.items()}


def iter_planted_topic_samples(
    n_cells: int,
    *,
    n_samples: int = 4,
    n_topics: int = 10,
    n_genes: int = 2000,
    n_peaks: int = 5000,
    theta_alpha: float = 0.1,
    phi_alpha: float = 0.05,
    lib_median: float = 2000.0,
    frag_median: float = 200.0,
    seed: int = 0,
    held_out_fraction: float = 0.1,
):
    """Draw the planted topic atlas sample by sample.

    The parameters (:math:`\\phi_m`, :math:`\\phi^{(s)}_m`, :math:`\\alpha_s`) are those of
    :func:`~atlasfit.datasets.planted_topic_atlas` with the same ``seed``, ``n_samples``, sizes and
    concentrations, bit for bit. The cells follow the same model but are drawn per sample from the
    key ``(seed, 7, s)`` (``planted_topic_atlas`` draws a sample label per cell and then the cells
    of all samples interleaved, which cannot be streamed by sample), so they are other draws from the
    same distribution. Sample ``s`` (name ``f"s{s}"``) gets ``n_cells // n_samples`` cells (the first
    ``n_cells % n_samples`` samples one more); of those, the last ``round(held_out_fraction * n_s)``
    are held out.

    Yields
    ------
    ``(name, {modality: (theta, CSR)} for the training cells, (theta, {modality: CSR}) held out)``,
    plus, before the first sample, the parameters ``(modalities, kinds, phi, phi_sample, alpha)``.
    """
    if n_cells < n_samples or n_samples < 1:
        raise ValueError(f"need n_samples >= 1 and n_cells >= n_samples, got n_cells={n_cells}, n_samples={n_samples}")
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    modalities, kinds, phi, phi_s, alpha_s = _planted_params(n_genes, n_peaks, n_topics, n_samples,
                                                             theta_alpha, phi_alpha, seed)
    kinds = dict(zip(modalities, kinds))
    yield modalities, kinds, phi, phi_s, alpha_s
    for s, n_s in enumerate(_sample_sizes(n_cells, n_samples)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 7, s]))
        theta, X = _draw_sample(rng, int(n_s), alpha_s[s], {m: phi_s[m][s] for m in modalities}, kinds,
                                lib_median, frag_median)
        n_te = int(round(held_out_fraction * n_s))
        n_tr = int(n_s) - n_te
        if n_tr < 1:
            raise ValueError(f"sample s{s} would have no training cells ({n_s} cells, held_out_fraction="
                             f"{held_out_fraction}); use more cells or fewer samples")
        yield (f"s{s}", (theta[:n_tr], {m: x[:n_tr] for m, x in X.items()}),
               (theta[n_tr:], {m: x[n_tr:] for m, x in X.items()}))


def write_planted_topic_store(
    path,
    n_cells: int,
    *,
    n_samples: int,
    n_topics: int = 10,
    n_genes: int = 2000,
    n_peaks: int = 5000,
    seed: int = 0,
    held_out_fraction: float = 0.1,
    theta_alpha: float = 0.1,
    phi_alpha: float = 0.05,
    lib_median: float = 2000.0,
    frag_median: float = 200.0,
    peaks_kind: str = "counts",
    overwrite: bool = False,
) -> Path:
    """Write the planted RNA + peaks topic atlas into an atlas store, one sample at a time.

    Same generative model as :func:`~atlasfit.datasets.planted_topic_atlas` (its docstring), same
    planted parameters for the same arguments; the cells are drawn per sample (see
    :func:`iter_planted_topic_samples`). ``n_cells`` counts all drawn cells: the store holds the
    training cells, ``held_out_fraction`` of every sample's cells go to the side file
    ``<path>.planted.npz`` together with the planted parameters (:func:`read_planted_side`).

    Memory: one sample's cells (their CSR blocks and :math:`\\theta`) plus the held-out cells
    gathered so far and dense rates of 2,000 cells at a time; the store writer appends each sample
    and drops it. With ``n_cells=10**6`` use e.g. 32 samples and ``held_out_fraction=0.01``.

    Parameters
    ----------
    path
        Store directory to create (Zarr, atlas layout).
    n_cells
        Cells drawn (training + held out).
    n_samples
        Samples (shards of the topic model); sample ``s`` is named ``f"s{s}"``.
    n_topics, n_genes, n_peaks, theta_alpha, phi_alpha, lib_median, frag_median, seed
        As in :func:`~atlasfit.datasets.planted_topic_atlas` (``n_peaks=0``: RNA only).
    held_out_fraction
        Fraction of each sample's cells kept out of the store (0 allowed).
    peaks_kind
        Store kind of ``atac``: ``"counts"`` (default: CSR of 0/1 values, about 8 bytes per open peak;
        train it with ``likelihoods={"atac": "bernoulli"}``) or ``"binary"`` (the store's binary kind,
        dense float32: 4 bytes per cell and peak, 20 GB per 10^6 cells x 5,000 peaks before compression,
        and dense when read back).
    overwrite
        Replace an existing store (and side file).

    Returns
    -------
    pathlib.Path
        The store path.

    Examples
    --------
    >>> import tempfile, os
    >>> from atlasfit.io import open_atlas
    >>> p = write_planted_topic_store(os.path.join(tempfile.mkdtemp(), "p.zarr"), 300, n_samples=3,
    ...                               n_genes=20, n_peaks=30, n_topics=3)
    >>> open_atlas(p).samples["rna"].tolist(), read_planted_side(p).x_test["atac"].shape
    ([90, 90, 90], (30, 30))
    """
    import anndata as ad
    import pandas as pd

    from atlasfit.io import write_atlas

    if peaks_kind not in ("counts", "binary"):
        raise ValueError(f"peaks_kind {peaks_kind!r}: use 'counts' (CSR of 0/1) or 'binary' (dense)")
    path = Path(path).absolute()
    side = planted_store_side_path(path)
    if (path.exists() or side.exists()) and not overwrite:
        raise FileExistsError(f"write_planted_topic_store: '{path}' or its side file exists; pass overwrite=True")
    it = iter_planted_topic_samples(n_cells, n_samples=n_samples, n_topics=n_topics, n_genes=n_genes,
                                    n_peaks=n_peaks, theta_alpha=theta_alpha, phi_alpha=phi_alpha,
                                    lib_median=lib_median, frag_median=frag_median, seed=seed,
                                    held_out_fraction=held_out_fraction)
    modalities, kinds, phi, phi_s, alpha_s = next(it)
    var = {m: pd.DataFrame(index=pd.Index([f"{m}_{j}" for j in range(phi[m].shape[1])])) for m in modalities}
    held = {"theta": [], "sample": [], **{m: [] for m in modalities}}
    cats = [f"s{s}" for s in range(n_samples)]

    def stream():
        for s, (name, (th, X), (th_te, X_te)) in enumerate(it):
            obs = pd.DataFrame({"sample": pd.Categorical([name] * th.shape[0], categories=cats)},
                               index=pd.Index([f"{name}_c{j}" for j in range(th.shape[0])]))
            yield name, {m: ad.AnnData(X[m], obs=obs.copy(), var=var[m],
                                       obsm={"theta_true": th.astype(np.float32)}) for m in modalities}
            held["theta"].append(th_te)
            held["sample"].append(np.full(th_te.shape[0], s, dtype=np.int32))
            for m in modalities:
                held[m].append(X_te[m])

    store_kinds = {m: ("counts" if kinds[m] == "counts" else peaks_kind) for m in modalities}
    write_atlas(path, stream(), sample_key="sample", kinds=store_kinds, overwrite=overwrite)
    arrays = {
        "theta_test": np.concatenate(held["theta"], axis=0),
        "sample_test": np.concatenate(held["sample"]),
        "alpha_sample": alpha_s,
        "sample_names": np.asarray(cats),
        "modalities": np.asarray(modalities),
        "settings": np.asarray(json.dumps(dict(
            n_cells=int(n_cells), n_samples=int(n_samples), n_topics=int(n_topics), n_genes=int(n_genes),
            n_peaks=int(n_peaks), seed=int(seed), held_out_fraction=float(held_out_fraction),
            theta_alpha=float(theta_alpha), phi_alpha=float(phi_alpha), lib_median=float(lib_median),
            frag_median=float(frag_median), peaks_kind=peaks_kind,
            sample_sizes=[int(v) for v in _sample_sizes(n_cells, n_samples)]))),
    }
    for m in modalities:
        X = sp.vstack(held[m], format="csr") if held[m] else sp.csr_matrix((0, phi[m].shape[1]), dtype=np.float32)
        arrays[f"test_{m}_data"], arrays[f"test_{m}_indices"] = X.data, X.indices
        arrays[f"test_{m}_indptr"], arrays[f"test_{m}_shape"] = X.indptr, np.asarray(X.shape)
        arrays[f"phi_{m}"], arrays[f"phi_sample_{m}"] = phi[m], phi_s[m]
    tmp = side.with_name(side.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, side)
    return path


def read_planted_side(path) -> PlantedAtlas:
    """The side file of a planted store (``path``: the store or the ``.planted.npz`` itself) as a
    :class:`~atlasfit.datasets.PlantedAtlas`: ``x_test`` / ``theta_test`` / ``sample_test`` are the
    held-out cells (CSR float32), ``phi`` / ``phi_sample`` the planted parameters; the training part
    is empty (the training cells are in the store: :func:`read_store_matrix`). The generation
    settings are in ``atlas.settings`` (a dict)."""
    p = Path(path)
    if p.suffix != ".npz":
        p = planted_store_side_path(p)
    with np.load(p) as z:
        mods = [str(m) for m in z["modalities"]]
        x_test, phi, phi_s = {}, {}, {}
        for m in mods:
            x_test[m] = sp.csr_matrix((z[f"test_{m}_data"], z[f"test_{m}_indices"], z[f"test_{m}_indptr"]),
                                      shape=tuple(int(v) for v in z[f"test_{m}_shape"]))
            phi[m], phi_s[m] = z[f"phi_{m}"], z[f"phi_sample_{m}"]
        K = phi[mods[0]].shape[0]
        atlas = PlantedAtlas(
            {m: sp.csr_matrix((0, x_test[m].shape[1]), dtype=np.float32) for m in mods}, x_test,
            np.zeros(0, dtype=np.int32), z["sample_test"], np.zeros((0, K)), z["theta_test"], phi, phi_s)
        atlas.settings = json.loads(str(z["settings"]))
        atlas.sample_names = [str(s) for s in z["sample_names"]]
        atlas.alpha_sample = z["alpha_sample"]
    return atlas


def read_store_matrix(path, modality: str) -> sp.csr_matrix:
    """All training cells of one modality of a store as one CSR matrix (store row order), read sample
    by sample (for exporting a small planted store to other tools)."""
    from atlasfit.io import open_atlas

    atlas = open_atlas(path)
    counts = atlas.samples[modality]
    blocks = [atlas.read_block(modality, s) for s in counts.index[counts > 0]]
    return sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr")
