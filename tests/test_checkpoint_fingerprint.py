"""Checkpoints that know their fit (issue 11 item 4).

* A resume with another K, mode, seed, configuration or store is refused before any work (no shard
  loaded, no iteration run), with a message naming each differing part; the same settings resume.
* Fits of other settings on one store get their own default checkpoint directory; a resume whose
  default directory is empty is refused naming what differs from the store's other checkpoint.
* Two fits on one checkpoint directory: the second gets a lock error naming the directory and the fix;
  a stale lock (dead pid on this host, or a stopped heartbeat from another host) is taken over; the
  lock is released at the end of a fit and on error.

MultiGEDI, GEDI and the topic model, in memory (in process) and on tiny stores (an in-process
cluster): 2 samples x 30 cells, 20 features.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import atlasfit
import atlasfit.models.multigedi._shard as mg_shard
from atlasfit.models.multigedi import MultiGEDI

RNA = {"rna": {"obs_type": "M"}}


def _adata(seed=0, samples=("s1", "s2")):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.poisson(2.0, (60, 20)).astype(np.float32))
    a.obs_names = [f"c{i}" for i in range(60)]
    a.obs["sample"] = np.repeat(list(samples), 30)
    return a


@pytest.fixture
def loads(monkeypatch):
    """Counts the shards MultiGEDI loads (engine setup: the first work a fit does on the data)."""
    calls = []
    real = mg_shard.load_shard

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(mg_shard, "load_shard", counting)
    return calls


def _fit(ck, K=3, mode="Bsphere", seed=0, iters=2, data=None, resume=False, callback=None, **kw):
    m = MultiGEDI(RNA, sample_key="sample" if not isinstance(data, str) else None, K=K, mode=mode, seed=seed)
    return m.fit(_adata() if data is None else data, max_iterations=iters, checkpoint_dir=ck,
                 resume_from_checkpoint=resume, progress=False, callback=callback, **kw)


def _refused(ck, match, loads, **kw):
    its = []
    with pytest.raises(ValueError, match=match) as err:
        _fit(ck, iters=4, resume=True, callback=lambda it, sh: its.append(it), **kw)
    assert loads == [] and its == [], "the mismatch must be found before any shard is loaded or iteration run"
    assert "resume_from_checkpoint" in str(err.value) and "checkpoint_dir=" in str(err.value)
    return [part for part, _, _ in err.value.differences]


# ------------------------------------------------------------------ MultiGEDI: mismatched resumes


def test_multigedi_resume_with_another_K_is_refused_before_any_work(tmp_path, loads):
    _fit(tmp_path / "ck", K=3)
    loads.clear()
    parts = _refused(tmp_path / "ck", r"config\.K: 3 \(checkpoint\) -> 4 \(this fit\)", loads, K=4)
    assert parts == ["config.K"]  # only what differs


def test_multigedi_resume_with_another_mode_is_refused(tmp_path, loads):
    _fit(tmp_path / "ck")
    loads.clear()
    _refused(tmp_path / "ck", r"config\.mode: 'Bsphere' \(checkpoint\) -> 'Bl2'", loads, mode="Bl2")


def test_multigedi_resume_with_another_seed_is_refused(tmp_path, loads):
    _fit(tmp_path / "ck", seed=1)
    loads.clear()
    _refused(tmp_path / "ck", r"seed: 1 \(checkpoint\) -> 2 \(this fit\)", loads, seed=2)


def test_multigedi_resume_on_another_store_is_refused(tmp_path, loads):
    distributed = pytest.importorskip("distributed")
    a = atlasfit.io.convert(_adata(), tmp_path / "a.zarr", sample_key="sample")
    b = atlasfit.io.convert(_adata(), tmp_path / "b.zarr", sample_key="sample")  # same shapes and samples
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            distributed.Client(lc, set_as_default=False) as client:
        _fit(tmp_path / "ck", data=str(a), client=client)
        loads.clear()
        parts = _refused(tmp_path / "ck", r"data\.store: '.*a\.zarr' \(checkpoint\) -> '.*b\.zarr'", loads,
                         data=str(b), client=client)
    assert parts == ["data.store"]


def test_multigedi_resume_on_other_samples_is_refused(tmp_path, loads):
    _fit(tmp_path / "ck")
    loads.clear()
    _refused(tmp_path / "ck", r"data\.samples", loads, data=_adata(samples=("s1", "s3")))


def test_multigedi_resume_with_the_same_settings_continues_to_the_same_bits(tmp_path):
    full = _fit(tmp_path / "full", iters=4)
    _fit(tmp_path / "ck", iters=2)
    resumed = _fit(tmp_path / "ck", iters=4, resume=True)
    assert resumed.n_iter_ == 4
    np.testing.assert_array_equal(resumed.get_Z("rna"), full.get_Z("rna"))
    assert json.loads((tmp_path / "ck" / "LATEST.json").read_text())["iteration"] == 4
    assert not (tmp_path / "ck" / "LOCK.json").exists()  # released at the end of the fit


def test_fresh_fit_over_another_fits_checkpoint_warns_and_replaces_it(tmp_path):
    _fit(tmp_path / "ck", K=3)
    with pytest.warns(UserWarning, match=r"(?s)another fit; this fit replaces it.*config\.K: 3"):
        _fit(tmp_path / "ck", K=4)
    _fit(tmp_path / "ck", K=4, iters=3, resume=True)  # the checkpoint is now the K=4 fit's


# ------------------------------------------------------------------ default directories per fit


def _policy(store, fp, **kw):
    from atlasfit.engine import checkpoint_policy

    return checkpoint_policy("T", store_path=store, model="multigedi", distributed=True, fingerprint=fp, **kw)


def _fp(K=3, seed=0):
    return {"model": "M", "config": {"K": K}, "data": {"store": "x"}, "seed": seed}


def test_fits_of_other_settings_on_one_store_get_their_own_default_directory(tmp_path):
    from atlasfit.engine import CheckpointLockedError

    store = tmp_path / "a.zarr"
    p3, p4 = _policy(store, _fp(3)), _policy(store, _fp(4))  # held at the same time: no conflict
    assert p3.checkpoint.path != p4.checkpoint.path
    assert p3.checkpoint.path.parent == p4.checkpoint.path.parent == tmp_path / "a.zarr.checkpoints"
    assert p3.checkpoint.path.name.startswith("multigedi-")
    with pytest.raises(CheckpointLockedError, match="in use by another fit"):
        _policy(store, _fp(3))  # the same fit twice at once: one directory, a lock error
    p3.release()
    p4.release()
    _policy(store, _fp(3)).release()


def test_resume_in_an_empty_default_directory_names_what_differs_from_the_stores_checkpoint(tmp_path):
    from atlasfit.engine import CheckpointMismatchError, SerialEngine, plan_shards, run_fit

    store = tmp_path / "a.zarr"
    eng = SerialEngine(plan_shards(["a"], [2]))
    eng.setup(lambda spec: {})
    run_fit(eng, init=lambda e: {"t": 0}, step=lambda e, s, it: {"t": s["t"] + 1}, stop=2,
            policy=_policy(store, _fp(3)), progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"config\.K: 3 \(checkpoint\) -> 5") as err:
        _policy(store, _fp(5), resume=True)
    assert err.value.differences == [("config.K", 3, 5)]
    pol = _policy(store, _fp(3), resume=True)  # the same fit finds its own directory
    assert pol.resume and pol.checkpoint.iteration == 2
    pol.release()
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        _policy(tmp_path / "other.zarr", _fp(3), resume=True)


def test_a_checkpoint_without_a_fingerprint_is_resumed_only_when_named_and_with_a_warning(tmp_path):
    from atlasfit.engine import SerialEngine, plan_shards, run_fit

    store = tmp_path / "a.zarr"
    eng = SerialEngine(plan_shards(["a"], [2]))
    eng.setup(lambda spec: {})
    run_fit(eng, init=lambda e: {"t": 0}, step=lambda e, s, it: {"t": s["t"] + 1}, stop=2,
            policy=_policy(store, None), progress=False)  # as an older atlasfit: <store>.checkpoints/multigedi
    legacy = tmp_path / "a.zarr.checkpoints" / "multigedi"
    with pytest.raises(FileNotFoundError, match="older atlasfit without a fingerprint"):
        _policy(store, _fp(3), resume=True)
    with pytest.warns(UserWarning, match="records no fingerprint"):
        pol = _policy(store, _fp(3), resume=True, checkpoint_dir=legacy)
    assert pol.checkpoint.iteration == 2
    pol.release()


# ------------------------------------------------------------------ the lock


def test_a_second_fit_on_a_checkpoint_directory_in_use_gets_a_lock_error(tmp_path, loads):
    from atlasfit.engine import CheckpointLock

    ck = tmp_path / "ck"
    held = CheckpointLock(ck, "first fit").acquire()  # the first fit, still running
    try:
        with pytest.raises(RuntimeError, match="in use by another fit") as err:
            _fit(ck)
        assert str(ck) in str(err.value) and "checkpoint_dir=" in str(err.value)
        assert loads == []
    finally:
        held.release()
    _fit(ck)  # once the first fit has ended
    assert not (ck / "LOCK.json").exists()


def test_the_lock_is_released_when_a_fit_fails(tmp_path):
    class Boom(Exception):
        pass

    def fail(it, shared):
        raise Boom

    with pytest.raises(Boom):
        _fit(tmp_path / "ck", iters=3, callback=fail)
    assert not (tmp_path / "ck" / "LOCK.json").exists()
    _fit(tmp_path / "ck", iters=3, resume=True)


def _write_lock(ck, **rec):
    ck.mkdir(parents=True, exist_ok=True)
    base = {"pid": 1, "host": socket.gethostname(), "token": "t0", "who": "old fit", "started": "2026-01-01T00:00:00"}
    (ck / "LOCK.json").write_text(json.dumps({**base, **rec}))
    return ck / "LOCK.json"


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is dead now (and not reused within the test)
    _write_lock(tmp_path / "ck", pid=proc.pid)
    m = _fit(tmp_path / "ck")
    assert m.checkpoint_info_.iteration == 2
    assert not (tmp_path / "ck" / "LOCK.json").exists()


def test_locks_of_other_hosts_are_taken_over_only_once_their_heartbeat_is_stale(tmp_path):
    from atlasfit.engine import CheckpointLock, CheckpointLockedError

    path = _write_lock(tmp_path / "ck", host="node-elsewhere", pid=12345)
    with pytest.raises(CheckpointLockedError, match="node-elsewhere"):
        CheckpointLock(tmp_path / "ck").acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))  # its fit was killed an hour ago
    lock = CheckpointLock(tmp_path / "ck").acquire()
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()
    assert not path.exists()


def test_a_fit_that_lost_its_lock_stops_before_writing(tmp_path):
    from atlasfit.engine import Checkpoint, CheckpointLock, CheckpointLockedError, SerialEngine, plan_shards

    lock = CheckpointLock(tmp_path / "ck").acquire()
    _write_lock(tmp_path / "ck", token="someone else")  # another fit took the directory over
    eng = SerialEngine(plan_shards(["a"], [2]))
    eng.setup(lambda spec: {})
    with pytest.raises(CheckpointLockedError, match="lost the lock"):
        Checkpoint(tmp_path / "ck", lock=lock).save(eng, 1, {"t": 1}, None)
    lock.release()
    assert json.loads((tmp_path / "ck" / "LOCK.json").read_text())["token"] == "someone else"


# ------------------------------------------------------------------ GEDI and the topic model


def test_gedi_resume_with_another_K_or_a_pathway_prior_is_refused(tmp_path):
    from atlasfit.models.gedi import GEDI

    a = _adata()
    C = pd.DataFrame(np.eye(20)[:, :3], index=a.var_names, columns=["p0", "p1", "p2"])
    GEDI(K=3, sample_key="sample").fit(a, max_iterations=2, checkpoint_dir=tmp_path / "ck", progress=False)
    with pytest.raises(ValueError, match=r"config\.K: 3 \(checkpoint\) -> 4"):
        GEDI(K=4, sample_key="sample").fit(a, max_iterations=3, checkpoint_dir=tmp_path / "ck",
                                          resume_from_checkpoint=True, progress=False)
    with pytest.raises(ValueError, match=r"config\.C: None \(checkpoint\) -> '[0-9a-f]{16}'"):
        GEDI(K=3, C=C, sample_key="sample").fit(a, max_iterations=3, checkpoint_dir=tmp_path / "ck",
                                               resume_from_checkpoint=True, progress=False)
    m = GEDI(K=3, sample_key="sample").fit(a, max_iterations=3, checkpoint_dir=tmp_path / "ck",
                                          resume_from_checkpoint=True, progress=False)
    assert m.n_iter_ == 3


TRAIN = dict(batch_size=20, lr=0.02, progress=False)


def _topic(n_topics=3):
    from atlasfit.models.topic import MultimodalAmortizedLDA

    return MultimodalAmortizedLDA.from_data(_adata(), sample_key="sample", n_topics=n_topics, n_hidden=8,
                                            weight_mode="cell")


@pytest.fixture
def topic_loads(monkeypatch):
    import atlasfit.models.topic._training as topic_model  # where train() calls load_shard

    calls = []
    real = topic_model.load_shard

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(topic_model, "load_shard", counting)
    return calls


@pytest.mark.parametrize("change, match", [
    ({"n_topics": 4}, r"config\.model\.n_topics: 3 \(checkpoint\) -> 4"),
    ({"seed": 5}, r"seed: 0 \(checkpoint\) -> 5"),
    ({"batch_size": 30}, r"(?s)another configuration.*config\.batch_size: 20 \(checkpoint\) -> 30"),
])
def test_topic_resume_with_other_settings_is_refused_before_any_work(tmp_path, topic_loads, change, match):
    _topic().train(max_epochs=2, checkpoint_dir=tmp_path / "ck", seed=0, **TRAIN)
    topic_loads.clear()
    epochs = []
    n_topics = change.pop("n_topics", 3)
    kw = {**TRAIN, "seed": 0, **change}
    with pytest.raises(ValueError, match=match) as err:
        _topic(n_topics).train(max_epochs=4, checkpoint_dir=tmp_path / "ck", resume_from_checkpoint=True,
                               callback=lambda e, rec: epochs.append(e), **kw)
    assert topic_loads == [] and epochs == []
    assert "checkpoint_dir=" in str(err.value)


def test_topic_resume_with_the_same_settings_continues(tmp_path):
    full = _topic().train(max_epochs=3, checkpoint_dir=tmp_path / "full", seed=0, **TRAIN)
    _topic().train(max_epochs=2, checkpoint_dir=tmp_path / "ck", seed=0, **TRAIN)
    resumed = _topic().train(max_epochs=3, checkpoint_dir=tmp_path / "ck", resume_from_checkpoint=True, seed=0,
                             **TRAIN)
    assert resumed.n_epochs_ == 3
    for k, v in full._fit.params.items():
        np.testing.assert_array_equal(resumed._fit.params[k], v, err_msg=k)
    assert not (tmp_path / "ck" / "LOCK.json").exists()
