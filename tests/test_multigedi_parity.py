"""Parity of the MultiGEDI map/reduce implementation with the reference fixtures.

The reference numbers are the stored states of multigedi 1.1.0 in ``tests/data/*.npz`` (see
``tests/data/ORIGIN.md`` and ``tests/data/multigedi_fixtures_README.md``). Every array is scored as
‖out − ref‖ / max(‖ref‖, 1e-300) after aligning one sign per factor for the whole state (PCA and
joint-SVD columns have their own signs); the bar is 1e-8 (float64).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from atlasfit.engine import SerialEngine, plan_shards
from atlasfit.models.multigedi import (
    FitConfig,
    InMemoryReader,
    ModalityConfig,
    export_state,
    initialize,
    iterate,
    load_shard,
    make_plan,
)

DATA = Path(__file__).parent / "data"
TOL = 1e-8  # acceptance bar of the fixtures README
ITERS = (0, 1, 5, 10)  # stored iterations of every fixture


def load_fixture(name):
    """Inputs, JSON config, FitConfig, SamplePlan and reader of one fixture."""
    d = np.load(DATA / f"{name}.npz", allow_pickle=False)
    cfg = json.loads(str(d["config"]))
    data, labels, cells, nfeat, mcs = {}, {}, {}, {}, []
    for mc in cfg["modalities"]:
        m = mc["name"]
        labels[m] = [str(x) for x in d[f"input/{m}/sample"].tolist()]
        cells[m] = d[f"input/{m}/cells"]
        if mc["obs_type"] == "M_list":
            data[m] = {"M1": sp.csr_matrix(d[f"input/{m}/M1"]), "M2": sp.csr_matrix(d[f"input/{m}/M2"])}
        elif mc["obs_type"] == "M":
            data[m] = sp.csr_matrix(d[f"input/{m}/X"])
        else:
            data[m] = d[f"input/{m}/X"]
        nfeat[m] = mc["J"]
        mcs.append(
            ModalityConfig(m, mc["obs_type"], orthoZ=mc["orthoZ"], adjustD=mc["adjustD"],
                           is_si_fixed=mc["is_si_fixed"])
        )
    config = FitConfig(K=cfg["K"], mode=cfg["mode"], seed=cfg["seed"], modalities=mcs)
    plan = make_plan(labels, nfeat, cells)
    return d, cfg, config, plan, InMemoryReader(data, labels)


def make_engine(plan, reader, config, max_shards=64):
    eng = SerialEngine(
        plan_shards(plan.global_samples, [plan.n_cells[g] for g in plan.global_samples], max_shards)
    )
    eng.setup(load_shard, reader, plan, config)
    return eng


def rel(out, ref):
    """The fixtures README's score: ‖out − ref‖ / max(‖ref‖, 1e-300) (NaNs must coincide)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    nan = np.isnan(ref)
    assert np.array_equal(nan, np.isnan(out))
    return float(np.linalg.norm(out[~nan] - ref[~nan]) / max(np.linalg.norm(ref[~nan]), 1e-300))


def _col_signs(out, ref):
    s = np.sign(np.sum(out * ref, axis=0))
    s[s == 0] = 1.0
    return s


def factor_signs(out, d, t):
    """One sign per factor for the whole state, estimated from all B_g."""
    num = 0.0
    for k in d.files:
        if k.startswith(f"iter{t}/B/"):
            num = num + np.sum(out[k[len(f'iter{t}/'):]] * d[k], axis=1)
    return np.where(num < 0, -1.0, 1.0)


def score_state(out, d, t, signs_for=None):
    """Scores per stored key of iteration t. ``signs_for(key) -> K signs`` (default: global signs)."""
    pre = f"iter{t}/"
    if signs_for is None:
        s = factor_signs(out, d, t)

        def signs_for(key):
            return s

    scores = {}
    for k in d.files:
        if not k.startswith(pre) or k.endswith("_sample_grouped"):
            continue
        key = k[len(pre):]
        ref = d[k]
        assert key in out, f"output lacks {key}"
        o = np.asarray(out[key], dtype=np.float64)
        parts = key.split("/")
        if parts[0] == "B":
            o = o * signs_for(key)[:, None]
        elif key in ("X_multigedi_pca", "svd/u"):
            o = o * _col_signs(o, ref)[None, :]
        elif len(parts) >= 2 and parts[1] in ("Z", "U", "Q"):
            o = o * signs_for(key)[None, :]
        scores[key] = rel(o, ref)
    return scores


def _report(name, t, scores):
    key = max(scores, key=scores.get)
    print(f"{name} iter{t}: worst {scores[key]:.2e} at {key} ({len(scores)} arrays)")
    return scores[key]


@pytest.fixture(scope="module")
def real5k_run():
    """One 10-sweep fit of the real fixture, exported at 0, 1, 5 and 10 sweeps (the README shows that
    continuing a fit equals a fresh fit with more sweeps)."""
    d, cfg, config, plan, reader = load_fixture("multigedi_real5k")
    eng = make_engine(plan, reader, config)
    shared = initialize(eng, plan, config)
    outs = {0: export_state(eng, shared, plan, config)}
    for it in range(10):
        shared = iterate(eng, shared, it, plan=plan, config=config)
        if it + 1 in ITERS:
            outs[it + 1] = export_state(eng, shared, plan, config)
    return d, outs


@pytest.mark.parametrize("t", ITERS)
def test_real5k_parity(real5k_run, t):
    d, outs = real5k_run
    scores = score_state(outs[t], d, t)
    assert _report("multigedi_real5k", t, scores) <= TOL, scores
    if t == 0:  # modalities that are not rSVD-initialised start at exact zeros (README)
        assert not np.any(outs[0]["rna/Z"]) and not np.any(outs[0]["rna/Q/0"])


def test_synth_3mod_parity():
    """Three modalities (M orthoZ, M_list regular Z, partial-overlap X), Bl2, interleaved cells."""
    d, cfg, config, plan, reader = load_fixture("multigedi_synth_3mod")
    eng = make_engine(plan, reader, config)
    shared = initialize(eng, plan, config)
    worst = _report("multigedi_synth_3mod", 0, score_state(export_state(eng, shared, plan, config), d, 0))
    for it in range(10):
        shared = iterate(eng, shared, it, plan=plan, config=config)
        if it + 1 in ITERS:
            sc = score_state(export_state(eng, shared, plan, config), d, it + 1)
            worst = max(worst, _report("multigedi_synth_3mod", it + 1, sc))
    assert worst <= TOL


def test_multi_init_iteration0_per_modality_signs():
    """Two rSVD-initialised modalities: their factor signs are compared separately (README)."""
    d, cfg, config, plan, reader = load_fixture("multigedi_synth_multi_init")
    assert plan.init_modalities() == ("small", "big")
    eng = make_engine(plan, reader, config)
    out = export_state(eng, initialize(eng, plan, config), plan, config)
    sg = {m: _col_signs(out[f"{m}/Z"], d[f"iter0/{m}/Z"]) for m in ("small", "big")}

    def signs_for(key):
        parts = key.split("/")
        if parts[0] == "B":
            return sg[plan.largest_modality(parts[1])]
        return sg.get(parts[0], np.ones(config.K))

    scores = score_state(out, d, 0, signs_for)
    assert _report("multigedi_synth_multi_init", 0, scores) <= TOL
    assert not np.any(out["bin/Z"])


def test_multi_init_from_stored_iteration0():
    """Iterations 1, 5, 10 from the stored iteration-0 state via init_state, priors from the data."""
    d, cfg, config, plan, reader = load_fixture("multigedi_synth_multi_init")
    init = {k[len("iter0/"):]: d[k] for k in d.files if k.startswith("iter0/")}
    eng = make_engine(plan, reader, config)
    shared = initialize(eng, plan, config, init_state=init)
    worst = 0.0
    for it in range(10):
        shared = iterate(eng, shared, it, plan=plan, config=config)
        if it + 1 in ITERS:
            sc = score_state(export_state(eng, shared, plan, config), d, it + 1)
            worst = max(worst, _report("multigedi_synth_multi_init", it + 1, sc))
    assert worst <= TOL


@pytest.mark.parametrize("name", ["multigedi_synth_3mod", "multigedi_synth_multi_init"])
def test_same_bits_for_any_shard_grouping(name):
    """Per-sample statistics reduced in global sample order: 1 shard, 2 shards and one shard per
    sample give bitwise identical states."""
    d, cfg, config, plan, reader = load_fixture(name)
    results = []
    for max_shards in (1, 2, 64):
        eng = make_engine(plan, reader, config, max_shards)
        assert len(eng.shards) == min(max_shards, len(plan.global_samples))
        shared = initialize(eng, plan, config)
        for it in range(3):
            shared = iterate(eng, shared, it, plan=plan, config=config)
        results.append(export_state(eng, shared, plan, config))
    for other in results[1:]:
        assert set(other) == set(results[0])
        for k in results[0]:
            assert np.array_equal(np.asarray(other[k]), np.asarray(results[0][k])), k


def test_float32_fit_tracks_float64():
    """float32 state arrays; after 5 sweeps the state stays close to the float64 fit (no fixture:
    the bound is a loose single-precision sanity bound, 1e-3 relative)."""
    d, cfg, config, plan, reader = load_fixture("multigedi_synth_3mod")
    cfg32 = FitConfig(K=config.K, mode=config.mode, seed=config.seed, dtype=np.float32,
                      modalities=config.modalities)
    outs = []
    for c in (config, cfg32):
        eng = make_engine(plan, reader, c)
        shared = initialize(eng, plan, c)
        for it in range(5):
            shared = iterate(eng, shared, it, plan=plan, config=c)
        if c is cfg32:
            st = eng.states[0]
            g = st["samples"][0]
            assert st["B"][g].dtype == np.float32
            assert all(v.dtype == np.float32 for v in (st["mods"]["rna"][g]["Y"], st["mods"]["rna"][g]["Q"]))
        outs.append(export_state(eng, shared, plan, c))
    for k in ("rna/Z", "splicing/Z", "chromatin/Z", "rna/sigma2", "X_multigedi_pca"):
        ref = outs[0][k]
        o = outs[1][k]
        if k == "X_multigedi_pca":
            o = o * _col_signs(o, ref)[None, :]
        assert rel(o, ref) < 1e-3, k
