"""Loader for the small real data set bundled with atlasfit (see ``data/ORIGIN.md``)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["multigedi_real_5k", "real_data_path"]

_REAL_FILE = "multigedi_real_5k.npz"
_REAL_KEYS = {"expr": np.int32, "M1": np.int32, "M2": np.int32, "sample": np.int16}


def real_data_path():
    """Return a :mod:`importlib.resources` handle of the bundled ``multigedi_real_5k.npz``.

    Returns
    -------
    importlib.resources.abc.Traversable
        The file inside the installed package (``atlasfit/datasets/data``).

    Examples
    --------
    >>> from atlasfit.datasets import real_data_path
    >>> real_data_path().name
    'multigedi_real_5k.npz'
    """
    return resources.files("atlasfit.datasets").joinpath("data", _REAL_FILE)


def _load_real_arrays() -> dict[str, np.ndarray]:
    path = real_data_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled data file {_REAL_FILE!r} is missing from the atlasfit package "
            f"(looked in {path}); reinstall atlasfit (`pip install --force-reinstall atlasfit`)"
        )
    with path.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        missing = sorted(set(_REAL_KEYS) - set(npz.files))
        if missing:
            raise ValueError(
                f"bundled data file {_REAL_FILE!r} lacks the keys {missing}; reinstall atlasfit"
            )
        return {k: np.asarray(npz[k]).astype(dt, copy=False) for k, dt in _REAL_KEYS.items()}


def multigedi_real_5k():
    """Real multi-sample RNA + splicing counts: 5,000 cells from 27 samples.

    500 genes (obs type ``"M"``) and 1,000 splicing events as paired counts (obs type
    ``"M_list"``), recovered from the test fixtures of the MIT-licensed multigedi 1.1.0 (the
    data behind ``/specs`` parity fixture ``multigedi_real5k.npz``). Cells are grouped by sample
    in ascending label order.

    Returns
    -------
    mudata.MuData
        Modalities ``rna`` (``X``: CSR int32 counts, 5000 x 500, var names ``gene0`` ..) and
        ``splicing`` (layers ``M1``, ``M2``: CSR int32, ``X = M1 + M2``, 5000 x 1000, var names
        ``event0`` ..). Obs names ``cell0`` .. ``cell4999`` in both; obs column ``sample``
        (str labels ``"0"`` .. ``"26"``) on each modality and on the root.

    Examples
    --------
    >>> from atlasfit.datasets import multigedi_real_5k
    >>> mdata = multigedi_real_5k()
    >>> mdata["rna"].shape, mdata["splicing"].shape
    ((5000, 500), (5000, 1000))
    >>> mdata.obs["sample"].nunique()
    27
    """
    import anndata as ad
    import mudata as md

    arrs = _load_real_arrays()
    n_cells = arrs["expr"].shape[0]
    obs_names = pd.Index([f"cell{i}" for i in range(n_cells)])
    sample = arrs["sample"].astype(str)

    def _obs() -> pd.DataFrame:
        return pd.DataFrame({"sample": pd.Categorical(sample)}, index=obs_names.copy())

    rna = ad.AnnData(
        X=sp.csr_matrix(arrs["expr"]),
        obs=_obs(),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(arrs["expr"].shape[1])]),
    )
    m1 = sp.csr_matrix(arrs["M1"])
    m2 = sp.csr_matrix(arrs["M2"])
    splicing = ad.AnnData(
        X=(m1 + m2).astype(np.int32),
        obs=_obs(),
        var=pd.DataFrame(index=[f"event{j}" for j in range(arrs["M1"].shape[1])]),
        layers={"M1": m1, "M2": m2},
    )
    from ._synthetic import _new_mudata

    mdata = _new_mudata(md, {"rna": rna, "splicing": splicing})
    mdata.obs["sample"] = pd.Categorical(sample)
    return mdata
