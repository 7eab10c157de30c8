"""Specific top features of a topic: lift and LDAvis relevance next to the raw probability ranking
(issue 12), on the closed form and on a planted atlas with a gene that is frequent in every cell."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from atlasfit.models.topic import MultimodalAmortizedLDA
from atlasfit.models.topic._ranking import feature_scores

K = 4
MARKERS = 3  # planted marker genes per topic
HK = 1.5  # the housekeeping gene's probability in every topic, relative to one marker's in its topic


def _planted(n=300, seed=0):
    """K topics with disjoint blocks of marker genes, plus gene 'HK' (housekeeping), HK times as
    frequent as a marker in every topic; each cell draws its counts from one topic.

    Truth: raw probability ranks HK first in every topic; lift ranks it last among the topic's
    non-background features (lift 1 against a marker's ~K); relevance at lambda 0.6 ranks a marker above
    it because 0.6 log(1/HK) + 0.4 log(K) = 0.31 > 0."""
    rng = np.random.default_rng(seed)
    F = K * MARKERS + 1
    phi = np.full((K, F), 0.01)
    for k in range(K):
        phi[k, 1 + k * MARKERS:1 + (k + 1) * MARKERS] = 1.0
    phi[:, 0] = HK
    phi /= phi.sum(axis=1, keepdims=True)
    topic = np.repeat(np.arange(K), n // K)
    X = np.stack([rng.multinomial(200, phi[t]) for t in topic]).astype(np.float32)
    names = ["HK"] + [f"m{k}_{j}" for k in range(K) for j in range(MARKERS)]
    return X, names, topic


@pytest.fixture(scope="module")
def fitted():
    import anndata as ad

    X, names, _ = _planted()
    a = ad.AnnData(X)
    a.var_names = names
    m = MultimodalAmortizedLDA.from_data({"rna": a}, n_topics=K, n_hidden=16, likelihoods={"rna": "multinomial"})
    return m.train(max_epochs=20, batch_size=50, lr=0.05, progress=False, seed=0)


def test_scores_are_the_closed_form():
    rng = np.random.default_rng(1)
    phi = rng.dirichlet(np.ones(7), size=4)  # 4 topics x 7 features
    w = np.array([0.1, 0.2, 0.3, 0.4])
    for weights, wk in ((None, np.full(4, 0.25)), (w, w), (3 * w, w)):  # weights are normalised
        p = wk @ phi  # marginal feature probability
        np.testing.assert_allclose(feature_scores(phi, "lift", topic_weights=weights), phi / p, rtol=1e-13)
        for lam in (0.0, 0.3, 0.6, 1.0):
            want = lam * np.log(phi) + (1 - lam) * np.log(phi / p)  # LDAvis relevance
            np.testing.assert_allclose(feature_scores(phi, "relevance", lam, weights), want, rtol=1e-12)
    np.testing.assert_array_equal(feature_scores(phi, "probability"), phi)
    # lambda 1 ranks as the probability, lambda 0 as the lift
    np.testing.assert_array_equal(np.argsort(-feature_scores(phi, "relevance", 1.0), axis=1),
                                  np.argsort(-phi, axis=1))
    np.testing.assert_array_equal(np.argsort(-feature_scores(phi, "relevance", 0.0), axis=1),
                                  np.argsort(-feature_scores(phi, "lift"), axis=1))


def test_a_feature_frequent_in_every_topic_tops_raw_but_not_relevance_or_lift(fitted):
    _, names, _ = _planted()
    phi = fitted.get_feature_topic_dist("rna")  # features x topics
    raw = fitted.get_top_features_per_topic("rna", 3)
    assert raw.iloc[0].tolist() == ["HK"] * K  # planted: HK is 1.5x a marker in every topic
    for method in ("relevance", "lift"):
        top = fitted.get_top_features_per_topic("rna", MARKERS, method=method)
        blocks = []
        for k in range(K):
            assert "HK" not in top[f"topic_{k}"].tolist()
            # each learned topic's top features are the markers of one planted topic
            blocks.append({f.split("_")[0] for f in top[f"topic_{k}"]})
            assert len(blocks[-1]) == 1
        assert sorted(b.pop() for b in blocks) == [f"m{k}" for k in range(K)]  # every planted topic found
    # the scores are the closed form on the model's own phi (uniform topic weights), in descending order
    P = phi.to_numpy().T
    p = P.mean(axis=0)
    rel = 0.6 * np.log(P) + 0.4 * np.log(P / p)
    scored = fitted.get_top_features_per_topic("rna", len(names), method="relevance", return_scores=True)
    for k in range(K):
        got = dict(scored[f"topic_{k}"].tolist())
        np.testing.assert_allclose([got[f] for f in names], rel[k], rtol=1e-12)
        assert [f for f, _ in scored[f"topic_{k}"]] == [names[j] for j in np.argsort(-rel[k], kind="stable")]
    lift = fitted.get_top_features_per_topic("rna", 1, method="lift", return_scores=True, topic_weights=[1, 1, 1, 2])
    pw = np.array([0.2, 0.2, 0.2, 0.4]) @ P
    for k in range(K):
        assert lift[f"topic_{k}"][0][1] == pytest.approx((P[k] / pw).max(), rel=1e-12)


def test_topic_heatmap_uses_the_ranking(fitted):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atlasfit import pl

    for method, has_hk in (("probability", True), ("relevance", False), ("lift", False)):
        ax = pl.topic_heatmap(fitted, "rna", 2, method=method, show=False)
        rows = [t.get_text() for t in ax.get_yticklabels()]
        want = fitted.get_top_features_per_topic("rna", 2, method=method)
        assert rows == list(dict.fromkeys(want.T.to_numpy().ravel().tolist()))
        assert ("HK" in rows) is has_hk
        plt.close(ax.figure)


def test_bad_ranking_arguments_are_named(fitted):
    with pytest.raises(ValueError, match="method='tfidf'"):
        fitted.get_top_features_per_topic("rna", method="tfidf")
    with pytest.raises(ValueError, match="lambda_=1.5"):
        fitted.get_top_features_per_topic("rna", method="relevance", lambda_=1.5)
    with pytest.raises(ValueError, match="topic_weights must be 4"):
        fitted.get_top_features_per_topic("rna", method="lift", topic_weights=[1, 1])
    with pytest.raises(ValueError, match="topic_weights must be 4"):
        fitted.get_top_features_per_topic("rna", method="lift", topic_weights=[1, -1, 1, 1])


def test_gaussian_modality_only_ranks_by_loadings():
    rng = np.random.default_rng(0)
    m = MultimodalAmortizedLDA.from_data({"prot": rng.normal(size=(40, 5)).astype(np.float32)}, n_topics=2,
                                         n_hidden=4, likelihoods={"prot": "gaussian"})
    m.train(1, 20, progress=False)
    assert m.get_top_features_per_topic("prot", 2).shape == (2, 2)
    with pytest.raises(ValueError, match="Gaussian.*method='probability'"):
        m.get_top_features_per_topic("prot", 2, method="relevance")
    assert isinstance(m.get_feature_topic_dist("prot"), pd.DataFrame)
