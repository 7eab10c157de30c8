"""Planted-topic acceptance for the topic model (issue 4) and the helpers of its benchmarks.

Fast tests check the planted-atlas generator, the scores and the scvi-equivalent configuration used
by ``benchmarks/bench_topic_planted.py`` and ``benchmarks/bench_topic_vs_scvi.py``. The slow test is
the acceptance run on the full planted atlas (20k cells, 2,000 genes + 5,000 peaks, K=10):
``python -m pytest tests/test_topic_planted.py -m slow -q -p no:cacheprovider``.
"""

import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from atlasfit.models.topic import per_token_log_likelihood  # noqa: E402
from atlasfit.datasets._planted import (  # noqa: E402
    atac_ceiling,
    planted_topic_atlas,
    matched_correlation,
    per_token_ll_sparse,
    planted_per_token_ll,
)


@pytest.fixture(scope="module")
def small_atlas():
    return planted_topic_atlas(3000, 500, n_genes=200, n_peaks=300, n_topics=5, seed=3)


def test_planted_atlas_follows_the_issue_spec(small_atlas):
    a = small_atlas
    assert a.x_train["rna"].shape == (3000, 200) and a.x_train["atac"].shape == (3000, 300)
    assert a.x_test["rna"].shape == (500, 200) and a.phi["atac"].shape == (5, 300)
    # library size ~ LogNormal(log 2000, 0.5): the multinomial total of a cell is its library, so the
    # log row sums have mean log 2000 and sd 0.5 up to sampling error (3000 cells: se 0.009 / 0.0065)
    loglib = np.log(np.asarray(a.x_train["rna"].sum(axis=1)).ravel())
    assert abs(loglib.mean() - np.log(2000)) < 0.05
    assert abs(loglib.std() - 0.5) < 0.03
    # peaks are binary; counts are integers
    assert set(np.unique(a.x_train["atac"].data)) == {1.0}
    assert np.array_equal(a.x_train["rna"].data, np.round(a.x_train["rna"].data))
    # four samples, theta on the simplex, phi rows distributions
    assert set(np.unique(a.sample_train)) == {0, 1, 2, 3}
    np.testing.assert_allclose(a.theta_train.sum(axis=1), 1.0, rtol=1e-12)
    for m in ("rna", "atac"):
        np.testing.assert_allclose(a.phi[m].sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(a.phi_sample[m].sum(axis=2), 1.0, rtol=1e-12)
        # "small shifts": per-sample phi stays close to the planted phi (log-shift sd 0.1)
        for s in range(4):
            r, _ = matched_correlation(a.phi_sample[m][s], a.phi[m])
            assert r.min() > 0.95
    # theta ~ Dirichlet(0.1 * tilted): sparse, mostly one or two topics (Dir(0.1), K=5: E[max] ~ 0.8)
    assert 0.7 < a.theta_train.max(axis=1).mean() < 0.95


def test_generator_is_deterministic():
    a = planted_topic_atlas(50, 10, n_genes=20, n_peaks=30, n_topics=3, seed=7)
    b = planted_topic_atlas(50, 10, n_genes=20, n_peaks=30, n_topics=3, seed=7)
    assert (a.x_train["rna"] != b.x_train["rna"]).nnz == 0
    assert (a.x_test["atac"] != b.x_test["atac"]).nnz == 0
    c = planted_topic_atlas(50, 10, n_genes=20, n_peaks=30, n_topics=3, seed=8)
    assert (a.x_train["rna"] != c.x_train["rna"]).nnz > 0
    assert "atac" not in planted_topic_atlas(20, 5, n_genes=10, n_peaks=0, n_topics=3).x_train


def test_sparse_per_token_ll_equals_the_dense_formula():
    rng = np.random.default_rng(0)
    theta = rng.dirichlet(np.ones(4), size=30)
    phi = rng.dirichlet(np.ones(25), size=4)
    X = sp.random(30, 25, density=0.3, random_state=1, format="csr")
    X.data = np.ceil(X.data * 5)
    # same quantity, computed densely by the library function (definition: sum x log rho / sum x)
    assert per_token_ll_sparse(theta, phi, X) == pytest.approx(per_token_log_likelihood(theta, phi, X), rel=1e-12)


def test_planted_ll_uses_each_cells_sample_shift(small_atlas):
    a = small_atlas
    for m in ("rna", "atac"):
        ll = planted_per_token_ll(a, m)
        # recompute directly: rho_n = theta_n phi^(s_n) for every held-out cell
        rho = np.einsum("nk,nkf->nf", a.theta_test, a.phi_sample[m][a.sample_test])
        X = a.x_test[m].toarray()
        assert ll == pytest.approx((X * np.log(rho)).sum() / X.sum(), rel=1e-10)
        # the planted parameters explain held-out cells better than one shared distribution
        # (measured on this fixture: by 0.22 nats/token for the peaks, more for the genes)
        flat = np.asarray(a.x_train[m].sum(axis=0)).ravel()
        assert ll > per_token_ll_sparse(np.ones((X.shape[0], 1)), (flat / flat.sum())[None], a.x_test[m]) + 0.1


def test_matched_correlation_finds_the_permutation():
    rng = np.random.default_rng(1)
    phi = rng.dirichlet(np.full(100, 0.05), size=6)
    perm = rng.permutation(6)
    r, assign = matched_correlation(phi[perm], phi)
    np.testing.assert_allclose(r, 1.0)
    # learned topic assign[k] is planted topic k
    assert np.array_equal(perm[assign], np.arange(6))
    # more learned topics than planted: still one match per planted topic
    r2, _ = matched_correlation(np.vstack([phi[perm], rng.dirichlet(np.ones(100), size=2)]), phi)
    np.testing.assert_allclose(r2, 1.0)


def test_atac_ceiling_is_below_one_for_saturated_peaks(small_atlas):
    # binarisation caps what any model can recover; the empirical ceiling is well above chance
    c = atac_ceiling(small_atlas)
    assert 0.5 < c < 1.0


def test_scvi_equivalent_config():
    from benchmarks.bench_topic_vs_scvi import scvi_equivalent_config

    cfg = scvi_equivalent_config(2000, 10)
    # scvi-tools 1.4.2 AmortizedLDA / scvi.nn.Encoder defaults (read from its source)
    assert cfg.likelihoods == ("multinomial",) and not cfg.has_background("rna")
    assert (cfg.n_hidden, cfg.n_layers, cfg.dropout, cfg.bn_eps, cfg.bn_momentum, cfg.var_eps) == (
        128, 1, 0.1, 1e-3, 0.01, 1e-4)
    assert cfg.entropy_weight == 0.0 and cfg.topic_variance_weight == 0.0
    assert cfg.normalize_encoder_inputs is False


# Acceptance configuration: the defaults of the topic model's training (k-means start of the
# topic-feature logits, binarised-Poisson "cloglog" link for the peaks) with constant KL, 50 epochs,
# lr 0.05, batch 256, float32 (benchmarks/results/topic_planted_cloglog.csv, training seed 0):
# RNA 0.998 / peaks 0.992 mean matched correlation, held-out LL -5.837 / -7.037 against -5.809 /
# -7.020 under the planted parameters (seed 1: 0.998 / 0.992, -5.834 / -7.036).
ACCEPT_OPTION = "reg=reference kl=constant init=kmeans link=cloglog"
ACCEPT_EPOCHS = 50
ACCEPT_LR = 0.05
ACCEPT_SEED = 0
# Regression bounds below those measured values (same data, same seed; margin for BLAS/rounding
# differences between machines).
ACCEPT_RNA_CORR = 0.95
ACCEPT_ATAC_CORR = 0.95
ACCEPT_LL_GAP = {"rna": 0.08, "atac": 0.08}  # measured gaps 0.028 / 0.017 nats per token


@pytest.mark.slow
def test_planted_atlas_acceptance():
    """Issue 4 acceptance: 20k cells, 2,000 genes + 5,000 peaks, K=10; the issue's target is a mean
    matched correlation >= 0.9 per modality.

    204 s measured on 1 core; it reproduces the benchmark row (same data, seed and code path). The
    bounds are regression bounds from that measurement, all above the target.
    """
    from benchmarks.bench_topic_planted import run_option

    a = planted_topic_atlas(20_000, 2_000, seed=0)
    row, curves = run_option(a, ACCEPT_OPTION, n_epochs=ACCEPT_EPOCHS, lr=ACCEPT_LR, batch_size=256,
                             seed=ACCEPT_SEED, n_topics=10, n_hidden=128)
    assert row["rna_corr_mean"] >= ACCEPT_RNA_CORR, row
    assert row["atac_corr_mean"] >= ACCEPT_ATAC_CORR, row
    for m in ("rna", "atac"):
        assert row[f"{m}_ll"] >= planted_per_token_ll(a, m) - ACCEPT_LL_GAP[m], row
