"""Low-level layout of an atlas store: constants, encodings and streaming appenders.

The store is a Zarr (format 2, not consolidated) MuData layout, the same bytes that
``mudata.write_zarr`` / ``anndata.write_zarr`` produce for the elements used here, so that
``mudata.read_zarr(store)`` and ``anndata.read_zarr(f"{store}/mod/{name}")`` read it unchanged.
Everything cell-sized is written by *appending* one sample at a time (resize + region assignment),
never by materialising a whole modality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from ._integrity import csr_record, dense_record

# 1.1: per-sample integrity records (uns/atlasfit/mods/<mod>/integrity) and every chunk of X /
# layers written, also all-zero ones, so that a missing chunk file is always damage
FORMAT_VERSION = "1.1"
ATLAS_KEY = "atlasfit"  # uns key of the bookkeeping (root and per modality)
MODELS_KEY = "atlasfit_models"  # root uns key holding model groups written by write_results
SOURCE_ROW = "atlasfit_source_row"
KINDS = ("counts", "binary", "continuous")
ZARR_FORMAT = 2
# X / layers arrays write all-zero chunks too (Zarr's default skips them): a store then holds every
# chunk of its grid, so `validate` can tell a lost chunk file from one that was never written
ALL_CHUNKS = {"write_empty_chunks": True}

# chunking: about 4 MiB of float32 per chunk for the cell-sized arrays
NNZ_CHUNK = 1 << 20  # CSR data / indices elements per chunk
ROW_CHUNK_1D = 1 << 16  # obs columns, indptr, obs names
DENSE_CHUNK_ELEMS = 1 << 20  # dense X / obsm: rows per chunk = this // n_columns


def dense_row_chunk(n_cols: int) -> int:
    """Rows per zarr chunk for a dense cell-by-``n_cols`` array (about 1 Mi elements)."""
    return int(max(1, min(1 << 16, DENSE_CHUNK_ELEMS // max(1, int(n_cols)))))


def set_encoding(node, enc_type: str, enc_version: str, **extra) -> None:
    """Write anndata's ``encoding-type`` / ``encoding-version`` attributes (plus ``extra``)."""
    attrs = {"encoding-type": enc_type, "encoding-version": enc_version}
    attrs.update(extra)
    node.attrs.update(attrs)


def open_root(path, mode: str = "r") -> zarr.Group:
    """Open the zarr group at ``path`` (format 2 for writes, like mudata/anndata write)."""
    if mode == "r":
        return zarr.open_group(str(path), mode="r")
    return zarr.open_group(str(path), mode=mode, zarr_format=ZARR_FORMAT)


def empty_dict_group(parent: zarr.Group, name: str) -> zarr.Group:
    """Create an empty anndata ``dict`` group (obsm, varm, layers, uns, ...)."""
    g = parent.create_group(name)
    set_encoding(g, "dict", "0.1.0")
    return g


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def is_zarr_group_dir(path: Path) -> bool:
    return (Path(path) / ".zgroup").exists() or (Path(path) / "zarr.json").exists()


class Appender1D:
    """Append-only 1-D zarr array (numeric, bool or strings)."""

    def __init__(self, parent: zarr.Group, name: str, dtype, *, chunk: int = ROW_CHUNK_1D,
                 encoding=("array", "0.2.0")):
        self.is_str = dtype is str or np.dtype(dtype).kind in "OUS"
        self.arr = parent.create_array(
            name, shape=(0,), chunks=(chunk,), dtype=str if self.is_str else np.dtype(dtype)
        )
        set_encoding(self.arr, *encoding)
        self.n = 0

    def append(self, values) -> None:
        values = np.asarray(values, dtype=object if self.is_str else self.arr.dtype)
        k = values.shape[0]
        if k == 0:
            return
        self.arr.resize((self.n + k,))
        self.arr[self.n : self.n + k] = values
        self.n += k


class DenseAppender:
    """Append-only dense 2-D array (rows = cells), anndata ``array`` encoding."""

    def __init__(self, parent: zarr.Group, name: str, n_cols: int, dtype):
        self.n_cols = int(n_cols)
        self.arr = parent.create_array(
            name,
            shape=(0, self.n_cols),
            chunks=(dense_row_chunk(self.n_cols), max(1, self.n_cols)),
            dtype=np.dtype(dtype),
            config=ALL_CHUNKS,
        )
        set_encoding(self.arr, "array", "0.2.0")
        self.n = 0

    def append(self, block) -> dict:
        """Append the rows of ``block``; returns their integrity record (CRC-32 of the stored bytes)."""
        block = np.ascontiguousarray(block.toarray() if sp.issparse(block) else block, dtype=self.arr.dtype)
        k = block.shape[0]
        if k == 0:
            return dense_record(block)
        self.arr.resize((self.n + k, self.n_cols))
        self.arr[self.n : self.n + k, :] = block
        self.n += k
        return dense_record(block)


class CSRAppender:
    """Append-only CSR matrix in anndata's ``csr_matrix`` encoding (group of data/indices/indptr)."""

    def __init__(self, parent: zarr.Group, name: str, n_cols: int, dtype, index_dtype=np.int32):
        self.g = parent.create_group(name)
        self.n_cols = int(n_cols)
        self.data = self.g.create_array("data", shape=(0,), chunks=(NNZ_CHUNK,), dtype=np.dtype(dtype),
                                        config=ALL_CHUNKS)
        self.indices = self.g.create_array(
            "indices", shape=(0,), chunks=(NNZ_CHUNK,), dtype=np.dtype(index_dtype), config=ALL_CHUNKS
        )
        self.indptr = self.g.create_array("indptr", shape=(1,), chunks=(ROW_CHUNK_1D,), dtype=np.int64,
                                          config=ALL_CHUNKS)
        self.indptr[0:1] = np.zeros(1, dtype=np.int64)
        self.n = 0
        self.nnz = 0
        self._write_attrs()

    def _write_attrs(self) -> None:
        set_encoding(self.g, "csr_matrix", "0.1.0", shape=[int(self.n), int(self.n_cols)])

    def append(self, block) -> dict:
        """Append the rows of ``block``; returns their integrity record (nnz, CRC-32 of the stored bytes)."""
        block = sp.csr_matrix(block)
        if not block.has_sorted_indices:
            block = block.sorted_indices()  # a copy: never reorder the caller's matrix in place
        k, nz = block.shape[0], int(block.nnz)
        data = np.asarray(block.data[:nz], dtype=self.data.dtype)
        indices = np.asarray(block.indices[:nz], dtype=self.indices.dtype)
        indptr = np.asarray(block.indptr, dtype=np.int64)
        if k == 0:
            return csr_record(indptr, data, indices)
        if nz:
            self.data.resize((self.nnz + nz,))
            self.data[self.nnz : self.nnz + nz] = data
            self.indices.resize((self.nnz + nz,))
            self.indices[self.nnz : self.nnz + nz] = indices
        self.indptr.resize((self.n + k + 1,))
        self.indptr[self.n + 1 : self.n + k + 1] = indptr[1:] + self.nnz
        self.n += k
        self.nnz += nz
        return csr_record(indptr, data, indices)

    def finish(self) -> None:
        self._write_attrs()


class CategoricalAppender:
    """Append-only categorical column: codes are appended, categories grow and are written at the end."""

    def __init__(self, parent: zarr.Group, name: str, categories=None, ordered: bool = False):
        self.g = parent.create_group(name)
        self.codes = Appender1D(self.g, "codes", np.int32, encoding=("array", "0.2.0"))
        self.cats: dict = {}
        self.cat_list: list = []
        self.ordered = bool(ordered)
        for c in categories if categories is not None else []:
            self._add(c)

    def _add(self, c):
        if c not in self.cats:
            self.cats[c] = len(self.cat_list)
            self.cat_list.append(c)
        return self.cats[c]

    def append(self, values) -> None:
        if isinstance(values, pd.Series):
            values = values.to_numpy(dtype=object)
        values = np.asarray(values, dtype=object)
        local_codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
        table = np.array([self._add(c) for c in uniques], dtype=np.int32)
        codes = np.full(local_codes.shape[0], -1, dtype=np.int32)
        ok = local_codes >= 0
        codes[ok] = table[local_codes[ok]]
        self.codes.append(codes.astype(np.int32))

    def finish(self) -> None:
        cats = self.cat_list
        if all(isinstance(c, str) for c in cats):
            arr = Appender1D(self.g, "categories", str, encoding=("string-array", "0.2.0"))
            arr.append(np.asarray(cats, dtype=object))
        else:
            arr = Appender1D(self.g, "categories", np.asarray(cats).dtype)
            arr.append(np.asarray(cats))
        set_encoding(self.g, "categorical", "0.2.0", ordered=self.ordered)


def dataframe_attrs(group: zarr.Group, columns: list[str]) -> None:
    """Attributes of anndata's ``dataframe`` encoding (index stored as ``_index``)."""
    set_encoding(group, "dataframe", "0.2.0", **{"_index": "_index", "column-order": list(columns)})
