"""Topic-model training on the Dask engine: same bits as the serial engine on 1 and 2 workers,
one-round steps (theta_bar_sync), local steps with periodic averaging (steps_per_round)."""

from __future__ import annotations

import distributed
import numpy as np
import pytest

from atlasfit.engine import DaskEngine, SerialEngine
from atlasfit.models.topic import TopicModelConfig, train_serial
from atlasfit.models.topic._optim import AdamWState
from atlasfit.models.topic._train import _average_round, _step_size


def _toy(n=72, seed=0):
    rng = np.random.default_rng(seed)
    rna = rng.poisson(2.0, (n, 10)).astype(float)
    atac = (rng.random((n, 8)) < 0.3).astype(float)
    atac[5] = 0.0  # one cell without ATAC: masked in the mixture
    sample = np.repeat(["s0", "s1", "s2"], [20, 28, 24])
    return {"rna": rna, "atac": atac}, sample


def _cfg(**kw):
    base = dict(n_topics=3, n_hidden=6, weight_mode="cell")
    base.update(kw)
    return TopicModelConfig(("rna", "atac"), (10, 8), ("gamma_poisson", "bernoulli"), **base)


def _same(a, b):
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    for k in a.bn_state:
        assert np.array_equal(a.bn_state[k], b.bn_state[k]), k
    assert np.array_equal(a.cell_omega, b.cell_omega)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


class _Recording(DaskEngine):
    """DaskEngine that remembers over how many workers its shards were placed."""

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)
        self.n_owners = len(set(self.owners.values()))


class _Counting(SerialEngine):
    """SerialEngine that counts map rounds by shard function name."""

    def __init__(self, shards):
        super().__init__(shards)
        self.calls: dict[str, int] = {}

    def map(self, fn, *args, **kwargs):
        self.calls[fn.__name__] = self.calls.get(fn.__name__, 0) + 1
        return super().map(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def thread_clients():
    """A 1-worker and a 2-worker in-process LocalCluster (threads; no pickling needed)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c1, \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c2, \
            distributed.Client(c1) as k1, distributed.Client(c2) as k2:
        yield k1, k2


# synchronous steps (steps_per_round=1, not the default 8): these tests look at the rounds of one step
TRAIN = dict(n_epochs=2, batch_size=16, seed=3, lr=0.01, steps_per_round=1)


@pytest.mark.parametrize(
    "opts",
    [{}, {"theta_bar_sync": "lagged"}, {"steps_per_round": 3}],
    ids=["exact-2-rounds", "lagged-1-round", "local-steps-3"],
)
def test_dask_engine_same_bits_as_serial_on_1_and_2_workers(thread_clients, opts):
    data, sample = _toy()
    cfg = _cfg()
    ref = train_serial(data, cfg, sample=sample, **{**TRAIN, **opts})
    engines = []
    for client in thread_clients:
        def factory(shards, client=client):
            engines.append(_Recording(client, shards))
            return engines[-1]

        fit = train_serial(data, cfg, sample=sample, engine_factory=factory, **{**TRAIN, **opts})
        _same(ref, fit)
    # three shards on one worker, then spread over two workers
    assert [e.n_owners for e in engines] == [1, 2]


def test_process_workers_same_bits_1_vs_2():
    """Process workers (state pickled nowhere, arguments pickled): 1 and 2 workers give the same bits."""
    data, sample = _toy(n=48)
    sample = np.repeat(["a", "b"], 24)
    cfg = _cfg(weight_mode="universal")
    fits, engines = [], []
    for n_workers in (1, 2):
        with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            def factory(shards, client=client):
                engines.append(_Recording(client, shards))
                return engines[-1]

            fits.append(train_serial(data, cfg, sample=sample, engine_factory=factory, n_epochs=1, batch_size=12,
                                     seed=1, steps_per_round=2, theta_bar_sync="lagged"))
    assert [e.n_owners for e in engines] == [1, 2]
    for k in fits[0].params:
        assert np.array_equal(fits[0].params[k], fits[1].params[k]), k


def test_rounds_per_step():
    data, sample = _toy()
    N = 72
    n_steps = -(-N // 16)  # 5 steps per epoch

    def run(cfg, **opts):
        eng = []

        def factory(shards):
            eng.append(_Counting(shards))
            return eng[-1]

        fit = train_serial(data, cfg, sample=sample, engine_factory=factory, **{**TRAIN, **opts})
        return fit, eng[0].calls

    _, exact = run(_cfg())
    assert exact.get("_shard_forward") == exact.get("_shard_backward") == 2 * n_steps and "_shard_step" not in exact
    _, lagged = run(_cfg(), theta_bar_sync="lagged")
    # only the fit's first step needs the two-round exchange (no previous mean theta yet)
    assert lagged["_shard_forward"] == 1 and lagged["_shard_step"] == 2 * n_steps - 1
    _, local = run(_cfg(), steps_per_round=2)
    assert local["_shard_local_steps"] == 2 * 3 and "_shard_forward" not in local  # ceil(5/2) rounds per epoch
    # without the topic-variance regulariser the step is one round and the same bits as two rounds
    a, calls = run(_cfg(topic_variance_weight=0.0))
    b, _ = run(_cfg(topic_variance_weight=0.0), theta_bar_sync="lagged")
    assert calls["_shard_step"] == 2 * n_steps and "_shard_forward" not in calls
    _same(a, b)


def test_lagged_theta_bar_changes_only_the_topic_variance_gradient():
    data, sample = _toy()
    a = train_serial(data, _cfg(), sample=sample, **TRAIN)
    b = train_serial(data, _cfg(), sample=sample, theta_bar_sync="lagged", **TRAIN)
    diff = max(np.abs(a.params[k] - b.params[k]).max() for k in a.params)
    assert diff > 0  # the lagged mean is a different (biased) gradient of V ...
    assert diff < 0.05  # ... but only slightly: lr 0.01 x 10 steps bounds any parameter's move by ~0.1


def test_local_steps_on_one_shard_are_the_synchronous_steps():
    # one sample -> one shard: its local objective is the global one and the average of one copy
    # (weight 1.0) is that copy, so S local steps are S synchronous steps bit for bit
    data, _ = _toy()
    cfg = _cfg()
    ref = train_serial(data, cfg, **TRAIN)
    for S in (2, 4, 7):
        _same(ref, train_serial(data, cfg, **{**TRAIN, "steps_per_round": S}))


def test_local_steps_on_several_shards_differ_but_learn():
    data, sample = _toy()
    cfg = _cfg(weight_mode="universal")
    sync = train_serial(data, cfg, sample=sample, n_epochs=6, batch_size=16, seed=3, lr=0.02, kl_schedule="constant",
                        steps_per_round=1)
    loc = train_serial(data, cfg, sample=sample, n_epochs=6, batch_size=16, seed=3, lr=0.02, kl_schedule="constant",
                       steps_per_round=5)
    assert not np.array_equal(sync.params["dec/rna/Z_loc"], loc.params["dec/rna/Z_loc"])
    # both decrease the training loss (full-data scale) from the first to the last epoch
    assert loc.history[-1]["loss"] < loc.history[0]["loss"]
    assert sync.history[-1]["loss"] < sync.history[0]["loss"]
    # the averaged optimiser counts every local step once
    assert loc.optimizer.step == sync.optimizer.step == 6 * 5


def test_average_round_weights_by_cells_in_shard_order():
    # two shards with constant parameters 1 and 4 that used 10 and 30 cells: mean 0.25*1 + 0.75*4 = 3.25
    cfg = TopicModelConfig(("rna",), (4,), ("multinomial",), n_topics=2, n_hidden=3)
    p = {"w": np.zeros(3)}

    def shard(val, n):
        stats = {"n": n, "nll": 1.0, "kl": 0.0, "entropy": 0.0, "theta_sum": np.ones(2) * n / 2,
                 "theta_sq_sum": np.ones(2) * n / 4, "global_value": 2.0, "nll/rna": 1.0,
                 "bn/rna/0/s1": np.ones(3) * n, "bn/rna/0/s2": np.ones(3) * n}
        return {"n": n, "params": {"w": np.full(3, val)}, "m": {"w": np.full(3, 2 * val)},
                "v": {"w": np.full(3, 3 * val)}, "steps": [stats]}

    st = AdamWState(step=5, m={"w": np.zeros(3)}, v={"w": np.zeros(3)})
    bn = {"enc/rna/rm0": np.zeros(3), "enc/rna/rv0": np.ones(3)}
    losses = []
    out = _average_round([shard(1.0, 10), shard(4.0, 30), shard(100.0, 0)], p, st, bn, cfg, 100, 1.0, 1, losses)
    assert np.allclose(out["w"], 3.25) and np.allclose(st.m["w"], 6.5) and np.allclose(st.v["w"], 9.75)
    assert st.step == 6 and len(losses) == 1
    # running mean moved by momentum 0.01 towards the global minibatch mean s1/B = 1
    assert np.allclose(bn["enc/rna/rm0"], cfg.bn_momentum * 1.0)


def test_step_size_matches_the_minibatch_plan():
    # chunks of every sample cover it exactly once per epoch (see _step_rows)
    sizes, n_steps = [20, 28, 24], 5
    assert sum(_step_size(sizes, s, n_steps) for s in range(n_steps)) == 72
    assert [_step_size([7], s, 3) for s in range(3)] == [2, 2, 3]


def test_bad_round_options():
    data, sample = _toy()
    with pytest.raises(ValueError, match="steps_per_round"):
        train_serial(data, _cfg(), sample=sample, steps_per_round=0)
    with pytest.raises(ValueError, match="steps_per_round"):
        train_serial(data, _cfg(), sample=sample, steps_per_round=2.5)
    with pytest.raises(ValueError, match="theta_bar_sync"):
        train_serial(data, _cfg(), sample=sample, theta_bar_sync="previous")


def test_workers_get_only_their_rows_with_covariates_graph_and_cell_weights(thread_clients):
    # each worker is sent only its samples' rows (DaskEngine select_args hook); with batch offsets,
    # encoder covariates, a within-sample GCN graph and per-cell weights the result is still the
    # serial one, bit for bit (the serial engine holds all rows)
    import anndata as ad
    import mudata as md
    import pandas as pd
    import scipy.sparse as sp

    from atlasfit.engine import plan_shards
    from atlasfit.models.topic import MultimodalAmortizedLDA

    data, sample = _toy()
    n = len(sample)
    rng = np.random.default_rng(3)
    G = sp.random(n, n, density=0.15, random_state=4, format="csr")
    G = ((G + G.T) > 0).astype(float).tolil()
    G[sample[:, None] != sample[None, :]] = 0  # within-sample edges only
    G = G.tocsr()
    obs = pd.DataFrame({"sample": sample, "batch": rng.choice(["b0", "b1"], n), "age": rng.normal(size=n)},
                       index=[f"c{i}" for i in range(n)])
    mods = {m: ad.AnnData(sp.csr_matrix(x), obs=obs.copy(), obsp={"nbr": G}) for m, x in data.items()}
    mdata = md.MuData(mods)
    for c in obs:
        mdata.obs[c] = obs[c]

    def fit(client):
        m = MultimodalAmortizedLDA.from_mudata(
            mdata, sample_key="sample", batch_key="batch", continuous_covariate_keys=["age"],
            spatial_key="nbr", n_topics=3, n_hidden=6, weight_mode="cell", spatial_mode="gcn",
            encode_covariates=True)
        # steps_per_round pinned: "auto" is 1 in process and 128 on a cluster
        return m.train(max_epochs=2, batch_size=16, progress=False, client=client, steps_per_round=4)

    serial = fit(None)
    _, k2 = thread_clients
    dist = fit(k2)
    for k, v in serial._fit.params.items():
        np.testing.assert_array_equal(dist._fit.params[k], v, err_msg=k)
    for a, b in zip(serial._omega, dist._omega):
        np.testing.assert_array_equal(a, b)
    # and the hook sends a worker its samples' rows only, renumbered, with their ids in the full data
    from atlasfit.models.topic._shard import Layout, MemoryBlocks, load_shard

    groups = {s: np.flatnonzero(sample == s) for s in ("s0", "s1", "s2")}
    shards = plan_shards(["s0", "s1", "s2"], [20, 28, 24], max_shards=3)
    spec = [sh for sh in shards if list(sh.samples) == ["s1"]][0]
    cfg = _cfg(n_batches=2)
    layout = Layout(n={s: len(g) for s, g in groups.items()}, index={"s0": 0, "s1": 1, "s2": 2},
                    sid={"s0": 0, "s1": 1, "s2": 2})
    args = (MemoryBlocks(data, groups, batch=np.arange(n) % 2), layout, cfg, np.float64, None)
    a, kw = load_shard.select_args([spec], args, {})
    sub = a[0]
    assert sub.X["rna"].shape[0] == 28 and list(sub.rows) == ["s1"]
    np.testing.assert_array_equal(sub.row_ids("s1"), groups["s1"])
    st = load_shard(spec, *a, **kw)
    np.testing.assert_array_equal(st["rows"], groups["s1"])
    np.testing.assert_array_equal(st["batch"], (np.arange(n) % 2)[groups["s1"]])
