"""Data registration of the topic model: AnnData / MuData / dict / atlas store to aligned modalities
with names, sample labels, kinds and covariates, and the training layout built from them (the
seeded per-sample validation split, the shards' block reader).

In-memory data are checked here (every value, errors naming the first offending cell and feature);
a store registers only metadata and its blocks are checked where a shard reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._config import COUNT_LIKELIHOODS, LIKELIHOODS, TopicModelConfig
from ._fit import contiguous_locator, memory_locator
from ._shard import Layout, MemoryBlocks, StoreBlocks, split_positions, train_positions

_RNA_NAMES = ("rna", "gex", "gene", "genes", "expression", "transcripts", "mrna")


def _dense_rows(X, rows=None) -> np.ndarray:
    sub = X if rows is None else X[rows]
    if sp.issparse(sub):
        sub = sub.toarray()
    return np.asarray(sub, dtype=np.float64)


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def _first_bad(X, bad_fn):
    """(row, col) of the first entry where ``bad_fn(values)`` is True, or None."""
    if sp.issparse(X):
        C = sp.csr_matrix(X)
        hit = np.flatnonzero(bad_fn(C.data))
        if not hit.size:
            return None
        k = int(hit[0])
        row = int(np.searchsorted(C.indptr, k, side="right") - 1)
        return row, int(C.indices[k])
    A = np.asarray(X)
    hit = np.argwhere(bad_fn(A))
    return None if not hit.size else (int(hit[0, 0]), int(hit[0, 1]))


def _check_modality_values(m, X, lik, obs_names, var_names):
    """Errors for data a likelihood cannot take, naming the first offending cell and feature."""

    def where(rc):
        r, c = rc
        return f"first at cell {str(obs_names[r])!r}, feature {str(var_names[c])!r}"

    rc = _first_bad(X, lambda v: ~np.isfinite(v))
    if rc is not None:
        raise ValueError(f"modality {m!r} has non-finite values (NaN/inf; {where(rc)}); fill them (e.g. 0) "
                         "or drop those cells/features")
    if lik == "gaussian":
        return
    rc = _first_bad(X, lambda v: v < 0)
    if rc is not None:
        raise ValueError(f"modality {m!r} has negative values ({where(rc)}); likelihood {lik!r} needs counts "
                         f">= 0: pass raw counts (layers={{{m!r}: 'counts'}}) or likelihoods={{{m!r}: 'gaussian'}}")
    if lik == "bernoulli":
        rc = _first_bad(X, lambda v: (v != 0) & (v != 1))
        if rc is not None:
            raise ValueError(f"modality {m!r} is not binary ({where(rc)}); likelihood 'bernoulli' needs 0/1 "
                             "data: binarise it (x > 0) or use a count likelihood")
        return
    rc = _first_bad(X, lambda v: v != np.round(v))
    if rc is not None:
        raise ValueError(f"modality {m!r} holds non-integer values ({where(rc)}) but likelihood {lik!r} needs "
                         f"counts; pass the raw-count layer (layers={{{m!r}: 'counts'}}) or "
                         f"likelihoods={{{m!r}: 'gaussian'}} for continuous data")


def _default_likelihood(m: str, kind: str | None, is_binary) -> str:
    """Seed defaults (§8) made data-aware: binary data (store kind ``binary``, or every value 0/1, in
    memory or in a store) -> bernoulli, RNA-like counts -> gamma_poisson, other counts -> multinomial,
    continuous (store kind) -> gaussian. ``is_binary()`` is called only when the kind does not decide."""
    if kind == "binary":
        return "bernoulli"
    if kind == "continuous":
        return "gaussian"
    if is_binary():
        return "bernoulli"
    return "gamma_poisson" if m.lower() in _RNA_NAMES else "multinomial"


def _is_binary(reg, m: str) -> bool:
    """Whether every finite value of modality ``m`` is 0 or 1 (and there is one). A store is scanned
    in chunks of its stored values (stopping at the first other value), never held whole."""
    if not reg.is_store:
        v = _values(reg.X[m])
        v = v[np.isfinite(v)]
        return bool(v.size) and bool(np.all((v == 0) | (v == 1)))
    import zarr

    key, storage, _, n_vars = reg.atlas._element(m, reg.layers.get(m))
    node = zarr.open_group(str(reg.atlas.path), mode="r")[key]
    arr = node["data"] if storage == "csr" else node
    step = 1 << 22 if storage == "csr" else max(1, (1 << 22) // max(1, int(n_vars)))
    seen = False
    for lo in range(0, int(arr.shape[0]), step):
        v = np.asarray(arr[lo:lo + step]).ravel()
        v = v[np.isfinite(v)]
        if v.size and not np.all((v == 0) | (v == 1)):
            return False
        seen = seen or bool(v.size)
    return seen


def _as_list(arg, names, what):
    if arg is None:
        return {m: None for m in names}
    if isinstance(arg, str):
        return {m: arg for m in names}
    if isinstance(arg, Mapping):
        unknown = set(arg) - set(names)
        if unknown:
            raise ValueError(f"{what} names modalities {sorted(unknown)} that are not used (modalities: {names})")
        return {m: arg.get(m) for m in names}
    arg = list(arg)
    if len(arg) != len(names):
        raise ValueError(f"{what} has {len(arg)} entries but there are {len(names)} modalities {names}; "
                         "give one per modality or a dict {modality: value}")
    return dict(zip(names, arg))


class _Registered:
    """Registered data: cell and feature names, sample labels, kinds, covariates, and the matrices.

    In memory, ``X`` holds the matrices. A store registers only metadata (names, per-sample cell
    counts, kinds) and reads its blocks where they are needed: training shards read their own samples
    on the workers (:meth:`blocks`); ``X`` (every row on the driver) is read only when a driver-side
    summary asks for it."""

    def __init__(self, X, obs_names, var_names, samples, kinds, source=None, spatial=None, *, atlas=None,
                 layers=None, sample_counts=None):
        self._X = X  # {m: csr / ndarray}, or None for a store (read on demand)
        self.obs_names = pd.Index(obs_names)
        self.var_names = var_names  # {m: Index}
        self._samples = None if samples is None else np.asarray(samples).astype(str)
        self.kinds = kinds  # {m: store kind or None}
        self.source = source  # store path or None
        self.spatial = spatial or {}
        self.named = True
        self.batch = None  # integer codes per cell (batch_key)
        self.batch_categories: list[str] = []
        self.cont = None  # (n_cells, n_continuous) floats (continuous_covariate_keys)
        self.atlas = atlas
        self.layers = dict(layers or {})
        self._counts = sample_counts  # store: pd.Series {sample: cells} in store order

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)

    @property
    def is_store(self) -> bool:
        return self.atlas is not None

    @property
    def modalities(self) -> list:
        return list(self.var_names)

    def n_features(self, m: str) -> int:
        return len(self.var_names[m])

    @property
    def X(self) -> dict:
        """``{m: matrix}`` of every registered cell (a store is read into this process on first use)."""
        if self._X is None:
            X = {}
            for m in self.modalities:
                blocks = [self.atlas.read_block(m, s, self.layers.get(m)) for s in self._counts.index]
                X[m] = sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.concatenate(blocks, axis=0)
            self._X = X
        return self._X

    @property
    def samples(self) -> np.ndarray:
        """Sample label per cell (a store's are built on demand from its per-sample counts)."""
        if self._samples is None:
            self._samples = np.repeat(self._counts.index.to_numpy().astype(str), self._counts.to_numpy())
        return self._samples

    def sample_names(self) -> list:
        """Samples in order of first appearance (store order for a store)."""
        if self._samples is None:
            return [str(s) for s in self._counts.index]
        names, first = np.unique(self._samples, return_index=True)
        return [str(s) for s in names[np.argsort(first)]]

    def sample_rows(self) -> dict:
        """``{sample: row positions}`` (in-memory data: the labels may interleave)."""
        if self._samples is None:
            off = np.concatenate([[0], np.cumsum(self._counts.to_numpy())])
            return {str(s): np.arange(off[i], off[i + 1]) for i, s in enumerate(self._counts.index)}
        return {s: np.flatnonzero(self._samples == s) for s in self.sample_names()}

    def sample_counts(self) -> dict:
        if self._samples is None:
            return {str(s): int(n) for s, n in self._counts.items()}
        return {s: int(r.size) for s, r in self.sample_rows().items()}


def _take_layer(a, m, layer):
    if layer is None:
        if a.X is None:
            raise ValueError(f"modality {m!r} has no X; pass layers={{{m!r}: <layer>}} (layers: {list(a.layers)})")
        return a.X
    if layer not in a.layers:
        raise ValueError(f"modality {m!r} has no layer {layer!r} (layers: {list(a.layers)}); fix layers=")
    return a.layers[layer]


def _register(data, modalities=None, layers=None, sample_key=None, spatial_key=None, batch_key=None,
              continuous_covariate_keys=None) -> _Registered:
    """Turn any supported input into aligned per-modality matrices (no copy where possible)."""
    import anndata as ad

    try:
        import mudata as md
    except ImportError:  # pragma: no cover - mudata is a core dependency
        md = None
    from ...io import Atlas, open_atlas

    if isinstance(data, (str, Path, Atlas)):
        return _register_store(data if isinstance(data, Atlas) else open_atlas(data), modalities, layers,
                               sample_key, spatial_key, batch_key, continuous_covariate_keys)
    root_obs = None
    named = True  # feature names come from the data (not generated for plain arrays)
    if md is not None and isinstance(data, md.MuData):
        mods = dict(data.mod)
        root_obs = data.obs
        root_names = data.obs_names
    elif isinstance(data, ad.AnnData):
        name = (list(modalities)[0] if modalities else "rna")
        if modalities is not None and len(list(modalities)) != 1:
            raise ValueError(f"an AnnData holds one modality but modalities={list(modalities)}; pass a MuData "
                             "or a dict {name: AnnData}")
        mods = {name: data}
        root_names = data.obs_names
    elif isinstance(data, Mapping):
        if not data:
            raise ValueError("data is an empty dict; give {modality: AnnData or (n_cells, n_features) array}")
        vals = list(data.values())
        if all(isinstance(v, ad.AnnData) for v in vals):
            mods = dict(data)
            root_names = vals[0].obs_names
        elif all(sp.issparse(v) or isinstance(v, np.ndarray) for v in vals):
            n = vals[0].shape[0]
            mods = {}
            for m, v in data.items():
                if v.ndim != 2:
                    raise ValueError(f"modality {m!r}: array has shape {v.shape}; give (n_cells, n_features)")
                if v.shape[0] != n:
                    raise ValueError(f"mismatched cells: modality {m!r} has {v.shape[0]} rows, modality "
                                     f"{list(data)[0]!r} has {n}; align the rows (one row per cell, same order)")
                mods[m] = ad.AnnData(sp.csr_matrix(v) if sp.issparse(v) else np.asarray(v))
                mods[m].obs_names = [f"cell{i}" for i in range(n)]
                mods[m].var_names = [f"{m}_{j}" for j in range(v.shape[1])]
            root_names = mods[list(mods)[0]].obs_names
            layers = None  # plain arrays are the matrices themselves
            named = False
        else:
            raise TypeError("a dict input must hold only AnnData or only (n_cells, n_features) arrays, got "
                            f"{sorted({type(v).__name__ for v in vals})}")
    else:
        raise TypeError(f"cannot use data of type {type(data).__name__}; give an AnnData, a MuData, a dict of "
                        "AnnData or arrays, or an atlas store path (atlasfit.io.convert)")
    names = list(mods) if modalities is None else [str(m) for m in modalities]
    for m in names:
        if m not in mods:
            raise ValueError(f"modality {m!r} is missing from the data (it has {list(mods)}); fix modalities=")
    lay = _as_list(layers, names, "layers")
    X, var_names = {}, {}
    for m in names:
        a = mods[m]
        if a.n_obs != len(root_names) or not a.obs_names.equals(pd.Index(root_names)):
            other = pd.Index(root_names)
            if a.n_obs != len(other):
                detail = f"{a.n_obs} cells, the data has {len(other)}"
            else:
                k = int(np.flatnonzero(a.obs_names.to_numpy() != other.to_numpy())[0])
                detail = f"cell {k} is {a.obs_names[k]!r} but {other[k]!r} in the data's cell order"
            raise ValueError(f"mismatched cells: modality {m!r} has {detail}; every modality must hold the same "
                             "cells in the same order (e.g. mudata.pp.intersect_obs(mdata) and reorder)")
        M = _take_layer(a, m, lay[m])
        if hasattr(M, "compute"):
            M = M.compute()
        X[m] = sp.csr_matrix(M) if sp.issparse(M) else np.asarray(M)
        if X[m].ndim == 1:
            X[m] = X[m][:, None]
        var_names[m] = a.var_names
    n = len(root_names)
    frames = ([root_obs] if root_obs is not None else []) + [mods[m].obs for m in names]

    def column(key, what):
        for f in frames:  # MuData global obs first, then the modalities' obs
            if key in f.columns:
                return f[key]
        cols = sorted(set().union(*[set(f.columns) for f in frames]))
        raise ValueError(f"unknown {what} {key!r}: no obs column of that name (columns: {cols}); pass an existing "
                         f"column, or {what}=None")

    samples = np.zeros(n, dtype=str) if sample_key is None else _labels(column(sample_key, "sample_key"),
                                                                       "sample_key", sample_key, root_names)
    spatial = {}
    if spatial_key is not None:
        for m in names:
            holders = [mods[m]] + ([data] if root_obs is not None else [])
            G = next((h.obsp[spatial_key] for h in holders if spatial_key in h.obsp), None)
            if G is None:
                have = sorted(set().union(*[set(h.obsp.keys()) for h in holders]))
                raise ValueError(f"spatial key {spatial_key!r} is absent: modality {m!r} has no "
                                 f".obsp[{spatial_key!r}] (obsp keys: {have}); build the graph first "
                                 "(e.g. squidpy.gr.spatial_neighbors) or pass spatial_key=None")
            if G.shape != (n, n):
                raise ValueError(f"modality {m!r}: .obsp[{spatial_key!r}] has shape {G.shape}, expected ({n}, {n})")
            spatial[m] = sp.csr_matrix(G)
    reg = _Registered(X, root_names, var_names, samples, {m: None for m in names}, None, spatial)
    reg.named = named
    _covariates(reg, column, batch_key, continuous_covariate_keys)
    return reg


def _labels(col: pd.Series, what: str, key: str, names) -> np.ndarray:
    if col.isna().any():
        k = int(np.flatnonzero(col.isna().to_numpy())[0])
        raise ValueError(f"{what} {key!r}: cell {str(names[k])!r} has no label; fill or drop such cells")
    return col.astype(str).to_numpy()


def _covariates(reg: _Registered, column, batch_key, cont_keys) -> None:
    """Per-cell covariates (§1.5, §2.2): batch codes of ``batch_key`` (categories in order of first
    appearance) and the ``continuous_covariate_keys`` columns as floats."""
    if batch_key is not None:
        lab = _labels(column(batch_key, "batch_key"), "batch_key", batch_key, reg.obs_names)
        cats, first = np.unique(lab, return_index=True)
        cats = cats[np.argsort(first)]
        reg.batch_categories = [str(c) for c in cats]
        reg.batch = pd.Index(cats).get_indexer(lab).astype(np.int64)
    if cont_keys:
        cols = []
        for key in cont_keys:
            c = pd.to_numeric(column(key, "continuous_covariate_keys"), errors="coerce").to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(c)):
                k = int(np.flatnonzero(~np.isfinite(c))[0])
                raise ValueError(f"continuous covariate {key!r}: cell {str(reg.obs_names[k])!r} has a missing or "
                                 "non-numeric value; impute or drop such cells")
            cols.append(c)
        reg.cont = np.stack(cols, axis=1)


def _register_store(atlas, modalities, layers, sample_key, spatial_key, batch_key=None,
                    continuous_covariate_keys=None) -> _Registered:
    if sample_key is not None and sample_key != atlas.sample_key:
        raise ValueError(f"unknown sample_key {sample_key!r}: the atlas store {str(atlas.path)!r} is keyed by "
                         f"{atlas.sample_key!r}; pass sample_key=None (or {atlas.sample_key!r})")
    if spatial_key is not None:
        raise ValueError(f"spatial key {spatial_key!r} is absent: atlas stores keep no .obsp graphs; load the "
                         "data as a MuData with the graph in .obsp instead")
    names = list(atlas.modalities) if modalities is None else [str(m) for m in modalities]
    for m in names:
        if m not in atlas.modalities:
            raise ValueError(f"modality {m!r} is missing from the atlas store (it has {atlas.modalities}); "
                             "fix modalities=")
    lay = _as_list(layers, names, "layers")
    counts = atlas.samples
    ref = names[0]
    obs_ref = atlas.obs(ref).index
    for m in names[1:]:
        differ = counts.index[counts[m].to_numpy() != counts[ref].to_numpy()]
        if len(differ):
            s = differ[0]
            raise ValueError(f"mismatched cells: sample {s!r} has {int(counts.loc[s, m])} cells in modality {m!r} "
                             f"but {int(counts.loc[s, ref])} in {ref!r}; the topic model needs every modality "
                             "measured on the same cells (convert only the shared samples/cells)")
        obs_m = atlas.obs(m).index
        if not obs_m.equals(obs_ref):
            k = int(np.flatnonzero(obs_m.to_numpy() != obs_ref.to_numpy())[0])
            raise ValueError(f"mismatched cells: store row {k} is {obs_m[k]!r} in modality {m!r} but "
                             f"{obs_ref[k]!r} in {ref!r}; convert the modalities with the same cells")
    present = counts[ref][counts[ref] > 0]
    var_names, kinds = {}, {}
    for m in names:
        if lay[m] is not None and lay[m] not in atlas.layers(m):
            raise ValueError(f"modality {m!r} has no layer {lay[m]!r} in the atlas store (layers: "
                             f"{atlas.layers(m)}); fix layers=")
        var_names[m] = atlas.var(m).index
        kinds[m] = atlas.kind(m)
    reg = _Registered(None, obs_ref, var_names, None, kinds, str(atlas.path), atlas=atlas, layers=lay,
                      sample_counts=present)
    if batch_key is not None or continuous_covariate_keys:
        obs = atlas.obs(ref)

        def column(key, what):
            if key not in obs.columns:
                raise ValueError(f"unknown {what} {key!r}: modality {ref!r} of the store has no obs column of that "
                                 f"name (columns: {sorted(obs.columns)})")
            return obs[key]

        _covariates(reg, column, batch_key, continuous_covariate_keys)
    return reg



def register_config(data, modalities, likelihoods, sample_key, n_topics, layers, spatial_key, batch_key,
                    continuous_covariate_keys, cfg: dict):
    """Register ``data`` and build the model configuration from it (``from_data``): covariate sizes,
    default and checked likelihoods, checked values (in-memory data). Returns ``(registered, config)``."""
    if cfg.get("spatial_mode") is not None and spatial_key is None:
        raise ValueError(f"spatial_mode={cfg['spatial_mode']!r} needs a graph: pass spatial_key=<.obsp key> "
                         "(a within-sample spatial neighbour graph)")
    if cfg.get("n_batches") and batch_key is None:
        raise ValueError(f"n_batches={cfg['n_batches']} needs per-cell batch labels: pass batch_key=<obs column>")
    reg = _register(data, modalities, layers, sample_key, spatial_key, batch_key, continuous_covariate_keys)
    if reg.batch is not None:
        nb = len(reg.batch_categories)
        if cfg.setdefault("n_batches", nb) != nb:
            raise ValueError(f"n_batches={cfg['n_batches']} but batch_key {batch_key!r} has {nb} categories "
                             f"{reg.batch_categories[:5]}; leave n_batches out (it is set from the data)")
    if reg.cont is not None:
        cfg.setdefault("n_continuous_covariates", reg.cont.shape[1])
        cfg.setdefault("encode_covariates", True)
    names = reg.modalities
    liks = _as_list(likelihoods, names, "likelihoods")
    for m in names:
        if liks[m] is None:
            liks[m] = _default_likelihood(m, reg.kinds[m], lambda m=m: _is_binary(reg, m))
        if liks[m] not in LIKELIHOODS:
            raise ValueError(f"modality {m!r}: unknown likelihood {liks[m]!r}; use one of {LIKELIHOODS}")
        if reg.kinds[m] == "continuous" and liks[m] in COUNT_LIKELIHOODS:
            raise ValueError(f"modality {m!r} is stored as kind 'continuous' (non-count data) but likelihood "
                             f"{liks[m]!r} needs counts; use likelihoods={{{m!r}: 'gaussian'}}")
        if not reg.is_store:  # a store's blocks are checked where the shards read them
            _check_modality_values(m, reg.X[m], liks[m], reg.obs_names, reg.var_names[m])
    config = TopicModelConfig(
        modalities=tuple(names),
        n_features=tuple(reg.n_features(m) for m in names),
        likelihoods=tuple(liks[m] for m in names),
        n_topics=int(n_topics),
        **cfg,
    )
    return reg, config


# --------------------------------------------------------------------------- training layout


def split_indices(reg: _Registered, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` row positions of the seeded per-sample split (both sorted)."""
    rows = reg.sample_rows()
    val = [rows[s][split_positions(r.size, fraction, seed, i)] for i, (s, r) in enumerate(rows.items())]
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(reg.n_obs), val), val


def training_layout(reg: _Registered, liks: Mapping, fraction: float, seed: int):
    """What a fit needs to build its shards: ``(layout, names, sizes, locate, reader)``.

    ``names``/``sizes``: the samples with training cells, in order of their first training cell, and
    their training cells (the shard plan and minibatch noise keys); ``locate``: training-set positions
    to (sample, position) for the k-means rows; ``reader``: the shards' block reader."""
    counts = reg.sample_counts()
    all_names = list(counts)
    n_val = {s: int(round(float(fraction) * counts[s])) for s in all_names}
    if reg.is_store:
        names = [s for s in all_names if counts[s] - n_val[s] > 0]
        locate = contiguous_locator(names, [counts[s] - n_val[s] for s in names])
    else:
        rows = reg.sample_rows()
        first, tr = {}, []
        for i, s in enumerate(all_names):
            t = rows[s][train_positions(counts[s], split_positions(counts[s], fraction, seed, i))]
            if t.size:
                first[s] = int(t[0])
                tr.append(t)
        names = sorted(first, key=first.get)
        tr = np.sort(np.concatenate(tr)) if tr else np.zeros(0, dtype=np.int64)
        locate = memory_locator(reg.samples[tr])
    sizes = [counts[s] - n_val[s] for s in names]
    layout = Layout(n={s: counts[s] for s in names}, index={s: all_names.index(s) for s in names},
                    sid={s: j for j, s in enumerate(names)}, fraction=float(fraction), seed=int(seed),
                    checks=dict(liks) if reg.is_store else {})
    if reg.is_store:
        cov = None
        if reg.batch is not None or reg.cont is not None:
            cov = {}
            for s, r in reg.sample_rows().items():
                cov[s] = {}
                if reg.batch is not None:
                    cov[s]["batch"] = reg.batch[r]
                if reg.cont is not None:
                    cov[s]["cont"] = reg.cont[r]
        reader = StoreBlocks(reg.atlas.block_reader(), reg.layers, cov)
    else:
        reader = MemoryBlocks(reg.X, reg.sample_rows(), batch=reg.batch, cont=reg.cont, graphs=reg.spatial or None)
    return layout, names, sizes, locate, reader
