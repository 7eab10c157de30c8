"""Integrity of an atlas store: per-sample records written at convert time, and the checks that use them.

For every modality, sample and stored element (X, each layer) the writer records what reading that
sample's rows must give back, computed on the bytes it writes (see docs/store.md, "Integrity"):

* CSR elements: ``nnz`` (stored entries of the sample) and the CRC-32 of the sample's slice of
  ``data``, of ``indices`` and of its row lengths (``diff`` of its ``indptr`` rows, int64);
* dense elements: the CRC-32 of the sample's rows (``values``).

Every read of a sample block (:meth:`atlasfit.io.Atlas.read_block`, the workers'
:class:`~atlasfit.io._blocks.BlockReader`, the blocks of :meth:`atlasfit.io.Atlas.X`) recomputes the
CRC-32 of what it read and compares; a missing chunk (Zarr reads it as the fill value, 0), a chunk
that no longer decodes or one that decodes to other bytes is an :class:`AtlasValidationError`
naming the store, modality, sample, array and, where it can be told, the chunk file.

Kept free of pandas / anndata: Dask workers verify their blocks with it.
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from ._errors import AtlasValidationError

ALGORITHM = "crc32"
RECORDS_KEY = "integrity"  # uns/atlasfit/mods/<mod>/integrity
META_FILES = (".zattrs", ".zarray", ".zgroup", ".zmetadata", "zarr.json")
FIX = ("re-run convert from the source (atlasfit.io.convert(source, store, "
       "overwrite=True); command line: atlasfit convert SOURCE STORE --sample-key KEY --overwrite) or "
       "restore the store from a backup")
CSR_ARRAYS = ("data", "indices", "indptr")


def crc32(a) -> int:
    """CRC-32 of the little-endian bytes of array ``a`` (zlib, about 1-10 GB/s).

    Examples
    --------
    >>> crc32(np.arange(3, dtype=np.int64)) == crc32(np.arange(3, dtype=">i8"))
    True
    """
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.size == 0:
        return 0
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def csr_record(indptr, data, indices) -> dict:
    """The record of one sample's CSR rows as stored (``indptr`` holds the sample's rows + 1 entries)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    return {"nnz": int(indptr[-1] - indptr[0]), "data": crc32(data), "indices": crc32(indices),
            "indptr": crc32(np.diff(indptr))}


def dense_record(block) -> dict:
    """The record of one sample's rows of a dense element as stored."""
    return {"values": crc32(block)}


class RecordBook:
    """Collects the records of one element, sample by sample (writer side)."""

    def __init__(self, storage: str):
        self.fields = ("nnz",) + CSR_ARRAYS if storage == "csr" else ("values",)
        self.cols: dict[str, list[int]] = {f: [] for f in self.fields}

    def add(self, rec: dict) -> None:
        for f in self.fields:
            self.cols[f].append(int(rec[f]))

    def arrays(self) -> dict:
        return {f: np.asarray(v, dtype=np.int64) for f, v in self.cols.items()}


def load_records(integrity, keys) -> dict | None:
    """``{element key: {field: int64 array}}`` (plus ``start``: each sample's first entry) or None.

    ``integrity`` is the nested dict read from ``uns/atlasfit/mods/<mod>/integrity`` (None: a store
    written before records existed, format 1.0).
    """
    if not integrity:
        return None
    out = {}
    for key in keys:
        node = integrity
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
        rec = {f: np.asarray(v, dtype=np.int64) for f, v in node.items()}
        if "nnz" in rec:
            rec["start"] = np.concatenate([[0], np.cumsum(rec["nnz"])[:-1]]).astype(np.int64)
        out[key] = rec
    return out


def expected(records: dict | None, key: str, i: int, mod: str, sample: str) -> dict | None:
    """What reading sample number ``i`` of element ``key`` must give (None when there are no records)."""
    if records is None or key not in records:
        return None
    rec = records[key]
    out = {f: int(v[i]) for f, v in rec.items()}
    out.update(mod=mod, sample=sample)
    return out


# ---------------------------------------------------------------------------------- chunk files
def _chunk_coords(z, lo: int, hi: int):
    """Chunk grid coordinates of rows ``lo:hi`` of array ``z`` (all chunks along the other axes)."""
    if z.ndim == 0:
        yield ()
        return
    c0 = int(z.chunks[0])
    rest = [range(-(-int(s) // int(c))) for s, c in zip(z.shape[1:], z.chunks[1:])]
    for i in range(lo // c0, -(-hi // c0)):
        for other in np.ndindex(*[len(r) for r in rest]) if rest else [()]:
            yield (i,) + tuple(int(o) for o in other)


def chunk_file(store, array_key: str, z, coords) -> Path:
    return Path(store) / array_key / z.metadata.encode_chunk_key(coords)


def chunk_problem(store, array_key: str, lo: int, hi: int, *, decode: bool = True,
                  missing_ok: bool = False) -> str | None:
    """The first missing or undecodable chunk file of rows ``lo:hi`` of ``array_key``, in words."""
    try:
        z = zarr.open_array(str(Path(store) / array_key), mode="r")
    except Exception as err:  # noqa: BLE001 - named in the message
        return f"its metadata cannot be read ({type(err).__name__}: {err})"
    for coords in _chunk_coords(z, lo, min(hi, int(z.shape[0]) if z.ndim else 1)):
        f = chunk_file(store, array_key, z, coords)
        if not f.exists():
            if missing_ok:
                continue
            return f"chunk file '{f}' is missing (Zarr reads a missing chunk as zeros)"
        if decode:
            try:
                z.get_block_selection(coords)
            except Exception as err:  # noqa: BLE001 - named in the message
                return f"chunk file '{f}' does not decode ({type(err).__name__}: {err})"
    return None


def _range_files(store, array_key: str, lo: int, hi: int) -> str:
    try:
        z = zarr.open_array(str(Path(store) / array_key), mode="r")
        coords = list(_chunk_coords(z, lo, hi))
        first, last = chunk_file(store, array_key, z, coords[0]), chunk_file(store, array_key, z, coords[-1])
    except Exception:  # noqa: BLE001 - best effort naming only
        return f"'{Path(store) / array_key}'"
    return f"'{first}'" if first == last else f"'{first}' .. '{last.name}'"


def damaged(store, exp: dict | None, key: str, array: str, what: str, detail: str) -> AtlasValidationError:
    """The error of a damaged element read: store, modality, sample, array, chunk and the fix."""
    name = key if array == "values" else f"{key}/{array}"
    if exp is not None:
        where = f"modality '{exp['mod']}', sample '{exp['sample']}', array '{name}'"
    else:
        where = f"array '{name}'"
    return AtlasValidationError(f"atlas store '{store}' is damaged: {where}: {what}; {detail}; {FIX}")


def _mismatch(store, exp, key, array, lo, hi, what) -> AtlasValidationError:
    arr_key = key if array == "values" else f"{key}/{array}"
    problem = chunk_problem(store, arr_key, lo, hi)
    if problem is None:
        problem = (f"its chunk files {_range_files(store, arr_key, lo, hi)} exist and decode but hold "
                   "other bytes than were written")
    return damaged(store, exp, key, array, what, problem)


def verify_csr(store, key: str, start: int, stop: int, indptr, data, indices, exp: dict) -> None:
    """Compare a sample's CSR rows as read with its record; raise :class:`AtlasValidationError`."""
    a, b = int(indptr[0]), int(indptr[-1])
    if a != exp["start"] or b - a != exp["nnz"] or crc32(np.diff(indptr)) != exp["indptr"]:
        what = (f"its rows {start}:{stop} give {b - a} stored entries from entry {a}, the record says "
                f"{exp['nnz']} from {exp['start']}" if (a != exp["start"] or b - a != exp["nnz"])
                else "its row lengths differ from the record (CRC-32)")
        raise _mismatch(store, exp, key, "indptr", start, stop + 1, what)
    for array, values in (("data", data), ("indices", indices)):
        if crc32(values) != exp[array]:
            raise _mismatch(store, exp, key, array, a, b,
                            f"entries {a}:{b} differ from the record (CRC-32)")


def verify_dense(store, key: str, start: int, stop: int, values, exp: dict) -> None:
    """Compare a sample's dense rows as read with its record."""
    if crc32(values) != exp["values"]:
        raise _mismatch(store, exp, key, "values", start, stop, f"rows {start}:{stop} differ from the record (CRC-32)")


def read_failure(store, key: str, storage: str, start: int, stop: int, exp, err) -> AtlasValidationError:
    """An error raised by Zarr while reading rows of an element, in the store's terms."""
    if is_metadata_error(err):
        return metadata_failure(store, err, under=key)
    if storage == "csr":
        problem = chunk_problem(store, f"{key}/indptr", start, stop + 1)
        if problem is not None:
            return damaged(store, exp, key, "indptr", "reading failed", problem)
        try:
            ip = zarr.open_array(str(Path(store) / key / "indptr"), mode="r")[start : stop + 1]
            a, b = int(ip[0]), int(ip[-1])
        except Exception:  # noqa: BLE001
            a, b = 0, 0
        for array in ("data", "indices"):
            problem = chunk_problem(store, f"{key}/{array}", a, b) if b > a else None
            if problem is not None:
                return damaged(store, exp, key, array, "reading failed", problem)
        return damaged(store, exp, key, "data/indices/indptr", "reading failed",
                       f"{type(err).__name__}: {err}")
    problem = chunk_problem(store, key, start, stop)
    return damaged(store, exp, key, "values", "reading failed", problem or f"{type(err).__name__}: {err}")


def zarr_arrays(store) -> list[str]:
    """Keys (paths relative to ``store``) of every Zarr array in the store, sorted."""
    out = []
    for d, dirs, files in os.walk(store):
        dirs.sort()
        if ".zarray" in files:
            out.append(Path(d).relative_to(store).as_posix())
            dirs[:] = []  # chunk files (and nested chunk directories) only
        elif "zarr.json" in files:
            try:
                if json.loads((Path(d) / "zarr.json").read_bytes()).get("node_type") == "array":
                    out.append(Path(d).relative_to(store).as_posix())
                    dirs[:] = []
            except ValueError:
                pass  # named by the metadata check
    return sorted(out)


def missing_chunks(store, array_key: str) -> list[Path]:
    """Chunk files of the array's whole grid that do not exist."""
    z = zarr.open_array(str(Path(store) / array_key), mode="r")
    n = int(z.shape[0]) if z.ndim else 1
    return [f for f in (chunk_file(store, array_key, z, c) for c in _chunk_coords(z, 0, n)) if not f.exists()]


def _owner(array_key: str) -> str:
    parts = array_key.split("/")
    return f"modality '{parts[1]}', " if len(parts) > 2 and parts[0] == "mod" else ""


def decode_all(store, array_key: str, band_bytes: int = 1 << 26) -> int:
    """Decode every chunk file of an array (absent chunks are allowed); returns the chunks read.

    Raises :class:`AtlasValidationError` naming the first chunk file that does not decode.
    """
    try:
        z = zarr.open_array(str(Path(store) / array_key), mode="r")
        if z.ndim == 0 or int(z.shape[0]) == 0:
            z[...]
            return 1
        n, c0 = int(z.shape[0]), int(z.chunks[0])
        row_bytes = max(1, int(np.prod(z.shape[1:], dtype=np.int64)) * max(1, z.dtype.itemsize))
        step = c0 * max(1, band_bytes // (c0 * row_bytes))
    except Exception as err:
        if is_metadata_error(err):
            raise metadata_failure(store, err, under=array_key) from err
        raise AtlasValidationError(f"atlas store '{store}' is damaged: {_owner(array_key)}array "
                                   f"'{array_key}' cannot be opened ({type(err).__name__}: {err}); {FIX}") from err
    for lo in range(0, n, step):
        try:
            z[lo : lo + step]
        except Exception as err:
            problem = chunk_problem(store, array_key, lo, min(n, lo + step), missing_ok=True)
            raise AtlasValidationError(
                f"atlas store '{store}' is damaged: {_owner(array_key)}array '{array_key}': "
                f"{problem or f'{type(err).__name__}: {err}'}; {FIX}") from err
    return -(-n // c0)


# ---------------------------------------------------------------------------------- metadata
def is_metadata_error(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it wraps) is a JSON / text decoding error of Zarr metadata."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def metadata_files(root, under: str | None = None):
    """Zarr metadata files of the tree at ``root`` (or ``root/under`` and its parents up to root)."""
    root = Path(root)
    if under:
        parts = Path(under).parts
        for i in range(len(parts) + 1):
            d = root.joinpath(*parts[:i])
            for name in META_FILES:
                if (d / name).is_file():
                    yield d / name
        base = root / under
    else:
        base = root
    for d, _dirs, files in os.walk(base):
        if under and Path(d) == base:
            continue
        for name in META_FILES:
            if name in files:
                yield Path(d) / name


def bad_metadata(root, under: str | None = None) -> tuple[Path, str] | None:
    """The first metadata file that is not valid JSON, with the parser's complaint, or None."""
    for f in metadata_files(root, under):
        try:
            json.loads(f.read_bytes())
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            return f, str(err)
        except OSError as err:
            return f, f"unreadable ({err})"
    return None


SOURCE_FIX = "re-export the source (e.g. AnnData.write_zarr / MuData.write_zarr) or restore it from a backup"


def metadata_failure(store, err, under: str | None = None, *, what: str = "atlas store",
                     fix: str = FIX) -> AtlasValidationError:
    """The error of a store whose Zarr metadata (.zattrs / .zarray / .zgroup / zarr.json) is damaged."""
    hit = bad_metadata(store, under) or (bad_metadata(store) if under else None)
    if hit is None:
        return AtlasValidationError(
            f"the metadata of {what} '{store}' is damaged: a metadata file is not valid JSON ({err}); {fix}")
    f, why = hit
    return AtlasValidationError(
        f"the metadata of {what} '{store}' is damaged: '{f}' is not valid JSON ({why}; truncated or "
        f"overwritten?); {fix}")


@contextmanager
def metadata_guard(store, under: str | None = None, *, what: str = "atlas store", fix: str = FIX):
    """Turn a JSON decoding error raised while reading the store into a clear error naming the file."""
    try:
        yield
    except AtlasValidationError:
        raise
    except Exception as err:
        if is_metadata_error(err):
            raise metadata_failure(store, err, under, what=what, fix=fix) from err
        raise
