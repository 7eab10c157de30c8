"""atlasfit: multi-sample, multi-modal single-cell models on atlas-size data with Dask.

Public entry points: :class:`MultiGEDI`, :func:`fit`, and the namespaces :mod:`atlasfit.io`,
:mod:`atlasfit.datasets`, :mod:`atlasfit.cluster`, :mod:`atlasfit.tl`, :mod:`atlasfit.pl`.
"""

from __future__ import annotations

from ._compat import guard_worker_profiler as _guard_worker_profiler

_guard_worker_profiler()  # Python 3.11.0-3.11.8: Dask's worker profiler can deadlock a worker

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models.multigedi import MultiGEDI

__version__ = "0.1.0"

# Public names, imported on first use (PEP 562): a Dask worker that unpickles a shard function
# imports this package, and should not pay for pandas / anndata / xarray / matplotlib it never uses.
_LAZY = {
    "MultiGEDI": (".models.multigedi", "MultiGEDI"),
    "MultimodalAmortizedLDA": (".models.topic", "MultimodalAmortizedLDA"),
    "GEDI": (".models.gedi", "GEDI"),
    "ReferenceKeywordWarning": ("._aliases", "ReferenceKeywordWarning"),
    "datasets": (".datasets", None),
    "io": (".io", None),
    "pl": (".pl", None),
    "tl": (".tl", None),
    "cluster": (".cluster", None),
}


def __getattr__(name: str):
    try:
        mod, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'atlasfit' has no attribute {name!r}") from None
    module = importlib.import_module(mod, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
    from .io import open_atlas
    from .models.multigedi import MultiGEDI

    if model is None:
        atlas = open_atlas(store)
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


__all__ = ["GEDI", "MultiGEDI", "MultimodalAmortizedLDA", "ReferenceKeywordWarning", "cluster", "datasets", "fit",
           "io", "pl", "tl"]
