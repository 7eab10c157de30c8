"""What single-modality GEDI and MultiGEDI share (spec ``shared/specs/multigedi.md``).

GEDI is MultiGEDI's single-modal case with a pathway prior and sample covariates: the same shard
layout, data registration, initialisation (randomised SVD), round B, checkpoint payload and block
kernels. This module is the one place GEDI takes them from, so GEDI never reaches into MultiGEDI's
private modules and a change to a shared piece is visible here.
"""

from __future__ import annotations

from .multigedi import _shard as msh
from .multigedi._config import SINGLE_OBS_TYPES
from .multigedi._init import rsvd_modality
from .multigedi._kernels import (
    inv_sqrt_guard,
    normalize_B_columns,
    o_statistic,
    project_Ytilde,
    residual_DBt,
    row_sumsq,
    update_hyperpriors,
    update_o,
    update_si,
    update_Z_ortho,
    update_Z_regular,
)

__all__ = [
    "SINGLE_OBS_TYPES",
    "MultiGEDI",
    "dump_local",
    "inv_sqrt_guard",
    "msh",
    "normalize_B_columns",
    "o_statistic",
    "project_Ytilde",
    "residual_DBt",
    "restore_local",
    "row_sumsq",
    "rsvd_modality",
    "update_hyperpriors",
    "update_o",
    "update_si",
    "update_Z_ortho",
    "update_Z_regular",
]


def dump_local(state) -> dict:
    """Checkpoint payload of a shard (every sample's local state) with array names safe for any
    store ('/' -> '~')."""
    return {g: {k.replace("/", "~"): v for k, v in d.items()} for g, d in msh.dump_local(state).items()}


def restore_local(state, data: dict) -> None:
    """Inverse of :func:`dump_local`."""
    msh.restore_local(state, {g: {k.replace("~", "/"): v for k, v in d.items()} for g, d in data.items()})


def __getattr__(name: str):
    # MultiGEDI (the data registration GEDI reuses) pulls pandas/anndata: import it on first use only,
    # so shard functions unpickled on workers do not (PEP 562)
    if name == "MultiGEDI":
        from .multigedi._model import MultiGEDI

        return MultiGEDI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
