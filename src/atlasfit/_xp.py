"""Array-namespace helpers: one kernel, two array modules (NumPy on CPU, CuPy on GPU).

Kernels call :func:`get_xp` on their inputs and use the returned module; nothing here imports
CuPy at import time.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np


def get_xp(*arrays) -> ModuleType:
    """Return the array module (``numpy`` or ``cupy``) of the given arrays.

    Examples
    --------
    >>> import numpy as np
    >>> get_xp(np.zeros(3)) is np
    True
    """
    cp = sys.modules.get("cupy")
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def is_cupy(a) -> bool:
    """True if ``a`` is a CuPy array (without importing CuPy)."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def to_numpy(a):
    """Return ``a`` as a NumPy array (copying from the device when it is a CuPy array).

    Examples
    --------
    >>> to_numpy([1, 2]).tolist()
    [1, 2]
    """
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def sparse_module(a):
    """Return ``scipy.sparse`` or ``cupyx.scipy.sparse`` matching the array module of ``a``."""
    if type(a).__module__.startswith("cupyx"):
        import cupyx.scipy.sparse as sp  # noqa: PLC0415 - optional GPU dependency

        return sp
    import scipy.sparse as sp

    return sp
