"""atlasfit: multi-sample, multi-modal single-cell models on atlas-size data with Dask."""

from __future__ import annotations

__version__ = "0.1.0"
