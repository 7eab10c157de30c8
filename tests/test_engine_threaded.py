"""The in-process threaded engine (issue 12): the default engine of an in-memory MultiGEDI / GEDI fit.

It must give the bits of :class:`SerialEngine` (the project's determinism rule) for any number of
threads, keep the contract of the engine protocol (results in shard order, the first failing shard's
error, state that stays in process), and run the shard functions of a round side by side.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_multigedi_model import fixture_mudata, model_for, states_equal

import atlasfit
from atlasfit.engine import SerialEngine, ThreadedEngine, is_distributed, make_engine, plan_shards, resolve_threads


def _plan(n=5):
    return plan_shards([f"s{i}" for i in range(n)], [10 + i for i in range(n)])


def test_results_in_shard_order_whatever_runs_first():
    eng = ThreadedEngine(_plan(5), n_threads=3)
    eng.setup(lambda spec: {"i": spec.index, "x": np.arange(spec.n_cells[0], dtype=float)})
    # shards start largest first (s4 first): the results still come back in shard order
    assert eng.map(lambda st, k: (st["i"], float(st["x"].sum()) * k), 2) == [
        (i, 2.0 * sum(range(10 + i))) for i in range(5)]
    assert eng.map_spec(lambda st, spec: spec.samples[0]) == [f"s{i}" for i in range(5)]
    assert eng.recover() == [] and not is_distributed(eng)
    eng.close()
    with pytest.raises(RuntimeError, match="before setup"):
        eng.map(lambda st: None)


def test_shard_functions_run_side_by_side():
    """Two shards of one round meet at a barrier: only possible when they run at the same time."""
    eng = ThreadedEngine(_plan(2), n_threads=2)
    eng.setup(lambda spec: {})
    barrier = threading.Barrier(2, timeout=10)

    def meet(st):
        barrier.wait()  # raises BrokenBarrierError after 10 s if the other shard never runs alongside
        return threading.current_thread().name

    names = eng.map(meet)
    assert len(set(names)) == 2 and all(n.startswith("atlasfit-shard") for n in names)
    eng.close()


def test_blas_is_pinned_to_one_thread_inside_shard_functions():
    from threadpoolctl import threadpool_info

    eng = ThreadedEngine(_plan(3), n_threads=2)
    eng.setup(lambda spec: {})
    seen = eng.map(lambda st: {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
    assert all(s <= {1} for s in seen)  # every BLAS loaded reports one thread (as on Dask workers)
    eng.close()


def test_first_failing_shard_in_shard_order_is_raised_after_every_shard_finished():
    eng = ThreadedEngine(_plan(4), n_threads=2)
    eng.setup(lambda spec: {"i": spec.index, "done": False})

    def fn(st):
        st["done"] = True
        if st["i"] in (1, 3):
            raise ValueError(f"shard {st['i']}")
        return st["i"]

    with pytest.raises(ValueError, match="shard 1"):
        eng.map(fn)
    assert all(st["done"] for st in eng.states)  # no shard left running or skipped
    eng.reload()  # the state right after setup again
    assert not any(st["done"] for st in eng.states)
    eng.close()


def test_make_engine_in_process_choice(monkeypatch):
    plan = _plan(3)
    monkeypatch.delenv("ATLASFIT_THREADS", raising=False)
    assert type(make_engine(plan)[0]) is SerialEngine  # the default of make_engine: serial (topic model)
    assert type(make_engine(plan, threads=1)[0]) is SerialEngine
    eng = make_engine(plan, threads=2)[0]
    assert type(eng) is ThreadedEngine and eng.n_threads == 2
    assert make_engine(plan, threads=8)[0].n_threads == 3  # never more threads than shards
    assert type(make_engine(plan_shards(["a"], [3]), threads=4)[0]) is SerialEngine  # one shard
    monkeypatch.setenv("ATLASFIT_THREADS", "1")
    assert type(make_engine(plan, threads=None)[0]) is SerialEngine
    assert resolve_threads(None) == 1 and resolve_threads(2) == 2
    monkeypatch.setenv("ATLASFIT_THREADS", "many")
    with pytest.raises(ValueError, match="ATLASFIT_THREADS must be an integer >= 1"):
        make_engine(plan, threads=None, who="MultiGEDI")
    with pytest.raises(ValueError, match="MultiGEDI: threads must be an integer >= 1"):
        make_engine(plan, threads=0, who="MultiGEDI")


@pytest.fixture(scope="module")
def fixture_data():
    return fixture_mudata()


def test_multigedi_in_memory_same_bits_on_1_2_and_3_threads(fixture_data):
    """The in-memory default (threads) gives the serial engine's bits: every exported array and the
    embedding, for 2 and 3 threads (fixture multigedi_synth_3mod: M + M_list + X, partial overlap, Bl2)."""
    _, cfg, mdata, conf = fixture_data
    fits = {}
    for threads in (1, 2, 3):
        m = model_for(cfg, conf).fit(mdata, max_iterations=3, progress=False, threads=threads)
        assert type(m._engine) is (SerialEngine if threads == 1 else ThreadedEngine)
        fits[threads] = (m.export_state(), m.embedding())
        m.close()
    for threads in (2, 3):
        states_equal(fits[1][0], fits[threads][0])
        np.testing.assert_array_equal(fits[1][1], fits[threads][1])


def test_multigedi_default_in_memory_fit_uses_the_cores(fixture_data, monkeypatch):
    from atlasfit.engine._threaded import usable_cores

    monkeypatch.delenv("ATLASFIT_THREADS", raising=False)
    _, cfg, mdata, conf = fixture_data
    m = model_for(cfg, conf).fit(mdata, max_iterations=1, progress=False)
    if usable_cores() > 1:
        assert type(m._engine) is ThreadedEngine and m._engine.n_threads == min(usable_cores(), len(m._engine.shards))
    else:
        assert type(m._engine) is SerialEngine
    m.close()


def test_gedi_in_memory_same_bits_serial_and_threaded(fixture_data, monkeypatch):
    """GEDI builds its engine through MultiGEDI's registration: threads by default, the same bits."""
    _, _, mdata, _ = fixture_data
    rna = mdata["rna"].copy()
    out = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("ATLASFIT_THREADS", threads)
        g = atlasfit.GEDI(K=3, seed=0, sample_key="sample")
        g.fit(rna, max_iterations=2, progress=False)
        assert type(g._engine) is (SerialEngine if threads == "1" else ThreadedEngine)
        out[threads] = g.embedding()
        g.close()
    np.testing.assert_array_equal(out["1"], out["2"])
