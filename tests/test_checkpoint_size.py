"""Issue 12: what MultiGEDI's checkpoints cost on disk next to the store they fit.

One small store (3 samples of the real 5k data: rna 500 genes M, splicing 1,000 events M_list), fitted
in process (``client=False``, so no cluster) with a checkpoint directory, in float64 and float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import atlasfit
from atlasfit.datasets import multigedi_real_5k

MODS = {"rna": {"obs_type": "M"}, "splicing": {"obs_type": "M_list", "layers": ("M1", "M2")}}


def _du(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cksize")
    mdata = multigedi_real_5k()
    keep = mdata["rna"].obs["sample"].isin(["0", "1", "2"]).to_numpy()
    store = atlasfit.io.convert(mdata[keep].copy(), tmp / "small.zarr", sample_key="sample")
    store_bytes = _du(store)
    out = {}
    import logging

    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("atlasfit.engine")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    for dtype in ("float64", "float32"):
        ck = tmp / f"ck_{dtype}"
        # leftovers of a save that crashed half way: an incomplete version and a pointer never renamed
        (ck / "v000000000-deadbeef" / "local").mkdir(parents=True)
        (ck / ".LATEST.json.deadbeef").write_text("{}")
        m = atlasfit.MultiGEDI(modalities=MODS, sample_key="sample", K=3, seed=0, dtype=dtype)
        m.fit(store, max_iterations=2, client=False, checkpoint_dir=ck, checkpoint_every=1, progress=False)
        n_cells = int(m._atlas.samples["rna"].sum())
        m.close()
        out[dtype] = (ck, m.checkpoint_info_, n_cells)
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    out["log"] = records
    return store, store_bytes, out


def test_one_compact_version_is_kept(fitted):
    """After a fit with a save every iteration, the directory holds one version (older ones and the
    crashed leftovers removed). rna's Y (counts) is saved in full in the fit's dtype (a bit-identical
    resume needs it); of splicing's Y (paired counts) only the entries with a count, the rest being
    recomputed on restore (models/multigedi/_ckpt.py; the resume's bits: tests/test_multigedi_model.py,
    tests/test_faults.py). On disk that is about half the dense Y (0.48 on the real 5k data,
    benchmarks/results/checkpoint_size.csv)."""
    store, _, out = fitted
    out = dict(out)
    log = out.pop("log")
    # the Python API says at INFO where the checkpoints go and how big each one is
    assert any(f"checkpoints go to {out['float64'][0].absolute()}" in r for r in log), log
    assert any("checkpoint at iteration 2:" in r and "MB" in r and str(out["float64"][0].absolute()) in r
               for r in log), log
    atlas = atlasfit.io.open_atlas(store)
    n_paired = 0
    for g in atlas.samples["splicing"].index:
        blk = atlas.read_block("splicing", g, layer="M1"), atlas.read_block("splicing", g, layer="M2")
        n_paired += int(((abs(blk[0]) + abs(blk[1])) != 0).sum())
    for dtype, (ck, info, n_cells) in out.items():
        entries = sorted(p.name for p in ck.iterdir())
        assert entries == ["LATEST.json", Path(info.path).name], entries
        # dir_bytes was measured while the fit held LOCK.json (a few hundred bytes), released since
        assert info.iteration == 2 and 0 <= info.dir_bytes - _du(ck) < 1024
        with open(Path(info.path) / "manifest.json") as fh:
            local = json.load(fh)["local"]
        code = np.dtype(dtype).str
        rna = [shape for d in local.values() for name, (shape, dt) in d.items() if name == "rna~Y" and dt == code]
        assert sum(shape[1] for shape in rna) == n_cells and {shape[0] for shape in rna} == {500}
        kept = sum(shape[0] for d in local.values() for name, (shape, dt) in d.items()
                   if name == "splicing~Yval" and dt == code)
        exceptions = sum(shape[0] for d in local.values() for name, (shape, _) in d.items() if name == "splicing~Yexc")
        assert kept == n_paired and exceptions == 0, (kept, n_paired, exceptions)
        dense_y = n_cells * (500 + 1000) * np.dtype(dtype).itemsize  # the format before issue 12
        assert info.n_bytes <= 0.6 * dense_y, (dtype, info.n_bytes, dense_y)
    assert out["float32"][1].n_bytes <= 0.6 * out["float64"][1].n_bytes


@pytest.mark.xfail(strict=True, reason=(
    "issue 12's target (default checkpoints <= 2x the store) is not met: a bit-identical resume needs the "
    "latent state Y of count modalities in full (cells x features, full-entropy floats: lossless compression "
    "keeps 0.87 of float64, 0.82 of float32), while the store holds sparse counts. Measured on the real 5k "
    "data: 6.6x (float64), 3.1x (float32); benchmarks/results/checkpoint_size.csv. Strict: passes -> XPASS "
    "-> fails, so reaching the target flips this test."))
def test_checkpoint_at_most_twice_the_store(fitted):
    _, store_bytes, out = fitted
    for ck, _, _ in (out["float64"], out["float32"]):
        assert _du(ck) <= 2 * store_bytes
