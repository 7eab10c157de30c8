"""Store integrity (issue 11 item 2, item 8 part): a missing or damaged chunk, or damaged metadata, is
an error naming the store, modality, sample and array (or file), never zeros or a raw codec error."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import atlasfit.io._layout as layout
from atlasfit.io import AtlasValidationError, convert, open_atlas, validate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
warnings.filterwarnings("ignore", category=FutureWarning)

SAMPLES = ("S0", "S1", "S2")


def source(n_per=120, n_genes=40, seed=0):
    """rna counts (CSR) with layer 'spliced', atac binary (dense), three samples of ``n_per`` cells."""
    rng = np.random.default_rng(seed)
    n = n_per * len(SAMPLES)
    names = [f"c{i:04d}" for i in range(n)]
    obs = pd.DataFrame({"sample": np.repeat(SAMPLES, n_per)}, index=names)
    X = sp.random(n, n_genes, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 6).astype(np.float32)
    rna = ad.AnnData(X, obs=obs.copy(), var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    rna.layers["spliced"] = X.copy()
    B = (rng.random((n, 6)) < 0.3).astype(np.float32)
    atac = ad.AnnData(B, obs=obs.copy(), var=pd.DataFrame(index=[f"p{j}" for j in range(6)]))
    return {"rna": rna, "atac": atac}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks small enough that a few hundred cells span several chunk files of every array."""
    monkeypatch.setattr(layout, "NNZ_CHUNK", 512)
    monkeypatch.setattr(layout, "ROW_CHUNK_1D", 64)
    monkeypatch.setattr(layout, "DENSE_CHUNK_ELEMS", 64 * 6)


@pytest.fixture
def store(tmp_path, small_chunks):
    mods = source()
    path = convert(mods, tmp_path / "atlas.zarr", sample_key="sample",
                   modalities={"rna": "counts", "atac": "binary"})
    return Path(path), mods


def sample_of_entry(store_path: Path, entry: int) -> str:
    """The sample holding CSR entry ``entry`` of rna X (from the raw arrays, not the package)."""
    import zarr

    indptr = zarr.open_array(str(store_path / "mod/rna/X/indptr"), mode="r")[:]
    row = int(np.searchsorted(indptr, entry, side="right") - 1)
    return SAMPLES[row // 120]  # 120 cells per sample, sorted by sample


def flip(path: Path, offset: int = 16, n: int = 8) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(raw))):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------ missing chunk
def test_missing_chunk_fails_deep_validate_naming_modality_sample_array(store):
    path, _ = store
    chunk = path / "mod/rna/X/data/1"
    assert chunk.exists() and (path / "mod/rna/X/data/3").exists()
    chunk.unlink()
    with pytest.raises(AtlasValidationError) as e:
        validate(path)
    msg = str(e.value)
    assert str(path) in msg and "modality 'rna'" in msg and "mod/rna/X/data" in msg
    assert f"sample '{sample_of_entry(path, 512)}'" in msg
    assert str(chunk) in msg and "missing" in msg and "convert" in msg


def test_missing_chunk_fails_every_block_read(store):
    path, mods = store
    (path / "mod/rna/X/data/1").unlink()
    s = sample_of_entry(path, 512)
    atlas = open_atlas(path)
    pattern = rf"modality 'rna', sample '{s}', array 'mod/rna/X/data'.*data/1' is missing"
    with pytest.raises(AtlasValidationError, match=pattern):
        atlas.read_block("rna", s)
    with pytest.raises(AtlasValidationError, match=pattern):
        atlas.block_reader().read_block("rna", s)
    with pytest.raises(AtlasValidationError, match=pattern):
        atlas.X("rna").compute(scheduler="sync")
    # the other samples and elements still read, and read right
    other = [x for x in SAMPLES if x != s][-1]
    rows = mods["rna"].obs["sample"].to_numpy() == other
    np.testing.assert_array_equal(atlas.read_block("rna", other).toarray(), mods["rna"].X[rows].toarray())
    np.testing.assert_array_equal(atlas.read_block("rna", s, layer="spliced").toarray(),
                                  mods["rna"].layers["spliced"][mods["rna"].obs["sample"].to_numpy() == s].toarray())


def test_missing_chunk_fails_a_store_fit_instead_of_fitting_zeros(store):
    import atlasfit

    path, _ = store
    (path / "mod/rna/X/data/1").unlink()
    model = atlasfit.MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="sample", K=2, seed=0)
    with pytest.raises(AtlasValidationError, match=r"modality 'rna', sample '.*', array 'mod/rna/X/data'"):
        model.fit(path, max_iterations=1, progress=False)


def test_missing_dense_chunk_and_indptr_chunk(store):
    path, _ = store
    (path / "mod/atac/X/1.0").unlink()
    atlas = open_atlas(path)
    with pytest.raises(AtlasValidationError, match=r"modality 'atac', sample 'S0', array 'mod/atac/X'.*missing"):
        atlas.read_block("atac", "S0")
    (path / "mod/rna/layers/spliced/indptr/2").unlink()
    with pytest.raises(AtlasValidationError, match=r"modality 'rna', sample 'S1', "
                       r"array 'mod/rna/layers/spliced/indptr'.*indptr/2' is missing"):
        atlas.read_block("rna", "S1", layer="spliced")


# ------------------------------------------------------------------------------ damaged chunk
def test_bit_flipped_chunk_is_a_clear_error_not_a_raw_blosc_error(store):
    path, _ = store
    chunk = path / "mod/rna/X/data/2"
    flip(chunk)
    s = sample_of_entry(path, 2 * 512)
    atlas = open_atlas(path)
    with pytest.raises(AtlasValidationError) as e:
        atlas.read_block("rna", s)
    msg = str(e.value)
    assert f"modality 'rna', sample '{s}', array 'mod/rna/X/data'" in msg and str(path) in msg
    assert str(chunk) in msg or "differ from the record" in msg
    with pytest.raises(AtlasValidationError, match=r"mod/rna/X/data"):
        validate(path)


def test_chunk_that_decodes_to_other_bytes_is_caught_by_the_record(store):
    """A damaged chunk that still decodes (here: another chunk's file) cannot pass as data."""
    path, _ = store
    shutil.copyfile(path / "mod/rna/X/indices/3", path / "mod/rna/X/indices/1")
    s = sample_of_entry(path, 512)
    with pytest.raises(AtlasValidationError, match=rf"sample '{s}', array 'mod/rna/X/indices': entries "
                       r"\d+:\d+ differ from the record"):
        open_atlas(path).read_block("rna", s)
    with pytest.raises(AtlasValidationError, match=r"array 'mod/rna/X/indices'"):
        validate(path)


# ------------------------------------------------------------------------------ damaged metadata
@pytest.mark.parametrize("rel", [".zattrs", ".zgroup", "uns/atlasfit/.zattrs",
                                 "uns/atlasfit/mods/rna/offsets/.zarray"])
def test_truncated_metadata_names_the_file_on_open(store, rel):
    path, _ = store
    f = path / rel
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(AtlasValidationError, match="metadata of atlas store") as e:
        open_atlas(path)
    assert f"'{f}' is not valid JSON" in str(e.value) and "convert" in str(e.value)


def test_truncated_metadata_names_the_file_on_read_and_validate(store):
    path, _ = store
    atlas = open_atlas(path)
    f = path / "mod/rna/X/data/.zarray"
    f.write_bytes(b'{"chunks": [5')
    with pytest.raises(AtlasValidationError, match=rf"'{f}' is not valid JSON"):
        atlas.read_block("rna", "S0")
    with pytest.raises(AtlasValidationError, match=rf"'{f}' is not valid JSON"):
        validate(path, deep=False)
    g = path / "mod/rna/obs/.zattrs"
    g.write_bytes(g.read_bytes()[:10])
    with pytest.raises(AtlasValidationError, match=r"is not valid JSON"):
        atlas.obs("rna")


def test_truncated_metadata_of_a_zarr_source_names_the_file(tmp_path):
    a = ad.AnnData(np.ones((4, 2), np.float32), obs=pd.DataFrame({"s": list("AABB")}, index=list("abcd")))
    src = tmp_path / "src.zarr"
    a.write_zarr(src)
    f = src / ".zmetadata"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(AtlasValidationError, match=r"metadata of source .*src.zarr/\.zmetadata' is not valid JSON"):
        convert(src, tmp_path / "out.zarr", sample_key="s")
    assert not (tmp_path / "out.zarr").exists()


def test_cli_names_the_damaged_file_without_traceback(store, capsys):
    from atlasfit.cli import main

    path, _ = store
    f = path / "uns/atlasfit/.zattrs"
    f.write_bytes(f.read_bytes()[:5])
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "Traceback" not in err


# ------------------------------------------------------------------------------ validate deep / fast
def test_fast_validate_is_metadata_only_and_says_what_it_skipped(store):
    path, _ = store
    for chunk in (path / "mod/rna/X/data").glob("[0-9]*"):
        chunk.unlink()  # every data chunk gone: only a deep check can notice
    t0 = time.perf_counter()
    rep = validate(path, deep=False)
    assert time.perf_counter() - t0 < 10
    assert rep.deep is False and rep.has_records
    text = str(rep)
    assert "fast check: metadata only" in text
    assert "NOT checked: chunk files" in text and "integrity records" in text
    with pytest.raises(AtlasValidationError, match=r"modality 'rna', sample 'S0', array 'mod/rna/X/data'"):
        validate(path)


def test_deep_validate_report_and_cli(store, capsys):
    from atlasfit.cli import main

    path, _ = store
    rep = validate(path)
    assert rep.deep and rep.has_records and rep.format_version == "1.1" and not rep.not_checked
    assert any("integrity records" in c for c in rep.checked)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "deep check" in out and "NOT checked" not in out
    assert main(["validate", str(path), "--fast"]) == 0
    assert "NOT checked: chunk files" in capsys.readouterr().out
    (path / "mod/atac/X/2.0").unlink()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "modality 'atac'" in err and "mod/atac/X" in err and "Traceback" not in err


def test_records_round_trip_for_csr_layers_and_dense(store):
    path, mods = store
    atlas = open_atlas(path)
    for m, layer in (("rna", None), ("rna", "spliced"), ("atac", None)):
        got = atlas.X(m, layer).compute(scheduler="sync")
        src = mods[m].X if layer is None else mods[m].layers[layer]
        got = got.toarray() if sp.issparse(got) else got
        np.testing.assert_array_equal(got, src.toarray() if sp.issparse(src) else src)


# ------------------------------------------------------------------------------ old stores
def test_store_without_records_still_opens_reads_and_validates(store):
    """A store written before records existed (format 1.0) works; validate says how to get them."""
    path, mods = store
    for m in ("rna", "atac"):
        shutil.rmtree(path / f"uns/atlasfit/mods/{m}/integrity")
    atlas = open_atlas(path)
    assert not atlas.has_records
    rows = mods["rna"].obs["sample"].to_numpy() == "S1"
    np.testing.assert_array_equal(atlas.read_block("rna", "S1").toarray(), mods["rna"].X[rows].toarray())
    rep = validate(path)
    assert any("no integrity records" in n and "convert" in n for n in rep.notes)
    assert any("no integrity records" in n for n in validate(path, deep=False).notes)


def test_record_check_overhead_is_small(tmp_path):
    """CRC-32 of what was read anyway: on a 10^6-entry block about +2-3 ms on a ~10 ms warm read.

    The bound is loose (a shared CI machine); the measured numbers are in docs/store.md.
    """
    n, J = 2000, 5000
    X = sp.random(n, J, density=0.1, format="csr", random_state=2, dtype=np.float32)
    X.data = np.ceil(X.data * 5).astype(np.float32)
    a = ad.AnnData(X, obs=pd.DataFrame({"sample": ["A"] * n}, index=[f"c{i}" for i in range(n)]))
    path = convert(a, tmp_path / "big.zarr", sample_key="sample")
    atlas = open_atlas(path)
    from atlasfit.io._blocks import _read_rows

    key, storage, dtype, nv = atlas._element("rna", None)
    exp = {f: int(v[0]) for f, v in atlas._mod("rna")["records"]["X"].items()}
    exp.update(mod="rna", sample="A")
    plain, checked = [], []
    for _ in range(9):  # interleaved, best of 9: robust to a busy machine
        t0 = time.perf_counter()
        _read_rows(str(path), key, storage, 0, n, nv, dtype)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        blk = _read_rows(str(path), key, storage, 0, n, nv, dtype, exp)
        checked.append(time.perf_counter() - t0)
    assert blk.nnz == X.nnz > 900_000
    assert min(checked) < 1.6 * min(plain) + 0.005, (min(plain), min(checked))
