"""Special functions (log-gamma, digamma) for NumPy or CuPy arrays, chosen by the array's type."""

from __future__ import annotations

from ..._xp import is_cupy


def _special(a):
    if is_cupy(a):
        import cupyx.scipy.special as sc  # noqa: PLC0415 - optional GPU dependency
    else:
        import scipy.special as sc  # noqa: PLC0415
    return sc


def gammaln(a):
    """:math:`\\log\\Gamma(a)` elementwise, in the array module of ``a``.

    Examples
    --------
    >>> import numpy as np
    >>> float(np.round(gammaln(np.array([5.0]))[0], 6))
    3.178054
    """
    return _special(a).gammaln(a)


def digamma(a):
    """:math:`\\psi(a) = \\frac{d}{da}\\log\\Gamma(a)` elementwise, in the array module of ``a``.

    Examples
    --------
    >>> import numpy as np
    >>> float(np.round(digamma(np.array([1.0]))[0], 6))
    -0.577216
    """
    return _special(a).digamma(a)
