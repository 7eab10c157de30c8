"""``atlasfit.tl`` downstream tools on in-memory data fitted by ``tl.multigedi`` (or ``tl.gedi``):
``svd``, ``pca``, ``variance``, ``dispersion``, ``pseudotime``, ``vector_field`` (the reference's
``gd.tl`` names, spec §11). They read what :func:`write_fit_state` left in the MuData and run the same
core functions as the model methods (:mod:`atlasfit.models.multigedi._svd`, ``_moments``,
``_dynamics``).
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# what tl.multigedi writes for the downstream tools
# ---------------------------------------------------------------------------------------------


def write_fit_state(model, mods: dict, uns: dict, key: str) -> None:
    """Per modality m: ``obsm[f"X_{key}_B"]`` (the shared embedding B, cells x K, the modality's row
    order), ``obs[f"{key}_s"]`` (the per-cell offset s_i of m) and in ``uns[key]["model"][m]``:
    ``samples`` (the modality's samples), ``o_i`` (samples x features) and ``Q_i`` (samples x
    features x K)."""
    st = model.export_state()
    for m in model.config.names:
        samples = list(model.plan_.mod_samples[m])
        mods[m].obsm[f"X_{key}_B"] = model.cell_embedding(m)
        s = np.concatenate([st[f"{m}/s_i/{g}"] for g in samples])
        mods[m].obs[f"{key}_s"] = model._to_rows(m, s[:, None])[:, 0]
        uns["model"][m].update({
            "samples": np.asarray(samples, dtype=str),
            "o_i": np.stack([st[f"{m}/o_i/{g}"] for g in samples]),
            "Q_i": np.stack([st[f"{m}/Q/{g}"] for g in samples]),
        })


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _key(data, key: str | None) -> str:
    """The fit's key: given, else ``"multigedi"`` for a MuData and ``"gedi"`` for an AnnData that holds a
    ``tl.gedi`` fit (the reference's default), else ``"multigedi"``."""
    if key is not None:
        return key
    if hasattr(data, "mod"):
        return "multigedi"
    return "gedi" if "gedi" in getattr(data, "uns", {}) or "X_gedi" in getattr(data, "obsm", {}) else "multigedi"


def _mods(data):
    return data.mod if hasattr(data, "mod") else {None: data}


def _uns_entry(data, key: str, what: str) -> dict:
    uns = getattr(data, "uns", {})
    if key not in uns:
        raise KeyError(f"tl.{what}: no fit under uns[{key!r}]; run atlasfit.tl.multigedi(..., key_added={key!r}) "
                       "first, or pass key= the fit's key_added")
    return uns[key]


def _fit_modalities(entry: dict, key: str, what: str) -> list[str]:
    model = entry.get("model", {})
    names = [m for m in model if isinstance(model[m], dict) and "Z" in model[m]]
    if not names:
        raise KeyError(f"tl.{what}: uns[{key!r}] holds no MultiGEDI parameters (Z, D per modality); "
                       "it needs the output of atlasfit.tl.multigedi")
    return names


def _check_mod(names, modality, what):
    if modality is not None and modality not in names:
        raise KeyError(f"tl.{what}: unknown modality {modality!r}; the fit has {names}")


def _B_rows(data, m: str, key: str, what: str) -> np.ndarray:
    a = data.mod[m]
    if f"X_{key}_B" not in a.obsm:
        raise KeyError(f"tl.{what}: mdata[{m!r}].obsm has no 'X_{key}_B' (the shared embedding B); refit with "
                       "atlasfit.tl.multigedi, which writes it")
    return np.asarray(a.obsm[f"X_{key}_B"], dtype=np.float64)


def _X(entry: dict, names) -> np.ndarray:
    return np.concatenate([np.asarray(entry["model"][m]["Z"], dtype=np.float64)
                           * np.asarray(entry["model"][m]["D"], dtype=np.float64)[None, :] for m in names], axis=0)


def _joint_B(data, names, key, what) -> np.ndarray:
    """B of every cell once (a cell shared by several modalities counts once), the MuData's obs order."""
    import pandas as pd

    seen: dict = {}
    for m in names:
        B = _B_rows(data, m, key, what)
        for name, row in zip(data.mod[m].obs_names, B):
            seen.setdefault(name, row)
    order = [n for n in pd.Index(data.obs_names) if n in seen] if hasattr(data, "obs_names") else list(seen)
    return np.stack([seen[n] for n in order])


def _svd_core(data, key: str, modality: str | None, what: str) -> dict:
    from .models.multigedi._svd import factorized_svd

    entry = _uns_entry(data, key, what)
    if not hasattr(data, "mod"):  # single-modality GEDI (GEDI.write / tl.gedi): X = Z, the cells' DB in obsm
        if modality is not None:
            raise ValueError(f"tl.{what}: modality= is for a MultiGEDI MuData; a GEDI AnnData has one modality")
        if "Z" not in entry or f"X_{key}" not in data.obsm:
            raise KeyError(f"tl.{what}: the AnnData has no GEDI fit under key {key!r} (uns[{key!r}]['Z'] and "
                           f"obsm['X_{key}']); run atlasfit.tl.gedi(..., key_added={key!r}) first")
        DB = np.asarray(data.obsm[f"X_{key}"], dtype=np.float64)
        out = factorized_svd(np.asarray(entry["Z"], dtype=np.float64), DB.T @ DB)
        out["rows"] = DB @ out["T"]
        return out
    names = _fit_modalities(entry, key, what)
    _check_mod(names, modality, what)
    B = _joint_B(data, names, key, what) if modality is None else _B_rows(data, modality, key, what)
    out = factorized_svd(_X(entry, names if modality is None else [modality]), B.T @ B)
    out["rows"] = B @ out["T"]  # PCA rows = V diag(d)
    return out


# ---------------------------------------------------------------------------------------------
# SVD / PCA (§7.1)
# ---------------------------------------------------------------------------------------------


def svd(data, *, key: str | None = None, modality: str | None = None, copy: bool = False):
    """Factorised SVD of a fit's rank-K reconstruction (spec §7.1), joint or of one ``modality``
    (X = Z_m diag(D_m), B of that modality's cells).

    Writes ``uns[key]["svd"][modality or "joint"] = {"d", "u", "v"}``: singular values, left
    singular vectors (features x r) and right singular vectors (cells x r: the modality's rows in its
    AnnData order; for ``joint`` the MuData's ``obs_names`` order). On an AnnData fitted by
    ``tl.gedi`` (``key="gedi"``): the SVD of Z (DB), written to ``uns[key]["svd"]``.

    Examples
    --------
    >>> import atlasfit
    >>> mdata = atlasfit.datasets.multigedi_real_5k()
    >>> atlasfit.tl.multigedi(mdata, {"rna": {"obs_type": "M"}}, "sample", K=3, max_iterations=1)  # doctest: +SKIP
    >>> atlasfit.tl.svd(mdata, modality="rna")  # doctest: +SKIP
    """
    if copy:
        data = data.copy()
    key = _key(data, key)
    out = _svd_core(data, key, modality, "svd")
    d = out["d"]
    v = np.zeros_like(out["rows"])
    np.divide(out["rows"], d[None, :], out=v, where=d[None, :] > 0)
    res = {"d": d, "u": out["u"], "v": v}
    if hasattr(data, "mod"):
        data.uns[key].setdefault("svd", {})[modality or "joint"] = res
    else:
        data.uns[key]["svd"] = res
    return data if copy else None


def pca(data, *, n_components: int | None = None, key: str | None = None, modality: str | None = None,
        key_added: str | None = None, copy: bool = False):
    """PCA coordinates V diag(d) (spec §7.1) of the joint (``modality=None``: ``obsm[f"X_{key}_pca"]``
    on every modality) or per-modality reconstruction (``obsm[f"X_{key}_{modality}_pca"]`` on that
    modality); ``key_added`` overrides the obsm name; ``n_components`` keeps the first columns.
    Rows follow each AnnData's own cells. On an AnnData fitted by ``tl.gedi`` (``key="gedi"``):
    ``obsm[f"X_{key}_pca"]``, the PCA of Z (DB)."""
    if copy:
        data = data.copy()
    key = _key(data, key)
    out = _svd_core(data, key, modality, "pca")
    T = out["T"]
    if n_components is not None:
        if not 1 <= int(n_components) <= T.shape[1]:
            raise ValueError(f"tl.pca: n_components must be in 1..{T.shape[1]}, got {n_components}")
        T = T[:, : int(n_components)]
    if not hasattr(data, "mod"):  # GEDI AnnData: the rows of its own cells
        data.obsm[key_added or f"X_{key}_pca"] = np.asarray(data.obsm[f"X_{key}"], dtype=np.float64) @ T
        return data if copy else None
    entry = data.uns[key]
    names = _fit_modalities(entry, key, "pca")
    for m in (names if modality is None else [modality]):
        name = key_added or (f"X_{key}_pca" if modality is None else f"X_{key}_{modality}_pca")
        data.mod[m].obsm[name] = _B_rows(data, m, key, "pca") @ T
    return data if copy else None


# ---------------------------------------------------------------------------------------------
# variance / dispersion (§7.3)
# ---------------------------------------------------------------------------------------------


def _feature_stats(data, key: str, modality: str | None, what: str) -> tuple[str, dict]:
    from .models.multigedi._moments import LocalStates, feature_stats

    entry = _uns_entry(data, key, what)
    names = _fit_modalities(entry, key, what)
    if modality is None:
        if len(names) != 1:
            raise ValueError(f"tl.{what}: the fit has modalities {names}; pass modality=")
        modality = names[0]
    _check_mod(names, modality, what)
    p = entry["model"][modality]
    if "Q_i" not in p or "o_i" not in p:
        raise KeyError(f"tl.{what}: uns[{key!r}]['model'][{modality!r}] has no Q_i / o_i; refit with "
                       "atlasfit.tl.multigedi, which writes them")
    a = data.mod[modality]
    B = _B_rows(data, modality, key, what)
    s = np.asarray(a.obs[f"{key}_s"], dtype=np.float64)
    labels = a.obs[entry["params"]["sample_key"]].astype(str).to_numpy()
    samples = [str(g) for g in p["samples"]]
    state = {"samples": tuple(samples), "B": {}, "mods": {modality: {}}}
    for i, g in enumerate(samples):
        rows = labels == g
        state["B"][g] = B[rows].T
        state["mods"][modality][g] = {"Q": np.asarray(p["Q_i"][i]), "oi": np.asarray(p["o_i"][i]), "si": s[rows]}
    shared = {f"{modality}/{k}": np.asarray(p[k], dtype=np.float64) for k in ("Z", "D", "o")}
    return modality, feature_stats(LocalStates(state), shared, samples, modality)


def variance(data, *, key: str | None = None, modality: str | None = None, key_added: str | None = None,
             copy: bool = False):
    """Per-feature variance of the imputed latent values Ŷ = (Z + Q_i) D B_i + (o + o_i)1ᵀ + 1 s_iᵀ
    (spec §7.3) over the modality's cells: ``var[key_added or f"{key}_variance"]``."""
    if copy:
        data = data.copy()
    key = _key(data, key)
    m, st = _feature_stats(data, key, modality, "variance")
    data.mod[m].var[key_added or f"{key}_variance"] = st["variance"]
    return data if copy else None


def dispersion(data, *, key: str | None = None, modality: str | None = None, key_added: str | None = None,
               copy: bool = False):
    """Per-feature dispersion of the imputed latent values (spec §7.3): variance / mean over the
    modality's cells, 0 where the mean is ≤ 0 (the reference's definition, on the model's latent log /
    logit scale): ``var[key_added or f"{key}_dispersion"]``.

    Examples
    --------
    >>> import atlasfit
    >>> mdata = atlasfit.datasets.multigedi_real_5k()
    >>> atlasfit.tl.multigedi(mdata, {"rna": {"obs_type": "M"}}, "sample", K=3, max_iterations=1)  # doctest: +SKIP
    >>> atlasfit.tl.dispersion(mdata, modality="rna")  # doctest: +SKIP
    """
    if copy:
        data = data.copy()
    key = _key(data, key)
    m, st = _feature_stats(data, key, modality, "dispersion")
    data.mod[m].var[key_added or f"{key}_dispersion"] = st["dispersion"]
    return data if copy else None


# ---------------------------------------------------------------------------------------------
# dynamics (§7.6)
# ---------------------------------------------------------------------------------------------


def _target(data, modality: str | None, what: str):
    mods = _mods(data)
    if None in mods:
        return data
    if modality is None:
        if len(mods) != 1:
            raise ValueError(f"tl.{what}: the MuData has modalities {list(mods)}; pass modality=")
        modality = next(iter(mods))
    if modality not in mods:
        raise KeyError(f"tl.{what}: unknown modality {modality!r}; the MuData has {list(mods)}")
    return mods[modality]


def _start_mask(a, start_cells) -> np.ndarray:
    """Boolean mask over ``a``'s cells from a mask, integer indices, obs names or (obs column, value)."""
    n = a.n_obs
    if isinstance(start_cells, tuple) and len(start_cells) == 2 and isinstance(start_cells[0], str) \
            and start_cells[0] in a.obs.columns:
        col, val = start_cells
        return (a.obs[col] == val).to_numpy()
    arr = np.asarray(start_cells)
    if arr.dtype.kind in "US" or arr.dtype == object:
        names = arr.astype(str).reshape(-1)
        pos = a.obs_names.get_indexer(names)
        if (pos < 0).any():
            raise KeyError(f"tl.pseudotime: start cell {names[pos < 0][0]!r} is not in obs_names")
        mask = np.zeros(n, dtype=bool)
        mask[pos] = True
        return mask
    from .models.multigedi._dynamics import start_indices

    mask = np.zeros(n, dtype=bool)
    mask[start_indices(arr, n)] = True
    return mask


def pseudotime(data, start_cells, *, key: str | None = None, modality: str | None = None,
               use_rep: str | None = None, key_added: str | None = None, copy: bool = False):
    """Pseudotime (spec §7.6): the Euclidean distance of every cell to the centroid of the start cells
    in a representation, min–max scaled to [0, 1]: ``obs[key_added or f"{key}_pseudotime"]``.

    Parameters
    ----------
    data
        AnnData (e.g. fitted by ``tl.gedi``) or MuData (``modality`` picks the AnnData).
    start_cells
        Boolean mask, integer row indices, obs names, or ``(obs column, value)``.
    key
        The fit's key: default ``"multigedi"`` for a MuData, ``"gedi"`` for an AnnData holding a
        ``tl.gedi`` fit (then the column is the reference's ``obs["gedi_pseudotime"]``).
    use_rep
        obsm key of the representation; default ``X_{key}_pca`` (joint MultiGEDI PCA), else
        ``X_{key}`` (GEDI's DB).

    Examples
    --------
    >>> import numpy as np, anndata as ad, atlasfit
    >>> a = ad.AnnData(np.zeros((3, 1)), obsm={"X_gedi": np.array([[0.0], [1.0], [3.0]])})
    >>> atlasfit.tl.pseudotime(a, [0], key="gedi")
    >>> a.obs["gedi_pseudotime"].round(3).tolist()
    [0.0, 0.333, 1.0]
    """
    from .models.multigedi._dynamics import pseudotime_dense

    if copy:
        data = data.copy()
    key = _key(data, key)
    a = _target(data, modality, "pseudotime")
    reps = [use_rep] if use_rep is not None else [f"X_{key}_pca", f"X_{key}"]
    rep = next((r for r in reps if r in a.obsm), None)
    if rep is None:
        raise KeyError(f"tl.pseudotime: no representation {reps} in obsm (has {list(a.obsm)}); pass use_rep=")
    mask = _start_mask(a, start_cells)
    if not mask.any():
        raise ValueError("tl.pseudotime: no start cells selected; the start set must hold at least one cell")
    a.obs[key_added or f"{key}_pseudotime"] = pseudotime_dense(np.asarray(a.obsm[rep]), mask)
    return data if copy else None


def vector_field(data, start_contrast, end_contrast, *, n_steps: int = 10, key: str | None = None,
                 modality: str | None = None, key_added: str | None = None, copy: bool = False):
    """Vector field (spec §7.6): the offset effect diffO at contrasts interpolated linearly between
    ``start_contrast`` and ``end_contrast``: field(t) = E ((1 − t) c₀ + t c₁), t on ``n_steps``
    points of [0, 1].

    E is R_o (genes x covariates; contrasts over the covariates of H) for a GEDI fit with sample
    covariates (``tl.gedi(H=...)``), and the sample offsets [o_1 … o_I] of ``modality`` (contrasts
    over its samples, e.g. ``{"d0": 1}`` → ``{"d3": 1}``) for a MultiGEDI fit. Contrasts: a vector in
    the order of the names, or a dict ``{name: weight}``.

    Writes ``uns[key_added or f"{key}_vector_field"]`` = ``{"t", "contrasts", "field" (steps x
    features), "velocity" (features: E (c₁ − c₀)), "names" (samples / covariates), "modality"}``.
    """
    from .models.multigedi import _dynamics as dyn

    if copy:
        data = data.copy()
    key = _key(data, key)
    entry = _uns_entry(data, key, "vector_field")
    if "Ro" in entry:  # single-modality GEDI with covariates (GEDI.write's layout)
        E = np.asarray(entry["Ro"], dtype=np.float64)
        names = [str(c) for c in entry["covariate"]]
        what = "covariates"
        modality = None
    else:
        mnames = _fit_modalities(entry, key, "vector_field")
        if modality is None:
            if len(mnames) != 1:
                raise ValueError(f"tl.vector_field: the fit has modalities {mnames}; pass modality=")
            modality = mnames[0]
        _check_mod(mnames, modality, "vector_field")
        p = entry["model"][modality]
        if "o_i" not in p:
            raise KeyError(f"tl.vector_field: uns[{key!r}] has no sample offsets o_i for {modality!r} (a GEDI fit "
                           "needs sample covariates H); refit with atlasfit.tl.multigedi or tl.gedi(H=...)")
        E = np.asarray(p["o_i"], dtype=np.float64).T
        names = [str(g) for g in p["samples"]]
        what = "samples"
    c0 = dyn.contrast_vector(start_contrast, names, f"start_contrast (over the {what})")
    c1 = dyn.contrast_vector(end_contrast, names, f"end_contrast (over the {what})")
    out = dyn.vector_field(E, c0, c1, n_steps)
    out["names"] = np.asarray(names, dtype=str)
    out["modality"] = "" if modality is None else modality
    data.uns[key_added or f"{key}_vector_field"] = out
    return data if copy else None


for _fn in (svd, pca, variance, dispersion, pseudotime, vector_field):
    _fn.__module__ = "atlasfit.tl"  # public as atlasfit.tl.<name> (API docs, reprs)
del _fn
