"""Checks on atlas data: one sample block at a time, with errors that name the culprit and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._layout import ATLAS_KEY, KINDS, SOURCE_ROW


class AtlasValidationError(ValueError):
    """Raised when a source or an atlas store breaks the atlas contract.

    The message names the modality, sample, first offending cell / feature and the fix.

    Examples
    --------
    >>> issubclass(AtlasValidationError, ValueError)
    True
    """


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


def validate(store_or_source, *, sample_key: str | None = None, kinds=None) -> None:
    """Check an atlas store, or a source before conversion, without changing it.

    For an atlas store (a directory written by :func:`write_atlas` / :func:`convert`) every
    sample block is checked against the modality kind, the bookkeeping against obs, and shared
    samples for identical cells in identical order. Anything else is treated as a source (path to
    .h5ad / .h5mu / .zarr, AnnData, MuData or dict of AnnData) and streamed through the same checks
    :func:`convert` runs, writing nothing.

    Parameters
    ----------
    store_or_source
        Atlas store path, or a source as accepted by :func:`convert`.
    sample_key
        obs column with the sample labels (required for sources).
    kinds
        ``{modality: kind}`` for sources (default ``"counts"``).

    Raises
    ------
    AtlasValidationError
        Naming modality, sample, first offending cell / feature and the fix.

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
            validate_store(p)
            return
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


def validate_store(path) -> None:
    """Check every block and the bookkeeping of an atlas store (see :func:`validate`)."""
    from ._open import open_atlas

    atlas = open_atlas(path)
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
