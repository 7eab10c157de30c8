"""topomics' small getters (spec topic_model.md §7, issue 13 item 6): get_entropy, the regulariser
weights, get_last_entropy / get_last_topic_variance, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from atlasfit import MultimodalAmortizedLDA
from atlasfit.models.topic._config import TopicModelConfig
from atlasfit.models.topic._fit import _last_batch


@pytest.fixture(scope="module")
def model():
    X = np.random.default_rng(3).poisson(2.0, (50, 8))
    m = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=4, n_hidden=6, entropy_weight=0.05,
                                         topic_variance_weight=0.3)
    return m.train(2, 16, progress=False)


def test_get_entropy_closed_form(model):
    th = model.get_latent_representation()
    thn = th / th.sum(axis=1, keepdims=True)
    # spec §7: mean over cells of -Σ_k θ log max(θ, 1e-8), rows renormalised when normalised=True
    want = np.mean(-(thn * np.log(np.maximum(thn, 1e-8))).sum(axis=1))
    assert model.get_entropy() == pytest.approx(want, rel=1e-12)
    raw = np.mean(-(th * np.log(np.maximum(th, 1e-8))).sum(axis=1))
    assert model.get_entropy(normalised=False) == pytest.approx(raw, rel=1e-12)
    assert model.get_entropy() <= np.log(4)


def test_regulariser_weights(model):
    assert model.get_entropy_weight() == 0.05 and model.get_topic_variance_weight() == 0.3


def test_last_batch_closed_form():
    # planted θ of a 3-cell minibatch: H = -Σθ log(θ + 1e-5) per cell (§3.1), unbiased variance per topic
    th = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    tot = {"n": 3, "entropy": float(-(th * np.log(th + 1e-5)).sum()), "theta_sum": th.sum(0),
           "theta_sq_sum": (th * th).sum(0)}
    cfg = TopicModelConfig(("rna",), (5,), ("multinomial",), n_topics=3)
    got = dict(_last_batch(tot, cfg))
    assert got["last_entropy"] == pytest.approx(-(th * np.log(th + 1e-5)).sum(axis=1).mean(), rel=1e-12)
    assert got["last_topic_variance"] == pytest.approx(th.var(axis=0, ddof=1).mean(), rel=1e-12)
    assert np.isnan(dict(_last_batch(None, cfg))["last_entropy"])


def test_last_values_follow_training_and_persist(model, tmp_path):
    h = model.history_
    assert model.get_last_entropy() == h["last_entropy"].iloc[-1]
    assert model.get_last_topic_variance() == h["last_topic_variance"].iloc[-1]
    assert h["last_entropy"].between(0, np.log(4)).all() and (h["last_topic_variance"] >= 0).all()
    # train(1); train(1) is train(2) (same bits), the recorded values included
    X = np.random.default_rng(3).poisson(2.0, (50, 8))
    m2 = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=4, n_hidden=6, entropy_weight=0.05,
                                          topic_variance_weight=0.3)
    m2.train(1, 16, progress=False).train(1, 16, progress=False)
    assert m2.history_["last_entropy"].tolist() == h["last_entropy"].tolist()
    model.save(tmp_path / "m.zarr")
    back = MultimodalAmortizedLDA.load(tmp_path / "m.zarr", data={"rna": X})
    assert back.get_last_entropy() == model.get_last_entropy()
    assert MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=2).get_entropy_weight() == 0.01
    with pytest.raises(RuntimeError, match="train"):
        MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=2).get_last_entropy()


def test_last_values_with_local_steps():
    # steps_per_round > 1 (local steps, periodic averaging): the last step of the last round is recorded
    X = np.random.default_rng(3).poisson(2.0, (50, 8))
    m = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=4, n_hidden=6).train(2, 8, progress=False,
                                                                                   steps_per_round=3)
    h = m.history_
    assert h["last_entropy"].between(0, np.log(4)).all() and (h["last_topic_variance"] >= 0).all()
