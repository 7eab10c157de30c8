"""Row-block reads of an atlas store with nothing but Zarr, NumPy and SciPy.

This is the code a Dask worker runs to load its samples, kept free of pandas / anndata / xarray
imports so that a worker process stays small (~70 MB less resident memory per worker than
importing the whole :mod:`atlasfit.io`). :class:`~atlasfit.io.Atlas` builds the picklable
:class:`BlockReader` handed to the workers (:meth:`atlasfit.io.Atlas.block_reader`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import zarr

from ._errors import AtlasValidationError
from ._integrity import expected, read_failure, verify_csr, verify_dense

_GROUP_CACHE: dict[str, object] = {}


def _group(path: str):
    """Per-process cache of the opened root group (zarr opens are cheap but not free)."""
    g = _GROUP_CACHE.get(path)
    if g is None:
        g = zarr.open_group(str(path), mode="r")
        _GROUP_CACHE[path] = g
    return g


def _read_rows(path: str, key: str, storage: str, start: int, stop: int, n_vars: int, dtype,
               expect: dict | None = None):
    """Read rows ``start:stop`` of element ``key`` ("mod/<m>/X" or "mod/<m>/layers/<l>").

    ``expect``: the integrity record of the sample these rows hold (:mod:`atlasfit.io._integrity`);
    the rows read are checked against it (CRC-32 of the bytes read). Errors raised by Zarr while
    reading (a chunk that does not decode, damaged metadata) become :class:`AtlasValidationError`
    naming the store, array and chunk file.
    """
    try:
        g = _group(path)
        if storage == "csr":
            node = g[key]
            indptr = np.asarray(node["indptr"][start : stop + 1], dtype=np.int64)
            a, b = int(indptr[0]), int(indptr[-1])
            data = node["data"][a:b] if b > a else np.zeros(0, dtype=dtype)
            indices = node["indices"][a:b] if b > a else np.zeros(0, dtype=np.int32)
        else:
            out = np.asarray(g[key][start:stop, :])
    except AtlasValidationError:
        raise
    except Exception as err:  # a chunk that does not decode, unreadable metadata, ...
        raise read_failure(path, key, storage, start, stop, expect, err) from err
    if storage == "csr":
        if expect is not None:
            verify_csr(path, key, start, stop, indptr, data, indices, expect)
        return sp.csr_matrix((data, indices, indptr - a), shape=(stop - start, n_vars))
    if expect is not None:
        verify_dense(path, key, start, stop, out, expect)
    return out


class BlockReader:
    """Picklable reader of whole-sample row blocks: ``read_block(mod, sample, layer=None)``.

    Holds the store path, each element's ``(key, storage, dtype, n_vars)``, each modality's
    ``{sample: slice}`` and the store's integrity records (``{(mod, layer): records}``, see
    :mod:`atlasfit.io._integrity`; None for stores written before records existed); reads only that
    sample's rows and checks them against the sample's record.

    Examples
    --------
    >>> import anndata as ad, numpy as np, tempfile, os
    >>> from atlasfit.io import open_atlas, write_atlas
    >>> items = [("A", {"rna": ad.AnnData(np.ones((2, 3), np.float32))})]
    >>> r = open_atlas(write_atlas(os.path.join(tempfile.mkdtemp(), "a.zarr"), items)).block_reader()
    >>> r.read_block("rna", "A").shape
    (2, 3)
    """

    def __init__(self, path: str, elements: dict, slices: dict, records: dict | None = None):
        self.path = str(path)
        self.elements = dict(elements)  # (mod, layer or None) -> (key, storage, dtype str, n_vars)
        self.slices = {m: dict(s) for m, s in slices.items()}
        self.index = {m: {smp: i for i, smp in enumerate(s)} for m, s in self.slices.items()}
        self.records = dict(records or {})  # (mod, layer or None) -> {field: int64 per sample} or None

    def read_block(self, mod: str, sample: str, layer: str | None = None):
        """The cells x features block of ``sample`` in ``mod`` (``csr_matrix`` or ndarray)."""
        try:
            key, storage, dtype, n_vars = self.elements[(mod, layer)]
        except KeyError:
            have = sorted(str(k) for k in self.elements)
            raise KeyError(f"atlas '{self.path}' has no element for modality {mod!r}, layer {layer!r} "
                           f"(has {have})") from None
        sl = self.slices[mod].get(sample)
        if sl is None:
            raise KeyError(f"sample '{sample}' is not in modality '{mod}' of atlas '{self.path}' (it has "
                           f"{len(self.slices[mod])} samples, e.g. {list(self.slices[mod])[:5]})")
        rec = self.records.get((mod, layer))
        exp = expected({key: rec} if rec is not None else None, key, self.index[mod][sample], mod, sample)
        return _read_rows(self.path, key, storage, sl.start, sl.stop, n_vars, dtype, exp)
