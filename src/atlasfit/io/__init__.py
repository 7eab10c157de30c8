"""The atlas store: a sample-chunked Zarr store in MuData layout, opened lazily as Dask arrays.

Layout (Zarr format 2, not consolidated; what ``mudata.write_zarr`` writes)::

    atlas.zarr/
      .zattrs                 encoding-type MuData, axis 0
      obs/ var/               global obs (union of cell names, modality-major, like mudata) / var
      obsmap/<mod> varmap/<mod>   1-based row of each global cell/feature in the modality (0 = absent)
      obsm/<mod> varm/<mod>   boolean membership masks (as mudata writes them)
      uns/atlasfit/           bookkeeping: format_version, sample_key, samples (global order),
                              modalities, mods/<mod>/{kind, samples, offsets, has_X, n_vars,
                              integrity (per-sample nnz + CRC-32 of X / layers)}, complete (LAST)
      uns/atlasfit_models/<name>/   model groups from write_results(groups=...)
      mod/<mod>/              one AnnData group per modality
        X or layers/<l>       counts: csr_matrix (source dtype); binary (0/1/NaN): dense
        obs/                  cells sorted by sample; columns <sample_key>, atlasfit_source_row
        var/ obsm/ varm/ obsp/ varp/ uns/atlasfit/

Two ordering rules: (1) samples in global order = first appearance in the source (scanning
modalities in the given order) and, within each modality, cells sorted by sample with cells of a
sample in source order; (2) a sample shared by several modalities lists the same cells (matched by
name) in the same order in each. ``atlasfit_source_row`` records each cell's row in the source
modality, so :func:`to_source_order` returns results in the user's order.
"""

import importlib

# Imported on first use (PEP 562): workers import only ``atlasfit.io._blocks`` (Zarr + SciPy).
_LAZY = {
    "convert": "._convert",
    "Atlas": "._open",
    "open_atlas": "._open",
    "to_source_order": "._results",
    "write_results": "._results",
    "AtlasValidationError": "._errors",
    "validate": "._validate",
    "write_atlas": "._write",
    "AtlasReadOnlyError": "._txn",
    "read_mudata": "._mudata",
    "mudata_options": "._mudata",
}


def __getattr__(name: str):
    try:
        mod = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'atlasfit.io' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Atlas",
    "AtlasReadOnlyError",
    "AtlasValidationError",
    "convert",
    "mudata_options",
    "open_atlas",
    "read_mudata",
    "to_source_order",
    "validate",
    "write_atlas",
    "write_results",
]
