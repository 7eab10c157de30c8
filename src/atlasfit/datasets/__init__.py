"""Data sets: a synthetic multi-sample, multi-modal atlas with planted ground truth, a planted
RNA + peaks topic atlas, and a small bundled real data set.

Examples
--------
>>> from atlasfit import datasets
>>> mdata = datasets.synthetic_mudata(n_cells=400, n_samples=2, features={"rna": 30})
>>> mdata["rna"].shape
(400, 30)
"""

from __future__ import annotations

from ._planted import PlantedAtlas, matched_correlation, planted_topic_atlas
from ._planted_store import read_planted_side, write_planted_topic_store
from ._real import multigedi_real_5k, real_data_path
from ._synthetic import (
    SyntheticParams,
    iter_synthetic_atlas,
    synthetic_mudata,
    synthetic_truth,
)
from ._synthetic_store import synthetic_atlas

__all__ = [
    "PlantedAtlas",
    "SyntheticParams",
    "iter_synthetic_atlas",
    "matched_correlation",
    "multigedi_real_5k",
    "planted_topic_atlas",
    "read_planted_side",
    "real_data_path",
    "synthetic_atlas",
    "synthetic_mudata",
    "synthetic_truth",
    "write_planted_topic_store",
]
