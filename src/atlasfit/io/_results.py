"""Write results back into an atlas store (never rewriting X), and return rows in source order."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

from .._xp import to_numpy
from ._layout import ATLAS_KEY, MODELS_KEY, SOURCE_ROW, dense_row_chunk, open_root, set_encoding
from ._open import Atlas, open_atlas
from ._txn import check_writable, commit, staging as _staging
from ._validate import AtlasValidationError


def _store_block(block, path: str = "", block_info=None):
    """Write one Dask block into the zarr array at ``path`` (runs on the worker)."""
    import zarr

    loc = block_info[0]["array-location"]
    arr = zarr.open_array(path, mode="r+")
    if sp.issparse(block) or type(block).__module__.startswith("cupyx"):
        block = block.toarray()
    arr[tuple(slice(a, b) for a, b in loc)] = to_numpy(block)
    return np.zeros((1,) * len(loc), dtype=bool)


def _write_array(parent, name: str, arr, *, dims=None) -> None:
    """Write a NumPy / Dask array as an anndata ``array`` (plus xarray ``_ARRAY_DIMENSIONS``)."""
    if isinstance(arr, da.Array):
        if arr.ndim == 0:
            arr = arr.compute()
    if isinstance(arr, da.Array):
        shape = tuple(int(s) for s in arr.shape)
        if any(np.isnan(s) for s in arr.shape):
            raise AtlasValidationError(f"result '{name}' has unknown chunk sizes; call compute_chunk_sizes()")
        rows = dense_row_chunk(int(np.prod(shape[1:])) if len(shape) > 1 else 1)
        chunks = (min(rows, max(1, shape[0])),) + tuple(max(1, s) for s in shape[1:])
        dtype = np.dtype(arr.dtype)
        z = parent.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
        set_encoding(z, "array", "0.2.0")
        if dims is not None:
            z.attrs["_ARRAY_DIMENSIONS"] = list(dims)
        # aligned: every Dask block covers whole zarr chunks, so no two tasks write one chunk
        aligned = arr.rechunk(chunks)
        path = str(Path(parent.store.root) / parent.path / name)
        aligned.map_blocks(_store_block, path=path, dtype=bool,
                           chunks=tuple((1,) * len(c) for c in aligned.chunks),
                           meta=np.empty((0,) * arr.ndim, dtype=bool)).compute()
        return
    if sp.issparse(arr):
        write_elem(parent, name, sp.csr_matrix(arr))
        return
    a = to_numpy(arr)
    if a.dtype.kind in "OU":
        write_elem(parent, name, a.astype(object))
    else:
        write_elem(parent, name, a)
    if dims is not None:
        parent[name].attrs["_ARRAY_DIMENSIONS"] = list(dims)


def _write_dataset(parent, name: str, ds) -> None:
    """An xarray Dataset (or dict of arrays) as an anndata dict group readable by xarray too."""
    import xarray as xr

    g = parent.create_group(name)
    set_encoding(g, "dict", "0.1.0")
    if isinstance(ds, Mapping) and not isinstance(ds, xr.Dataset):
        for k, v in ds.items():
            if isinstance(v, Mapping):
                _write_dataset(g, str(k), v)
            elif isinstance(v, (str, int, float, bool, np.generic)):
                write_elem(g, str(k), v)
            else:
                _write_array(g, str(k), v)
        return
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"write_results: group '{name}' must be an xarray.Dataset or a dict of arrays, "
                        f"not {type(ds).__name__}")
    for k, v in ds.variables.items():
        data = v.data
        coords = [c for c in ds.coords if c != k and k in ds.data_vars and set(ds[c].dims) <= set(v.dims)]
        _write_array(g, str(k), data, dims=v.dims)
        if coords:
            g[str(k)].attrs["coordinates"] = " ".join(str(c) for c in coords)
        if v.attrs:
            g[str(k)].attrs.update(json.loads(json.dumps(v.attrs, default=str)))
    if ds.attrs:
        g.attrs.update(json.loads(json.dumps(ds.attrs, default=str)))


def write_results(store, *, obsm=None, varm=None, uns=None, groups=None, model: str | None = None,
                  replaces=(), staging=None) -> None:
    """Write fit results into an atlas store without touching X.

    Parameters
    ----------
    store
        Atlas store path (or an :class:`Atlas`).
    obsm
        ``{modality: {key: array}}`` with rows in STORE order (NumPy, SciPy sparse or Dask; Dask
        arrays are rechunked to the zarr chunks and written from the workers).
    varm
        ``{modality: {key: array}}`` with one row per feature.
    uns
        ``{key: nested dict of arrays / scalars / str}`` written to the root ``uns``.
    groups
        ``{name: xarray.Dataset or dict of arrays}`` written to root ``uns/atlasfit_models/<name>``
        (readable with ``xarray.open_zarr(store, group="uns/atlasfit_models/<name>")`` and by mudata
        as ``mdata.uns["atlasfit_models"][name]``).
    model
        Name of the result set (a model's key). Elements that an earlier write under the same name
        wrote and this one does not (e.g. another modality's ``obsm``) are removed in the same
        all-or-nothing write, so a model's results are replaced as a whole; the names are recorded in
        the ``atlasfit-results`` attribute of ``uns/atlasfit_models``.
    replaces
        Further element paths (relative to the store, e.g. ``"mod/atac/obsm/X_m"``) that belong to
        ``model`` and are removed when they exist and are not written now (results of stores written
        before the registry existed).
    staging
        A :func:`atlasfit.io._txn.staging` area the caller already holds (its scratch is kept).

    Raises
    ------
    AtlasReadOnlyError
        (an :class:`AtlasValidationError` and a ``PermissionError``) before any work when the store
        cannot be written.

    Notes
    -----
    All or nothing, under a kill at any moment: every element is staged inside the store's hidden
    ``.atlasfit-txn`` directory, a journal listing the moves is committed atomically, the moves are
    applied, and a write interrupted after its commit point is completed by the next
    :func:`open_atlas` or write (docs/store.md, "Results").

    Examples
    --------
    >>> import anndata as ad, numpy as np, tempfile, os
    >>> items = [("A", {"rna": ad.AnnData(np.ones((2, 3), np.float32))})]
    >>> p = write_atlas(os.path.join(tempfile.mkdtemp(), "a.zarr"), items)
    >>> write_results(p, obsm={"rna": {"X_fit": np.zeros((2, 4))}})
    >>> open_atlas(p).obs("rna").shape[0]
    2
    """
    atlas = store if isinstance(store, Atlas) else open_atlas(store)
    path = atlas.path
    obsm, varm, uns, groups = dict(obsm or {}), dict(varm or {}), dict(uns or {}), dict(groups or {})
    plan: list[tuple[str, str, object]] = []  # (relative target, kind, value)
    for what, d in (("obsm", obsm), ("varm", varm)):
        for mod, items in d.items():
            if mod not in atlas.modalities:
                raise AtlasValidationError(f"write_results: {what} names modality '{mod}' not in the atlas "
                                           f"(has {atlas.modalities})")
            n = atlas.n_obs(mod) if what == "obsm" else atlas._mod(mod)["n_vars"]
            for key, arr in items.items():
                if arr.shape[0] != n:
                    raise AtlasValidationError(
                        f"write_results: {what}['{key}'] of modality '{mod}' has {arr.shape[0]} rows but the "
                        f"modality has {n} {'cells' if what == 'obsm' else 'features'}; "
                        f"{'give rows in store order' if what == 'obsm' else 'give one row per feature'}"
                    )
                plan.append((f"mod/{mod}/{what}/{key}", "array", arr))
    for key, val in uns.items():
        if key in (ATLAS_KEY, MODELS_KEY):
            raise AtlasValidationError(f"write_results: uns key '{key}' is reserved; use groups= for models")
        plan.append((f"uns/{key}", "uns", val))
    for name, ds in groups.items():
        plan.append((f"uns/{MODELS_KEY}/{name}", "group", ds))
    if not plan and model is None:
        return
    parents = {t.rsplit("/", 1)[0] for t, _, _ in plan} | {t for t, _, _ in plan}
    check_writable(path, sorted(parents | {"uns", f"uns/{MODELS_KEY}"} | {str(r) for r in replaces}))
    with contextlib.nullcontext(staging) if staging is not None else _staging(path) as st:
        new = st.path / "new"
        root = open_root(new, "w")
        staged = []
        for i, (target, kind, val) in enumerate(plan):
            name = f"e{i}"
            if kind == "array":
                _write_array(root, name, val)
            elif kind == "uns":
                write_elem(root, name, val)
            else:
                _write_dataset(root, name, val)
            staged.append((f"new/{name}", target))
        commit(st, staged, models_key=MODELS_KEY, model=model, replaces=replaces)


def to_source_order(atlas: Atlas, mod: str, array):
    """Reorder rows from store order to the source's order of modality ``mod``.

    Parameters
    ----------
    atlas
        An :class:`Atlas` (or a store path).
    mod
        Modality name.
    array
        NumPy / Dask / SciPy sparse array or pandas DataFrame with one row per cell in store order.

    Returns
    -------
    Same type, rows in the order of the source the store was converted from.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, tempfile, os
    >>> a = ad.AnnData(np.ones((3, 2), np.float32), obs=pd.DataFrame({"s": ["B", "A", "B"]},
    ...                index=["c0", "c1", "c2"]))
    >>> atlas = open_atlas(convert(a, os.path.join(tempfile.mkdtemp(), "a.zarr"), sample_key="s"))
    >>> list(atlas.obs("rna").index), list(to_source_order(atlas, "rna", atlas.obs("rna")).index)
    (['c0', 'c2', 'c1'], ['c0', 'c1', 'c2'])
    """
    if not isinstance(atlas, Atlas):
        atlas = open_atlas(atlas)
    src = atlas.obs(mod)[SOURCE_ROW].to_numpy().astype(np.int64)
    if array.shape[0] != src.shape[0]:
        raise ValueError(f"to_source_order: array has {array.shape[0]} rows but modality '{mod}' has "
                         f"{src.shape[0]} cells; give one row per cell in store order")
    inv = np.empty_like(src)
    inv[src] = np.arange(src.shape[0])
    if isinstance(array, (pd.DataFrame, pd.Series)):
        return array.iloc[inv]
    return array[inv]


from ._convert import convert  # noqa: E402,F401  (doctest namespace)
from ._write import write_atlas  # noqa: E402,F401  (doctest namespace)
