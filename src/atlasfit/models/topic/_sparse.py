"""Sparse (CSR) helpers of the topic-model kernels: one code path for SciPy and CuPy.

A minibatch of a count modality stays a CSR matrix (sorted, duplicate-free column indices, the
model's dtype): the encoder input :math:`\\hat x = \\log(1 + x/\\max(\\ell,1)\\cdot\\mathrm{med})` has
the sparsity of :math:`x`, so the first layer is a sparse-times-dense product, and the multinomial and
complementary log-log Bernoulli likelihoods need :math:`\\rho_{nf}` only at the non-zeros
(:func:`sddmm`). Everything here dispatches on the array type (``scipy.sparse`` with NumPy,
``cupyx.scipy.sparse`` with CuPy); nothing imports CuPy at module import time.

Examples
--------
>>> import numpy as np, scipy.sparse as sp
>>> X = sp.csr_matrix(np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]))
>>> row_sums(X).tolist(), row_ids(X).tolist()
([2.0, 4.0], [0, 1, 1])
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from ..._xp import get_xp


def is_sparse(a) -> bool:
    """True for a SciPy or CuPy (``cupyx.scipy.sparse``) sparse matrix or array (no CuPy import).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> is_sparse(sp.csr_matrix(np.eye(2))), is_sparse(np.eye(2))
    (True, False)
    """
    mod = type(a).__module__
    if mod.startswith("scipy.sparse"):
        return True
    if mod.startswith("cupyx.scipy.sparse"):
        return True
    return False


def _is_cupyx(a) -> bool:
    return type(a).__module__.startswith("cupyx")


def xp_of(a):
    """Array module of a dense array, a sparse matrix or a :class:`SparseBlocks` input (``numpy`` or ``cupy``).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> xp_of(sp.csr_matrix(np.eye(2))) is np
    True
    """
    if isinstance(a, SparseBlocks):
        a = a.sparse
    if is_sparse(a):
        if _is_cupyx(a):
            return sys.modules["cupy"]
        return np
    return get_xp(a)


def sparse_module(a):
    """``scipy.sparse`` or ``cupyx.scipy.sparse``, matching ``a`` (a sparse matrix or a dense array)."""
    if _is_cupyx(a) or type(a).__module__.startswith("cupy"):
        import cupyx.scipy.sparse as sp  # noqa: PLC0415 - optional GPU dependency

        return sp
    import scipy.sparse as sp  # noqa: PLC0415

    return sp


def csr_like(X, data, shape=None, indices=None):
    """CSR matrix with the row structure of ``X`` and new values ``data`` (and, optionally, new
    column ``indices`` in a matrix of ``shape``, e.g. columns remapped into per-batch blocks).
    No copy of the structure arrays."""
    sp = sparse_module(X)
    ind = X.indices if indices is None else indices
    return sp.csr_matrix((data, ind, X.indptr), shape=X.shape if shape is None else shape, copy=False)


def row_ids(X):
    """Row index of every stored entry of the CSR matrix ``X`` (length nnz)."""
    xp = xp_of(X)
    counts = xp.diff(X.indptr)
    return xp.repeat(xp.arange(X.shape[0], dtype=X.indices.dtype), counts)


def row_sums(x):
    """Row sums as a 1-D array (dense rows or a CSR matrix; a sparse matrix-vector product, so the
    sum over each row's entries runs in order, deterministically on either device)."""
    if isinstance(x, SparseBlocks):
        raise TypeError("row_sums: pass the sparse block, not the encoder input")
    if not is_sparse(x):
        return x.sum(axis=1)
    xp = xp_of(x)
    return xp.asarray(x.tocsr() @ xp.ones(x.shape[1], dtype=x.dtype)).ravel()


def entry_row_sums(X, values):
    """:math:`\\sum_{j\\in\\text{row } n} v_j` for per-entry ``values`` of the CSR matrix ``X`` (length nnz)."""
    xp = xp_of(X)
    return xp.asarray(csr_like(X, values) @ xp.ones(X.shape[1], dtype=values.dtype)).ravel()


def to_dense(x):
    """Dense rows of ``x`` (a sparse matrix becomes an array on its own device; dense is returned as is)."""
    if isinstance(x, SparseBlocks):
        xp = xp_of(x)
        return xp.concatenate([to_dense(x.sparse), x.dense], axis=1)
    if not is_sparse(x):
        return x
    return x.toarray()


def sddmm(A, BT, rows, cols):
    """Sampled dense-dense product: :math:`v_j = \\sum_k A_{r_j k}\\,B^\\top_{c_j k}` for the stored
    entries :math:`(r_j, c_j)`, :math:`O(\\mathrm{nnz}\\cdot K)` (``A`` (B, K), ``BT`` (F', K)).

    Examples
    --------
    >>> import numpy as np
    >>> A, BT = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0], [5.0, 6.0]])
    >>> sddmm(A, BT, np.array([0, 0]), np.array([1, 0])).tolist()
    [17.0, 11.0]
    """
    xp = xp_of(A)
    out = xp.empty(rows.shape[0], dtype=A.dtype)
    # chunks keep the two gathered (chunk, K) blocks in cache
    step = 1 << 15
    for lo in range(0, rows.shape[0], step):
        hi = min(rows.shape[0], lo + step)
        out[lo:hi] = xp.einsum("ik,ik->i", xp.take(A, rows[lo:hi], axis=0), xp.take(BT, cols[lo:hi], axis=0))
    return out


class SparseBlocks(NamedTuple):
    """Encoder input :math:`[\\hat x, \\text{cov}]` kept as a CSR block and a dense covariate block (§2.2)."""

    sparse: Any
    dense: Any

    @property
    def shape(self):
        return (self.sparse.shape[0], self.sparse.shape[1] + self.dense.shape[1])


def input_matmul(h, W):
    """:math:`hW` for a dense input, a CSR input or :class:`SparseBlocks` (:math:`\\hat xW_{[:F]} + \\text{cov}\\,W_{[F:]}`)."""
    if isinstance(h, SparseBlocks):
        F = h.sparse.shape[1]
        return _spmm(h.sparse, W[:F]) + h.dense @ W[F:]
    if is_sparse(h):
        return _spmm(h, W)
    return h @ W


def input_tmatmul(h, D):
    """:math:`h^\\top D` for a dense input, a CSR input or :class:`SparseBlocks` (blocks stacked by rows)."""
    if isinstance(h, SparseBlocks):
        xp = xp_of(D)
        return xp.concatenate([_spmm_t(h.sparse, D), h.dense.T @ D], axis=0)
    if is_sparse(h):
        return _spmm_t(h, D)
    return h.T @ D


#: Below this many stored entries a sparse product runs on the calling thread.
_PARALLEL_MIN_NNZ = 1 << 15
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def sparse_threads() -> int:
    """Threads for the CPU sparse-times-dense products: ``ATLASFIT_SPARSE_THREADS`` if set, else 1.

    The products are split by output columns, each computed exactly as on one thread, so the result
    has the same bits for any number of threads. One thread is the default because measured on this
    project's 2-core machine (100k-cell planted store, batch 1024, one process whose BLAS already uses
    both cores for the dense products) 1 thread trained at 17.0k cells/s and 2 at 15.6k; on Dask
    workers (one per core) extra threads only oversubscribe the cores."""
    env = os.environ.get("ATLASFIT_SPARSE_THREADS")
    if env:
        return max(1, int(env))
    return 1


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n:
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="atlasfit-spmm")
        return _POOL


def _col_blocks(n_cols: int, n: int):
    cuts = np.linspace(0, n_cols, n + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


def _threaded_cols(S, W):
    """:math:`SW` for a SciPy sparse ``S`` and dense ``W``, split over the columns of ``W`` on the
    thread pool (SciPy's kernels release the GIL). Every output entry is the same sum in the same
    order whatever the split, so the bits do not depend on the number of threads."""
    n = sparse_threads()
    if n == 1 or S.nnz < _PARALLEL_MIN_NNZ or W.shape[1] < 2 * n:
        return np.asarray(S @ W)
    out = np.empty((S.shape[0], W.shape[1]), dtype=np.result_type(S.dtype, W.dtype))

    def block(lohi):
        lo, hi = lohi
        out[:, lo:hi] = S @ np.ascontiguousarray(W[:, lo:hi])

    list(_pool(n).map(block, _col_blocks(W.shape[1], n)))
    return out


#: A CPU minibatch whose encoder input has at least this fraction of its entries stored is read
#: dense by the first encoder layer: one BLAS product of B·F·H multiply-adds then beats SciPy's
#: sparse kernels on nnz·H. Measured on this project's 2-core machine (one thread, H = 128, 256
#: rows): RNA-like rows 24% stored, float32: densify + forward + backward 2.1 ms against 4.4 ms
#: sparse; peak-like rows 3.5% stored: 5.4 ms dense against 2.4 ms sparse; the crossover is near
#: 11% in float32 and 14% in float64. The choice depends only on the minibatch's data, so it is the
#: same on any number of workers; both layouts compute the same sums (up to rounding order).
DENSE_INPUT_FRACTION = 0.12


def encoder_layout(h):
    """The layout in which the first encoder layer reads a sparse input (dense inputs unchanged):
    dense when at least :data:`DENSE_INPUT_FRACTION` of the entries are stored (CPU); otherwise CSC
    on the CPU, where both products then stream one feature at a time (:math:`\\hat xW_0`
    accumulates into the (B, H) output, which stays in cache, and :math:`\\hat x^\\top\\partial a`
    is a CSR product over features); CSR on the GPU (cuSPARSE)."""
    if isinstance(h, SparseBlocks):
        inner = encoder_layout(h.sparse)
        if not is_sparse(inner):
            return np.concatenate([inner, np.asarray(h.dense, dtype=inner.dtype)], axis=1)
        return SparseBlocks(inner, h.dense)
    if is_sparse(h) and not _is_cupyx(h):
        B, F = h.shape
        if B * F and h.nnz >= DENSE_INPUT_FRACTION * B * F:
            return h.toarray()
        return h.tocsc()
    return h


def _spmm(X, W):
    """:math:`XW`, sparse ``X`` (B, F) times dense ``W`` (F, H): :math:`O(\\mathrm{nnz}\\cdot H)`."""
    if _is_cupyx(X):
        return X @ W
    return _threaded_cols(X, W)


def _spmm_t(X, D):
    """:math:`X^\\top D`, sparse ``X`` (B, F) times dense ``D`` (B, H): :math:`O(\\mathrm{nnz}\\cdot H)`
    (for a CSC ``X``, :math:`X^\\top` is CSR: feature :math:`f`'s row sums its entries in cell order)."""
    if _is_cupyx(X):
        return X.T @ D
    return _threaded_cols(X.T, D)


def minibatch_rows(X, rows, dtype, *, sparse: bool = True, device: str | None = None):
    """Rows ``rows`` of a shard's matrix ``X`` for one minibatch, in the model ``dtype``.

    A sparse ``X`` stays CSR (canonical: sorted, duplicate-free indices) when ``sparse`` is True and
    is densified otherwise; dense ``X`` stays dense. ``device="cupy"`` moves the rows to the GPU
    (``cupyx.scipy.sparse.csr_matrix`` or a CuPy array).
    """
    sub = X[rows]
    if is_sparse(sub):
        if sparse:
            sub = sub.tocsr()
            if sub.dtype != dtype:
                sub = sub.astype(dtype)
            if not sub.has_canonical_format:
                sub = sub.copy()
                sub.sum_duplicates()
        else:
            sub = np.asarray(sub.toarray(), dtype=dtype) if not _is_cupyx(sub) else sub.toarray().astype(dtype)
    else:
        sub = get_xp(sub).asarray(sub, dtype=dtype)
    if device == "cupy":
        import cupy  # noqa: PLC0415 - optional GPU dependency, only on GPU workers

        if is_sparse(sub):
            import cupyx.scipy.sparse as cps  # noqa: PLC0415

            sub = cps.csr_matrix(sub)
        else:
            sub = cupy.asarray(sub)
    return sub
