"""The topic model's defaults (issue 10 item 4): float32 parameters and minibatches, and
``steps_per_round="auto"`` (synchronous steps in process, 128 local steps per round on a cluster).

Data: the planted RNA + peaks atlas of :func:`atlasfit.datasets.planted_topic_atlas` at 1,200
training cells, 3 samples (seed 0), K = 4 topics; the assertions are identities (same bits) except
where a tolerance states its source.
"""

from __future__ import annotations

import numpy as np
import pytest

from atlasfit.datasets import planted_topic_atlas
from atlasfit.models.topic import MultimodalAmortizedLDA
from atlasfit.models.topic._fit import DISTRIBUTED_STEPS_PER_ROUND, resolve_steps_per_round

K = 4
LIK = {"rna": "multinomial", "atac": "bernoulli"}
TRAIN = {"max_epochs": 2, "batch_size": 128, "lr": 0.02, "progress": False, "validation_fraction": 0.0, "seed": 1}


@pytest.fixture(scope="module")
def mdata():
    return planted_topic_atlas(n_train=1200, n_test=10, n_topics=K, n_genes=150, n_peaks=300, n_samples=3,
                               seed=0).to_mudata()


def _model(mdata, **kw):
    return MultimodalAmortizedLDA.from_mudata(mdata, likelihoods=LIK, sample_key="sample", n_topics=K, n_hidden=16,
                                              **kw)


def test_default_dtype_is_float32(mdata):
    m = _model(mdata).train(**TRAIN)
    assert m.dtype is np.float32
    assert all(v.dtype == np.float32 for v in m._fit.params.values())
    th = m.get_latent_representation(n_samples=5)
    # a simplex to the float32 rounding (definition of the posterior mean of softmax draws)
    np.testing.assert_allclose(th.sum(axis=1), 1.0, atol=50 * np.finfo(np.float32).eps)


def test_float32_and_float64_fits_agree(mdata):
    """The float32 default and a float64 fit of the same data and seed end at the same model up to the
    float32 rounding accumulated over 20 steps: the fitted topic-feature distributions (measured max
    |difference| 2.7e-7 RNA, 4e-8 peaks on this data; bound 1e-5) and the per-epoch training loss
    (measured relative difference 8e-9; bound 1e-6)."""
    a = _model(mdata).train(**TRAIN)
    b = _model(mdata, dtype="float64").train(**TRAIN)
    for m in ("rna", "atac"):
        pa = a.get_feature_topic_dist(m).to_numpy()
        pb = b.get_feature_topic_dist(m).to_numpy()
        assert np.abs(pa - pb).max() < 1e-5
    la, lb = a.history_["train_loss"].to_numpy(), b.history_["train_loss"].to_numpy()
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_steps_per_round_auto():
    assert resolve_steps_per_round("auto", distributed=False) == 1
    assert resolve_steps_per_round("auto", distributed=True) == DISTRIBUTED_STEPS_PER_ROUND == 128
    assert resolve_steps_per_round(3, distributed=True) == 3
    with pytest.raises(ValueError, match="steps_per_round"):
        MultimodalAmortizedLDA.from_data({"rna": np.ones((4, 3))}, n_topics=2).train(max_epochs=1, batch_size=2,
                                                                                   steps_per_round="fast")


def test_auto_in_process_is_synchronous_steps(mdata):
    a = _model(mdata).train(**TRAIN)
    b = _model(mdata).train(**TRAIN, steps_per_round=1)
    for k, v in a._fit.params.items():
        np.testing.assert_array_equal(v, b._fit.params[k], err_msg=k)


def test_auto_on_a_cluster_same_bits_on_one_and_two_workers(mdata):
    distributed = pytest.importorskip("distributed")
    fits = []
    for n in (1, 2):
        with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=False,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            fits.append(_model(mdata).train(**TRAIN, client=client))
    ref = _model(mdata).train(**TRAIN, steps_per_round=DISTRIBUTED_STEPS_PER_ROUND)  # in process, same scheme
    for k, v in ref._fit.params.items():
        np.testing.assert_array_equal(fits[0]._fit.params[k], v, err_msg=k)
        np.testing.assert_array_equal(fits[1]._fit.params[k], v, err_msg=k)


def test_max_shards_auto_follows_the_batch_size():
    from atlasfit.models.topic._fit import CELLS_PER_SHARD_STEP, resolve_max_shards

    assert CELLS_PER_SHARD_STEP == 512
    assert resolve_max_shards("auto", 1024) == 2  # at least 2: two workers busy at small batches
    assert resolve_max_shards("auto", 64) == 2
    assert resolve_max_shards("auto", 8192) == 16
    assert resolve_max_shards(5, 1024) == 5
    with pytest.raises(ValueError, match="max_shards"):
        resolve_max_shards(0, 1024)


def test_default_engine_holds_at_most_auto_shards(mdata):
    m = _model(mdata).train(**TRAIN)  # 3 samples, batch 128: max(2, 128 // 512) = 2 shards of whole samples
    assert len(m._engine.shards) == 2
    assert sorted(s for sh in m._engine.shards for s in sh.samples) == ["s0", "s1", "s2"]
