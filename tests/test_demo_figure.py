"""The demo figure's kNN figures (sample mixing, label purity) on planted neighbourhoods, and the figure
itself on a small planted embedding (issue 12)."""

from __future__ import annotations

import doctest

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scanpy")

from atlasfit import _demo_figure  # noqa: E402
from atlasfit._demo_figure import knn_indices, knn_mixing, knn_purity  # noqa: E402


def _planted(n_per=60, seed=0):
    """Three well-separated cell types (centres 20 apart, unit noise) in 2 dimensions; four samples
    spread evenly over every type (cell i is in sample i mod 4)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    types = np.repeat(np.arange(3), n_per)
    X = centres[types] + rng.normal(size=(3 * n_per, 2))
    samples = np.arange(3 * n_per) % 4
    return X, types, samples


def test_docstring_examples():
    res = doctest.testmod(_demo_figure, verbose=False)
    assert res.attempted > 0 and res.failed == 0, res


def test_mixing_and_purity_on_planted_neighbourhoods():
    X, types, samples = _planted()
    idx = knn_indices(X, 30)
    assert idx.shape == (180, 30) and not (idx == np.arange(180)[:, None]).any()  # self excluded
    # planted: types 20 sd apart, so every neighbour (30 < 60 cells per type) has the cell's type
    assert knn_purity(idx, types) == 1.0
    # samples are spread evenly over each type: neighbourhoods as mixed as random cells (1 up to noise)
    assert knn_mixing(idx, samples) == pytest.approx(1.0, abs=0.05)
    # samples = types: every neighbourhood holds one sample
    assert knn_mixing(idx, types) == 0.0
    # purity is the mean share of same-label neighbours: relabel one type's cells in halves -> each cell of
    # that type keeps about half of its neighbours; closed form from the graph itself
    lab = types.copy()
    lab[(types == 0) & (np.arange(180) % 2 == 0)] = 3
    want = np.mean([(lab[idx[i]] == lab[i]).mean() for i in range(180)])
    assert knn_purity(idx, lab) == pytest.approx(want, rel=1e-15)
    assert 0.8 < knn_purity(idx, lab) < 0.9  # 2/3 of the cells pure, 1/3 at about 1/2


@pytest.mark.slow  # scanpy's UMAP compiles its numba kernels: ~15 s CPU in a fresh process
def test_figure_on_a_planted_embedding(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    X, types, samples = _planted(40)
    rng = np.random.default_rng(1)
    # the "uncorrected" baseline: each sample shifted by its own offset, which splits the types by sample
    pca = X + 10.0 * rng.normal(size=(4, 2))[samples]
    hist = pd.DataFrame({"iteration": [1, 2, 3, 1, 2, 3], "modality": ["rna"] * 3 + ["atac"] * 3,
                         "sigma2": [4.0, 2.0, 1.9, 1.0, 0.5, 0.45]})
    png = tmp_path / "demo.png"
    scores = _demo_figure.demo_figure(
        png, joint=X, pca=pca, samples=samples.astype(str), labels=None, label_name="Leiden cluster",
        history=hist, title="test", joint_name="joint", pca_name="pca", leiden_resolution=0.3)
    assert png.stat().st_size > 10_000
    assert set(scores) == {"joint", "pca"}
    assert scores["joint"]["mixing"] > 0.9 > scores["pca"]["mixing"]  # planted sample offsets
    assert scores["joint"]["purity"] > 0.95  # Leiden recovers the three planted types
