"""Checkpoints of the topic model (issue 10 item 5): a store fit on Dask workers checkpoints its driver
state (parameters, AdamW moments and step, BatchNorm statistics, the lagged mean theta, history) and
each sample's per-cell Omega rows; an interrupted fit resumes to the same bits, a worker killed in the
middle of an epoch costs a rollback and gives the same bits, and training never modifies the store.

Data: 4 samples x 30 cells, RNA 12 genes (Poisson counts) + ATAC 10 peaks (Bernoulli 0.3), drawn here.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

import atlasfit  # noqa: E402
from atlasfit.models.topic import MultimodalAmortizedLDA  # noqa: E402

TRAIN = dict(batch_size=24, lr=0.02, seed=2, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(11)
    n = 120
    obs = pd.DataFrame({"s": np.repeat(["a", "b", "c", "d"], 30)}, index=[f"c{i}" for i in range(n)])
    rna = ad.AnnData(rng.poisson(2.0, (n, 12)).astype(np.float32), obs=obs.copy())
    atac = ad.AnnData((rng.random((n, 10)) < 0.3).astype(np.float32), obs=obs.copy())
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["s"] = obs["s"]
    return atlasfit.io.convert(mdata, tmp_path_factory.mktemp("ck") / "a.zarr", sample_key="s",
                               modalities={"rna": "counts", "atac": "binary"})


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def _model(store):
    return MultimodalAmortizedLDA.from_data(store, n_topics=3, n_hidden=8, weight_mode="cell")


def _same(a, b):
    for k, v in a._fit.params.items():
        np.testing.assert_array_equal(b._fit.params[k], v, err_msg=k)
    for k, v in a._fit.bn_state.items():
        np.testing.assert_array_equal(b._fit.bn_state[k], v, err_msg=k)
    for x, y in zip(a._omega, b._omega):
        np.testing.assert_array_equal(x, y)
    assert a._opt.step == b._opt.step
    pd.testing.assert_frame_equal(a.history_, b.history_)


def _digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def test_resume_after_an_interrupted_fit_gives_the_same_bits(store, client, tmp_path):
    before = _digest(Path(store))
    full = _model(store).train(max_epochs=5, client=client, checkpoint_dir=tmp_path / "full", **TRAIN)

    class Stop(Exception):
        pass

    def stop_after_4(epoch, rec):  # the driver "dies" after epoch index 3 (4 epochs), checkpoint at 2
        if epoch == 3:
            raise Stop

    with pytest.raises(Stop):
        _model(store).train(max_epochs=5, client=client, checkpoint_dir=tmp_path / "ck", checkpoint_every=2,
                            callback=stop_after_4, **TRAIN)
    resumed = _model(store).train(max_epochs=5, client=client, checkpoint_dir=tmp_path / "ck",
                                  resume_from_checkpoint=True, **TRAIN)
    assert resumed.n_epochs_ == 5 and resumed.history_["epoch"].tolist() == [0, 1, 2, 3, 4]
    _same(full, resumed)
    # a checkpoint of other settings is refused with a clear error
    with pytest.raises(ValueError, match="another configuration"):
        _model(store).train(max_epochs=6, client=client, checkpoint_dir=tmp_path / "ck", resume_from_checkpoint=True,
                            **{**TRAIN, "batch_size": 30})
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        _model(store).train(max_epochs=1, client=client, checkpoint_dir=tmp_path / "none",
                            resume_from_checkpoint=True, **TRAIN)
    # training read the store and wrote its checkpoints beside it: the store's files are unchanged
    assert _digest(Path(store)) == before


def test_store_fit_checkpoints_by_default_beside_the_store(store, client):
    m = _model(store).train(max_epochs=2, client=client, **TRAIN)
    ck = Path(m.checkpoint_info_.path).parent  # one directory per fit: topic-<digest of its fingerprint>
    assert m.checkpoint_info_ is not None and m.checkpoint_info_.iteration == 2
    assert ck.parent == Path(str(store) + ".checkpoints") and ck.name.startswith("topic-")
    none = _model(store).train(max_epochs=1, client=client, checkpoint_every=0, **TRAIN)
    assert none.checkpoint_info_ is None


def test_worker_killed_mid_epoch_recovers_to_the_same_bits(store, tmp_path, monkeypatch):
    import atlasfit.models.topic._fit as fit_module

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2)
        ref = _model(store).train(max_epochs=4, client=c, checkpoint_dir=tmp_path / "ref", **TRAIN)
        flag = str(tmp_path / "killed")
        real = fit_module._shard_local_steps

        def steps_then_die(state, *args, **kw):
            # the round of epoch 2 (default: its 5 steps in one round of local steps): the worker holding
            # sample "c" kills itself in the middle of the round, after its other shards have run
            epoch = args[6]
            out = real(state, *args, **kw)
            if epoch == 2 and any(s == "c" for s, _, _ in state["samples"]) and not os.path.exists(flag):
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        monkeypatch.setattr(fit_module, "_shard_local_steps", steps_then_die)
        got = _model(store).train(max_epochs=4, client=c, checkpoint_dir=tmp_path / "ck", checkpoint_every=1,
                                  **TRAIN)
        assert os.path.exists(flag)  # the worker did die
    cluster.close()
    _same(ref, got)
