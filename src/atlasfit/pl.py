"""Plots for fitted models: convergence, embeddings, metagenes / top features, variance explained,
topic heatmaps and modality weights.

Functions take a fitted :class:`atlasfit.MultiGEDI` (or its pieces) and return the matplotlib Axes.
matplotlib is imported lazily (extra ``plot``).
"""

from __future__ import annotations

import numpy as np


def _axes(ax, figsize=(5, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _finish(ax, show):
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax


def convergence(model, which: str = "sigma2", *, ax=None, show: bool = True):
    """Plot the per-iteration trace of ``which`` (``"sigma2"``, ``"dZ"`` or ``"objective"``; for a
    GEDI also ``"dA"``, ``"dR"``) per modality.

    Parameters
    ----------
    model
        A fitted :class:`atlasfit.MultiGEDI` or :class:`atlasfit.GEDI` (its ``history_`` DataFrame:
        columns ``iteration``, the traced quantities and, for MultiGEDI, ``modality``), or that
        DataFrame itself (one line without a ``modality`` column).
    which
        Column of the history to plot; ``dZ``, ``dA``, ``dR`` and ``objective`` use a log scale.

    Examples
    --------
    >>> import pandas as pd, matplotlib
    >>> matplotlib.use("Agg")
    >>> h = pd.DataFrame({"iteration": [1, 2, 1, 2], "modality": ["a", "a", "b", "b"],
    ...                   "sigma2": [1.0, 0.5, 2.0, 1.5]})
    >>> ax = convergence(h, show=False)
    """
    hist = getattr(model, "history_", model)
    if which not in hist.columns:
        raise ValueError(f"convergence: {which!r} is not traced; choose one of "
                         f"{[c for c in hist.columns if c not in ('iteration', 'modality')]}")
    ax = _axes(ax)
    if "modality" in hist.columns:
        groups = hist.groupby("modality", sort=False)
    else:  # single-modality GEDI: one trace, labelled with its modality
        groups = [(getattr(model, "modality_", which), hist)]
    for mod, sub in groups:
        ax.plot(sub["iteration"], sub[which], marker="o", ms=3, label=str(mod))
    if which in ("dZ", "dA", "dR", "objective") and (hist[which] > 0).all():
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel(which)
    name = type(model).__name__ if hasattr(model, "history_") else "MultiGEDI"
    ax.set_title(f"{name} convergence: {which}")
    ax.legend(fontsize=8)
    return _finish(ax, show)


def embedding(coords, labels=None, *, ax=None, title: str | None = None, s: float = 3.0,
              show: bool = True, max_legend: int = 30):
    """Scatter 2-D coordinates (e.g. the first two columns of ``X_multigedi_pca``, or a UMAP).

    Examples
    --------
    >>> import numpy as np, matplotlib
    >>> matplotlib.use("Agg")
    >>> ax = embedding(np.random.default_rng(0).normal(size=(50, 2)), np.repeat(["a", "b"], 25),
    ...                show=False)
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"embedding: coords must be (cells, >=2), got shape {coords.shape}")
    ax = _axes(ax)
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=s, lw=0)
    else:
        labels = np.asarray(labels).astype(str)
        cats = list(dict.fromkeys(labels.tolist()))
        import matplotlib.pyplot as plt

        cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
        for i, c in enumerate(cats):
            m = labels == c
            ax.scatter(coords[m, 0], coords[m, 1], s=s, lw=0, color=cmap(i % cmap.N), label=c)
        if len(cats) <= max_legend:
            ax.legend(fontsize=6, markerscale=3, ncol=2 if len(cats) > 12 else 1, frameon=False,
                      loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "embedding")
    return _finish(ax, show)


def _scaled_metagenes(model, modality: str | None, who: str):
    """(Z·diag(D), feature names, modality name) of a fitted MultiGEDI (``modality`` needed) or GEDI
    (its one modality; ``modality`` optional)."""
    if hasattr(model, "feature_names"):  # MultiGEDI: per-modality getters
        if modality is None:
            raise ValueError(f"{who}: give the modality, one of {list(model.config.names)}")
        Z = np.asarray(model.get_Z(modality)) * np.asarray(model.get_D(modality))[None, :]
        return Z, np.asarray(model.feature_names(modality)), str(modality)
    if modality is not None and str(modality) != str(model.modality_):  # GEDI: one modality
        raise ValueError(f"{who}: the GEDI model was fitted on modality {model.modality_!r}, not {modality!r}")
    Z = np.asarray(model.get_Z()) * np.asarray(model.get_D())[None, :]
    return Z, np.asarray(model.feature_names_), str(model.modality_)


def top_features(model, modality: str | None = None, n_top: int = 10):
    """Top features per factor of ``modality`` by absolute value of Z·diag(D) (a DataFrame: factors x rank).

    ``model`` is a fitted :class:`atlasfit.MultiGEDI` (``modality`` needed) or :class:`atlasfit.GEDI`
    (``modality`` may be left out).

    Examples
    --------
    See :func:`metagenes`.
    """
    import pandas as pd

    Z, names, _ = _scaled_metagenes(model, modality, "top_features")
    order = np.argsort(-np.abs(Z), axis=0)[:n_top]
    return pd.DataFrame(
        {f"factor{k}": [f"{names[j]} ({Z[j, k]:+.2f})" for j in order[:, k]] for k in range(Z.shape[1])}
    ).T


def metagenes(model, modality: str | None = None, n_top: int = 5, *, ax=None, show: bool = True):
    """Heatmap of Z·diag(D) of ``modality`` restricted to the top features of every factor.

    ``model`` is a fitted :class:`atlasfit.MultiGEDI` (``modality`` needed) or :class:`atlasfit.GEDI`.

    Examples
    --------
    >>> import numpy as np, anndata as ad, matplotlib
    >>> matplotlib.use("Agg")
    >>> import atlasfit
    >>> a = ad.AnnData(np.random.default_rng(0).poisson(2.0, (60, 12)).astype(float))
    >>> a.obs["sample"] = np.repeat(["s1", "s2", "s3"], 20)
    >>> m = atlasfit.GEDI(K=2, sample_key="sample").fit(a, max_iterations=2, progress=False)
    >>> ax = metagenes(m, n_top=3, show=False)
    >>> top_features(m, n_top=2).shape
    (2, 2)
    """
    Z, names, modality = _scaled_metagenes(model, modality, "metagenes")
    idx = list(dict.fromkeys(np.argsort(-np.abs(Z), axis=0)[:n_top].T.ravel().tolist()))
    ax = _axes(ax, figsize=(0.5 * Z.shape[1] + 2, 0.18 * len(idx) + 1.5))
    lim = np.abs(Z[idx]).max() or 1.0
    im = ax.imshow(Z[idx], aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_yticks(range(len(idx)))
    ax.set_yticklabels(names[idx], fontsize=6)
    ax.set_xticks(range(Z.shape[1]))
    ax.set_xticklabels([str(k) for k in range(Z.shape[1])], fontsize=7)
    ax.set_xlabel("factor")
    ax.set_title(f"{modality}: metagenes (Z·D), top {n_top} per factor")
    ax.figure.colorbar(im, ax=ax, shrink=0.6)
    return _finish(ax, show)


def variance_explained(model, *, ax=None, show: bool = True):
    """Bar plot of the share d_k² / Σ d² of each singular value of the fitted signal (spec §7.1):
    the joint SVD of a :class:`atlasfit.MultiGEDI`, the SVD of Z·diag(D)·B of a :class:`atlasfit.GEDI`
    (:attr:`atlasfit.GEDI.singular_values_`)."""
    d = np.asarray(model.singular_values_)
    share = d**2 / np.sum(d**2)
    ax = _axes(ax)
    ax.bar(np.arange(len(d)), share)
    ax.set_xlabel("joint component" if hasattr(model, "feature_names") else "component")
    ax.set_ylabel("d² / Σd²")
    ax.set_title("variance explained per component")
    return _finish(ax, show)


def topic_heatmap(model, modality: str, n_top: int = 5, *, method: str = "probability", lambda_: float = 0.6,
                  topic_weights=None, include_background: bool = False, ax=None, show: bool = True):
    """Heatmap of a topic model's feature-topic distributions φ̂ of ``modality`` on the top
    ``n_top`` features of every topic, each feature row scaled to its maximum over topics.

    ``model`` is a trained :class:`atlasfit.MultimodalAmortizedLDA`. The features of each topic are
    chosen as :meth:`~atlasfit.MultimodalAmortizedLDA.get_top_features_per_topic` ranks them:
    ``method="probability"`` (raw φ̂, the default), ``"relevance"`` (LDAvis, weight ``lambda_``) or
    ``"lift"``; the specific rankings skip features that are frequent in every topic.

    Examples
    --------
    >>> import numpy as np, matplotlib
    >>> matplotlib.use("Agg")
    >>> from atlasfit import MultimodalAmortizedLDA
    >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
    ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
    >>> ax = topic_heatmap(m, "rna", 2, method="relevance", show=False)
    """
    phi = model.get_feature_topic_dist(modality, include_background=include_background)  # features x topics
    top = model.get_top_features_per_topic(modality, n_top, method=method, lambda_=lambda_,
                                           topic_weights=topic_weights, include_background=include_background)
    pos = {str(f): i for i, f in enumerate(np.asarray(phi.index).astype(str))}
    idx = list(dict.fromkeys(pos[f] for k in top.columns for f in top[k]))
    vals = np.asarray(phi.to_numpy(), dtype=float)
    sub = vals[idx]
    sub = sub / np.maximum(np.abs(sub).max(axis=1, keepdims=True), 1e-300)
    ax = _axes(ax, figsize=(0.5 * vals.shape[1] + 2, 0.18 * len(idx) + 1.5))
    im = ax.imshow(sub, aspect="auto", cmap="viridis", vmin=min(0.0, float(sub.min())), vmax=1)
    ax.set_yticks(range(len(idx)))
    ax.set_yticklabels(np.asarray(phi.index)[idx], fontsize=6)
    ax.set_xticks(range(vals.shape[1]))
    ax.set_xticklabels([str(c) for c in phi.columns], fontsize=7, rotation=90)
    ax.set_xlabel("topic")
    rank = method if method != "relevance" else f"relevance (λ={float(lambda_):g})"
    ax.set_title(f"{modality}: φ of the top {n_top} features per topic by {rank} (row-scaled)")
    ax.figure.colorbar(im, ax=ax, shrink=0.6)
    return _finish(ax, show)


def modality_weights(model, groupby=None, *, ax=None, show: bool = True):
    """Mean mixture weight of each modality per cell group (stacked bars; one bar without ``groupby``).

    ``groupby``: one label per cell of the model's data (e.g. ``mdata.obs["cell_type"]``), or None.
    """
    import pandas as pd

    w = model.get_modality_weights()
    if groupby is None:
        means = w.mean(axis=0).to_frame("all cells").T
    else:
        labels = np.asarray(groupby)
        if len(labels) != len(w):
            raise ValueError(f"modality_weights: groupby has {len(labels)} labels for {len(w)} cells")
        means = w.groupby(pd.Index(labels, name="group"), observed=True).mean()
    ax = _axes(ax, figsize=(0.4 * len(means) + 3, 3.5))
    bottom = np.zeros(len(means))
    for m in means.columns:
        ax.bar(np.arange(len(means)), means[m].to_numpy(), bottom=bottom, label=str(m))
        bottom += means[m].to_numpy()
    ax.set_xticks(np.arange(len(means)))
    ax.set_xticklabels([str(i) for i in means.index], rotation=90, fontsize=7)
    ax.set_ylabel("mean mixture weight")
    ax.set_title("modality weights")
    ax.legend(fontsize=7)
    return _finish(ax, show)
