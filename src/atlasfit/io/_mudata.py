"""MuData objects built or read by atlasfit, without mudata's ``pull_on_update`` FutureWarnings.

mudata 0.3 warns twice (``From 0.4 .update() will not pull obs/var columns ...``) every time a MuData
is built or read while its option ``pull_on_update`` is unset. atlasfit sets the option only inside
its own calls (:func:`mudata_options`), to the behaviour mudata 0.3 has anyway (pull the modalities'
obs/var columns), so what users get does not change and their own settings are left as they are.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def _pull_on_update_unset(md) -> bool:
    """True when mudata knows ``pull_on_update`` and the user has not set it."""
    try:
        from mudata._core.config import OPTIONS  # noqa: PLC0415 (mudata has no get_options)
    except ImportError:  # pragma: no cover - another mudata layout: assume unset
        return True
    return "pull_on_update" in OPTIONS and OPTIONS["pull_on_update"] is None


@contextmanager
def mudata_options():
    """Within the block, mudata's ``pull_on_update`` is ``True`` if the user left it unset.

    A value the user set (``mudata.set_options(pull_on_update=False)``) is kept; the previous state
    is restored on exit. Versions of mudata without the option are left alone.

    Examples
    --------
    >>> import warnings, anndata as ad, mudata as md, numpy as np
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", FutureWarning)
    ...     with mudata_options():
    ...         m = md.MuData({"rna": ad.AnnData(np.ones((2, 3)))})
    >>> m.n_obs
    2
    """
    import mudata as md

    if not _pull_on_update_unset(md):
        yield
        return
    try:
        opts = md.set_options(pull_on_update=True)
    except ValueError:  # pragma: no cover - a mudata without the option
        yield
        return
    with opts:
        yield


def read_mudata(store: str | Path):
    """Read a whole atlas store (or any MuData Zarr store) into memory as a :class:`mudata.MuData`.

    The same as ``mudata.read_zarr(store)``, without mudata's ``pull_on_update`` FutureWarnings. Only
    for stores that fit in memory; models read large stores lazily (:func:`atlasfit.io.open_atlas`).

    Examples
    --------
    >>> import tempfile, os, atlasfit
    >>> from atlasfit.datasets import synthetic_mudata
    >>> path = os.path.join(tempfile.mkdtemp(), "a.zarr")
    >>> _ = atlasfit.io.convert(synthetic_mudata(n_cells=200, n_samples=2, features={"rna": 20}),
    ...                         path, sample_key="sample")
    >>> read_mudata(path)["rna"].shape
    (200, 20)
    """
    import mudata as md

    p = Path(store)
    if not p.is_dir():
        raise FileNotFoundError(f"read_mudata: '{p}' is not a Zarr store directory; pass the path that "
                                "atlasfit.io.convert wrote")
    with mudata_options():
        return md.read_zarr(str(p))
