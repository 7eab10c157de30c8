"""Convert AnnData / MuData sources (files or in memory) to an atlas store, sample by sample."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from ._layout import SOURCE_ROW
from ._validate import AtlasValidationError, check_kind, check_labels, check_unique


class _ModSource:
    """One modality of a source: metadata in memory, data read one sample (row set) at a time."""

    def __init__(self, name, obs, var, elements, obsm):
        self.name = name
        self.obs = obs
        self.var = var
        self.elements = elements  # {"X" | layer: reader(sorted_rows) -> block}
        self.obsm = obsm  # {key: reader}


def _mem_reader(arr):
    def read(idx):
        return arr[idx]

    return read


def _node_reader(node):
    """Reader for an on-disk (h5py / zarr) anndata element: CSR/CSC group or dense array."""
    enc = node.attrs.get("encoding-type", None)
    if isinstance(enc, bytes):
        enc = enc.decode()
    if enc in ("csr_matrix", "csc_matrix"):
        ds = sparse_dataset(node)

        def read_sparse(idx):
            return sp.csr_matrix(ds[idx])

        return read_sparse
    if enc not in (None, "array") or getattr(node, "shape", None) is None:
        return None
    is_zarr = not hasattr(node, "id")

    def read_dense(idx):
        if idx.size and idx[-1] - idx[0] + 1 == idx.size:
            return np.asarray(node[int(idx[0]) : int(idx[-1]) + 1])
        if is_zarr:
            return np.asarray(node.get_orthogonal_selection((idx,) + (slice(None),) * (node.ndim - 1)))
        return np.asarray(node[idx])

    return read_dense


def _from_anndata(name, a: ad.AnnData) -> _ModSource:
    elements = {}
    if a.X is not None:
        elements["X"] = _mem_reader(a.X)
    for k in a.layers.keys():
        elements[k] = _mem_reader(a.layers[k])
    obsm = {}
    for k in a.obsm.keys():
        v = a.obsm[k]
        if isinstance(v, pd.DataFrame):
            warnings.warn(f"convert: obsm['{k}'] of modality '{name}' is a DataFrame and is not copied",
                          stacklevel=3)
            continue
        obsm[k] = _mem_reader(v)
    return _ModSource(name, a.obs, a.var, elements, obsm)


def _from_group(name, g) -> _ModSource:
    obs = read_elem(g["obs"])
    var = read_elem(g["var"])
    elements = {}
    if "X" in g:
        r = _node_reader(g["X"])
        if r is not None:  # X may be encoded as "null"
            elements["X"] = r
    if "layers" in g:
        for k in g["layers"].keys():
            r = _node_reader(g["layers"][k])
            if r is None:
                raise AtlasValidationError(f"convert: layer '{k}' of modality '{name}' is not an array or "
                                           "a CSR/CSC matrix; drop it with layers=")
            elements[str(k)] = r
    obsm = {}
    if "obsm" in g:
        for k in g["obsm"].keys():
            r = _node_reader(g["obsm"][k])
            if r is None:
                warnings.warn(f"convert: obsm['{k}'] of modality '{name}' is not an array and is not copied",
                              stacklevel=3)
                continue
            obsm[str(k)] = r
    return _ModSource(name, obs, var, elements, obsm)


def _open_source(source):
    """Return (mods: dict name -> _ModSource, root_obs or None, closer)."""
    if isinstance(source, ad.AnnData):
        return {"rna": _from_anndata("rna", source)}, None, lambda: None
    try:
        import mudata as md
    except ImportError:  # pragma: no cover - mudata is a dependency
        md = None
    if md is not None and isinstance(source, md.MuData):
        return ({m: _from_anndata(m, a) for m, a in source.mod.items()}, source.obs, lambda: None)
    if isinstance(source, Mapping):
        out = {}
        for m, a in source.items():
            if not isinstance(a, ad.AnnData):
                raise AtlasValidationError(f"convert: source['{m}'] is {type(a).__name__}, not AnnData")
            out[str(m)] = _from_anndata(str(m), a)
        return out, None, lambda: None
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.exists():
            raise AtlasValidationError(f"convert: source '{p}' does not exist")
        if p.is_dir():
            import zarr

            f = zarr.open_group(str(p), mode="r")
            closer = lambda: None  # noqa: E731
        elif p.suffix in (".h5ad", ".h5mu", ".h5", ".hdf5"):
            import h5py

            f = h5py.File(p, "r")
            closer = f.close
        else:
            raise AtlasValidationError(f"convert: cannot read '{p}'; give a .h5ad, .h5mu or .zarr path")
        if "mod" in f:
            order = f["mod"].attrs.get("mod-order", None)
            names = [str(m.decode() if isinstance(m, bytes) else m) for m in order] if order is not None \
                else [str(k) for k in f["mod"].keys()]
            mods = {m: _from_group(m, f["mod"][m]) for m in names}
            root_obs = read_elem(f["obs"]) if "obs" in f else None
            return mods, root_obs, closer
        return {"rna": _from_group("rna", f)}, None, closer
    raise AtlasValidationError(
        f"convert: unsupported source type {type(source).__name__}; give a path (.h5ad/.h5mu/.zarr), "
        "AnnData, MuData or dict of AnnData"
    )


def _labels(ms: _ModSource, root_obs, sample_key: str) -> np.ndarray:
    names = pd.Index(ms.obs.index.astype(str))
    if sample_key in ms.obs.columns:
        raw = ms.obs[sample_key]
    elif root_obs is not None and sample_key in root_obs.columns:
        raw = root_obs[sample_key].reindex(names)
    elif root_obs is not None and f"{ms.name}:{sample_key}" in root_obs.columns:
        raw = root_obs[f"{ms.name}:{sample_key}"].reindex(names)
    else:
        raise AtlasValidationError(
            f"modality '{ms.name}' has no sample key: obs has no column '{sample_key}' (columns: "
            f"{list(ms.obs.columns)[:10]}); pass sample_key= naming the column with each cell's sample"
        )
    return check_labels(raw.to_numpy(dtype=object), names, mod=ms.name, sample_key=sample_key)


def _source_stream(source, *, sample_key: str, modalities=None, layers=None):
    """(modality order, generator of (sample, {mod: AnnData})) for a source, one sample at a time."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():  # a .zarr source: name a damaged file
        from ._integrity import SOURCE_FIX, metadata_guard

        with metadata_guard(Path(source).absolute(), what="source", fix=SOURCE_FIX):
            mods, root_obs, closer = _open_source(source)
    else:
        mods, root_obs, closer = _open_source(source)
    try:
        if modalities is not None:
            wanted = list(modalities.keys()) if isinstance(modalities, Mapping) else list(modalities)
            unknown = [m for m in wanted if m not in mods]
            if unknown:
                raise AtlasValidationError(f"convert: modalities {unknown} are not in the source (has "
                                           f"{list(mods)}); fix modalities=")
            mods = {m: mods[m] for m in wanted}
        for m, keep in (layers or {}).items():
            if m not in mods:
                raise AtlasValidationError(f"convert: layers= names modality '{m}' not in {list(mods)}")
            missing = [k for k in keep if k not in mods[m].elements]
            if missing:
                raise AtlasValidationError(f"convert: modality '{m}' has no layers {missing} (has "
                                           f"{[k for k in mods[m].elements if k != 'X']}); fix layers=")
            mods[m].elements = {k: v for k, v in mods[m].elements.items() if k == "X" or k in keep}
        plans = {}
        order: list[str] = []
        seen: set[str] = set()
        for m, ms in mods.items():
            n = ms.obs.shape[0]
            if n == 0:
                raise AtlasValidationError(f"convert: modality '{m}' of the source is empty (zero cells); "
                                           "drop it with modalities= or give it cells")
            names = pd.Index(ms.obs.index.astype(str))
            check_unique(names, what="cell", mod=m)
            check_unique(pd.Index(ms.var.index.astype(str)), what="feature", mod=m)
            labels = _labels(ms, root_obs, sample_key)
            codes, uniques = pd.factorize(pd.Series(labels, dtype=object))
            rows = np.argsort(codes, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(uniques)))])
            plans[m] = (names, {str(u): rows[bounds[i]: bounds[i + 1]] for i, u in enumerate(uniques)})
            for u in uniques:
                if str(u) not in seen:
                    seen.add(str(u))
                    order.append(str(u))
    except BaseException:
        closer()
        raise

    def gen():
        try:
            for s in order:
                item = {}
                ref = None
                for m, ms in mods.items():
                    names, by_sample = plans[m]
                    if s not in by_sample:
                        continue
                    idx = by_sample[s]  # ascending source rows
                    snames = names[idx]
                    perm = None
                    if ref is None:
                        ref = (m, snames)
                    else:
                        rmod, rnames = ref
                        pos = snames.get_indexer(rnames)
                        if len(snames) != len(rnames) or (pos < 0).any():
                            missing = rnames.difference(snames)
                            extra = snames.difference(rnames)
                            cell, where = ((missing[0], f"in '{rmod}' but not in '{m}'") if len(missing)
                                           else (extra[0], f"in '{m}' but not in '{rmod}'"))
                            raise AtlasValidationError(
                                f"modalities '{rmod}' and '{m}' hold different cells for shared sample "
                                f"'{s}' (first: cell '{cell}' is {where}); cells are matched by name across "
                                "modalities, so a shared sample needs the same cells in each (subset them)"
                            )
                        if not np.array_equal(pos, np.arange(len(pos))):
                            perm = pos
                    final = idx if perm is None else idx[perm]

                    def take(reader, idx=idx, perm=perm):
                        block = reader(idx)
                        return block if perm is None else block[perm]

                    obs = ms.obs.iloc[final].copy()
                    obs.index = pd.Index(names[final])
                    obs[SOURCE_ROW] = final.astype(np.int64)
                    x = take(ms.elements["X"]) if "X" in ms.elements else None
                    lay = {k: take(r) for k, r in ms.elements.items() if k != "X"}
                    obsm = {k: take(r) for k, r in ms.obsm.items()}
                    var = ms.var.copy()
                    var.index = var.index.astype(str)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        item[m] = ad.AnnData(X=x, obs=obs, var=var, layers=lay or None, obsm=obsm or None)
                yield s, item
        finally:
            closer()

    return list(mods), gen()


def convert(source, store, *, sample_key: str, modalities=None, layers=None, kinds=None,
            overwrite: bool = False) -> Path:
    """Convert an AnnData / MuData source into an atlas store, streaming sample by sample.

    Parameters
    ----------
    source
        Path to .h5ad / .h5mu / .zarr (AnnData or MuData; opened without loading X), or an in-memory
        AnnData, MuData or ``dict[str, AnnData]``. A plain AnnData becomes modality ``"rna"``.
    store
        Target directory.
    sample_key
        obs column with each cell's sample (looked up in the modality's obs, then in the MuData's
        global obs).
    modalities
        ``None`` (all, in source order), a list of names, or ``{name: kind}`` (kinds ``"counts"``,
        ``"binary"``, ``"continuous"``; default ``"counts"``).
    layers
        ``{modality: [layer, ...]}``: layers to keep (X is always kept when present); default all.
    kinds
        ``{modality: kind}`` for some of the kept modalities (``"counts"``, ``"binary"``,
        ``"continuous"``); the others are ``"counts"``. Unlike the mapping form of ``modalities`` it
        does not select modalities: ``kinds={"atac": "binary"}`` keeps every modality.
    overwrite
        Replace an existing store.

    Returns
    -------
    pathlib.Path

    Notes
    -----
    Samples are ordered by first appearance scanning modalities in order; within a sample cells keep
    the source order of the first modality holding the sample. Cells are matched by name across
    modalities: a shared sample must hold the same cell names in every modality.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd, tempfile, os
    >>> a = ad.AnnData(np.ones((3, 2), np.float32), obs=pd.DataFrame({"s": ["B", "A", "B"]},
    ...                index=["c0", "c1", "c2"]))
    >>> p = convert(a, os.path.join(tempfile.mkdtemp(), "a.zarr"), sample_key="s")
    >>> open_atlas(p).samples["rna"].to_dict()
    {'B': 2, 'A': 1}
    """
    if kinds is not None and not isinstance(kinds, Mapping):
        raise TypeError(f"convert: kinds must be a dict {{modality: kind}}, got {type(kinds).__name__}")
    given = dict(kinds or {})
    kinds = {}
    if isinstance(modalities, Mapping):
        kinds = {str(m): check_kind(str(m), k) for m, k in modalities.items()}
    for m, k in given.items():
        if modalities is not None and str(m) not in [str(x) for x in modalities]:
            raise ValueError(f"convert: kinds names modality {m!r}, which modalities={list(modalities)} does not "
                             "keep; add it to modalities or drop it from kinds")
        kinds[str(m)] = check_kind(str(m), k)
    store = Path(store).absolute()
    if store.exists() and not overwrite:
        raise FileExistsError(f"convert: '{store}' exists; pass overwrite=True to replace it")
    order, stream = _source_stream(source, sample_key=sample_key, modalities=modalities, layers=layers)
    from ._write import _write_atlas

    return _write_atlas(store, stream, sample_key=sample_key, kinds=kinds, overwrite=overwrite,
                        mod_order=order)


from ._open import open_atlas  # noqa: E402,F401  (doctest namespace)
