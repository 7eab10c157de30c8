"""Inputs of a :class:`~atlasfit.GEDI` fit: which modality to fit, and the pathway prior C and the
sample covariates H aligned to the data's genes and samples (spec §1.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _modality_name(data, modality: str | None) -> str:
    if modality is not None:
        return str(modality)
    import anndata as ad
    import mudata as md

    from ...io import Atlas, open_atlas

    if isinstance(data, ad.AnnData):
        return "rna"
    if isinstance(data, md.MuData):
        names = list(data.mod)
    elif isinstance(data, dict):
        names = list(data)
    elif isinstance(data, (str, Path, Atlas)):
        names = list((data if isinstance(data, Atlas) else open_atlas(data)).modalities)
    else:
        raise TypeError(
            f"GEDI.fit: cannot use data of type {type(data).__name__}; give an AnnData, a MuData, a "
            "dict of AnnData or an atlas store path"
        )
    if len(names) != 1:
        raise ValueError(
            f"GEDI: the data hold {len(names)} modalities {names}; choose one with GEDI(modality=...)"
        )
    return str(names[0])


def _align_C(C, genes: np.ndarray, modality: str):
    """C (genes x pathways) aligned to the modality's genes; returns (J x P float64, pathway names)."""
    J = len(genes)
    if isinstance(C, pd.DataFrame):
        if C.index.has_duplicates:
            dup = C.index[C.index.duplicated()][0]
            raise ValueError(f"GEDI: C has gene {dup!r} twice in its index; one row per gene is needed")
        missing = pd.Index(genes).difference(C.index, sort=False)
        if len(missing):
            raise ValueError(
                f"GEDI: C has no row for gene {str(missing[0])!r} of modality {modality!r} ({len(missing)} "
                f"of {J} genes missing); C must be a genes x pathways DataFrame indexed by the "
                "modality's var_names: align it, e.g. C.reindex(adata.var_names, fill_value=0)"
            )
        names = [str(c) for c in C.columns]
        mat = C.loc[list(genes)].to_numpy()
    else:
        mat = C.toarray() if hasattr(C, "toarray") else np.asarray(C)  # scipy.sparse too
        if mat.ndim != 2 or mat.shape[0] != J:
            raise ValueError(
                f"GEDI: C has shape {mat.shape} but modality {modality!r} has {J} genes; give C as a "
                "genes x pathways DataFrame indexed by gene names (or an array with one row per gene, "
                "in the modality's gene order)"
            )
        names = [f"pathway_{p}" for p in range(mat.shape[1])]
    try:
        mat = mat.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError("GEDI: C must be numeric (e.g. 0/1 gene-set membership)") from exc
    if mat.shape[1] == 0:
        raise ValueError("GEDI: C has no pathway columns; pass C=None to fit without a pathway prior")
    if len(set(names)) != len(names):
        raise ValueError(f"GEDI: C has duplicate pathway names in {names}")
    bad = ~np.isfinite(mat)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"GEDI: C is not finite at gene {str(genes[r])!r}, pathway {names[c]!r}")
    return mat, names


def _align_H(H, samples: tuple, modality: str):
    """H (covariates x samples DataFrame) -> (L x I float64 in ``samples`` order, covariate names)."""
    if not isinstance(H, pd.DataFrame):
        raise TypeError(
            f"GEDI: H must be a pandas DataFrame (covariates x samples: index = covariate names, "
            f"columns = sample labels), got {type(H).__name__}"
        )
    cols = pd.Index([str(c) for c in H.columns])
    if cols.has_duplicates:
        raise ValueError(f"GEDI: H has sample {cols[cols.duplicated()][0]!r} twice in its columns")
    missing = [g for g in samples if g not in cols]
    if missing:
        raise ValueError(
            f"GEDI: H has no column for sample {missing[0]!r} of modality {modality!r} ({len(missing)} "
            f"of {len(samples)} samples missing); H must be covariates x samples with one column per "
            f"sample label, e.g. H[{list(samples)[:3]}...]"
        )
    Hh = H.copy()
    Hh.columns = cols
    names = [str(i) for i in Hh.index]
    if len(names) == 0:
        raise ValueError("GEDI: H has no covariate rows; pass H=None to fit without covariates")
    if len(set(names)) != len(names):
        raise ValueError(f"GEDI: H has duplicate covariate names in {names}")
    try:
        mat = Hh[list(samples)].to_numpy().astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError("GEDI: H must be numeric (encode categorical covariates, e.g. as ±1 or "
                         "one-hot rows)") from exc
    bad = ~np.isfinite(mat)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"GEDI: H is not finite for covariate {names[r]!r}, sample {samples[c]!r}")
    return mat, names
