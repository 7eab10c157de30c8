"""What makes a fit's bits independent of where and how often it runs (docs/engine.md, "Determinism").

Two things made the same computation give different bits in different processes (issue 11 item 6):

* **BLAS thread count.** OpenBLAS (and MKL) blocks a matrix product differently with one thread
  than with several: ``Y @ M`` for a 300 x 3,000 by 3,000 x 15 product, a per-sample statistic of
  MultiGEDI's randomised SVD, differs in the last bits between 1 and 2 threads. Dask's nanny starts
  workers with ``OPENBLAS_NUM_THREADS=1`` while the driver (and the in-process engine, which runs
  the shard functions in the driver) uses one thread per core, so a serial fit and a Dask fit of
  the same seed differed in nearly every array (PCA by ~1e-12), and so did fits whose workers were
  started with other thread settings (``processes=False`` clusters run shard functions in the
  driver's threads; ``dask worker --no-nanny`` keeps the machine's default).
  :func:`blas_single_thread` pins BLAS to one thread around every shard function (on workers and in
  process) and around the fit driver's own linear algebra, whatever the process's setting.
* **Unaligned arrays out of Dask messages.** Arrays that travel as task arguments or results are
  rebuilt on buffers inside the received message, at whatever byte offset the message layout put
  them (it depends on the other contents: keys, sizes): often not even 8-byte aligned. NumPy sends
  unaligned arrays through buffered loops (``a.sum()`` of more than 8,192 elements adds per buffer)
  and does not use the symmetric BLAS kernel for ``a.T @ a``, so results depended on the message.
  :func:`realign` copies every unaligned array of a payload into its own (aligned) memory, as
  arrays built in process are.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

#: (len(sys.modules) when built, threadpoolctl.ThreadpoolController): finding the loaded BLAS
#: libraries walks every shared object of the process (~2 ms); a training step calls
#: :func:`blas_single_thread` once, so the controller is built once and rebuilt only after an import
#: (the only way a new BLAS gets loaded in practice).
_CONTROLLER: tuple | None = None


def _blas_controller():
    global _CONTROLLER
    key = len(sys.modules)
    if _CONTROLLER is None or _CONTROLLER[0] != key:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = (key, ThreadpoolController())
    return _CONTROLLER[1]


@contextlib.contextmanager
def blas_single_thread():
    """Run the block with BLAS on one thread (OpenBLAS, MKL, BLIS: every BLAS loaded in this process),
    restoring the previous setting afterwards.

    ``ATLASFIT_BLAS_THREADS=any`` leaves BLAS alone (faster in-process fits on many cores, but the
    same seed then gives the same bits only on the same kind of engine and machine).

    Examples
    --------
    >>> import numpy as np
    >>> with blas_single_thread():
    ...     float((np.ones((2, 2)) @ np.ones(2))[0])
    2.0
    """
    if os.environ.get("ATLASFIT_BLAS_THREADS", "1") == "any":
        yield
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def realign(obj, _depth: int = 0):
    """``obj`` with every NumPy array that is not aligned to its item size replaced by an aligned copy
    (in dicts, lists and tuples, a few levels deep); aligned arrays and other objects are returned as
    they are.

    Examples
    --------
    >>> buf = np.zeros(8 * 4 + 1, dtype=np.uint8)
    >>> a = buf[1:].view(np.float64)
    >>> a.flags.aligned, realign({"x": [a]})["x"][0].flags.aligned
    (False, True)
    """
    if isinstance(obj, np.ndarray):
        return obj if obj.flags.aligned else np.array(obj, copy=True)
    if _depth > 6:
        return obj
    if isinstance(getattr(obj, "indptr", None), np.ndarray) and isinstance(getattr(obj, "data", None), np.ndarray):
        for name in ("data", "indices", "indptr"):  # SciPy compressed sparse matrices and arrays
            a = getattr(obj, name, None)
            if isinstance(a, np.ndarray) and not a.flags.aligned:
                setattr(obj, name, np.array(a, copy=True))
        return obj
    if isinstance(obj, dict):
        return {k: realign(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [realign(v, _depth + 1) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(realign(v, _depth + 1) for v in obj)
    return obj
