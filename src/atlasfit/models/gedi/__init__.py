"""Single-modality GEDI with a gene-level pathway prior C and sample covariates H (spec
``shared/specs/multigedi.md`` §1-2, §2.8-2.9, §7.4-7.5), run as map/reduce rounds over shards of
whole samples on the same engines as MultiGEDI."""

from ._fit import GediContext, initialize_gedi, iterate_gedi
from ._kernels import (
    diff_exp,
    diff_O,
    diff_Q,
    gedi_dof,
    pathway_solver,
    qhat_from_R,
    solve_B_single,
    update_A,
    update_oi_prior,
    update_Q_prior,
    update_R,
    update_sigma2_gedi,
)
__all__ = [
    "GEDI",
    "GediContext",
    "diff_O",
    "diff_Q",
    "diff_exp",
    "gedi_dof",
    "initialize_gedi",
    "iterate_gedi",
    "pathway_solver",
    "qhat_from_R",
    "solve_B_single",
    "update_A",
    "update_R",
    "update_Q_prior",
    "update_oi_prior",
    "update_sigma2_gedi",
]


def __getattr__(name: str):
    # the user class pulls pandas/anndata; shard functions unpickled on workers must not (PEP 562)
    if name == "GEDI":
        from ._model import GEDI

        globals()["GEDI"] = GEDI
        return GEDI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
