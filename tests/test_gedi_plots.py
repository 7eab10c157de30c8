"""atlasfit.pl on a fitted single-modality GEDI (issue 13 item 3): convergence, metagenes,
top_features and variance_explained used to raise (KeyError 'modality', TypeError, AttributeError
singular_values_). Each plot's data are checked against the model's own numbers."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import atlasfit
from atlasfit import pl


@pytest.fixture(scope="module")
def gedi():
    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(2.0, (90, 20)).astype(np.float64))
    a.var_names = [f"g{j}" for j in range(20)]
    a.obs["sample"] = np.repeat(["s1", "s2", "s3"], 30)
    m = atlasfit.GEDI(K=3, sample_key="sample").fit(a, max_iterations=4, progress=False)
    yield m
    m.close()
    plt.close("all")


def test_singular_values_match_the_explicit_svd(gedi):
    # closed form: the singular values of the J x N matrix Z diag(D) B formed explicitly
    signal = gedi.shared_["Z"] @ gedi.embedding().T
    d = np.linalg.svd(signal, compute_uv=False)[:3]
    assert np.allclose(gedi.singular_values_, d, rtol=1e-10)


def test_convergence_plots_one_trace(gedi):
    ax = pl.convergence(gedi, show=False)
    (line,) = ax.get_lines()
    assert np.array_equal(line.get_ydata(), gedi.history_["sigma2"].to_numpy())
    assert line.get_label() == "rna"
    ax = pl.convergence(gedi, "dZ", show=False)
    assert np.array_equal(ax.get_lines()[0].get_ydata(), gedi.history_["dZ"].to_numpy())
    with pytest.raises(ValueError, match="not traced"):
        pl.convergence(gedi, "nope", show=False)


def test_metagenes_and_top_features(gedi):
    ZD = gedi.get_Z().to_numpy() * gedi.get_D()[None, :]
    top = pl.top_features(gedi, n_top=2)
    for k in range(3):  # the two features with the largest |Z D| of factor k, in order
        j = np.argsort(-np.abs(ZD[:, k]))[:2]
        assert [s.split(" ")[0] for s in top.loc[f"factor{k}"]] == [f"g{i}" for i in j]
    assert pl.top_features(gedi, "rna", n_top=2).equals(top)
    ax = pl.metagenes(gedi, n_top=2, show=False)
    shown = ax.get_images()[0].get_array()
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert np.allclose(shown, ZD[[int(r[1:]) for r in rows]])
    with pytest.raises(ValueError, match="fitted on modality 'rna'"):
        pl.metagenes(gedi, "atac", show=False)


def test_variance_explained(gedi):
    ax = pl.variance_explained(gedi, show=False)
    d = gedi.singular_values_
    heights = [p.get_height() for p in ax.patches]
    assert np.allclose(heights, d**2 / (d**2).sum())
