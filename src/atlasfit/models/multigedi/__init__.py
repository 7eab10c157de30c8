"""MultiGEDI: hub-and-spoke multi-modal matrix factorisation, run as map/reduce rounds over shards
of whole samples (spec: ``shared/specs/multigedi.md``)."""

from ._config import FitConfig, InMemoryReader, ModalityConfig, SamplePlan, make_plan
from ._fit import dof, fit, iterate
from ._init import compute_priors, hashed_seed, initialize, rsvd_modality
from ._outputs import export_state, joint_svd, store_pca
from ._shard import dump_local, load_shard, restore_local

__all__ = [
    "FitConfig",
    "InMemoryReader",
    "ModalityConfig",
    "SamplePlan",
    "compute_priors",
    "dof",
    "dump_local",
    "export_state",
    "fit",
    "hashed_seed",
    "initialize",
    "iterate",
    "joint_svd",
    "load_shard",
    "make_plan",
    "restore_local",
    "rsvd_modality",
    "store_pca",
]

__all__ += ["MultiGEDI"]


def __getattr__(name: str):
    # the user class pulls pandas/anndata; shard functions unpickled on workers must not (PEP 562)
    if name == "MultiGEDI":
        from ._model import MultiGEDI

        globals()["MultiGEDI"] = MultiGEDI
        return MultiGEDI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
