"""The error of the atlas store, in a module light enough for Dask workers (no pandas / anndata)."""

from __future__ import annotations


class AtlasValidationError(ValueError):
    """Raised when a source or an atlas store breaks the atlas contract.

    The message names the modality, sample, first offending cell / feature (or, for a damaged
    store, the array and chunk file) and the fix.

    Examples
    --------
    >>> issubclass(AtlasValidationError, ValueError)
    True
    """
