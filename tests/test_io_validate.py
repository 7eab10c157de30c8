"""Every invalid input raises AtlasValidationError naming the culprit and leaves all bytes unchanged."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasfit.io import AtlasValidationError, convert, open_atlas, validate, write_atlas, write_results

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def digest(path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return {str(q.relative_to(p.parent)): hashlib.sha256(q.read_bytes()).hexdigest() for q in files}


def tree(d) -> dict:
    """Digest of the whole directory ``d`` (sources, existing target, and any leftover temporaries)."""
    return {name: digest(Path(d) / name) for name in sorted(os.listdir(d))}


def rna(n=6, samples=("A", "A", "B", "B", "C", "C"), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(n, 5)).astype(dtype)
    return ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"sample": list(samples)},
                                                         index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))


@pytest.fixture
def env(tmp_path):
    """A directory with an existing target store (to prove it survives) and a helper."""
    target = tmp_path / "atlas.zarr"
    convert(rna(), target, sample_key="sample")

    def check(source, match, *, kinds=None, sample_key="sample", on_disk="h5ad"):
        if isinstance(source, ad.AnnData) and on_disk == "h5ad":
            src = tmp_path / "src.h5ad"
            if src.exists():
                src.unlink()
            source.write_h5ad(src)
        elif isinstance(source, dict) and on_disk == "h5mu":
            src = tmp_path / "src.h5mu"
            if src.exists():
                src.unlink()
            md.MuData(source).write_h5mu(src)
        else:
            src = source
        before = tree(tmp_path)
        with pytest.raises(AtlasValidationError, match=match):
            validate(src, sample_key=sample_key, kinds=kinds)
        assert tree(tmp_path) == before
        with pytest.raises(AtlasValidationError, match=match):
            convert(src, target, sample_key=sample_key, modalities=kinds, overwrite=True)
        # the existing target is untouched and no temporary directory is left behind
        assert tree(tmp_path) == before
        open_atlas(target)

    return check


def test_valid_source_passes(env, tmp_path):
    validate(rna(), sample_key="sample")
    validate(tmp_path / "atlas.zarr")


def test_missing_sample_key(env):
    env(rna(), r"modality 'rna' has no sample key: obs has no column 'donor'", sample_key="donor")


def test_nan_inf(env):
    a = rna()
    a.X = a.X.toarray()
    a.X[3, 2] = np.inf
    env(a, r"modality 'rna' X has NaN or infinite values in sample 'B' \(first at cell 'c3', feature 'g2'")


def test_negative_counts(env):
    a = rna()
    x = a.X.toarray()
    x[4, 1] = -1
    a.X = sp.csr_matrix(x)
    env(a, r"modality 'rna' X has negative values in sample 'C' \(first at cell 'c4', feature 'g1'.*counts >= 0")


def test_non_integer_counts(env):
    a = rna()
    x = a.X.toarray()
    x[1, 4] = 0.5
    a.X = sp.csr_matrix(x)
    env(a, r"modality 'rna' X has non-integer values in sample 'A' \(first at cell 'c1', feature 'g4'")


def test_empty_source(env):
    env(rna()[:0].copy(), r"modality 'rna' of the source is empty")


def test_empty_sample_in_stream(tmp_path):
    target = tmp_path / "w.zarr"
    items = [("A", {"rna": rna(2, ("A", "A"))}), ("B", {"rna": rna(2, ("B", "B"))[:0].copy()})]
    before = tree(tmp_path)
    with pytest.raises(AtlasValidationError, match=r"modality 'rna' has an empty sample 'B' \(zero cells\)"):
        write_atlas(target, items)
    assert tree(tmp_path) == before


def test_duplicate_cell_names(env):
    a = rna()
    a.obs_names = ["c0", "c1", "c2", "c3", "c4", "c1"]
    env(a, r"modality 'rna' has duplicate cell name 'c1'")


def test_duplicate_cell_names_across_samples_in_stream(tmp_path):
    b = rna(2, ("B", "B"))
    b.obs_names = ["c1", "zz"]
    before = tree(tmp_path)
    with pytest.raises(AtlasValidationError, match=r"modality 'rna' has duplicate cell name 'c1'"):
        write_atlas(tmp_path / "w.zarr", [("A", {"rna": rna(2, ("A", "A"))}), ("B", {"rna": b})])
    assert tree(tmp_path) == before


def test_duplicate_feature_names(env):
    a = rna()
    a.var_names = ["g0", "g1", "g2", "g1", "g4"]
    env(a, r"modality 'rna' has duplicate feature name 'g1'")


def test_shared_sample_different_cells(env):
    r = rna()
    p = rna(2, ("B", "B"), seed=1)
    p.obs_names = ["c2", "c9"]  # sample B of rna holds c2, c3
    env({"rna": r, "prot": p}, r"modalities 'rna' and 'prot' hold different cells for shared sample 'B' "
        r"\(first: cell 'c3' is in 'rna' but not in 'prot'\)", on_disk="h5mu")


def test_binary_out_of_range(env):
    b = ad.AnnData(np.array([[0, 1, np.nan], [1, 2, 0]], dtype=np.float64),
                   obs=pd.DataFrame({"sample": ["A", "A"]}, index=["c0", "c1"]),
                   var=pd.DataFrame(index=["p0", "p1", "p2"]))
    env({"rna": rna(), "atac": b}, r"modality 'atac' X has values outside \{0, 1, NaN\} in sample 'A' "
        r"\(first at cell 'c1', feature 'p1'", kinds={"rna": "counts", "atac": "binary"}, on_disk="h5mu")


def test_missing_sample_label(env):
    a = rna()
    a.obs["sample"] = pd.Series(["A", "A", None, "B", "C", "C"], index=a.obs_names, dtype=object)
    env(a, r"modality 'rna' has a missing sample label \(obs\['sample'\] is NaN/None\) at cell 'c2'")


def test_not_an_atlas_store_and_partial(tmp_path):
    plain = tmp_path / "plain.zarr"
    rna().write_zarr(plain)
    good = tmp_path / "atlas.zarr"
    convert(rna(), good, sample_key="sample")
    partial = tmp_path / "partial.zarr"
    shutil.copytree(good, partial)
    shutil.rmtree(partial / "uns" / "atlasfit" / "complete")
    before = tree(tmp_path)
    for fn in (open_atlas, validate, lambda p: write_results(p, uns={"x": np.ones(2)})):
        with pytest.raises(AtlasValidationError, match=r"plain.zarr' is not an atlas store"):
            fn(plain)
        with pytest.raises(AtlasValidationError, match=r"partial.zarr' is a partially written atlas store"):
            fn(partial)
    assert tree(tmp_path) == before


def test_store_with_reordered_shared_sample_is_rejected(tmp_path):
    """A store whose shared sample lists cells in different orders fails validate (store check)."""
    r = rna()
    p = rna(seed=1)
    store = convert({"rna": r, "prot": p}, tmp_path / "a.zarr", sample_key="sample")
    validate(store)
    idx = store / "mod" / "prot" / "obs" / "_index"
    import zarr

    z = zarr.open_array(str(idx), mode="r+")
    names = z[:]
    names[[2, 3]] = names[[3, 2]]
    z[:] = names
    before = tree(tmp_path)
    with pytest.raises(AtlasValidationError, match=r"modalities 'rna' and 'prot' hold different cells or orders "
                       r"for shared sample 'B' \(first difference: row 0: 'c2' vs 'c3'\)"):
        validate(store)
    assert tree(tmp_path) == before


def test_unknown_kind(tmp_path):
    with pytest.raises(AtlasValidationError, match=r"modality 'rna' has unknown kind 'count'"):
        convert(rna(), tmp_path / "a.zarr", sample_key="sample", modalities={"rna": "count"})
    assert not any(tmp_path.iterdir())


def test_obscure_inputs_get_clear_errors_or_a_documented_conversion(tmp_path):
    """Issue 11 item 8: an empty-string sample label became a sample named ""; a 0-feature modality
    converted and failed later with ZeroDivisionError; float16 input failed with a SciPy dtype error.
    Now: clear errors naming the cell / modality and the fix, and float16 stored as float32 (exact)."""
    import anndata as ad
    import pandas as pd

    from atlasfit.io import AtlasValidationError, convert, open_atlas

    obs = pd.DataFrame({"s": ["a", "a", "", "b"]}, index=[f"c{i}" for i in range(4)])
    with pytest.raises(AtlasValidationError, match=r"empty sample label .* at cell 'c2'"):
        convert(ad.AnnData(np.ones((4, 3), np.float32), obs=obs), tmp_path / "e.zarr", sample_key="s")
    assert not (tmp_path / "e.zarr").exists()
    ok = obs.assign(s=["a", "a", "b", "b"])
    with pytest.raises(AtlasValidationError, match=r"modality 'rna' has no features"):
        convert(ad.AnnData(np.ones((4, 0), np.float32), obs=ok), tmp_path / "z.zarr", sample_key="s")
    x16 = np.array([[0, 1, 2], [3, 0, 5], [1, 1, 0], [0, 0, 7]], dtype=np.float16)
    atlas = open_atlas(convert(ad.AnnData(x16, obs=ok), tmp_path / "h.zarr", sample_key="s"))
    got = np.concatenate([atlas.read_block("rna", s).toarray() for s in ("a", "b")])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x16.astype(np.float32))
