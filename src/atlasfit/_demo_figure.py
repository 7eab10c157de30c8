"""The demo's figure: UMAPs of the joint MultiGEDI embedding and of a plain PCA, coloured by sample and by
cell type (or Leiden cluster), with kNN mixing and purity figures, and the convergence trace.

Needs the ``plot`` extra (matplotlib, scanpy, igraph, leidenalg); imported only by :mod:`atlasfit._demo`.
"""

from __future__ import annotations

import numpy as np

#: neighbours per cell for the mixing / purity figures
KNN = 30


def knn_indices(X, k: int = KNN) -> np.ndarray:
    """The ``k`` nearest neighbours (exact, Euclidean) of every row of ``X``, the row itself excluded.

    Examples
    --------
    >>> knn_indices(np.array([[0.0], [1.0], [3.0], [10.0]]), 1).ravel().tolist()
    [1, 0, 1, 2]
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X, dtype=np.float64)
    k = int(min(k, X.shape[0] - 1))
    if k < 1:
        raise ValueError(f"knn_indices: need at least 2 cells, got {X.shape[0]}")
    # kneighbors() without a query leaves each point out of its own neighbourhood
    return NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=False)


def _codes(labels) -> np.ndarray:
    return np.unique(np.asarray(labels).astype(str), return_inverse=True)[1].ravel()


def _mean_entropy(idx: np.ndarray, codes: np.ndarray) -> float:
    n, k = idx.shape
    counts = np.zeros((n, int(codes.max()) + 1))
    np.add.at(counts, (np.repeat(np.arange(n), k), codes[idx].ravel()), 1.0)
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


def knn_mixing(idx: np.ndarray, batches, seed: int = 0) -> float:
    """Sample mixing of a kNN graph: the mean entropy of the sample labels among each cell's neighbours,
    divided by the same mean after a random permutation of the labels over the cells.

    0: every neighbourhood holds one sample; 1: neighbourhoods are as mixed as randomly drawn cells
    (an iLISI-like figure; the permutation removes the small-``k`` bias of the entropy). A sample-specific
    cell type lowers it even for a perfect integration.

    Examples
    --------
    >>> idx = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])   # two groups of three cells
    >>> knn_mixing(idx, ["a", "a", "a", "b", "b", "b"])      # every neighbourhood is one sample
    0.0
    >>> knn_mixing(idx, ["a", "b", "b", "a", "b", "b"]) > 0.5
    True
    """
    codes = _codes(batches)
    if codes.max() == 0:
        return 1.0
    h = _mean_entropy(idx, codes)
    h_rand = _mean_entropy(idx, np.random.default_rng(seed).permutation(codes))
    return h / h_rand if h_rand > 0 else float("nan")  # e.g. one neighbour: no entropy either way


def knn_purity(idx: np.ndarray, labels) -> float:
    """Label purity of a kNN graph: the mean share of each cell's neighbours that carry its label (1: pure).

    Examples
    --------
    >>> knn_purity(np.array([[1, 2], [0, 2], [0, 1]]), ["x", "x", "y"])   # (1/2 + 1/2 + 0) / 3
    0.3333333333333333
    """
    codes = _codes(labels)
    return float((codes[idx] == codes[:, None]).mean())


def palette(n: int) -> list:
    """``n`` distinguishable colours (scanpy's 20-, 28- and 102-colour palettes)."""
    from scanpy.plotting import palettes

    for pal in (palettes.default_20, palettes.default_28, palettes.default_102):
        if n <= len(pal):
            return list(pal[:n])
    return [palettes.default_102[i % len(palettes.default_102)] for i in range(n)]


def _natural(cats) -> list:
    return sorted(cats, key=lambda c: (0, int(c), "") if str(c).isdigit() else (1, 0, str(c)))


def umap_of(X, *, seed: int = 0, n_neighbors: int = 15, leiden_resolution: float | None = None):
    """UMAP coordinates of the rows of ``X`` through scanpy (exact kNN graph), and Leiden clusters of the
    same graph when ``leiden_resolution`` is given (else ``None``)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(obsm={"X_rep": np.asarray(X, dtype=np.float32)}, shape=(X.shape[0], 0))
    # exact neighbours (sklearn): deterministic, no pynndescent at any size
    sc.pp.neighbors(a, use_rep="X_rep", n_neighbors=n_neighbors, transformer="sklearn", random_state=seed)
    clusters = None
    if leiden_resolution is not None:
        sc.tl.leiden(a, resolution=leiden_resolution, flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed)
        clusters = a.obs["leiden"].astype(str).to_numpy()
    sc.tl.umap(a, random_state=seed)
    return a.obsm["X_umap"], clusters


def normalised_pca(counts, n_comps: int, seed: int = 0) -> np.ndarray:
    """The usual baseline: counts scaled to 10^4 per cell, log1p, PCA (``n_comps`` components)."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(counts.astype(np.float32))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.pca(a, n_comps=n_comps, random_state=seed)
    return a.obsm["X_pca"]


def _scatter(ax, xy, labels, cats, colours, title, s):
    order = np.random.default_rng(0).permutation(len(xy))  # no sample drawn last on top of the others
    lut = dict(zip(cats, colours))
    c = np.array([lut[v] for v in np.asarray(labels)[order]])
    ax.scatter(xy[order, 0], xy[order, 1], c=c, s=s, lw=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9.5)


def _convergence(ax, history):
    for mod, sub in history.groupby("modality", sort=False):
        s2 = sub["sigma2"].to_numpy(dtype=float)
        last = abs(s2[-1] - s2[-2]) / s2[-2] if len(s2) > 1 else float("nan")
        ax.plot(sub["iteration"], s2 / s2[0], lw=1.6, label=f"{mod}: σ² {s2[0]:.3g} → {s2[-1]:.3g} "
                f"(last step {100 * last:.2g}%)")
    ax.set_ylim(0, 1.3)  # the legend sits above the curves, which start at 1
    ax.set_xlabel("iteration")
    ax.set_ylabel("σ² / σ² at iteration 1")
    ax.set_title("MultiGEDI convergence: residual variance σ² per modality", fontsize=9.5)
    ax.legend(fontsize=7.5, frameon=False, loc="upper right")
    ax.grid(alpha=0.3)


def _bars(ax, scores: dict):
    names = list(scores)
    x = np.arange(2)
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [scores[n]["mixing"], scores[n]["purity"]]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * w, vals, w, label=n)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(["sample mixing\n(1 = as random cells)", "label purity\n(1 = pure)"], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"kNN figures ({KNN} neighbours per cell)", fontsize=9.5)
    ax.legend(fontsize=8, frameon=False, loc="upper left")


def demo_figure(png, *, joint, pca, samples, labels, label_name: str, history, title: str,
                joint_name: str, pca_name: str, note: str = "", seed: int = 0,
                leiden_resolution: float | None = None) -> dict:
    """Compute UMAPs and kNN figures for the joint embedding and the PCA baseline, draw the demo figure
    into ``png`` and return the figures.

    ``labels``: ground-truth cell types, or ``None`` for Leiden clusters of the joint embedding
    (``leiden_resolution``), used to colour both UMAPs and to score purity on both. ``note``: a line
    at the foot of the figure.
    """
    import matplotlib.pyplot as plt

    samples = np.asarray(samples).astype(str)
    umap_joint, clusters = umap_of(joint, seed=seed,
                                   leiden_resolution=leiden_resolution if labels is None else None)
    if labels is None:
        labels = clusters
    labels = np.asarray(labels).astype(str)
    umap_pca, _ = umap_of(pca, seed=seed)
    scores = {}
    for name, X in ((joint_name, joint), (pca_name, pca)):
        idx = knn_indices(X)
        scores[name] = {"mixing": knn_mixing(idx, samples, seed), "purity": knn_purity(idx, labels)}

    s_cats = _natural(set(samples.tolist()))
    l_cats = _natural(set(labels.tolist()))
    s_col, l_col = palette(len(s_cats)), palette(len(l_cats))
    size = float(np.clip(40_000 / len(samples), 0.3, 8.0))

    fig = plt.figure(figsize=(17, 9.2))
    gs = fig.add_gridspec(2, 4, width_ratios=[1, 1, 0.28, 1.15], wspace=0.08, hspace=0.22,
                          left=0.02, right=0.985, top=0.89, bottom=0.07)
    for r, (name, xy) in enumerate(((joint_name, umap_joint), (pca_name, umap_pca))):
        sc_ = scores[name]
        _scatter(fig.add_subplot(gs[r, 0]), xy, samples, s_cats, s_col,
                 f"{name}\nUMAP by sample ({len(s_cats)}): mixing {sc_['mixing']:.2f}", size)
        _scatter(fig.add_subplot(gs[r, 1]), xy, labels, l_cats, l_col,
                 f"{name}\nUMAP by {label_name}: purity {sc_['purity']:.2f}", size)
    leg = fig.add_subplot(gs[:, 2])
    leg.axis("off")
    handles = [plt.Line2D([], [], ls="", marker="o", ms=6, color=c) for c in l_col]
    leg.legend(handles, l_cats, title=label_name.replace(" (", "\n("), loc="center left", fontsize=8, title_fontsize=8.5,
               frameon=False, ncol=1 if len(l_cats) <= 30 else 2)
    _convergence(fig.add_subplot(gs[0, 3]), history)
    _bars(fig.add_subplot(gs[1, 3]), scores)
    fig.suptitle(title, fontsize=11.5)
    if note:
        fig.text(0.01, 0.012, note, fontsize=8.5, color="0.3", ha="left", va="bottom")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return scores
