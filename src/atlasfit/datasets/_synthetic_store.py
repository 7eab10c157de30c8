"""The synthetic atlas written straight into an atlas store, sample by sample (the generator is
:mod:`._synthetic`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["synthetic_atlas"]

from ._synthetic import (
    STORE_KINDS,
    SyntheticParams,
    _check_threads,
    _design,
    _iterate,
    _truth_dict,
    _with_common_doc,
)


def synthetic_atlas(
    store: str | Path,
    n_cells: int = 100_000,
    n_samples: int = 16,
    features: Mapping[str, int] | None = None,
    n_cell_types: int = 8,
    K_true: int = 10,
    overlap: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    obs_types: Mapping[str, str] | None = None,
    params: SyntheticParams | None = None,
    overwrite: bool = False,
    n_threads: int = 1,
) -> Path:
    """Write a synthetic atlas straight into an atlas store, sample by sample.

    Equivalent to ``atlasfit.io.write_atlas(store, iter_synthetic_atlas(...), sample_key="sample",
    kinds=...)`` with kinds ``"counts"`` for ``"M"`` / ``"M_list"`` modalities and ``"binary"`` for
    ``"X"``; the small ground truth (:func:`synthetic_truth`) is added to the store's root
    ``uns["synthetic_truth"]``. Peak memory is about one sample's data.

    Parameters
    ----------
    store
        Path of the atlas store (a Zarr directory) to create.
{common}
    overwrite
        Replace an existing store at ``store``.
    n_threads
        Threads generating the cell blocks of a sample (see :func:`iter_synthetic_atlas`).

    Returns
    -------
    pathlib.Path
        The store path.

    Examples
    --------
    >>> import tempfile, os
    >>> from atlasfit.datasets import synthetic_atlas
    >>> from atlasfit.io import open_atlas
    >>> tmp = tempfile.mkdtemp()
    >>> path = synthetic_atlas(os.path.join(tmp, "a.zarr"), n_cells=500, n_samples=3,
    ...                        features={{"rna": 40, "atac": 20}})
    >>> open_atlas(path).samples.index.tolist()
    ['S00', 'S01', 'S02']
    """
    from atlasfit.io import write_atlas

    n_threads = _check_threads(n_threads)
    d = _design(n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params)
    kinds = {m: STORE_KINDS[info["obs_type"]] for m, info in d.modalities.items()}
    path = write_atlas(
        store,
        _iterate(d, list(range(len(d.sample_names))), n_threads),
        sample_key="sample",
        kinds=kinds,
        overwrite=overwrite,
    )
    path = Path(path)
    _write_truth(path, _truth_dict(d))
    return path


def _write_truth(path: Path, truth: dict) -> None:
    """Add ``uns["synthetic_truth"]`` to the root of a MuData-layout Zarr store."""
    import zarr
    from anndata.io import write_elem

    root = zarr.open_group(str(path), mode="r+")
    uns = root["uns"] if "uns" in root else root.create_group("uns")
    if "encoding-type" not in uns.attrs:
        uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    write_elem(uns, "synthetic_truth", truth)


_with_common_doc(synthetic_atlas)
