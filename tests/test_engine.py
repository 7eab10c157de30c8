"""Dask engine, checkpoint/resume and the iteration loop.

Every equality below is exact (``np.array_equal`` on float64): the reference is the same toy fit
run in process with :class:`SerialEngine`, so any difference in bits is a bug (non-deterministic
reduction, lossy checkpoint, wrong rollback).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import distributed
import numpy as np
import pytest

from atlasfit.engine import (
    Checkpoint,
    DaskEngine,
    SerialEngine,
    ShardLostError,
    place_shards,
    plan_shards,
    resume,
    run_iterations,
)
from atlasfit.engine._dask import _w_drop, _w_held

D = 6
SAMPLES = [f"s{i}" for i in range(7)]
N_CELLS = [40, 25, 60, 10, 35, 50, 20]
N_ITER = 12


# --------------------------------------------------------------------------- toy iterative model


def load_toy(spec, d, seed):
    """Per-sample state: a (cells x d) array drawn from a generator keyed by (seed, sample)."""
    x = {}
    for s, n in zip(spec.samples, spec.n_cells):
        rng = np.random.default_rng([seed, int(s[1:])])
        x[s] = rng.standard_normal((n, d))
    return {"x": x, "samples": spec.samples}


def local_toy(state, v, it, kill_marker=None):
    """Nonlinear in-place recurrence driven by the shared vector; returns summed statistics."""
    if kill_marker is not None and "s0" in state["samples"] and it == kill_marker[1]:
        try:
            fd = os.open(kill_marker[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            fd = None
        if fd is not None:
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)  # this worker dies in the middle of a round
    s1 = np.zeros(v.shape)
    s2 = 0.0
    for s in state["samples"]:
        x = state["x"][s]
        x[...] = np.tanh(0.9 * x + v * (1.0 + 0.01 * it)) + 0.1 * np.sin(3.0 * x)
        s1 += x.sum(axis=0)
        s2 += float((x * x).sum())
    return {"s1": s1, "s2": s2}


def toy_step(engine, shared, it, kill_marker=None):
    stats = engine.map(local_toy, shared["v"], it, kill_marker)
    s1 = np.zeros(D)
    s2 = 0.0
    for st in stats:  # shard order: deterministic
        s1 += st["s1"]
        s2 += st["s2"]
    n = float(sum(N_CELLS))
    return {"v": 0.5 * np.cos(s1 / n) + 0.1 * shared["v"], "loss": s2 / n, "trace": shared["trace"] + [s2]}


def dump_toy(state):
    return {s: {"x": state["x"][s]} for s in state["samples"]}


def restore_toy(state, data):
    for s, arrs in data.items():
        state["x"][s] = arrs["x"].copy()


def init_shared():
    return {"v": np.linspace(-1.0, 1.0, D), "loss": 0.0, "trace": []}


def shard_plan():
    return plan_shards(SAMPLES, N_CELLS, max_shards=5)


def final_local(engine):
    return engine.map(lambda st: {s: st["x"][s].copy() for s in st["samples"]})


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted fit, in process."""
    eng = SerialEngine(shard_plan())
    eng.setup(load_toy, D, 7)
    shared = run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, progress=False)
    return shared, final_local(eng)


def assert_same(res, ref):
    shared, local = res
    rshared, rlocal = ref
    assert np.array_equal(shared["v"], rshared["v"])
    assert shared["loss"] == rshared["loss"]
    assert shared["trace"] == rshared["trace"]
    assert len(local) == len(rlocal)
    for a, b in zip(local, rlocal):
        assert a.keys() == b.keys()
        for s in a:
            assert np.array_equal(a[s], b[s])


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="2GiB"
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


# --------------------------------------------------------------------------- placement, errors


def test_place_shards_balanced_and_deterministic():
    sh = plan_shards([f"s{i}" for i in range(6)], [100, 90, 80, 30, 20, 10])
    a = place_shards(sh, ["tcp://b:1", "tcp://a:1"])
    b = place_shards(sh, ["tcp://a:1", "tcp://b:1"])
    assert a == b  # independent of the order the workers are listed in
    load = {w: sum(sum(sh[i].n_cells) for i, o in a.items() if o == w) for w in set(a.values())}
    # largest-first greedy by hand on (100, 90, 80, 30, 20, 10): a takes 100, b 90 then 80
    # (b lighter), then a takes 30, 20, 10: a = 160, b = 170
    assert load == {"tcp://a:1": 160, "tcp://b:1": 170}
    with pytest.raises(RuntimeError, match="no worker"):
        place_shards(sh, [])


def test_engine_rejects_bad_use(client):
    sh = shard_plan()
    with pytest.raises(ValueError, match="index"):
        DaskEngine(client, sh[1:])
    with pytest.raises(ValueError, match="mode"):
        DaskEngine(client, sh, mode="actors")
    with pytest.raises(RuntimeError, match="before setup"):
        DaskEngine(client, sh).map(local_toy, np.zeros(D), 0)


# --------------------------------------------------------------------------- determinism


def test_dask_equals_serial_2_workers(client, reference):
    with DaskEngine(client, shard_plan(), name="toy") as eng:
        eng.setup(load_toy, D, 7)
        assert len(set(eng.owners.values())) == 2
        shared = run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, progress=False)
        assert_same((shared, final_local(eng)), reference)


def test_per_shard_mode_and_scattered_args(client, reference):
    # mode="per-shard" and broadcast_threshold=0 (every argument scattered) give the same bits
    with DaskEngine(client, shard_plan(), mode="per-shard", broadcast_threshold=0) as eng:
        eng.setup(load_toy, D, 7)
        shared = run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, progress=False)
        assert_same((shared, final_local(eng)), reference)


def test_payload_size_counts_every_array_and_direct_transfers_give_the_same_bits(client, reference, monkeypatch):
    from atlasfit.engine._dask import payload_nbytes

    # dask.sizeof samples 10 values of a larger dict: a few large arrays among many small ones were
    # often estimated far below their size (exact total here: 1000*100*8 + 40*4*8 bytes of data)
    params = {f"b{i}": np.zeros(4) for i in range(40)} | {"W": np.zeros((1000, 100))}
    assert 800_000 + 1_280 <= payload_nbytes(((params, 3), {})) < 800_000 + 1_280 + 10_000
    for direct, env in ((None, None), (False, None), (None, "0")):  # auto (local workers: direct), via scheduler
        if env is None:
            monkeypatch.delenv("ATLASFIT_DIRECT_TRANSFERS", raising=False)
        else:
            monkeypatch.setenv("ATLASFIT_DIRECT_TRANSFERS", env)
        with DaskEngine(client, shard_plan(), broadcast_threshold=0, direct=direct) as eng:
            eng.setup(load_toy, D, 7)
            assert eng._use_direct() is (direct is None and env is None)  # the LocalCluster's workers are local
            shared = run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, progress=False)
            assert_same((shared, final_local(eng)), reference)


@pytest.mark.parametrize("n_workers", [1, 4])
def test_same_bits_on_1_and_4_workers(n_workers, reference):
    with distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster) as c:
        with DaskEngine(c, shard_plan()) as eng:
            eng.setup(load_toy, D, 7)
            assert len(set(eng.owners.values())) == min(n_workers, len(eng.shards))
            shared = run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, progress=False)
            assert_same((shared, final_local(eng)), reference)


def test_state_stays_on_workers_and_close_drops_it(client):
    eng = DaskEngine(client, shard_plan())
    eng.setup(load_toy, D, 7)
    held = client.run(_w_held, eng.id)
    assert sorted(i for v in held.values() for i in v) == list(range(len(eng.shards)))
    for w, idx in held.items():
        assert all(eng.owners[i] == w for i in idx)
    eng.close()
    held = client.run(_w_held, eng.id)
    assert all(v == [] for v in held.values())


def test_missing_state_raises_and_recover_reloads(client):
    with DaskEngine(client, shard_plan()) as eng:
        eng.setup(load_toy, D, 7)
        first = eng.owners[0]
        client.run(_w_drop, eng.id, workers=[first])  # as if that worker had restarted empty
        with pytest.raises(ShardLostError):
            eng.map(local_toy, np.zeros(D), 0)
        lost = eng.recover()
        assert lost == sorted(i for i, w in eng.owners.items() if w == first)
        assert len(eng.map(local_toy, np.zeros(D), 0)) == len(eng.shards)


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_roundtrip_exact(tmp_path):
    eng = SerialEngine(shard_plan())
    eng.setup(load_toy, D, 3)
    shared = {
        "v": np.arange(5.0) / 3.0,
        "k": np.int32(4),
        "f": np.float64(1.0) / 3.0,
        "nested": {"lr": 0.1 / 3.0, "name": "adam", "none": None, "flag": True},
        "shape": (2, 3),
        "trace": [0.5, 1.0 / 7.0],
        "strings": np.array(["a", "bb"]),
    }
    ck = Checkpoint(tmp_path / "ck")
    info = ck.save(eng, 9, shared, dump_toy)
    # raw: every local array (N_CELLS x D float64) at least; on disk compressed, one version
    assert info.iteration == 9 and info.raw_bytes > sum(N_CELLS) * D * 8 and info.seconds > 0
    assert 0 < info.n_bytes <= info.dir_bytes
    it, back = ck.load_shared()
    assert it == 9 and list(back) == list(shared)
    assert np.array_equal(back["v"], shared["v"]) and back["strings"].tolist() == ["a", "bb"]
    assert type(back["k"]) is np.int32 and back["k"] == 4
    assert type(back["f"]) is np.float64 and back["f"] == shared["f"]
    assert back["nested"] == shared["nested"] and back["shape"] == (2, 3) and back["trace"] == shared["trace"]
    before = final_local(eng)
    eng.map(local_toy, np.ones(D), 0)  # change the local state, then roll it back
    it2, _ = ck.restore(eng, restore_toy)
    assert it2 == 9
    for a, b in zip(final_local(eng), before):
        for s in a:
            assert np.array_equal(a[s], b[s])


def test_checkpoint_is_atomic_when_a_save_fails(tmp_path):
    eng = SerialEngine(shard_plan())
    eng.setup(load_toy, D, 3)
    ck = Checkpoint(tmp_path / "ck")
    ck.save(eng, 5, {"v": np.ones(3)}, dump_toy)

    def broken_dump(state):
        if "s6" in state["samples"]:
            raise OSError("disk full")
        return dump_toy(state)

    with pytest.raises(OSError, match="disk full"):
        ck.save(eng, 10, {"v": np.zeros(3)}, broken_dump)
    it, shared = ck.load_shared()  # the previous complete version is still the current one
    assert it == 5 and np.array_equal(shared["v"], np.ones(3))
    ck.save(eng, 15, {"v": np.full(3, 2.0)}, dump_toy)  # the next save cleans the partial version
    versions = [p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()]
    assert len(versions) == 1 and versions[0].startswith("v000000015")


def test_checkpoint_rejects_foreign_sample_and_objects(tmp_path):
    eng = SerialEngine(shard_plan())
    eng.setup(load_toy, D, 3)
    ck = Checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match="sample 'nope'"):
        ck.save(eng, 1, {}, lambda st: {"nope": {"x": np.zeros(2)}})
    with pytest.raises(TypeError, match="'bad'"):
        ck.save(eng, 1, {"bad": object()}, None)
    with pytest.raises(FileNotFoundError, match="no complete version"):
        Checkpoint(tmp_path / "empty").load_shared()


def test_driver_restart_resume_same_bits(client, tmp_path, reference):
    ck = Checkpoint(tmp_path / "ck")

    class DriverDied(Exception):
        pass

    def die_at_9(it, shared):
        if it == 9:
            raise DriverDied  # the driver process "dies" after iteration 9 (checkpoint at 8)

    with DaskEngine(client, shard_plan()) as eng:
        eng.setup(load_toy, D, 7)
        with pytest.raises(DriverDied):
            run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, checkpoint_every=4,
                           checkpoint=ck, dump_local=dump_toy, restore_local=restore_toy,
                           progress=False, callback=die_at_9)
    # a new driver: new engine, same plan and load function, state from the checkpoint
    ck2 = Checkpoint(tmp_path / "ck")
    with DaskEngine(client, shard_plan()) as eng2:
        eng2.setup(load_toy, D, 7)
        it, shared = resume(eng2, ck2, restore_toy)
        assert it == 8
        shared = run_iterations(eng2, toy_step, shared, start=it, stop=N_ITER, checkpoint_every=4,
                                checkpoint=ck2, dump_local=dump_toy, restore_local=restore_toy,
                                progress=False)
        assert_same((shared, final_local(eng2)), reference)
    assert ck2.iteration == N_ITER


def test_progress_logs_when_not_a_tty(caplog):
    eng = SerialEngine(shard_plan())
    eng.setup(load_toy, D, 7)
    with caplog.at_level(logging.INFO, logger="atlasfit.engine"):
        run_iterations(eng, toy_step, init_shared(), start=0, stop=6, progress=2)
    lines = [r.getMessage() for r in caplog.records if "iteration" in r.getMessage()]
    # progress=2 over 6 iterations: one line after iterations 2, 4 and 6
    assert [ln.split()[:3] for ln in lines] == [["atlasfit:", "iteration", f"{k}/6"] for k in (2, 4, 6)]


def test_callback_stops_early():
    eng = SerialEngine(shard_plan())
    eng.setup(load_toy, D, 7)
    seen = []
    run_iterations(eng, toy_step, init_shared(), start=0, stop=N_ITER, progress=False,
                   callback=lambda it, sh: seen.append(it) or it == 3)
    assert seen == [1, 2, 3]


# --------------------------------------------------------------------------- worker loss


@pytest.fixture(scope="module")
def kill_client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", memory_limit="2GiB"
    )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _workers(c, n=2):
    # a killed worker is restarted by its nanny; on a loaded machine that can take a while
    c.wait_for_workers(n, timeout=180)
    deadline = time.monotonic() + 180
    while len(c.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.workers))) < n:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_worker_killed_between_rounds_same_bits(kill_client, tmp_path, reference, caplog):
    _workers(kill_client)
    rng = np.random.default_rng(2024)
    kill_at = int(rng.integers(2, N_ITER - 1))  # a random round (seeded: reproducible)
    ck = Checkpoint(tmp_path / "ck")
    with DaskEngine(kill_client, shard_plan(), poll_interval=0.2) as eng:
        eng.setup(load_toy, D, 7)
        pids = kill_client.run(os.getpid)
        victim = eng.owners[0]
        killed = []

        def step(engine, shared, it):
            if it == kill_at and not killed:
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(it)
            return toy_step(engine, shared, it)

        shared = run_iterations(eng, step, init_shared(), start=0, stop=N_ITER, checkpoint_every=3,
                                checkpoint=ck, dump_local=dump_toy, restore_local=restore_toy,
                                progress=False)
        assert killed == [kill_at]
        assert victim not in set(eng.owners.values())  # its shards were re-placed
        rolled = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
        assert len(rolled) == 1 and f"iteration {3 * (kill_at // 3)}" in rolled[0]
        assert_same((shared, final_local(eng)), reference)


def test_worker_killed_mid_round_same_bits(kill_client, tmp_path, reference, caplog):
    _workers(kill_client)
    marker = str(tmp_path / "killed")
    ck = Checkpoint(tmp_path / "ck")
    with DaskEngine(kill_client, shard_plan(), poll_interval=0.2) as eng:
        eng.setup(load_toy, D, 7)

        def step(engine, shared, it):
            return toy_step(engine, shared, it, kill_marker=(marker, 7))

        shared = run_iterations(eng, step, init_shared(), start=0, stop=N_ITER, checkpoint_every=5,
                                checkpoint=ck, dump_local=dump_toy, restore_local=restore_toy,
                                progress=False)
        assert os.path.exists(marker)  # the worker did kill itself during round 7
        rolled = [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]
        assert len(rolled) == 1 and "iteration 5" in rolled[0]  # last checkpoint before round 7
        assert_same((shared, final_local(eng)), reference)


def test_worker_loss_without_checkpoint_raises(kill_client):
    _workers(kill_client, 1)
    with DaskEngine(kill_client, shard_plan(), poll_interval=0.2) as eng:
        eng.setup(load_toy, D, 7)
        pids = kill_client.run(os.getpid)
        os.kill(pids[eng.owners[0]], signal.SIGKILL)
        with pytest.raises(ShardLostError, match="checkpoint"):
            run_iterations(eng, toy_step, init_shared(), start=0, stop=3, progress=False)


# --------------------------------------------------------------------------- the fit driver


def _drv_load(spec):
    return {"x": np.arange(sum(spec.n_cells), dtype=float) + spec.index, "acc": np.zeros(1), "g": spec.samples[0]}


def _drv_step(engine, shared, it):
    parts = engine.map(_drv_accumulate, it)
    return {"total": shared["total"] + sum(parts)}


def _drv_accumulate(state, it):
    state["acc"] += state["x"].sum() * (it + 1)
    return float(state["acc"][0])


def _drv_dump(state):
    return {state["g"]: {"acc": state["acc"].copy()}}


def _drv_restore(state, data):
    state["acc"] = data[state["g"]]["acc"].copy()


def test_checkpoint_policy_rules(tmp_path):
    from atlasfit.engine import checkpoint_policy, default_checkpoint_dir

    store = tmp_path / "a.zarr"
    # in-memory / in-process fits: no checkpoint unless asked for
    assert checkpoint_policy("M", store_path=None, model="m", distributed=False).checkpoint is None
    # a store fit on a cluster checkpoints beside the store, every 10 by default
    pol = checkpoint_policy("M", store_path=store, model="m", distributed=True)
    assert pol.checkpoint.path == default_checkpoint_dir(store, "m").absolute() and pol.every == 10
    assert checkpoint_policy("M", store_path=store, model="m", distributed=True, checkpoint_every=0).checkpoint is None
    with pytest.raises(ValueError, match="checkpoint_dir"):
        checkpoint_policy("M", store_path=None, model="m", distributed=False, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        checkpoint_policy("M", store_path=store, model="m", distributed=True, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every"):
        checkpoint_policy("M", store_path=store, model="m", distributed=True, checkpoint_every=-1)


def test_run_fit_resume_equals_uninterrupted(tmp_path):
    """run_fit(init=..., stop=5) == run_fit(stop=3) then run_fit(resume, stop=5): same bits, local
    state included (the totals depend on every shard's accumulated state)."""
    from atlasfit.engine import checkpoint_policy, make_engine, run_fit

    shards = plan_shards(["a", "b", "c"], [3, 4, 5])
    eng, gpu = make_engine(shards)
    assert isinstance(eng, SerialEngine) and gpu is False
    eng.setup(_drv_load)
    ref = run_fit(eng, init=lambda e: {"total": 0.0}, step=_drv_step, stop=5, progress=False)

    ck_dir = tmp_path / "ck"
    eng1, _ = make_engine(shards)
    eng1.setup(_drv_load)
    pol = checkpoint_policy("T", store_path=None, model="t", distributed=False, checkpoint_dir=ck_dir,
                            checkpoint_every=1)
    run_fit(eng1, init=lambda e: {"total": 0.0}, step=_drv_step, stop=3, policy=pol,
            dump_local=_drv_dump, restore_local=_drv_restore, progress=False)
    eng2, _ = make_engine(shards)
    eng2.setup(_drv_load)
    pol2 = checkpoint_policy("T", store_path=None, model="t", distributed=False, checkpoint_dir=ck_dir, resume=True)
    got = run_fit(eng2, init=lambda e: pytest.fail("resume must not re-initialise"), step=_drv_step, stop=5,
                  policy=pol2, dump_local=_drv_dump, restore_local=_drv_restore, progress=False)
    assert got == ref
    with pytest.raises(ValueError, match="past the requested stop"):
        run_fit(eng2, init=lambda e: {}, step=_drv_step, stop=2, policy=pol2,
                dump_local=_drv_dump, restore_local=_drv_restore, progress=False)


def test_negative_iteration_counts_are_clear_errors():
    """Issue 11 item 8: `max_iterations=-3` said `run_iterations: stop (-3) < start (0)`, and a topic
    `train(max_epochs=-1)` returned an untrained model; both name the argument now (0 = initialise only)."""
    import atlasfit

    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (30, 6)).astype(float)
    with pytest.raises(ValueError, match=r"MultiGEDI.fit: max_iterations must be an integer >= 0"):
        import anndata as ad
        import pandas as pd

        a = ad.AnnData(X, obs=pd.DataFrame({"s": np.repeat(["a", "b"], 15)}, index=[f"c{i}" for i in range(30)]))
        atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="s", K=2).fit(a, max_iterations=-3)
    with pytest.raises(ValueError, match=r"GEDI.fit: max_iterations must be an integer >= 0"):
        atlasfit.GEDI(K=2, sample_key="s").fit(a, max_iterations=-1)
    m = atlasfit.MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=2, n_hidden=4)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"MultimodalAmortizedLDA.train: max_epochs must be an integer >= 0"):
            m.train(max_epochs=bad, batch_size=8, progress=False)
