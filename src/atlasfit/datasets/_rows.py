"""One sample's cells x features matrices assembled from consecutive row blocks, in place (used by
the synthetic atlas generator: its blocks of :data:`~._synthetic._BLOCK` cells arrive in order, from
one or several threads)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class _RowAppender:
    """Builds one sample's cells x features matrix from consecutive row blocks, in place.

    Each block is copied into the final arrays as soon as it arrives and then dropped, so a sample
    never holds its blocks and their concatenation at the same time (which, with the allocator
    keeping freed small blocks, doubled the resident memory). Dense: one preallocated array.
    CSR: int32 data / indices buffers sized from the density seen so far (+10%), grown rarely;
    the unused tail of a buffer is never written, so it is virtual memory only.
    """

    def __init__(self, n_rows: int, n_cols: int):
        self.n_rows, self.n_cols = n_rows, n_cols
        self.rows = 0
        self.nnz = 0
        self.dense = None
        self.data = self.indices = None
        self.indptr = None

    def add(self, piece) -> None:
        n = piece.shape[0]
        if not sp.issparse(piece):
            if self.dense is None:
                self.dense = np.empty((self.n_rows, self.n_cols), piece.dtype)
            self.dense[self.rows:self.rows + n] = piece
            self.rows += n
            return
        if self.indptr is None:
            self.indptr = np.zeros(self.n_rows + 1, np.int64)
        need = self.nnz + piece.nnz
        if self.data is None or need > self.data.shape[0]:
            rows_after = self.rows + n
            cap = max(need, int(need / rows_after * self.n_rows * 1.1) + 1024)
            for name in ("data", "indices"):
                new = np.empty(cap, np.int32)
                old = getattr(self, name)
                if old is not None:
                    new[:self.nnz] = old[:self.nnz]
                setattr(self, name, new)
        self.data[self.nnz:need] = piece.data
        self.indices[self.nnz:need] = piece.indices
        self.indptr[self.rows + 1:self.rows + n + 1] = piece.indptr[1:] + self.nnz
        self.rows += n
        self.nnz = need

    def finish(self):
        if self.rows != self.n_rows:  # internal invariant: every block was appended
            raise RuntimeError(f"row appender got {self.rows} of {self.n_rows} rows")
        if self.dense is not None:
            return self.dense
        if self.indptr is None:  # no sparse block at all (cannot happen for n_rows >= 1)
            return sp.csr_matrix((self.n_rows, self.n_cols), dtype=np.int32)
        ip_dtype = np.int32 if self.nnz < 2**31 else np.int64
        return sp.csr_matrix(
            (self.data[:self.nnz], self.indices[:self.nnz], self.indptr.astype(ip_dtype)),
            shape=(self.n_rows, self.n_cols),
        )


def _collect_blocks(results, types, latent, parts, offsets, n_i, n_cols) -> None:
    for lo, n, t_b, lat_b, mod_out in results:
        types[lo:lo + n] = t_b
        latent[lo:lo + n] = lat_b
        for m, arrs, off in mod_out:
            for k, v in arrs.items():
                if k not in parts[m]:
                    parts[m][k] = _RowAppender(n_i, n_cols[m])
                parts[m][k].add(v)
            if off is not None:
                offsets.setdefault(m, np.empty(n_i, np.float32))[lo:lo + n] = off
