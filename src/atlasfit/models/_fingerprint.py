"""The parts of a fit's checkpoint fingerprint that every model builds alike (issue 11 item 4).

A fingerprint is ``{"model": <kind>, "config": {...}, "data": {...}, "seed": <int>}`` in plain data;
the engine records it in every checkpoint and refuses a resume whose fingerprint differs
(:func:`atlasfit.engine.checkpoint_policy`). ``data`` identifies the data without reading it:

* ``store``: the store's absolute path (``None`` for in-memory data), and ``store_id`` when the store
  records an identity of its own (a ``uuid`` in its ``uns/atlasfit`` bookkeeping);
* ``shape``: ``{modality: [cells, features]}``;
* ``samples``: 16 hex digits of the SHA-256 of the sample names and their cell counts per modality.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` (JSON of plain data; arrays by their bytes).

    Examples
    --------
    >>> digest(["a", "b"]) == digest(("a", "b")) != digest(["b", "a"])
    True
    """
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, np.ndarray) and not x.dtype.hasobject:
            a = np.ascontiguousarray(x)
            h.update(f"nd{a.shape}{a.dtype.str}".encode())
            h.update(a.tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in x:
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple, np.ndarray)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(json.dumps(x.item() if isinstance(x, np.generic) else x, default=str).encode())
            h.update(b",")

    feed(obj)
    return h.hexdigest()[:16]


def plain_config(obj: Any) -> dict:
    """A dataclass configuration as ``{field: plain value}``: numbers, strings, bools, None and flat
    sequences as they are, dtypes by name, anything else by its ``repr``.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     K: int = 3
    ...     dtype: type = np.float32
    >>> plain_config(C())
    {'K': 3, 'dtype': 'float32'}
    """
    out = {}
    for f in fields(obj) if is_dataclass(obj) else ():
        out[f.name] = _plain(getattr(obj, f.name))
    return out


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
        return np.dtype(v).name
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if is_dataclass(v):
        return plain_config(v)
    return repr(v)


def data_identity(store, shape: dict, samples: dict) -> dict:
    """The ``data`` part of a fingerprint.

    Parameters
    ----------
    store
        An :class:`atlasfit.io.Atlas` (its path and, when recorded, its id) or a path, or ``None``
        for in-memory data.
    shape
        ``{modality: (cells, features)}``.
    samples
        ``{modality: {sample: cells}}`` (hashed).

    Examples
    --------
    >>> data_identity(None, {"rna": (4, 3)}, {"rna": {"a": 2, "b": 2}})["shape"]
    {'rna': [4, 3]}
    """
    out: dict = {"store": None if store is None else str(getattr(store, "path", store))}
    info = getattr(store, "_info", None)
    if isinstance(info, dict) and info.get("uuid"):
        out["store_id"] = str(info["uuid"])
    out["shape"] = {str(m): [int(n) for n in s] for m, s in shape.items()}
    out["samples"] = digest({str(m): [[str(k), int(v)] for k, v in d.items()] for m, d in samples.items()})
    return out


def plan_identity(plan, store) -> dict:
    """:func:`data_identity` of a MultiGEDI / GEDI :class:`~atlasfit.models.multigedi._config.SamplePlan`."""
    shape = {m: (plan.N(m), plan.n_features[m]) for m in plan.modalities}
    samples = {m: {g: plan.n_cells[g] for g in plan.mod_samples[m]} for m in plan.modalities}
    return data_identity(store, shape, samples)


def gedi_fingerprint(gedi, reg, C: tuple, H: tuple, is_store: bool) -> dict:
    """The fingerprint of a :class:`~atlasfit.models.gedi.GEDI` fit: that of its one-modality
    registration (:meth:`MultiGEDI.fingerprint`) with GEDI's own settings and digests of the aligned
    pathway prior ``C = (matrix, names)`` and covariates ``H = (matrix, names)`` (``None`` when not given)."""
    fp = reg.fingerprint(reg._atlas if is_store else None)
    fp["model"] = type(gedi).__name__
    if getattr(gedi, "solve_Y_every", None):
        fp["config"]["solve_Y_every"] = int(gedi.solve_Y_every)
    fp["config"].update(
        S_Qi=float(gedi.S_Qi), S_oi=float(gedi.S_oi),
        C=None if C[0] is None else digest([np.asarray(C[0], dtype=np.float64), [str(x) for x in C[1]]]),
        H=None if H[0] is None else digest([np.asarray(H[0], dtype=np.float64), [str(x) for x in H[1]]]),
    )
    return fp
