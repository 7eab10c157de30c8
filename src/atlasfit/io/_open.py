"""Lazy, picklable view of an atlas store: per modality a Dask array whose row blocks are the samples."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from ._blocks import BlockReader, _group, _read_rows
from ._errors import AtlasValidationError
from ._integrity import RECORDS_KEY, expected, load_records, metadata_guard
from ._layout import ATLAS_KEY, open_root


def _read_info(path: Path) -> dict:
    """The bookkeeping of the store at ``path`` (a damaged metadata file is named in the error)."""
    with metadata_guard(path):
        return _read_info_unguarded(path)


def _read_info_unguarded(path: Path) -> dict:
    if not path.is_dir():
        raise AtlasValidationError(f"'{path}' is not an atlas store (no such directory); create one with "
                                   "atlasfit.io.convert or write_atlas")
    book = path / "uns" / ATLAS_KEY
    if not book.is_dir():
        raise AtlasValidationError(
            f"'{path}' is not an atlas store (no uns/{ATLAS_KEY} bookkeeping); create one with "
            "atlasfit.io.convert or write_atlas"
        )
    if not (book / "complete").exists():
        raise AtlasValidationError(
            f"'{path}' is a partially written atlas store (no 'complete' flag in uns/{ATLAS_KEY}); "
            "the writer was interrupted: write it again with overwrite=True"
        )
    g = open_root(str(path), "r")
    info = read_elem(g[f"uns/{ATLAS_KEY}"])
    if not bool(info.get("complete", False)):
        raise AtlasValidationError(f"'{path}' is a partially written atlas store (complete flag false); "
                                   "write it again with overwrite=True")
    mods = {}
    for m in [str(x) for x in info["modalities"]]:
        d = info["mods"][m]
        layers_g = g[f"mod/{m}/layers"]
        layers = sorted(str(k) for k in layers_g.keys())
        storage = {}
        dtypes = {}
        for key in (["X"] if bool(d["has_X"]) else []) + [f"layers/{lay}" for lay in layers]:
            node = g[f"mod/{m}/{key}"]
            enc = node.attrs.get("encoding-type")
            storage[key] = "csr" if enc == "csr_matrix" else "dense"
            dtypes[key] = np.dtype(node["data"].dtype if enc == "csr_matrix" else node.dtype)
        mods[m] = {
            "records": load_records(d.get(RECORDS_KEY), list(storage)),
            "kind": str(d["kind"]),
            "samples": [str(s) for s in d["samples"]],
            "offsets": np.asarray(d["offsets"], dtype=np.int64),
            "has_X": bool(d["has_X"]),
            "n_vars": int(d["n_vars"]),
            "layers": layers,
            "storage": storage,
            "dtypes": dtypes,
        }
    return {
        "sample_key": str(info["sample_key"]),
        "samples": [str(s) for s in info["samples"]],
        "modalities": list(mods),
        "mods": mods,
        "format_version": str(info["format_version"]),
        # changes when the store is rewritten: keeps Dask keys of different stores at one path apart
        "stamp": (book / "complete").stat().st_mtime_ns,
    }


class _RowReader:
    """Array-like handed to ``dask.array.from_array``: holds only the path and element name."""

    def __init__(self, path: str, key: str, storage: str, shape, dtype, stamp=0, expects=None):
        self.path, self.key, self.storage, self.stamp = path, key, storage, stamp
        self.expects = dict(expects or {})  # row range of a sample -> its integrity record
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 2

    def __dask_tokenize__(self):
        return ("atlasfit-rows", self.path, self.key, self.shape, str(self.dtype), self.stamp)

    def __getitem__(self, item):
        rows, cols = item if isinstance(item, tuple) else (item, slice(None))
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("atlas row reader supports contiguous row ranges only")
        out = _read_rows(self.path, self.key, self.storage, start, stop, self.shape[1], self.dtype,
                         self.expects.get((start, stop)))
        if cols != slice(None) and cols != slice(0, self.shape[1], None):
            out = out[:, cols]
        return out


class Atlas:
    """A lazily opened atlas store (picklable: holds the path and the small bookkeeping).

    Use :func:`open_atlas` to create one.

    Attributes
    ----------
    path : pathlib.Path
        The store directory.
    modalities : list of str
        Modality names in store order.
    sample_key : str
        obs column with the sample labels.
    samples : pandas.DataFrame
        Index = global sample names in store order; one int column per modality with that
        modality's cell count (0 = absent).

    Examples
    --------
    >>> import anndata as ad, numpy as np, scipy.sparse as sp, tempfile, os
    >>> items = [(s, {"rna": ad.AnnData(sp.csr_matrix(np.ones((2, 3), np.float32)))}) for s in "AB"]
    >>> for s, m in items:
    ...     m["rna"].obs_names = [f"{s}{i}" for i in range(2)]
    >>> atlas = open_atlas(write_atlas(os.path.join(tempfile.mkdtemp(), "a.zarr"), items))
    >>> atlas.X("rna").chunks[0]
    (2, 2)
    """

    def __init__(self, path):
        self.path = Path(path).absolute()
        self._info = _read_info(self.path)
        self.modalities: list[str] = list(self._info["modalities"])
        self.sample_key: str = self._info["sample_key"]

    def __getstate__(self):
        return {"path": self.path, "_info": self._info, "modalities": self.modalities,
                "sample_key": self.sample_key}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        mods = ", ".join(f"{m}: {self.n_obs(m)} x {self._mod(m)['n_vars']} ({self.kind(m)})"
                         for m in self.modalities)
        return f"Atlas('{self.path}', {len(self._info['samples'])} samples; {mods})"

    # ----------------------------------------------------------------- bookkeeping
    def _mod(self, mod: str) -> dict:
        try:
            return self._info["mods"][mod]
        except KeyError:
            raise KeyError(f"atlas '{self.path}' has no modality '{mod}' (has {self.modalities})") from None

    @property
    def samples(self) -> pd.DataFrame:
        names = self._info["samples"]
        df = pd.DataFrame(index=pd.Index(names, name="sample"))
        for m in self.modalities:
            d = self._mod(m)
            counts = dict(zip(d["samples"], np.diff(d["offsets"]).tolist()))
            df[m] = np.array([counts.get(s, 0) for s in names], dtype=np.int64)
        return df

    def n_obs(self, mod: str) -> int:
        """Number of cells of modality ``mod``."""
        return int(self._mod(mod)["offsets"][-1])

    def kind(self, mod: str) -> str:
        """Data kind of ``mod``: ``"counts"``, ``"binary"`` or ``"continuous"``."""
        return self._mod(mod)["kind"]

    def layers(self, mod: str) -> list[str]:
        """Layer names of ``mod`` (X not included)."""
        return list(self._mod(mod)["layers"])

    def sample_slices(self, mod: str) -> dict[str, slice]:
        """Rows of each sample of ``mod`` (store order), ``{sample: slice}``."""
        d = self._mod(mod)
        o = d["offsets"]
        return {s: slice(int(o[i]), int(o[i + 1])) for i, s in enumerate(d["samples"])}

    def obs(self, mod: str) -> pd.DataFrame:
        """obs of ``mod`` in store order (sample column and ``atlasfit_source_row`` included)."""
        self._mod(mod)
        with metadata_guard(self.path, f"mod/{mod}/obs"):
            return read_elem(_group(str(self.path))[f"mod/{mod}/obs"])

    def var(self, mod: str) -> pd.DataFrame:
        """var of ``mod``."""
        self._mod(mod)
        with metadata_guard(self.path, f"mod/{mod}/var"):
            return read_elem(_group(str(self.path))[f"mod/{mod}/var"])

    # ----------------------------------------------------------------- data
    def _element(self, mod: str, layer):
        d = self._mod(mod)
        if layer is None:
            if not d["has_X"]:
                raise KeyError(f"modality '{mod}' of atlas '{self.path}' has no X; use one of its layers "
                               f"{d['layers']}")
            key = "X"
        else:
            if layer not in d["layers"]:
                raise KeyError(f"modality '{mod}' of atlas '{self.path}' has no layer '{layer}' (has "
                               f"{d['layers']})")
            key = f"layers/{layer}"
        return f"mod/{mod}/{key}", d["storage"][key], d["dtypes"][key], d["n_vars"]

    def X(self, mod: str, layer: str | None = None) -> da.Array:
        """Cells x features Dask array of ``mod`` (or its ``layer``) whose row chunks are the samples.

        Blocks are ``scipy.sparse.csr_matrix`` (CSR-stored elements such as counts) or NumPy arrays
        (dense elements), read on the worker; the graph holds only the path and the row range.
        """
        key, storage, dtype, n_vars = self._element(mod, layer)
        counts = tuple(int(c) for c in np.diff(self._mod(mod)["offsets"]))
        d = self._mod(mod)
        expects = {}
        for i, (smp, sl) in enumerate(self.sample_slices(mod).items()):
            e = expected(d["records"], key.split("/", 2)[2], i, mod, smp)
            if e is not None:
                expects[(sl.start, sl.stop)] = e
        reader = _RowReader(str(self.path), key, storage, (sum(counts), n_vars), dtype,
                            self._info["stamp"], expects)
        meta = sp.csr_matrix((0, 0), dtype=dtype) if storage == "csr" else np.empty((0, 0), dtype=dtype)
        return da.from_array(reader, chunks=(counts, (n_vars,)), asarray=False, fancy=False,
                             meta=meta, name=f"atlas-{mod}-{key.rsplit('/', 1)[-1]}-"
                             + da.core.tokenize(reader))

    def block_reader(self) -> BlockReader:
        """A small picklable reader of whole-sample blocks for workers (see :mod:`atlasfit.io._blocks`)."""
        elements, records = {}, {}
        for m in self.modalities:
            d = self._mod(m)
            for lay in ([None] if d["has_X"] else []) + list(d["layers"]):
                elements[(m, lay)] = self._element(m, lay)
                el = "X" if lay is None else f"layers/{lay}"
                if d["records"] is not None:
                    records[(m, lay)] = d["records"][el]
        return BlockReader(str(self.path), elements, {m: self.sample_slices(m) for m in self.modalities},
                           records)

    def read_block(self, mod: str, sample: str, layer: str | None = None):
        """The block of ``sample`` in ``mod``: ``csr_matrix`` or ndarray of that sample's cells."""
        key, storage, dtype, n_vars = self._element(mod, layer)
        sl = self.sample_slices(mod)
        if sample not in sl:
            raise KeyError(f"sample '{sample}' is not in modality '{mod}' of atlas '{self.path}' (it has "
                           f"{len(sl)} samples, e.g. {list(sl)[:5]})")
        s = sl[sample]
        d = self._mod(mod)
        exp = expected(d["records"], key.split("/", 2)[2], list(sl).index(sample), mod, sample)
        return _read_rows(str(self.path), key, storage, s.start, s.stop, n_vars, dtype, exp)

    @property
    def has_records(self) -> bool:
        """Whether the store holds integrity records (format >= 1.1; see docs/store.md, "Integrity")."""
        return all(self._mod(m)["records"] is not None for m in self.modalities)


def open_atlas(store) -> Atlas:
    """Open an atlas store lazily.

    Parameters
    ----------
    store
        Path of a store written by :func:`write_atlas` or :func:`convert`.

    Returns
    -------
    Atlas

    Raises
    ------
    AtlasValidationError
        If ``store`` is not an atlas store or is partially written.

    Examples
    --------
    >>> import anndata as ad, numpy as np, tempfile, os
    >>> items = [("A", {"rna": ad.AnnData(np.ones((2, 3), np.float32))})]
    >>> atlas = open_atlas(write_atlas(os.path.join(tempfile.mkdtemp(), "a.zarr"), items))
    >>> atlas.modalities, atlas.samples["rna"].tolist()
    (['rna'], [2])
    """
    from ._txn import recover  # complete or clean up a killed result write first (docs/store.md)

    recover(store)
    return Atlas(store)


from ._write import write_atlas  # noqa: E402  (doctest namespace)
