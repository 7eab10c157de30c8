"""Checks on atlas data: one sample block at a time, with errors that name the culprit and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._blocks import _group
from ._errors import AtlasValidationError
from ._integrity import (
    FIX,
    bad_metadata,
    decode_all,
    metadata_failure,
    metadata_files,
    metadata_guard,
    missing_chunks,
    zarr_arrays,
)
from ._layout import ATLAS_KEY, KINDS, SOURCE_ROW

_FIX = {
    "nonfinite": "replace NaN/inf values (or declare the modality kind 'binary' if NaN marks missing values)",
    "negative": "kind 'counts' needs counts >= 0; pass kinds={{'{mod}': 'continuous'}} for other data",
    "nonint": "kind 'counts' needs integer counts; pass kinds={{'{mod}': 'continuous'}} for other data",
    "binary": "kind 'binary' allows only 0, 1 and NaN (missing); binarise the data or choose another kind",
    "inf": "kind 'binary' allows only 0, 1 and NaN (missing); replace inf values",
}


def check_kind(mod: str, kind: str) -> str:
    """Return ``kind`` if it is a known data kind, else raise naming the modality."""
    if kind not in KINDS:
        raise AtlasValidationError(
            f"modality '{mod}' has unknown kind {kind!r}; use one of {', '.join(map(repr, KINDS))}"
        )
    return kind


def _first_bad(block, bad_fn):
    """(row, col, value) of the first entry (row-major) where ``bad_fn(values)`` holds, else None."""
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        if not block.has_sorted_indices:
            block = block.sorted_indices()
        data = np.asarray(block.data)
        bad = bad_fn(data)
        if not bad.any():
            return None
        i = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(block.indptr, i, side="right") - 1)
        return row, int(block.indices[i]), data[i]
    arr = np.asarray(block)
    bad = bad_fn(arr)
    if not bad.any():
        return None
    flat = int(np.flatnonzero(bad.ravel())[0])
    row, col = divmod(flat, arr.shape[1])
    return row, col, arr[row, col]


def check_block(block, *, mod: str, sample: str, kind: str, element: str, obs_names, var_names) -> None:
    """Check one sample's block of one modality element against the modality ``kind``.

    Parameters
    ----------
    block
        ``scipy.sparse`` matrix or dense array, cells x features.
    mod, sample, element
        Names used in the error message (``element`` is ``"X"`` or ``"layers/<name>"``).
    kind
        ``"counts"``, ``"binary"`` or ``"continuous"``.
    obs_names, var_names
        Cell and feature names of the block (to name the first offending entry).

    Examples
    --------
    >>> import numpy as np
    >>> check_block(np.array([[0, 2]]), mod="rna", sample="S1", kind="counts",
    ...             element="X", obs_names=["c1"], var_names=["g1", "g2"])
    """
    dtype = block.dtype
    if dtype.kind not in "biuf":
        raise AtlasValidationError(
            f"modality '{mod}' {element} has non-numeric dtype {dtype} in sample '{sample}'; "
            "store numbers (counts, 0/1/NaN or floats)"
        )
    floating = dtype.kind == "f"
    checks = []
    if kind == "binary":
        if floating:
            checks.append(("inf", "infinite values", lambda v: np.isinf(v)))
        checks.append(
            ("binary", "values outside {0, 1, NaN}", lambda v: ~((v == 0) | (v == 1) | np.isnan(v))
             if floating else ~((v == 0) | (v == 1)))
        )
    else:
        if floating:
            checks.append(("nonfinite", "NaN or infinite values", lambda v: ~np.isfinite(v)))
        if kind == "counts":
            checks.append(("negative", "negative values", lambda v: v < 0))
            if floating:
                checks.append(("nonint", "non-integer values", lambda v: v != np.round(v)))
    for code, what, fn in checks:
        hit = _first_bad(block, fn)
        if hit is not None:
            r, c, v = hit
            fix = _FIX[code].format(mod=mod)
            raise AtlasValidationError(
                f"modality '{mod}' {element} has {what} in sample '{sample}' (first at cell "
                f"'{obs_names[r]}', feature '{var_names[c]}', value {v!r}); {fix}"
            )


def check_unique(names, *, what: str, mod: str, sample: str | None = None) -> None:
    """Raise if ``names`` holds duplicates, naming the first duplicate."""
    idx = pd.Index(names)
    if not idx.is_unique:
        dup = idx[idx.duplicated()][0]
        where = f" in sample '{sample}'" if sample is not None else ""
        raise AtlasValidationError(
            f"modality '{mod}' has duplicate {what} name '{dup}'{where}; make the names unique "
            f"(e.g. AnnData.{'obs' if what == 'cell' else 'var'}_names_make_unique())"
        )


def check_labels(labels, obs_names, *, mod: str, sample_key: str) -> np.ndarray:
    """Return sample labels as strings; raise naming the first cell whose label is missing."""
    s = pd.Series(np.asarray(labels, dtype=object))
    miss = s.isna().to_numpy()
    if miss.any():
        i = int(np.flatnonzero(miss)[0])
        raise AtlasValidationError(
            f"modality '{mod}' has a missing sample label (obs['{sample_key}'] is NaN/None) at cell "
            f"'{obs_names[i]}' ({int(miss.sum())} cells in all); give every cell a sample or drop those cells"
        )
    out = s.astype(str).to_numpy(dtype=object)
    empty = np.array([not str(v).strip() for v in out], dtype=bool)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise AtlasValidationError(
            f"modality '{mod}' has an empty sample label (obs['{sample_key}'] is {out[i]!r}) at cell "
            f"'{obs_names[i]}' ({int(empty.sum())} cells in all); give every cell a sample name or drop those cells"
        )
    return out


@dataclass
class ValidationReport:
    """What :func:`validate` checked on an atlas store, and what it did not.

    ``str(report)`` is the text that ``atlasfit validate`` prints.

    Attributes
    ----------
    store : pathlib.Path
    deep : bool
        True: every chunk file and every sample's integrity record were checked.
    format_version : str
    has_records : bool
        Whether the store holds integrity records (format >= 1.1).
    checked, not_checked, notes : list of str
    """

    store: Path
    deep: bool
    format_version: str
    has_records: bool
    checked: list = field(default_factory=list)
    not_checked: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        how = "deep check" if self.deep else "fast check: metadata only"
        lines = [f"atlas store '{self.store}' (format {self.format_version}): no problem found ({how})"]
        lines += [f"  checked: {c}" for c in self.checked]
        lines += [f"  NOT checked: {c}" for c in self.not_checked]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def validate(store_or_source, *, sample_key: str | None = None, kinds=None, deep: bool = True):
    """Check an atlas store, or a source before conversion, without changing it.

    For an atlas store (a directory written by :func:`write_atlas` / :func:`convert`):

    * always (``deep=False`` does only this; fast, reads no cell-sized data): every Zarr metadata
      file parses, the bookkeeping is complete and consistent (sample lists, offsets) and every
      element's shape agrees with it;
    * ``deep=True`` (default) also: every chunk file of X / layers exists (stores of format >= 1.1)
      and every chunk file of the store decodes, every sample block of every element matches its
      integrity record (nnz and CRC-32, see docs/store.md "Integrity") and the modality kind, the
      obs labels match the bookkeeping and shared samples hold identical cells in identical order.

    Anything else is treated as a source (path to .h5ad / .h5mu / .zarr, AnnData, MuData or dict of
    AnnData) and streamed through the same checks :func:`convert` runs, writing nothing.

    Parameters
    ----------
    store_or_source
        Atlas store path, or a source as accepted by :func:`convert`.
    sample_key
        obs column with the sample labels (required for sources).
    kinds
        ``{modality: kind}`` for sources (default ``"counts"``).
    deep
        For a store: read every chunk (True, default; costs a full read of the store) or check the
        metadata only (False; the report lists what was not checked).

    Returns
    -------
    ValidationReport or None
        For a store, what was checked and what was not (``print(report)``); None for a source.

    Raises
    ------
    AtlasValidationError
        Naming modality, sample, first offending cell / feature (or array and chunk file of a
        damaged store) and the fix.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> a = ad.AnnData(np.ones((2, 2)), obs=pd.DataFrame({"s": ["A", "B"]}, index=["c1", "c2"]))
    >>> validate(a, sample_key="s")
    """
    from ._convert import _source_stream
    from ._write import _run_stream

    if isinstance(store_or_source, (str, Path)):
        p = Path(store_or_source)
        if not p.exists():
            raise AtlasValidationError(f"'{p}' does not exist; give an atlas store or a source file")
        if p.is_dir() and (p / "uns" / ATLAS_KEY).exists() or (p.is_dir() and sample_key is None):
            return validate_store(p, deep=deep)
    if sample_key is None:
        raise AtlasValidationError(
            "validate: a source needs sample_key (the obs column naming each cell's sample)"
        )
    kinds = {str(m): check_kind(str(m), k) for m, k in (kinds or {}).items()}
    order, stream = _source_stream(store_or_source, sample_key=sample_key)
    try:
        _run_stream(None, stream, sample_key=sample_key, kinds=kinds, mod_order=order)
    finally:
        stream.close()
    return None


def _check_shapes(atlas) -> int:
    """Element shapes against the bookkeeping (metadata only); returns the number of elements."""
    g = _group(str(atlas.path))
    n_el = 0
    for mod in atlas.modalities:
        d = atlas._info["mods"][mod]
        o = d["offsets"]
        if o.shape[0] != len(d["samples"]) + 1 or o[0] != 0 or (np.diff(o) < 0).any():
            raise AtlasValidationError(
                f"atlas store '{atlas.path}': the offsets of modality '{mod}' do not fit its "
                f"{len(d['samples'])} samples; {FIX}")
        n = int(o[-1])
        for key, storage in d["storage"].items():
            node = g[f"mod/{mod}/{key}"]
            if storage == "csr":
                shape = tuple(node.attrs.get("shape", ()))
                got = {"shape": shape, "indptr": node["indptr"].shape, "data": node["data"].shape,
                       "indices": node["indices"].shape}
                ok = (shape == (n, d["n_vars"]) and got["indptr"] == (n + 1,)
                      and got["data"] == got["indices"])
                if ok and d["records"] is not None:
                    ok = got["data"] == (int(d["records"][key]["nnz"].sum()),)
            else:
                got = {"shape": node.shape}
                ok = node.shape == (n, d["n_vars"])
            if not ok:
                raise AtlasValidationError(
                    f"atlas store '{atlas.path}' is damaged: modality '{mod}' element '{key}' has shapes "
                    f"{got}, the bookkeeping says {n} cells x {d['n_vars']} features; {FIX}")
            n_el += 1
    return n_el


def validate_store(path, deep: bool = True) -> ValidationReport:
    """Check an atlas store (see :func:`validate`); returns the :class:`ValidationReport`."""
    from ._open import open_atlas

    p = Path(path).absolute()
    if p.is_dir():
        hit = bad_metadata(p)
        if hit is not None:
            raise metadata_failure(p, hit[1])
    atlas = open_atlas(p)
    with metadata_guard(atlas.path):
        n_el = _check_shapes(atlas)
    arrays = zarr_arrays(atlas.path)
    n_samples = sum(len(atlas.sample_slices(m)) for m in atlas.modalities)
    rep = ValidationReport(store=atlas.path, deep=deep, format_version=atlas._info["format_version"],
                           has_records=atlas.has_records)
    rep.checked += [f"metadata: {sum(1 for _ in metadata_files(atlas.path))} Zarr metadata files parse",
                    (f"bookkeeping: {len(atlas.modalities)} modalities, {n_samples} (modality, sample) "
                    f"blocks, complete flag; shapes of {n_el} X / layer elements agree with it")]
    if not atlas.has_records:
        rep.notes.append(
            f"the store has no integrity records (format {rep.format_version}, written before records "
            "existed): a missing chunk reads as zeros and a damaged one is noticed only if it does not "
            "decode; re-run convert (atlasfit.io.convert(source, store, overwrite=True)) to add them")
    if not deep:
        rep.not_checked += [
            f"chunk files of the {len(arrays)} Zarr arrays (that they exist and decode)",
            f"the integrity records of the {n_samples} sample blocks (nnz, CRC-32)",
            "values against the modality kinds; obs sample labels, cell names, shared samples"]
        rep.notes.append("run validate(store) (command line: atlasfit validate STORE) for the deep check")
        return rep
    elements = {f"mod/{m}/{k}" for m in atlas.modalities for k in atlas._info["mods"][m]["storage"]}
    element_arrays = set()
    for e in elements:
        st = atlas._info["mods"][e.split("/")[1]]["storage"][e.split("/", 2)[2]]
        element_arrays |= {f"{e}/{a}" for a in ("data", "indices", "indptr")} if st == "csr" else {e}
    absent = []
    for key in sorted(element_arrays):
        lost = missing_chunks(atlas.path, key)
        if lost and atlas.has_records:
            m = key.split("/")[1]
            raise AtlasValidationError(
                f"atlas store '{atlas.path}' is damaged: modality '{m}', {_samples_of(atlas, key, lost[0])}, "
                f"array '{key}': chunk file '{lost[0]}' is missing ({len(lost)} missing in all; Zarr would "
                f"read them as zeros); {FIX}")
        absent += lost
    if absent:
        rep.notes.append(f"{len(absent)} chunk files of X / layers are absent (first '{absent[0]}'); a "
                         f"format {rep.format_version} store leaves all-zero chunks unwritten, so they "
                         "cannot be told from lost ones")
    n_chunks = sum(decode_all(atlas.path, key) for key in arrays if key not in element_arrays)
    _check_blocks(atlas)
    rep.checked += [
        (f"chunk files: every chunk of the {len(element_arrays)} X / layer arrays "
        f"{'exists and ' if atlas.has_records else ''}decodes; the {n_chunks} chunks of the other "
        f"{len(arrays) - len(element_arrays)} arrays decode"),
        (f"sample blocks: {n_samples} blocks read"
        f"{' and matched with their integrity records (nnz, CRC-32)' if atlas.has_records else ''}"
        " and checked against the modality kinds"),
        "obs: sample labels, cell and feature names, atlasfit_source_row, shared samples"]
    return rep


def _samples_of(atlas, array_key: str, chunk: Path) -> str:
    """The samples whose rows or entries lie in a chunk file of an X / layer array, in words."""
    import zarr

    _, mod, rest = array_key.split("/", 2)
    d = atlas._info["mods"][mod]
    element, array = (rest.rsplit("/", 1) if rest not in d["storage"] else (rest, None))
    z = zarr.open_array(str(atlas.path / array_key), mode="r")
    i = int(chunk.name.split(z.metadata.dimension_separator if hasattr(z.metadata, "dimension_separator")
                            else ".")[0])
    lo, hi = i * int(z.chunks[0]), (i + 1) * int(z.chunks[0])
    if array in ("data", "indices"):
        if d["records"] is None:
            return "samples unknown"
        starts = np.concatenate([d["records"][element]["start"], [d["records"][element]["nnz"].sum()]])
    else:
        starts = d["offsets"]  # rows (indptr has one more entry than rows)
    hit = [smp for k, smp in enumerate(d["samples"]) if starts[k] < hi and starts[k + 1] > lo
           or (array == "indptr" and starts[k + 1] == lo)]
    if not hit:
        return "no sample"
    more = f" and {len(hit) - 1} more" if len(hit) > 1 else ""
    return f"sample '{hit[0]}'{more}"


def _check_blocks(atlas) -> None:
    """Every block (read with its integrity check) against the kind, obs labels and shared samples."""
    ref_names: dict[str, tuple[str, pd.Index]] = {}
    for mod in atlas.modalities:
        obs = atlas.obs(mod)
        var = atlas.var(mod)
        check_unique(obs.index, what="cell", mod=mod)
        check_unique(var.index, what="feature", mod=mod)
        if atlas.sample_key not in obs.columns:
            raise AtlasValidationError(
                f"modality '{mod}' of store '{atlas.path}' has no obs column '{atlas.sample_key}'; "
                "rewrite the store with atlasfit.io.convert"
            )
        labels = check_labels(obs[atlas.sample_key], obs.index, mod=mod, sample_key=atlas.sample_key)
        src = obs[SOURCE_ROW].to_numpy() if SOURCE_ROW in obs.columns else None
        if src is None or not np.array_equal(np.sort(src), np.arange(len(obs))):
            raise AtlasValidationError(
                f"modality '{mod}' of store '{atlas.path}': obs['{SOURCE_ROW}'] is missing or not a "
                "permutation of the rows; rewrite the store with atlasfit.io.convert"
            )
        elements = ([None] if atlas._info["mods"][mod]["has_X"] else []) + atlas.layers(mod)
        for sample, sl in atlas.sample_slices(mod).items():
            if sl.stop <= sl.start:
                raise AtlasValidationError(
                    f"modality '{mod}' lists sample '{sample}' with zero cells; drop the sample from "
                    "the modality or add its cells"
                )
            bad = np.flatnonzero(labels[sl] != sample)
            if bad.size:
                c = obs.index[sl.start + int(bad[0])]
                raise AtlasValidationError(
                    f"modality '{mod}': cell '{c}' lies in the rows of sample '{sample}' but its "
                    f"obs['{atlas.sample_key}'] is '{labels[sl.start + int(bad[0])]}'; the store is "
                    "inconsistent, rewrite it with atlasfit.io.convert"
                )
            names = obs.index[sl]
            for layer in elements:
                block = atlas.read_block(mod, sample, layer=layer)
                check_block(block, mod=mod, sample=sample, kind=atlas.kind(mod),
                            element="X" if layer is None else f"layers/{layer}",
                            obs_names=names, var_names=var.index)
            if sample in ref_names:
                rmod, rnames = ref_names[sample]
                if not rnames.equals(names):
                    diff = _first_difference(rnames, names)
                    raise AtlasValidationError(
                        f"modalities '{rmod}' and '{mod}' hold different cells or orders for shared "
                        f"sample '{sample}' (first difference: {diff}); every modality must list a "
                        "shared sample's cells in the same order: rewrite with atlasfit.io.convert"
                    )
            else:
                ref_names[sample] = (mod, pd.Index(names))


def _first_difference(a: pd.Index, b: pd.Index) -> str:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return f"row {i}: '{a[i]}' vs '{b[i]}'"
    return f"{len(a)} vs {len(b)} cells"
