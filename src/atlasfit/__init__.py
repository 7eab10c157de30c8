"""atlasfit: multi-sample, multi-modal single-cell models on atlas-size data with Dask.

Public entry points: :class:`MultiGEDI`, :func:`fit`, and the namespaces :mod:`atlasfit.io`,
:mod:`atlasfit.datasets`, :mod:`atlasfit.cluster`, :mod:`atlasfit.tl`, :mod:`atlasfit.pl`.
"""

from __future__ import annotations

from ._compat import guard_worker_profiler as _guard_worker_profiler

_guard_worker_profiler()  # Python 3.11.0-3.11.8: Dask's worker profiler can deadlock a worker

from . import datasets, io, pl, tl
from .models.multigedi import MultiGEDI
from .models.topic import MultimodalAmortizedLDA
from .models.gedi import GEDI  # noqa: F401  (single-modality GEDI with C and H)

__version__ = "0.1.0"


def fit(store, model: MultiGEDI | None = None, *, max_iterations: int = 30, client=None,
        write: bool = True, **kwargs) -> MultiGEDI:
    """Fit ``model`` on an atlas store (on the active Dask client or an embedded cluster) and write
    the results into the store.

    Parameters
    ----------
    store
        Path of an atlas store (see :func:`atlasfit.io.convert`).
    model
        A configured model; default: MultiGEDI with one count (``"M"``) modality per counts
        modality of the store and ``"X"`` for binary ones, K=10.
    max_iterations
        Iterations.
    client
        A ``distributed.Client`` (default: the active one, or an embedded LocalCluster).
    write
        Write the results into the store.
    **kwargs
        Passed to ``model.fit``.

    Examples
    --------
    >>> import atlasfit  # doctest: +SKIP
    >>> model = atlasfit.fit("atlas.zarr", max_iterations=20)  # doctest: +SKIP
    """
    if model is None:
        atlas = io.open_atlas(store)
        mods = {}
        for m in atlas.modalities:
            if atlas.kind(m) == "binary":
                mods[m] = {"obs_type": "X"}
            elif {"M1", "M2"} <= set(atlas.layers(m)):
                mods[m] = {"obs_type": "M_list", "layers": ("M1", "M2")}
            else:
                mods[m] = {"obs_type": "M"}
        model = MultiGEDI(mods, K=10)
    model.fit(store, max_iterations=max_iterations, client=client, **kwargs)
    if write:
        model.write(store)
    return model


__all__ = ["MultiGEDI", "datasets", "fit", "io", "pl", "tl"]
