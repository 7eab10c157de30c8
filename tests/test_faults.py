"""Fault injection (issue 11).

Result writes (item 3): a write killed at seeded random points is, after the next open, entirely the
old results or entirely the new ones, with no debris; a model written again under the same key
replaces its whole result set. Read-only stores (part of item 8): a clear error before any work, for
the API and the CLI. Kills are ``os._exit`` in a forked child just before its k-th file-system
mutation (rename, replace, unlink, rmdir, mkdir, link), counted over the whole write path.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import traceback
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasfit.io import convert, open_atlas, write_results
from atlasfit.io import _results

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

KILLED = 86
_MUTATORS = ("rename", "replace", "unlink", "remove", "rmdir", "mkdir", "link")
N_CELLS = 240


# ------------------------------------------------------------------------------------ helpers
def _tiny_store(path: Path) -> Path:
    """rna (counts) + atac (binary) on the same 240 cells in 3 samples."""
    rng = np.random.default_rng(0)
    samples = np.repeat(["A", "B", "C"], N_CELLS // 3)
    obs = pd.DataFrame({"sample": samples}, index=[f"c{i}" for i in range(N_CELLS)])
    rna = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (N_CELLS, 12)).astype(np.float32)), obs=obs,
                     var=pd.DataFrame(index=[f"g{j}" for j in range(12)]))
    atac = ad.AnnData(sp.csr_matrix((rng.random((N_CELLS, 8)) < 0.3).astype(np.float32)), obs=obs.copy(),
                      var=pd.DataFrame(index=[f"p{j}" for j in range(8)]))
    return Path(convert({"rna": rna, "atac": atac}, path, sample_key="sample",
                        modalities={"rna": "counts", "atac": "binary"}))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return _tiny_store(tmp_path_factory.mktemp("template") / "a.zarr")


def _copy(template: Path, dest_dir: Path) -> Path:
    import shutil

    dest_dir.mkdir(parents=True)
    return Path(shutil.copytree(template, dest_dir / "a.zarr"))


def _hash_tree(base: Path) -> dict:
    return {str(q.relative_to(base)): hashlib.sha256(q.read_bytes()).hexdigest()
            for q in sorted(base.rglob("*")) if q.is_file()}


def _run_child(fn, timeout: float = 60.0) -> int:
    """Run ``fn`` in a forked child; its exit code (KILLED when a fault point fired)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child writer hung")
        time.sleep(0.005)


def _arm(kill_at: int | None, log: list | None = None) -> None:
    """(In the child) exit just before the ``kill_at``-th file-system mutation; log them all."""
    count = [0]

    def wrap(owner, name):
        orig = getattr(owner, name)

        def hooked(*args, **kwargs):
            count[0] += 1
            if log is not None:
                log.append(f"{name} {' '.join(str(a) for a in args)}")
            if count[0] == kill_at:
                os._exit(KILLED)
            return orig(*args, **kwargs)

        setattr(owner, name, hooked)

    for name in _MUTATORS:
        wrap(os, name)
    if hasattr(_results, "_exchange"):  # renameat2 through ctypes (atlasfit before issue 11)
        wrap(_results, "_exchange")


# ------------------------------------------------------------------------------------ scenarios
def _results_of(tag: float, mods, *, extra: bool) -> dict:
    """The elements a write puts, as {path in the store: value} (every element is constant)."""
    out = {}
    for m, nv in (("rna", 12), ("atac", 8)):
        if m in mods:
            out[f"mod/{m}/obsm/X_m"] = np.full((N_CELLS, 3), tag)
            out[f"mod/{m}/varm/m_Z"] = np.full((nv, 3), tag)
    if extra:
        out["mod/rna/obsm/X_m_extra"] = np.full((N_CELLS, 2), tag)
    out["uns/m_info"] = {"v": np.full(4, tag)}
    out["uns/atlasfit_models/m"] = {"Z": np.full((5, 3), tag)}
    return out


def _write(store: Path, elements: dict, **kw) -> None:
    obsm, varm, uns, groups = {}, {}, {}, {}
    for p, v in elements.items():
        parts = p.split("/")
        if parts[0] == "mod":
            (obsm if parts[2] == "obsm" else varm).setdefault(parts[1], {})[parts[3]] = v
        elif parts[1] == "atlasfit_models":
            groups[parts[2]] = v
        else:
            uns[parts[1]] = v
    write_results(store, obsm=obsm, varm=varm, uns=uns, groups=groups, **kw)


SCENARIOS = {
    # the same elements again plus a new one (plain write_results)
    "same_set": (_results_of(1.0, ("rna", "atac"), extra=False), _results_of(2.0, ("rna", "atac"), extra=True), {}),
    # a model written again under its key with fewer modalities: atac's results must go
    "fewer_modalities": (_results_of(1.0, ("rna", "atac"), extra=False), _results_of(2.0, ("rna",), extra=False),
                         {"model": "m"}),
}


def _value(x):
    a = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    vals = np.unique(a)
    return float(vals[0]) if vals.size == 1 else "mixed"


def _state(store: Path, paths) -> dict:
    """{path: constant value or None (absent)} read with anndata (obsm/varm) and mudata (uns)."""
    mods = {m: ad.read_zarr(str(store / "mod" / m)) for m in ("rna", "atac")}
    mdata = md.read_zarr(str(store))
    out = {}
    for p in paths:
        parts = p.split("/")
        if parts[0] == "mod":
            d = getattr(mods[parts[1]], parts[2])
            out[p] = _value(d[parts[3]]) if parts[3] in d else None
        elif parts[1] == "atlasfit_models":
            g = mdata.uns.get("atlasfit_models", {}).get(parts[2])
            out[p] = None if g is None else _value(g["Z"])
        else:
            g = mdata.uns.get(parts[1])
            out[p] = None if g is None else _value(g["v"])
    return out


def _expect(old: dict, new: dict) -> tuple[dict, dict]:
    """What :func:`_state` reads when the old (every element 1.0) or the new write (2.0) is in place."""
    paths = sorted(set(old) | set(new))
    return {p: 1.0 if p in old else None for p in paths}, {p: 2.0 if p in new else None for p in paths}


def _no_debris(store: Path) -> None:
    assert not (store / ".atlasfit-txn").exists(), sorted(p.name for p in (store / ".atlasfit-txn").iterdir())
    assert not [p.name for p in store.parent.iterdir() if p.name.startswith(".")]  # no hidden siblings


def _check_after_kill(store: Path, old_tags: dict, new_tags: dict, x_before: dict, *also) -> str:
    # plain readers open the store even before atlasfit has recovered it
    md.read_zarr(str(store))
    ad.read_zarr(str(store / "mod" / "atac"))
    open_atlas(store)  # recovery: roll a committed write forward, remove the dead writer's staging
    state = _state(store, old_tags)
    assert state in (old_tags, new_tags, *also), f"mixed results: {state}"
    _no_debris(store)
    assert _hash_tree(store / "mod" / "rna" / "X") == x_before
    return "old" if state == old_tags else "new"


# ------------------------------------------------------------------------------------ item 3: kills
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_result_write_killed_at_random_points_is_all_or_nothing(template, tmp_path, scenario):
    old, new, kw = SCENARIOS[scenario]
    old_tags, new_tags = _expect(old, new)
    base = _copy(template, tmp_path / "base")
    _write(base, old, **kw)
    assert _state(base, old_tags) == old_tags
    x_before = _hash_tree(base / "mod" / "rna" / "X")

    # one uninterrupted run of the new write, logging its file-system mutations
    store = _copy(base, tmp_path / "count")
    log_file = tmp_path / "ops.json"

    def counted():
        log: list = []
        _arm(None, log)
        try:
            _write(store, new, **kw)
        finally:
            log_file.write_text(json.dumps(log))

    assert _run_child(counted) == 0
    ops = json.loads(log_file.read_text())
    assert _state(store, new_tags) == new_tags
    _no_debris(store)
    # seeded kill points: some anywhere, most on the moves that swap results into place
    rng = np.random.default_rng(11)
    moves = [i + 1 for i, op in enumerate(ops) if op.split(" ")[0] in ("rename", "replace", "_exchange")
             and ".partial" not in op]
    anywhere = [i + 1 for i in range(len(ops)) if i + 1 not in moves]
    kills = sorted(set(rng.choice(moves, min(len(moves), 5), replace=False).tolist()
                       + rng.choice(anywhere, 3, replace=False).tolist()))
    assert len(kills) >= 6
    outcomes = []
    for j, k in enumerate(kills):
        store = _copy(base, tmp_path / f"kill{j}")
        assert _run_child(lambda: (_arm(k), _write(store, new, **kw))) == KILLED, f"kill point {k} never came"
        again = int(rng.integers(1, 4))
        if (store / ".atlasfit-txn" / "journal.json").exists() and j % 2 == 0:
            # killed again, this time while the next open rolls the write forward
            code = _run_child(lambda: (_arm(again), open_atlas(store)))
            assert code in (0, KILLED)
        outcomes.append(_check_after_kill(store, old_tags, new_tags, x_before))
        # and the store takes the next write normally
        if j == 0:
            _write(store, new, **kw)
            assert _state(store, new_tags) == new_tags
            _no_debris(store)
    assert "old" in outcomes and "new" in outcomes  # the kills fell on both sides of the commit point


def test_result_write_sigkill_at_random_times_is_all_or_nothing(template, tmp_path):
    """SIGKILL from outside at seeded random delays while a child rewrites the results in a loop."""
    old, new, _ = SCENARIOS["same_set"]
    third = {p: (np.full_like(v, 3.0) if isinstance(v, np.ndarray) else {k: np.full_like(a, 3.0) for k, a in v.items()})
             for p, v in new.items()}
    old_tags, new_tags = _expect(old, new)
    third_tags = {p: (3.0 if t == 2.0 else t) for p, t in new_tags.items()}
    base = _copy(template, tmp_path / "base")
    _write(base, old)
    x_before = _hash_tree(base / "mod" / "rna" / "X")
    rng = np.random.default_rng(5)
    for j in range(3):
        store = _copy(base, tmp_path / f"sig{j}")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                while True:
                    _write(store, new)
                    _write(store, third)
            finally:
                os._exit(3)
        time.sleep(float(rng.uniform(0.05, 0.6)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _check_after_kill(store, old_tags, new_tags, x_before, third_tags)


def test_model_rewritten_with_fewer_modalities_replaces_its_whole_result_set(template, tmp_path):
    """The topic model written under one key from rna + atac, then from rna only: no stale atac."""
    from atlasfit.models.topic import MultimodalAmortizedLDA

    store = _copy(template, tmp_path / "s")
    both = MultimodalAmortizedLDA.from_data(str(store), modalities=["rna", "atac"], n_topics=3, n_hidden=4)
    both.train(1, 120, progress=False, client=False).write(key="topic")  # in process: no cluster left behind
    atac = ad.read_zarr(str(store / "mod" / "atac"))
    assert "X_topic" in atac.obsm and "topic_loadings" in atac.varm
    rna = MultimodalAmortizedLDA.from_data(str(store), modalities=["rna"], n_topics=4, n_hidden=4)
    rna.train(1, 120, progress=False, client=False).write(key="topic")
    atac = ad.read_zarr(str(store / "mod" / "atac"))
    assert "X_topic" not in atac.obsm and "topic_loadings" not in atac.varm  # replaced as a whole
    assert ad.read_zarr(str(store / "mod" / "rna")).obsm["X_topic"].shape == (N_CELLS, 4)
    _no_debris(store)


def test_plain_write_takes_over_an_element_from_a_model(template, tmp_path):
    """An element rewritten outside the model leaves the model's set: a later model write keeps it."""
    store = _copy(template, tmp_path / "s")
    old, new, kw = SCENARIOS["fewer_modalities"]
    _write(store, old, model="m")
    write_results(store, obsm={"atac": {"X_m": np.full((N_CELLS, 3), 7.0)}})  # now the user's
    _write(store, new, model="m")
    atac = ad.read_zarr(str(store / "mod" / "atac"))
    assert _value(atac.obsm["X_m"]) == 7.0 and "m_Z" not in atac.varm


# ------------------------------------------------------------------------------------ item 8: read-only
def _read_only(store: Path, monkeypatch):
    """Make the store's directories read-only (mode 0o555). Where that does not stop this user
    (root), ``os.access`` is made to answer as for a read-only store too."""
    dirs = [store] + [p for p in store.rglob("*") if p.is_dir()]
    for d in dirs:
        d.chmod(0o555)
    if os.access(store, os.W_OK):
        real = os.access
        inside = str(store)

        def access(p, mode, *args, **kwargs):
            if mode & os.W_OK and (str(p) == inside or str(p).startswith(inside + os.sep)):
                return False
            return real(p, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return dirs


def _writable(dirs, monkeypatch) -> None:
    monkeypatch.undo()
    for d in dirs:
        d.chmod(0o755)


def test_read_only_store_gives_a_clear_error_before_any_work(template, tmp_path, monkeypatch):
    from atlasfit.io import AtlasValidationError

    store = _copy(template, tmp_path / "ro")
    _write(store, SCENARIOS["same_set"][0])
    before = _hash_tree(store)
    dirs = _read_only(store, monkeypatch)
    try:
        atlas = open_atlas(store)  # opening stays possible
        assert atlas.modalities == ["rna", "atac"]
        with pytest.raises(AtlasValidationError, match=r"read-only.*make it writable.*copy it") as err:
            write_results(store, obsm={"rna": {"X_m": np.zeros((N_CELLS, 2))}})
        assert f"atlas store '{store}'" in str(err.value) and isinstance(err.value, PermissionError)
        assert ".atlasfit" not in str(err.value)  # no temporary path
    finally:
        _writable(dirs, monkeypatch)
    assert _hash_tree(store) == before
    _no_debris(store)


def test_read_only_store_with_an_interrupted_write_opens_with_a_warning(template, tmp_path, monkeypatch):
    old, new, kw = SCENARIOS["same_set"]
    store = _copy(template, tmp_path / "ro")
    _write(store, old)
    journal = store / ".atlasfit-txn" / "journal.json"

    def killed_after_commit():
        rename = os.rename

        def hooked(*args, **kwargs):  # the first move after the commit point
            if journal.exists():
                os._exit(KILLED)
            return rename(*args, **kwargs)

        os.rename = hooked
        _write(store, new)

    assert _run_child(killed_after_commit) == KILLED and journal.exists()
    dirs = _read_only(store, monkeypatch)
    try:
        with pytest.warns(UserWarning, match="interrupted result write.*read-only"):
            open_atlas(store)
        assert (store / ".atlasfit-txn" / "journal.json").exists()  # left alone
    finally:
        _writable(dirs, monkeypatch)
    open_atlas(store)  # writable again: rolled forward
    old_tags, new_tags = _expect(old, new)
    assert _state(store, old_tags) == new_tags
    _no_debris(store)


def test_read_only_store_cli_fit_is_refused_before_fitting(template, tmp_path, capsys, monkeypatch):
    from atlasfit.cli import main

    store = _copy(template, tmp_path / "ro")
    dirs = _read_only(store, monkeypatch)
    t0 = time.perf_counter()
    try:
        rc = main(["fit", str(store), "--modality", "rna:M", "--K", "2", "--iterations", "2", "--workers", "1"])
    finally:
        _writable(dirs, monkeypatch)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "atlasfit fit: error:" in err and "read-only" in err and str(store) in err and "copy" in err
    assert time.perf_counter() - t0 < 10  # refused before a cluster or a fit


# ==================================================================================================
# Issue 11 items 6 and 7: the same seed gives the same bits on Dask (serial, repeated runs on fresh
# 2-worker clusters, any message layout) and after a worker is SIGKILLed during the initialisation,
# the iterations or the final joint SVD of MultiGEDI. The topic model's worker kill during an epoch
# is tests/test_topic_checkpoint.py::test_worker_killed_mid_epoch_recovers_to_the_same_bits (same
# fit driver, same recovery). Kills are deterministic: a shard function kills its own worker process
# (the one holding a chosen sample) at a chosen call, once (a flag file).
# ==================================================================================================
import atlasfit as _af  # noqa: E402
import atlasfit.models.multigedi._shard as _mg_shard  # noqa: E402

_distributed = pytest.importorskip("distributed")
_MG_MODS = {"rna": "M", "atac": "X"}


@pytest.fixture(scope="module")
def mg_store(tmp_path_factory):
    # sizes where OpenBLAS's one-thread and two-thread products differ (rSVD, sample moments)
    path = tmp_path_factory.mktemp("mg_det") / "syn.zarr"
    _af.datasets.synthetic_atlas(path, n_cells=3000, n_samples=6, features={"rna": 200, "atac": 300},
                                 obs_types=_MG_MODS, seed=0)
    return path


def _mg_model():
    return _af.MultiGEDI({m: {"obs_type": t} for m, t in _MG_MODS.items()}, sample_key="sample", K=5, seed=1)


def _mg_state(model) -> dict:
    st = model.export_state()
    model.close()
    return st


def _mg_fit(store, client, **kw) -> dict:
    m = _mg_model()
    if client is None:  # in process, reading the store here
        m._make_engine = lambda shards, c, s: _af.engine.SerialEngine(shards)
        return _mg_state(m.fit(store, max_iterations=4, progress=False, checkpoint_every=0))
    return _mg_state(m.fit(store, max_iterations=4, client=client, progress=False, **kw))


def _assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True)]
    assert not differ, f"{len(differ)} of {len(a)} arrays differ, e.g. {differ[:5]}"


def _new_cluster(n=2):
    return _distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)


def _arg_probe(state, pad, a):
    return a.flags.aligned, a.T @ a, float(a.sum())


def test_same_seed_same_bits_serial_and_repeated_two_worker_clusters(mg_store):
    """Item 6: serial, and two fits on two fresh 2-worker clusters: every array bit for bit."""
    serial = _mg_fit(mg_store, None)
    for _ in range(2):
        cluster = _new_cluster()
        with _distributed.Client(cluster, set_as_default=False) as c:
            c.wait_for_workers(2)
            _assert_same_bits(serial, _mg_fit(mg_store, c, checkpoint_every=0))
        cluster.close()


def test_arrays_reach_shards_and_driver_aligned_whatever_the_message_layout(kill_cluster):
    """Item 6: arrays rebuilt from a Dask message sit wherever the message put them (often not 8-byte
    aligned); NumPy then takes other loops (a.sum(), a.T @ a differ in the last bits). The engine
    hands shard functions and the driver aligned arrays: the in-process results, for any layout."""
    c, _ = kill_cluster
    eng = _af.engine.DaskEngine(c, _af.engine.plan_shards(["a", "b"], [1, 1]))
    eng.setup(lambda spec: {})
    ref = np.random.default_rng(0).standard_normal((2000, 6))
    try:
        for pad in range(8):  # shifts the array inside the message
            for aligned, gram, total in eng.map(_arg_probe, "x" * pad, ref):
                assert aligned
                assert np.array_equal(gram, ref.T @ ref) and total == float(ref.sum())
            for back in eng.map(lambda st, p: ["y" * len(p), ref.copy()], "x" * pad):
                assert back[1].flags.aligned
    finally:
        eng.close()


def _self_kill(real, flag: str, sample: str, at_call: int):
    """``real`` wrapped: the worker holding ``sample`` kills itself after its ``at_call``-th call (counted
    in files beside ``flag``), once."""

    def fn(state, *args, **kw):
        out = real(state, *args, **kw)
        if sample in state["samples"] and not os.path.exists(flag):
            calls = flag + ".calls"
            with open(calls, "a") as f:
                f.write(".")
            if os.path.getsize(calls) >= at_call:
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    return fn


@pytest.fixture(scope="module")
def kill_cluster(mg_store, tmp_path_factory):
    ck = tmp_path_factory.mktemp("mg_kill_ref")
    cluster = _new_cluster()
    with _distributed.Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2)
        ref = _mg_fit(mg_store, c, checkpoint_dir=ck, checkpoint_every=2)
        yield c, ref
    cluster.close()


@pytest.mark.parametrize("phase, fn, at_call", [
    ("init", "init_B", 1),            # the hub initialisation's B solve (after the priors and rSVD)
    ("iterations", "round_C", 3),     # in the middle of iteration 3 (checkpoints every 2)
    ("final_svd", "b_gram", 1),       # the joint SVD after the last iteration
])
def test_worker_killed_during_a_phase_gives_the_same_bits(mg_store, kill_cluster, tmp_path, monkeypatch,
                                                          phase, fn, at_call):
    """Item 7: a worker SIGKILLed during initialisation, an iteration or the final joint SVD: the fit
    recovers and gives the bits of the uninterrupted fit."""
    c, ref = kill_cluster
    c.wait_for_workers(2, timeout=60)
    flag = str(tmp_path / "killed")
    monkeypatch.setattr(_mg_shard, fn, _self_kill(getattr(_mg_shard, fn), flag, "S02", at_call))
    got = _mg_fit(mg_store, c, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    assert os.path.exists(flag), "the worker was not killed"
    _assert_same_bits(ref, got)
