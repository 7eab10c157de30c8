"""User-facing :class:`MultimodalAmortizedLDA` (scverse style) on top of the topic-model core.

Data registration (AnnData / MuData / dict / atlas store), a seeded per-sample validation split,
training on the engine protocol (serial, or Dask through :class:`~atlasfit.engine.DaskEngine`) with
held-out tracking and early stopping, posterior summaries (spec §5, §7, with the API bugs of §11 B
fixed), save / load and results written into an atlas store.

The maths lives in ``_loss.py`` / ``_train.py``; this module decides which cells go where and
computes summaries from the fitted parameters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ...engine import SerialEngine, plan_shards
from ._config import COUNT_LIKELIHOODS, LIKELIHOODS, TopicModelConfig, kl_weight_schedule
from ._loss import (
    combine_loss,
    global_draws,
    global_kl,
    loglik_bernoulli,
    loglik_gaussian,
    loglik_multinomial,
    loglik_nb_fixed,
    loglik_nb_learned,
    softmax,
)
from ._optim import AdamWState, adamw_init, adamw_step
from ._spatial import check_adjacency, neighbourhood, normalized_adjacency, sgc_features
from ._params import (
    background_init,
    draw_global_noise,
    init_bn_state,
    init_params,
    kmeans_decoder_init,
    make_buffers,
    softplus,
)
from ._train import (
    TopicFit,
    _average_round,
    _check_data,
    _full_grads,
    _merge_median,
    _shard_backward,
    _shard_data_stats,
    _shard_forward,
    _shard_load,
    _shard_local_steps,
    _shard_step,
    _step_size,
    _update_bn,
    guide_eval,
    topic_feature_dist,
)

_RNA_NAMES = ("rna", "gex", "gene", "genes", "expression", "transcripts", "mrna")
_FORMAT = "atlasfit.MultimodalAmortizedLDA/1"
_EVAL_BLOCK = 1024


# --------------------------------------------------------------------------- data registration


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


def _default_likelihood(m: str, X, kind: str | None = None) -> str:
    """Seed defaults (§8) made data-aware: binary -> bernoulli, RNA-like counts -> gamma_poisson,
    other counts -> multinomial, continuous (store kind) -> gaussian."""
    if kind == "binary":
        return "bernoulli"
    if kind == "continuous":
        return "gaussian"
    v = _values(X)
    v = v[np.isfinite(v)]
    if v.size and kind is None and np.all((v == 0) | (v == 1)):
        return "bernoulli"
    return "gamma_poisson" if m.lower() in _RNA_NAMES else "multinomial"


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
    """Cells x features matrices per modality, aligned rows, with names and sample labels."""

    def __init__(self, X, obs_names, var_names, samples, kinds, source=None, spatial=None):
        self.X = X  # {m: csr / ndarray}
        self.obs_names = pd.Index(obs_names)
        self.var_names = var_names  # {m: Index}
        self.samples = np.asarray(samples).astype(str)
        self.kinds = kinds  # {m: store kind or None}
        self.source = source  # store path or None
        self.spatial = spatial or {}
        self.named = True
        self.batch = None  # integer codes per cell (batch_key)
        self.batch_categories: list[str] = []
        self.cont = None  # (n_cells, n_continuous) floats (continuous_covariate_keys)

    @property
    def n_obs(self) -> int:
        return len(self.obs_names)


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
    X, var_names, kinds = {}, {}, {}
    for m in names:
        blocks = [atlas.read_block(m, s, lay[m]) for s in present.index]
        X[m] = sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.concatenate(blocks, axis=0)
        var_names[m] = atlas.var(m).index
        kinds[m] = atlas.kind(m)
    samples = np.repeat(present.index.to_numpy().astype(str), present.to_numpy())
    reg = _Registered(X, obs_ref, var_names, samples, kinds, str(atlas.path))
    if batch_key is not None or continuous_covariate_keys:
        obs = atlas.obs(ref)

        def column(key, what):
            if key not in obs.columns:
                raise ValueError(f"unknown {what} {key!r}: modality {ref!r} of the store has no obs column of that "
                                 f"name (columns: {sorted(obs.columns)})")
            return obs[key]

        _covariates(reg, column, batch_key, continuous_covariate_keys)
    return reg


class _EvalSet:
    """Cells to evaluate: full matrices ``X`` with the selected rows ``idx`` (None: all), and per
    selected cell its Omega row, name, batch code and continuous covariates; the full spatial graphs
    (SGC inputs and GCN neighbourhoods are computed over all cells of ``X``)."""

    def __init__(self, X, idx, omega, names, batch, cont, graphs):
        self.X, self.idx, self.omega, self.names = X, idx, omega, pd.Index(names)
        self.batch, self.cont, self.graphs = batch, cont, graphs or {}
        self.sgc = None
        self.adj_hat = None

    @property
    def n(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------- shard helpers (engine protocol)


def _shard_set_omega(state, omega, om_m, om_v, om_t):
    """Restore the per-cell mixing logits and their AdamW moments (continued training)."""
    if "omega" in state:
        r = state["rows"]
        state["omega"], state["omega_m"], state["omega_v"] = omega[r].copy(), om_m[r].copy(), om_v[r].copy()
        state["omega_t"] = om_t[r].copy()


def _shard_get_omega_state(state):
    if "omega" not in state:
        return None
    return state["rows"], state["omega"], state["omega_m"], state["omega_v"], state["omega_t"]


# --------------------------------------------------------------------------- the model


class MultimodalAmortizedLDA:
    """Multimodal amortised LDA: per-modality encoders, a mixture of experts collapsed by moment
    matching, logistic-normal priors and per-modality likelihoods (``specs/topic_model.md``).

    Build it with :meth:`from_data` / :meth:`from_mudata`; then :meth:`train` and the ``get_*``
    summaries. Cells of every modality must be the same cells in the same order.

    Parameters
    ----------
    config
        The model configuration (:class:`~atlasfit.models.topic.TopicModelConfig`).
    data
        Registered data (internal; use the constructors).
    dtype
        ``"float64"`` (default) or ``"float32"`` for parameters and minibatches.

    Attributes
    ----------
    config : TopicModelConfig
    train_indices_, validation_indices_ : numpy.ndarray
        Row positions of the training / validation cells in the registered data.
    n_epochs_ : int
        Epochs trained so far (over all calls of :meth:`train`).
    stopped_early_ : bool
        Whether the last :meth:`train` call ended by early stopping.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (80, 15)).astype(np.float32))
    >>> model = MultimodalAmortizedLDA.from_data(a, n_topics=3, n_hidden=8)
    >>> model.train(max_epochs=2, batch_size=32, progress=False).get_latent_representation().shape
    (80, 3)
    """

    def __init__(self, config: TopicModelConfig, data: _Registered | None = None, *, dtype: str = "float64"):
        self.config = config
        self.dtype = np.dtype(dtype).type
        self._data = data
        self.feature_names_ = {m: pd.Index(data.var_names[m]) for m in config.modalities} if data else {}
        self.layers_: dict = {}
        self.sample_key_: str | None = None
        self.spatial_key_: str | None = None
        self.batch_key_: str | None = None
        self.batch_categories_: list = []
        self.continuous_covariate_keys_: list | None = None
        self._fit: TopicFit | None = None
        self._opt: AdamWState | None = None
        self._omega = None  # (m, v, t, omega) over ALL registered cells (cell weight mode)
        self._history: list[dict] = []
        self.n_epochs_ = 0
        self.stopped_early_ = False
        self.train_indices_: np.ndarray | None = None
        self.validation_indices_: np.ndarray | None = None
        self._train_settings: dict = {}
        self._theta_prev = None  # global mean theta of the last step (theta_bar_sync="lagged")
        self.best_epoch_: int | None = None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_data(
        cls,
        data,
        modalities: Sequence[str] | None = None,
        likelihoods: Sequence[str] | Mapping[str, str] | None = None,
        sample_key: str | None = None,
        n_topics: int = 20,
        *,
        layers: str | Mapping[str, str] | None = None,
        spatial_key: str | None = None,
        batch_key: str | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        dtype: str = "float64",
        **cfg,
    ) -> MultimodalAmortizedLDA:
        """Register data and build the model in one call.

        Parameters
        ----------
        data
            An AnnData (one modality, named ``modalities[0]`` or ``"rna"``), a MuData, a dict of
            AnnData, a dict of ``(n_cells, n_features)`` arrays, or an atlas store path / Atlas (read
            sample by sample with :meth:`atlasfit.io.Atlas.read_block`, in store order).
        modalities
            Modalities to use, in order (default: all).
        likelihoods
            One per modality (list or ``{modality: likelihood}``), from ``"multinomial"``,
            ``"gamma_poisson"``, ``"nb"``, ``"bernoulli"``, ``"gaussian"``. Default per modality:
            binary data (store kind ``binary``, or all values 0/1) -> ``"bernoulli"``; counts ->
            ``"gamma_poisson"`` for an RNA-like name (``rna``, ``gex``, ``genes``, ...) and
            ``"multinomial"`` otherwise (the seed's rule, §8); store kind ``continuous`` -> ``"gaussian"``.
        sample_key
            obs column with the sample labels (MuData global obs first, then the modalities' obs);
            ``None``: one sample (stores always use their own key). Samples define the shards and
            stratify minibatches and the validation split.
        n_topics
            :math:`K`.
        layers
            Layer to read instead of ``X``: one name for every modality or ``{modality: layer}``.
        spatial_key
            ``.obsp`` key of a within-sample spatial graph (checked to exist, shape (n, n)); kept in
            ``spatial_graphs_`` and given to the spatial encoders (``spatial_mode="sgc"`` / ``"gcn"``).
        batch_key, continuous_covariate_keys
            obs columns of the categorical covariate (codes in order of first appearance;
            ``n_batches`` is set from it: decoder batch offsets §1.5, and the encoder one-hot with
            ``encode_covariates=True``) and of continuous encoder covariates (§2.2; sets
            ``n_continuous_covariates`` and ``encode_covariates=True``).
        dtype
            ``"float64"`` or ``"float32"``.
        **cfg
            Any other :class:`~atlasfit.models.topic.TopicModelConfig` field (``n_hidden``,
            ``weight_mode``, ``likelihood_weight_mode``, ``learnable_dispersion``, ...).

        Returns
        -------
        MultimodalAmortizedLDA

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"rna": rng.poisson(1.5, (50, 10)), "atac": (rng.random((50, 20)) < 0.3).astype(float)}
        >>> MultimodalAmortizedLDA.from_data(d, n_topics=4).config.likelihoods
        ('gamma_poisson', 'bernoulli')
        """
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
        names = list(reg.X)
        liks = _as_list(likelihoods, names, "likelihoods")
        for m in names:
            if liks[m] is None:
                liks[m] = _default_likelihood(m, reg.X[m], reg.kinds[m])
            if liks[m] not in LIKELIHOODS:
                raise ValueError(f"modality {m!r}: unknown likelihood {liks[m]!r}; use one of {LIKELIHOODS}")
            if reg.kinds[m] == "continuous" and liks[m] in COUNT_LIKELIHOODS:
                raise ValueError(f"modality {m!r} is stored as kind 'continuous' (non-count data) but likelihood "
                                 f"{liks[m]!r} needs counts; use likelihoods={{{m!r}: 'gaussian'}}")
            _check_modality_values(m, reg.X[m], liks[m], reg.obs_names, reg.var_names[m])
        config = TopicModelConfig(
            modalities=tuple(names),
            n_features=tuple(int(reg.X[m].shape[1]) for m in names),
            likelihoods=tuple(liks[m] for m in names),
            n_topics=int(n_topics),
            **cfg,
        )
        model = cls(config, reg, dtype=dtype)
        model.layers_ = _as_list(layers, names, "layers")
        model.sample_key_ = sample_key if reg.source is None else None
        model.spatial_key_ = spatial_key
        model.batch_key_ = batch_key
        model.batch_categories_ = list(reg.batch_categories)
        model.continuous_covariate_keys_ = None if not continuous_covariate_keys else list(continuous_covariate_keys)
        return model

    @classmethod
    def from_mudata(
        cls,
        mdata,
        modalities: Sequence[str] | None = None,
        likelihoods: Sequence[str] | Mapping[str, str] | None = None,
        sample_key: str | None = None,
        n_topics: int = 20,
        **kwargs,
    ) -> MultimodalAmortizedLDA:
        """Build the model from a MuData (cells aligned across ``mdata.mod``); see :meth:`from_data`.

        Examples
        --------
        >>> import numpy as np, anndata as ad, mudata as md
        >>> rng = np.random.default_rng(0)
        >>> mdata = md.MuData({"rna": ad.AnnData(rng.poisson(2.0, (40, 8)).astype(float)),
        ...                    "atac": ad.AnnData((rng.random((40, 12)) < 0.2).astype(float))})
        >>> cfg = MultimodalAmortizedLDA.from_mudata(mdata, n_topics=3).config
        >>> dict(zip(cfg.modalities, cfg.likelihoods)) == {"rna": "gamma_poisson", "atac": "bernoulli"}
        True
        """
        import mudata as md

        if not isinstance(mdata, md.MuData):
            raise TypeError(f"from_mudata needs a MuData, got {type(mdata).__name__}; use from_data for other inputs")
        return cls.from_data(mdata, modalities, likelihoods, sample_key, n_topics, **kwargs)

    # ------------------------------------------------------------------ training

    def _split(self, validation_fraction: float, seed: int) -> None:
        """Seeded validation split, stratified per sample: within each sample the cells are permuted
        with a generator keyed by (seed, sample position) and the first round(fraction * n_s) go to
        validation."""
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        lab = self._data.samples
        names, first = np.unique(lab, return_index=True)
        names = names[np.argsort(first)]
        val = []
        for i, s in enumerate(names):
            idx = np.flatnonzero(lab == s)
            perm = np.random.default_rng(np.random.SeedSequence([int(seed), 5501, i])).permutation(idx.size)
            val.append(idx[perm[: int(round(validation_fraction * idx.size))]])
        val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
        train = np.setdiff1d(np.arange(self._data.n_obs), val)
        if train.size < 2:
            raise ValueError(f"validation_fraction={validation_fraction} leaves {train.size} training cells; "
                             "lower it (training needs at least 2 cells)")
        self.train_indices_, self.validation_indices_ = train, val

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        validation_fraction: float = 0.1,
        early_stopping: bool = False,
        patience: int = 10,
        *,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        client=None,
        seed: int = 0,
        progress: bool = True,
        callback: Callable | None = None,
        kl_schedule: str = "scvi400",
        kl_kwargs: dict | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        omega_update: str = "all",
        input_median: str | float = "dataset",
        bernoulli_depth: str = "dataset",
        n_eval_samples: int = 1,
        max_shards: int = 64,
        theta_bar_sync: str = "exact",
        steps_per_round: int = 1,
        device: str = "cpu",
        decoder_init: str = "kmeans",
    ) -> MultimodalAmortizedLDA:
        """Train by minibatch AdamW on the engine protocol (spec §3, §6), with held-out tracking.

        Each epoch runs :math:`\\lceil N/\\text{batch\\_size}\\rceil` steps over the :math:`N` training cells
        (minibatches stratified per sample, noise keyed by (seed, epoch, step, sample); see
        :func:`~atlasfit.models.topic.train_serial`, whose shard functions are used). After every
        epoch the validation cells are scored (``history_``): ``val_loss`` = :math:`-`ELBO per cell
        (:meth:`get_elbo`, ``n_eval_samples`` draws with a fixed key, so the curve is smooth) and the
        per-token log-likelihood (:meth:`get_perplexity`, :math:`\\hat\\theta = \\mathrm{softmax}(\\bar\\mu)`).

        Calling ``train`` again continues: same split, parameters, BatchNorm statistics, per-cell
        :math:`\\Omega` rows and AdamW moments and step count; epochs are numbered on from
        ``n_epochs_`` (KL schedule and noise keys), so ``train(3); train(2)`` equals ``train(5)``.

        Parameters
        ----------
        max_epochs
            Epochs of this call; default :math:`\\max(1, \\min(\\mathrm{round}(2\\cdot10^7/N_{\\rm all}), 1000))` (§6).
        batch_size
            Global minibatch size (>= 2).
        lr, weight_decay, betas, eps
            AdamW (torch defaults; the paper uses lr 1e-2).
        validation_fraction
            Fraction of every sample's cells held out (seeded permutation per sample; fixed by the
            first call). 0 disables validation.
        early_stopping, patience, monitor, min_delta
            Stop when ``monitor`` (``"val_loss"``, lower is better, or ``"val_ll_per_token"``, higher is
            better) has not improved by more than ``min_delta`` for ``patience`` epochs. The last
            parameters are kept (``best_epoch_`` records the best one).
        client
            A ``distributed.Client``: shards run on its workers through
            :class:`~atlasfit.engine.DaskEngine` (same bits as serial: reductions in shard order).
        seed
            Keys initialisation, the split, minibatches and noise.
        progress
            Show a tqdm bar over epochs.
        callback
            ``callback(epoch, record)`` after each epoch (``record``: that epoch's ``history_`` row as a
            dict); returning True stops training.
        kl_schedule, kl_kwargs
            :func:`~atlasfit.models.topic.kl_weight_schedule` preset and arguments.
        omega_update, input_median, bernoulli_depth, max_shards, theta_bar_sync, steps_per_round
            As in :func:`~atlasfit.models.topic.train_serial` (``steps_per_round > 1``: local steps with
            periodic averaging, one engine round per that many steps; ``theta_bar_sync="lagged"``: one
            round per step with the topic-variance regulariser on).
        n_eval_samples
            Monte-Carlo draws for the per-epoch ``val_loss``.
        decoder_init
            Start of the topic-feature logits (first call only): ``"kmeans"`` (default,
            :func:`~atlasfit.models.topic.kmeans_decoder_init`: topics start at the profiles of k-means
            groups of 2,000 cells, so no two start alike) or ``"zeros"`` (the reference: every topic
            starts at the same point). Measured on the planted atlases (docs/topic_model.md): from
            zeros some runs lose a topic (two learned topics on one planted topic); from k-means none did.
        device
            ``"cpu"``; ``"gpu"``: the minibatch forward/backward kernels run on CuPy on each worker's GPU
            (e.g. a ``LocalCUDACluster`` client; a clear error without CuPy and a CUDA device);
            ``"auto"``: the GPU when one is usable and ``client`` is given. Recorded in ``device_``.

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> X = np.random.default_rng(1).poisson(2.0, (60, 10))
        >>> m = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=3, n_hidden=8)
        >>> m.train(max_epochs=3, batch_size=16, progress=False).history_.shape[0]
        3
        """
        if self._data is None:
            raise RuntimeError("this model has no data attached; use MultimodalAmortizedLDA.load(path, data=...)")
        cfg = self.config
        if monitor not in ("val_loss", "val_ll_per_token"):
            raise ValueError(f"monitor {monitor!r}: use 'val_loss' or 'val_ll_per_token'")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm and the topic variance need 2 cells), got {batch_size}")
        if omega_update not in ("all", "minibatch"):
            raise ValueError(f"omega_update {omega_update!r}: use 'all' (reference) or 'minibatch' (lazy)")
        if decoder_init not in ("zeros", "kmeans"):
            raise ValueError(f"decoder_init {decoder_init!r}: use 'zeros' (reference) or 'kmeans'")
        if input_median not in ("dataset", "minibatch") and not (
            isinstance(input_median, (int, float)) and not isinstance(input_median, bool) and input_median > 0
        ):
            raise ValueError(f"input_median {input_median!r}: use 'dataset', 'minibatch' or a positive scale factor")
        if bernoulli_depth not in ("dataset", "minibatch"):
            raise ValueError(f"bernoulli_depth {bernoulli_depth!r}: use 'dataset' or 'minibatch'")
        if theta_bar_sync not in ("exact", "lagged"):
            raise ValueError(f"theta_bar_sync {theta_bar_sync!r}: use 'exact' (two rounds per step) or 'lagged'")
        if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, (int, np.integer)) or steps_per_round < 1:
            raise ValueError(f"steps_per_round must be an integer >= 1, got {steps_per_round!r}")
        first_call = self._fit is None
        if first_call:
            self._split(validation_fraction, seed)
            self._train_settings = {"validation_fraction": float(validation_fraction), "seed": int(seed),
                                    "input_median": input_median, "bernoulli_depth": bernoulli_depth}
        else:
            old = self._train_settings
            for k, v in (("validation_fraction", float(validation_fraction)), ("seed", int(seed)),
                         ("input_median", input_median), ("bernoulli_depth", bernoulli_depth)):
                if old.get(k) != v:
                    raise ValueError(f"train() continues the previous fit, which used {k}={old.get(k)!r}; "
                                     f"got {k}={v!r} (start a new model to change it)")
        val = self.validation_indices_
        if early_stopping and val.size == 0:
            raise ValueError("early_stopping needs validation cells: set validation_fraction > 0")
        if max_epochs is None:
            max_epochs = max(1, min(int(round(2e7 / self._data.n_obs)), 1000))
        tr = self.train_indices_
        N = int(tr.size)
        data = {m: self._data.X[m][tr] for m in cfg.modalities}
        _check_data(data, cfg)
        lab = self._data.samples[tr]
        names, first = np.unique(lab, return_index=True)
        names = [str(n) for n in names[np.argsort(first)]]
        groups = {s: np.flatnonzero(lab == s) for s in names}
        sample_index = {s: i for i, s in enumerate(names)}
        shards = plan_shards(names, [len(groups[s]) for s in names], max_shards=max_shards)
        dtype = self.dtype
        from ...cluster import resolve_device

        gpu = resolve_device(device, type(self).__name__, distributed=client is not None)
        self.device_ = "gpu" if gpu else "cpu"
        if client is None:
            engine = SerialEngine(shards)
        else:
            from ...engine import DaskEngine

            engine = DaskEngine(client, shards, name="topic")
        extras = {}
        if cfg.needs_batch:
            extras["batch"] = self._data.batch[tr]
        if cfg.n_cont_encoded:
            extras["cont"] = self._data.cont[tr]
        if cfg.spatial_mode is not None:  # edges to validation cells are dropped with them
            extras["graph"] = {m: G[tr][:, tr] for m, G in self._data.spatial.items()}
        engine.setup(_shard_load, data, groups, sample_index, cfg, dtype, extras or None, "cupy" if gpu else None)
        try:
            if first_call:
                dstats = engine.map(_shard_data_stats)
                lib_median, bern_depth, b0 = {}, {}, {}
                for m in cfg.modalities:
                    if isinstance(input_median, (int, float)) and not isinstance(input_median, bool):
                        lib_median[m] = float(input_median)
                    else:
                        lib_median[m] = _merge_median(dstats, m)
                    bern_depth[m] = sum(s[m]["lib_sum"] for s in dstats) / N
                    if cfg.has_background(m):
                        b0[m] = background_init(sum(s[m]["x_over_lib"] for s in dstats), N, cfg.bg_offset)
                buffers = make_buffers(cfg, b0, dtype)
                p = init_params(cfg, seed, dtype)
                if decoder_init == "kmeans":
                    p.update(kmeans_decoder_init(cfg, data, buffers, seed=seed, dtype=dtype))
                self._fit = TopicFit(cfg, p, init_bn_state(cfg, dtype), buffers, lib_median, bern_depth, None, [], N)
                self._opt = adamw_init(p)
            elif self._omega is not None:
                engine.map(_shard_set_omega, *(a[tr] for a in self._omega))
            fit, opt_state = self._fit, self._opt
            p, bn, buffers = fit.params, fit.bn_state, fit.buffers
            opt = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
            n_steps = max(1, math.ceil(N / batch_size))
            kw = dict(kl_kwargs or {})
            kw.setdefault("max_epochs", self.n_epochs_ + max_epochs)
            med_arg = None if input_median == "minibatch" else fit.lib_median
            depth_arg = fit.bern_depth if bernoulli_depth == "dataset" else None
            sizes = [len(groups[s]) for s in names]
            needs_theta_bar = bool(cfg.topic_variance_weight)
            fwd_kw: dict = {}
            sign = 1.0 if monitor == "val_loss" else -1.0
            best, best_epoch, waited = math.inf, None, 0
            self.stopped_early_ = False
            epochs = range(max_epochs)
            if progress:
                from tqdm.auto import tqdm

                epochs = tqdm(epochs, desc="MultimodalAmortizedLDA", unit="epoch")
            for _ in epochs:
                epoch = self.n_epochs_
                beta = kl_weight_schedule(epoch, kl_schedule, **kw)
                losses = []
                if steps_per_round > 1:  # local steps with periodic averaging (train_serial's scheme)
                    for s0 in range(0, n_steps, steps_per_round):
                        steps = list(range(s0, min(n_steps, s0 + steps_per_round)))
                        res = engine.map(_shard_local_steps, p, opt_state.m, opt_state.v, opt_state.step, steps, seed,
                                         epoch, n_steps, buffers, med_arg, depth_arg, N, beta, opt, omega_update, fwd_kw)
                        p = _average_round(res, p, opt_state, bn, cfg, N, beta, len(steps), losses)
                else:
                    for step in range(n_steps):
                        B = _step_size(sizes, step, n_steps)
                        if B == 0:
                            continue
                        gnoise = draw_global_noise(cfg, (seed, epoch, step), dtype)
                        t = opt_state.step + 1
                        fwd = (p, gnoise, buffers, seed, epoch, step, n_steps, med_arg, depth_arg)
                        if not needs_theta_bar or (theta_bar_sync == "lagged" and self._theta_prev is not None):
                            out = engine.map(_shard_step, fwd, (N / B, beta, B, self._theta_prev, t, opt, omega_update),
                                             fwd_kw)
                            fstats, shard_grads = [o[0] for o in out], [o[1] for o in out]
                            live = [s for s in fstats if s["n"] > 0]
                            tot = {k: sum(s[k] for s in live) for k in live[0]}
                        else:
                            fstats = engine.map(_shard_forward, *fwd, **fwd_kw)
                            live = [s for s in fstats if s["n"] > 0]
                            tot = {k: sum(s[k] for s in live) for k in live[0]}
                            shard_grads = engine.map(_shard_backward, N / B, beta, B, tot["theta_sum"] / B, t, opt,
                                                     omega_update)
                        self._theta_prev = tot["theta_sum"] / B
                        grads: dict = {}
                        for sg in shard_grads:  # shard order: deterministic
                            for k, v in sg.items():
                                grads[k] = grads[k] + v if k in grads else v
                        grads, gval = _full_grads(p, gnoise, grads, beta, cfg, buffers)
                        losses.append(combine_loss(tot, cfg, cell_scale=N / B, beta=beta, global_value=gval))
                        p = adamw_step(p, grads, opt_state, **opt)
                        _update_bn(bn, tot, B, cfg)
                fit.params = p
                self.n_epochs_ += 1
                self._collect_omega(engine)
                loss = float(np.mean(losses)) if losses else float("nan")
                rec = {"epoch": epoch, "beta": beta, "train_loss": loss, "train_loss_per_cell": loss / N}
                if val.size:
                    ev = self._resolve(cells=val)
                    rec["val_loss"] = -self._elbo(ev, n_samples=n_eval_samples, seed=seed)
                    ll = self._per_token(ev, self._theta(ev, 0, seed, 4096))
                    rec["val_ll_per_token"] = ll["total"]
                    for m in cfg.modalities:
                        if m in ll:
                            rec[f"val_ll_per_token/{m}"] = ll[m]
                self._history.append(rec)
                fit.history.append({"epoch": epoch, "beta": beta, "loss": loss})
                stop = bool(callback(epoch, dict(rec))) if callback is not None else False
                if val.size:
                    score = sign * rec[monitor]
                    if score < best - min_delta:
                        best, best_epoch, waited = score, epoch, 0
                    else:
                        waited += 1
                    self.best_epoch_ = best_epoch
                    if early_stopping and waited >= patience:
                        self.stopped_early_ = True
                        stop = True
                if stop:
                    break
        finally:
            engine.close()
        return self

    def _collect_omega(self, engine) -> None:
        parts = engine.map(_shard_get_omega_state)
        if not parts or parts[0] is None:
            return
        if self._omega is None:
            n, M = self._data.n_obs, self.config.n_modalities
            self._omega = (np.ones((n, M), dtype=self.dtype), np.zeros((n, M), dtype=self.dtype),
                           np.zeros((n, M), dtype=self.dtype), np.zeros(n, dtype=np.int64))
        tr = self.train_indices_
        for rows, om, m1, v1, t1 in parts:
            g = tr[rows]
            self._omega[0][g], self._omega[1][g], self._omega[2][g], self._omega[3][g] = om, m1, v1, t1
        self._fit.cell_omega = self._omega[0][tr]

    @property
    def history_(self) -> pd.DataFrame:
        """Per-epoch training record (a pandas DataFrame).

        One row per epoch: ``epoch``, ``beta``, ``train_loss`` (mean over steps of the full-data-scale
        loss :math:`\\mathcal L_t`, spec §3.1), ``train_loss_per_cell`` (divided by :math:`N`) and, with a
        validation split, ``val_loss`` (:math:`-`:meth:`get_elbo` on the validation cells),
        ``val_ll_per_token`` and ``val_ll_per_token/<modality>`` (see :meth:`get_perplexity`).
        """
        return pd.DataFrame(self._history)

    @property
    def spatial_graphs_(self) -> dict:
        """``{modality: (n, n) CSR}`` graphs read from ``.obsp[spatial_key]`` (empty without ``spatial_key``)."""
        return {} if self._data is None else dict(self._data.spatial)

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`train` has run (or a trained model was loaded)."""
        return self._fit is not None

    def _check_trained(self):
        if self._fit is None:
            raise RuntimeError("the model is not trained: call train() first (or MultimodalAmortizedLDA.load)")

    # ------------------------------------------------------------------ evaluation core

    def _cell_index(self, cells, n: int, obs_names) -> np.ndarray:
        if cells is None:
            return np.arange(n)
        c = np.asarray(cells)
        if c.dtype == bool:
            if c.shape != (n,):
                raise ValueError(f"cells as a boolean mask must have {n} entries, got {c.shape}")
            return np.flatnonzero(c)
        if c.dtype.kind in "iu":
            if c.size and (c.min() < -n or c.max() >= n):
                raise IndexError(f"cells holds positions outside 0..{n - 1}")
            return c.astype(np.int64) % n if c.size else c.astype(np.int64)
        pos = pd.Index(obs_names).get_indexer(c.astype(str))
        if (pos < 0).any():
            raise KeyError(f"cell {str(c[np.flatnonzero(pos < 0)[0]])!r} is not in the data; give obs names, "
                           "positions or a boolean mask")
        return pos

    def _resolve(self, data=None, cells=None) -> _EvalSet:
        """The cells to evaluate: registered cells (``data=None``) or new data, optionally a subset."""
        self._check_trained()
        cfg = self.config
        if data is None:
            if self._data is None:
                raise ValueError("this model has no data attached; pass data= (or load(path, data=...))")
            reg, omega = self._data, None if self._omega is None else self._omega[0]
        else:
            reg = _register(data, cfg.modalities, {m: self.layers_.get(m) for m in cfg.modalities} or None, None,
                            self.spatial_key_ if cfg.spatial_mode is not None else None,
                            self.batch_key_ if cfg.needs_batch else None,
                            self.continuous_covariate_keys_ if cfg.n_cont_encoded else None)
            omega = None
            for m in cfg.modalities:
                F = cfg.n_feat(m)
                if reg.X[m].shape[1] != F:
                    raise ValueError(f"modality {m!r}: new data has {reg.X[m].shape[1]} features, the model {F}; "
                                     "subset the data to the model's features (feature_names_)")
                if reg.named and m in self.feature_names_:
                    new, own = pd.Index(reg.var_names[m]).astype(str), pd.Index(self.feature_names_[m]).astype(str)
                    if not new.equals(own):
                        j = int(np.flatnonzero(new.to_numpy() != own.to_numpy())[0])
                        raise ValueError(f"modality {m!r}: new data's features differ from the model's (position "
                                         f"{j}: {new[j]!r} vs {own[j]!r}); reorder/subset them, e.g. "
                                         f"adata[:, model.feature_names_[{m!r}]]")
                _check_modality_values(m, reg.X[m], cfg.likelihood(m), reg.obs_names, reg.var_names[m])
            if cfg.needs_batch:  # codes of the training categories
                lab = np.asarray(reg.batch_categories, dtype=object)[reg.batch]
                codes = pd.Index(self.batch_categories_).get_indexer(lab)
                if (codes < 0).any():
                    k = int(np.flatnonzero(codes < 0)[0])
                    raise ValueError(f"batch_key {self.batch_key_!r}: cell {str(reg.obs_names[k])!r} has category "
                                     f"{lab[k]!r}, unseen in training ({self.batch_categories_[:5]}); the decoder "
                                     "offsets exist only for the training categories")
                reg.batch = codes.astype(np.int64)
        idx = None if cells is None else self._cell_index(cells, reg.n_obs, reg.obs_names)
        sel = slice(None) if idx is None else idx
        return _EvalSet(
            reg.X, idx, None if omega is None else omega[sel], reg.obs_names[sel],
            None if reg.batch is None else reg.batch[sel], None if reg.cont is None else reg.cont[sel], reg.spatial,
        )

    def _blocks(self, ev: _EvalSet, size: int):
        """Yield ``(positions, x, Omega rows, forward extras)`` for consecutive blocks of ``size`` cells:
        dense rows in the parameters' dtype, and the encoder extensions (batch codes, continuous
        covariates, SGC inputs from the whole evaluated graph, GCN neighbourhoods)."""
        fit, cfg = self._fit, self.config
        dtype = fit.params[next(iter(fit.params))].dtype
        if cfg.spatial_mode is not None:
            missing = [m for m in cfg.modalities if m not in ev.graphs]
            if missing:
                raise ValueError(f"spatial_mode={cfg.spatial_mode!r}: no spatial graph for modalities {missing}; pass "
                                 f"data with .obsp[{self.spatial_key_!r}]")
        if cfg.spatial_mode == "sgc" and ev.sgc is None:
            ev.sgc = {m: sgc_features(ev.graphs[m], ev.X[m], cfg.sgc_n_layers, median=fit.lib_median[m],
                                      transform="none" if lik == "gaussian" or not cfg.normalize_encoder_inputs
                                      else "log1p")
                      for m, lik in zip(cfg.modalities, cfg.likelihoods)}
        if cfg.spatial_mode == "gcn" and ev.adj_hat is None:
            ev.adj_hat = {m: normalized_adjacency(check_adjacency(ev.graphs[m], ev.X[m].shape[0],
                                                                  name=f"spatial graph of modality {m!r}"))
                          for m in cfg.modalities}
        for lo in range(0, ev.n, size):
            pos = np.arange(lo, min(ev.n, lo + size))
            rows = pos if ev.idx is None else ev.idx[pos]
            x = {m: _dense_rows(ev.X[m], rows).astype(dtype, copy=False) for m in cfg.modalities}
            extra: dict = {}
            if cfg.needs_batch:
                extra["batch"] = ev.batch[pos]
            if cfg.n_cont_encoded:
                extra["cont_covariates"] = np.asarray(ev.cont[pos], dtype=dtype)
            if cfg.spatial_mode == "sgc":
                extra["enc_inputs"] = {m: _dense_rows(ev.sgc[m], rows).astype(dtype, copy=False)
                                       for m in cfg.modalities}
            elif cfg.spatial_mode == "gcn":
                adj, xn = {}, {}
                for m in cfg.modalities:
                    sub, cols = neighbourhood(ev.adj_hat[m], rows)
                    adj[m] = sub.astype(dtype)
                    xn[m] = _dense_rows(ev.X[m], cols).astype(dtype, copy=False)
                extra["graph"] = {"adj": adj, "x_nbr": xn}
            yield pos, x, None if ev.omega is None else ev.omega[pos], extra

    def _rho(self, m: str, theta, draws, batch, phi=None):
        """:math:`\\rho_{nm} = \\theta_n\\phi^{(c(n))}_m` with :math:`\\phi^{(c)} = \\mathrm{softmax}_f(Z_m + b_m + \\tau^b_m\\Delta_{m,c})`
        (§1.5, §1.6); ``phi`` replaces the plug-in :math:`\\mathrm{softmax}(Z+b)` when given."""
        cfg = self.config
        eta = draws[f"Z/{m}"] + draws[f"b/{m}"][None, :] if cfg.has_background(m) else draws[f"Z/{m}"]
        if not cfg.batch_offsets:
            return theta @ (softmax(eta, axis=1) if phi is None else phi)
        tb, dl = draws[f"tb/{m}"], draws[f"delta/{m}"]
        rho = np.empty((theta.shape[0], eta.shape[1]), dtype=theta.dtype)
        for c in np.unique(batch):
            idx = np.flatnonzero(batch == c)
            rho[idx] = theta[idx] @ softmax(eta + tb[:, None] * dl[int(c)][None, :], axis=1)
        return rho

    def _loglik(self, x: dict, theta, draws, batch) -> dict:
        """Per-cell :math:`\\log p_m(x_{nm}\\mid\\theta_n, \\text{draws})` with the training likelihoods (§1.5-§1.7)."""
        fit, cfg = self._fit, self.config
        out = {}
        for m, lik in zip(cfg.modalities, cfg.likelihoods):
            xm = x[m]
            if lik == "gaussian":
                mean = theta @ draws[f"Z/{m}"]
                if cfg.batch_offsets:
                    mean = mean + (theta @ draws[f"tb/{m}"])[:, None] * draws[f"delta/{m}"][batch]
                out[m] = loglik_gaussian(xm, mean, draws[f"sigma/{m}"])[0]
                continue
            rho = self._rho(m, theta, draws, batch)
            lib = np.maximum(xm.sum(axis=1), 0.0)
            if lik == "multinomial":
                out[m] = loglik_multinomial(xm, rho)[0]
            elif lik == "bernoulli":
                s = lib if cfg.bernoulli_scaling == "depth" else lib / fit.bern_depth[m]
                out[m] = loglik_bernoulli(xm, rho, s, cfg.bernoulli_link)[0]
            elif cfg.learns_dispersion(m):
                out[m] = loglik_nb_learned(xm, rho, lib, draws[f"d/{m}"])[0]
            else:
                out[m] = loglik_nb_fixed(xm, rho, lib, cfg.dispersion)[0]
        return out

    def _plugin_draws(self) -> dict:
        """Global latents at their variational location (zero noise, §5 plug-in)."""
        fit, cfg = self._fit, self.config
        p = fit.params
        zero = {k: np.zeros_like(v) for k, v in draw_global_noise(cfg, (0,), p[next(iter(p))].dtype).items()}
        return global_draws(p, zero, cfg, fit.buffers)

    def _theta(self, ev: _EvalSet, n_samples: int, seed: int, batch_size: int) -> np.ndarray:
        """:math:`\\hat\\theta` (§5), with :func:`~atlasfit.models.topic.topic_proportions`' noise stream
        (so the same values where that function applies)."""
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 977]))
        out = np.empty((ev.n, self.config.n_topics))
        for pos, x, om, extra in self._blocks(ev, batch_size):
            _, mbar, vbar, _ = guide_eval(self._fit, x, omega=om, **extra)
            if n_samples <= 0:
                th = softmax(mbar, axis=1)
            else:
                sd = np.sqrt(vbar)
                th = np.zeros_like(mbar)
                for _ in range(n_samples):
                    th = th + softmax(mbar + sd * np.asarray(rng.standard_normal(mbar.shape), dtype=mbar.dtype), axis=1)
                th = th / n_samples
            out[pos] = th
        return out

    def _elbo(self, ev: _EvalSet, n_samples: int, seed: int) -> float:
        fit, cfg = self._fit, self.config
        p, buf = fit.params, fit.buffers
        S = max(1, int(n_samples))
        draws, gvals = [], []
        for s in range(S):
            gn = draw_global_noise(cfg, (int(seed), 7919, s), p[next(iter(p))].dtype)
            draws.append(global_draws(p, gn, cfg, buf))
            gvals.append(global_kl(p, gn, cfg, buf)[0])
        if ev.n == 0:
            raise ValueError("no cells to evaluate")
        acc = 0.0
        prior_mu, prior_sd = buf["prior_mu"], buf["prior_sd"]
        for pos, x, om, extra in self._blocks(ev, _EVAL_BLOCK):  # fixed grid: a row's noise does not depend on memory settings
            _, mbar, vbar, batch = guide_eval(self._fit, x, omega=om, **extra)
            kl = (np.log(prior_sd) - 0.5 * np.log(vbar) + (vbar + (mbar - prior_mu) ** 2) / (2 * prior_sd**2) - 0.5).sum()
            acc -= float(kl)
            for s in range(S):
                rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7920, s, int(pos[0])]))
                theta = softmax(mbar + np.sqrt(vbar) * rng.standard_normal(mbar.shape), axis=1)
                lp = self._loglik(x, theta, draws[s], batch)
                acc += sum(float(buf[f"lik_w/{m}"]) * float(lp[m].sum()) for m in cfg.modalities) / S
        return acc / ev.n - float(np.mean(gvals)) / fit.n_cells

    def _per_token(self, ev: _EvalSet, theta, batch_size: int = 4096) -> dict:
        cfg = self.config
        draws = self._plugin_draws() if cfg.batch_offsets else None
        phis = {m: self._phi(m, True) for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"}
        ll = {m: 0.0 for m in phis}
        T = {m: 0.0 for m in phis}
        for lo in range(0, ev.n, batch_size):
            pos = np.arange(lo, min(ev.n, lo + batch_size))
            rows = pos if ev.idx is None else ev.idx[pos]
            for m, phi in phis.items():
                x = _dense_rows(ev.X[m], rows)
                if draws is None:
                    rho = theta[pos] @ phi
                else:
                    rho = self._rho(m, theta[pos], draws, ev.batch[pos])
                ll[m] += float((x * np.log(np.clip(rho, 1e-300, None))).sum())
                T[m] += float(x.sum())
        tot_T = sum(T.values())
        if tot_T <= 0:
            raise ValueError("the evaluated cells have no counts in any count modality; perplexity is undefined")
        out = {m: ll[m] / T[m] if T[m] > 0 else float("nan") for m in phis}
        out["total"] = sum(ll.values()) / tot_T
        return out

    # ------------------------------------------------------------------ posterior summaries

    def get_latent_representation(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                                  batch_size: int = 4096, return_dataframe: bool = False):
        """Posterior mean topic proportions :math:`\\hat\\theta` (cells x K), spec §5.

        .. math:: \\hat\\theta_n = \\frac1S\\sum_{s=1}^S\\mathrm{softmax}(\\bar\\mu_n + \\sqrt{\\bar v_n}\\odot\\epsilon_s)

        in eval mode (BatchNorm running statistics, no dropout), with the dataset median library (so
        the result does not depend on ``batch_size``, §11 item 12), the trained aggregation (attention
        included, §11 item 10) and, for ``weight_mode="cell"``, each registered cell's own
        :math:`\\Omega` row (§11 item 9; validation and new cells get equal weights). ``n_samples=0``
        gives :math:`\\mathrm{softmax}(\\bar\\mu_n)`.

        Parameters
        ----------
        data
            ``None`` (the registered cells) or new data of the same kind as :meth:`from_data` takes,
            with the model's modalities and features.
        cells
            Subset: positions, obs names or a boolean mask.
        n_samples, seed, batch_size
            Monte-Carlo draws, their key, and rows per evaluation block.
        return_dataframe
            DataFrame indexed by obs names with columns ``topic_k``.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_latent_representation(cells=[0, 1]).sum(axis=1).round(6).tolist()
        [1.0, 1.0]
        """
        ev = self._resolve(data, cells)
        th = self._theta(ev, n_samples, seed, batch_size)
        if return_dataframe:
            return pd.DataFrame(th, index=ev.names, columns=[f"topic_{k}" for k in range(self.config.n_topics)])
        return th

    def get_cell_topic_dist(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                            batch_size: int = 4096, return_dataframe: bool = False):
        """The cell-topic matrix :math:`\\hat\\theta`; the same as :meth:`get_latent_representation`.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_cell_topic_dist(return_dataframe=True).shape
        (40, 3)
        """
        return self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed, batch_size=batch_size,
                                              return_dataframe=return_dataframe)

    def _phi(self, m, include_background, n_samples=0, seed=0) -> np.ndarray:
        self._check_trained()
        if m not in self.config.modalities:
            raise ValueError(f"unknown modality {m!r}; the model has {list(self.config.modalities)}")
        return topic_feature_dist(self._fit, m, include_background=include_background, n_samples=n_samples,
                                  seed=seed)

    def get_feature_topic_dist(self, modality: str | None = None, include_background: bool = False, *,
                               n_samples: int = 0, seed: int = 0, as_dict: bool = False):
        """Topic-feature distributions :math:`\\hat\\phi_{mk}` as features x topics DataFrames (§5).

        .. math:: \\hat\\phi_{mk} = \\mathrm{softmax}_f(M^\\phi_{mk} + b_m)

        at the variational means (``n_samples=0``) or the Monte-Carlo mean of
        :math:`\\mathrm{softmax}_f(M^\\phi_{mk} + \\mathrm{sp}(S^\\phi_{mk})\\odot e_s + b_m)`. ``b_m`` (the
        feature background :math:`b^0_m + \\text{bg\\_loc}_m`, ``gamma_poisson`` only) is included only
        with ``include_background=True``: that is the distribution the likelihood uses, while the
        default shows what each topic adds on top of the background (the reference's output, §11
        item 13). Gaussian modalities: the mean loadings :math:`M^\\phi_m` (no softmax). Horseshoe prior
        (§5): :math:`M^\\phi` is replaced by :math:`\\text{loc}_\\beta\\odot\\tilde\\lambda` with
        :math:`c,\\tau,\\delta,\\lambda` at their LogNormal means (plug-in; ``n_samples`` is ignored).

        Returns one modality's frame, ``{modality: frame}`` with ``as_dict=True``, or (``modality=None``)
        all modalities stacked with a (modality, feature) MultiIndex.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_feature_topic_dist("rna").sum(axis=0).round(6).tolist()
        [1.0, 1.0, 1.0]
        """
        self._check_trained()
        cols = [f"topic_{k}" for k in range(self.config.n_topics)]
        frames = {m: pd.DataFrame(self._phi(m, include_background, n_samples, seed).T,
                                  index=self.feature_names_[m], columns=cols)
                  for m in self.config.modalities}
        if as_dict:
            return frames
        if modality is not None:
            if modality not in frames:
                raise ValueError(f"unknown modality {modality!r}; the model has {list(frames)}")
            return frames[modality]
        return pd.concat(frames, names=["modality", "feature"])

    def get_elbo(self, data=None, cells=None, *, n_samples: int = 10, seed: int = 0) -> float:
        """Evidence lower bound per evaluated cell (higher is better), eval mode, :math:`\\beta=1`, no regularisers:

        .. math::
            \\mathrm{ELBO} = \\frac1C\\sum_{n=1}^{C}\\Big[\\frac1S\\sum_s\\sum_m w_m\\log p_m(x_{nm}\\mid\\theta_n^{(s)}, G^{(s)})
            - \\mathrm{KL}(\\mathcal N(\\bar\\mu_n,\\bar v_n)\\,\\|\\,\\mathcal N(\\mu_\\theta,\\sigma_\\theta^2))\\Big]
            - \\frac{1}{N}\\frac1S\\sum_s\\mathcal G^{(s)}

        with :math:`C` the evaluated cells, :math:`N` the training cells (the global KL
        :math:`\\mathcal G` is shared by the whole training set), :math:`S` joint draws of
        :math:`z_n` and of the global latents :math:`G` (keyed by ``seed``, draw and block of 1,024
        rows). No :math:`N/B` factor: a per-cell average, comparable across data sizes (§11 items 6-7).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(m.get_elbo() < 0)
        True
        """
        return self._elbo(self._resolve(data, cells), n_samples, seed)

    def _tokens(self, data, cells, n_samples, seed, batch_size):
        ev = self._resolve(data, cells)
        return self._per_token(ev, self._theta(ev, n_samples, seed, batch_size), batch_size)

    def get_perplexity(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                       batch_size: int = 4096) -> float:
        """Perplexity per token over the evaluated cells (lower is better):

        .. math:: \\exp\\Big(-\\frac{\\sum_{m}\\sum_{n,f} x_{nmf}\\log(\\hat\\theta_n\\hat\\phi_m)_f}{\\sum_m\\sum_{n,f}x_{nmf}}\\Big)

        over the count modalities (Bernoulli ones count as tokens; Gaussian modalities are left
        out), with :math:`\\hat\\theta` from :meth:`get_latent_representation` and
        :math:`\\hat\\phi_m` including the background (the likelihood's :math:`\\rho`). Unscaled sums over
        the cells, so not inflated by :math:`N/B` (§11 item 7); no multinomial coefficient.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(m.get_perplexity() > 1.0)
        True
        """
        return float(np.exp(-self._tokens(data, cells, n_samples, seed, batch_size)["total"]))

    def get_perplexity_per_modality(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                                    batch_size: int = 4096) -> dict:
        """``{modality: exp(-sum x log(theta phi) / sum x)}`` for each count modality (see :meth:`get_perplexity`).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> list(m.get_perplexity_per_modality())
        ['rna']
        """
        ll = self._tokens(data, cells, n_samples, seed, batch_size)
        return {m: float(np.exp(-v)) for m, v in ll.items() if m != "total"}

    def get_likelihood_per_modality(self, data=None, cells=None, *, per_token: bool = True, n_samples: int = 100,
                                    seed: int = 0, batch_size: int = 4096) -> dict:
        """Log-likelihood of each modality under its own likelihood (NB, multinomial, Bernoulli, Gaussian),
        plugged in at the posterior means, summed over the evaluated cells:

        .. math:: \\mathcal{LL}_m = \\sum_{n}\\log p_m(x_{nm}\\mid\\hat\\theta_n, \\hat G),\\qquad
                  \\text{per token: } \\mathcal{LL}_m / T_m

        with :math:`\\hat G` the global latents at their variational location (zero noise:
        :math:`Z = M^\\phi`, :math:`b = b^0+\\text{bg\\_loc}`, :math:`d = e^{\\text{loc}}`), no :math:`w_m`,
        no :math:`N/B` factor (§11 item 7), and :math:`T_m = \\sum_{n,f}x_{nmf}` for count modalities
        (the number of ones for Bernoulli) or the number of values for Gaussian ones.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(m.get_likelihood_per_modality()["rna"] < 0)
        True
        """
        ev = self._resolve(data, cells)
        th = self._theta(ev, n_samples, seed, batch_size)
        cfg = self.config
        draws = self._plugin_draws()
        ll = {m: 0.0 for m in cfg.modalities}
        T = {m: 0.0 for m in cfg.modalities}
        for pos, x, _, extra in self._blocks(ev, batch_size):
            batch = extra.get("batch")
            x = {m: v.astype(np.float64) for m, v in x.items()}
            lp = self._loglik(x, th[pos], draws, None if batch is None else np.asarray(batch))
            for m, lik in zip(cfg.modalities, cfg.likelihoods):
                ll[m] += float(lp[m].sum())
                T[m] += float(x[m].size if lik == "gaussian" else np.round(np.clip(x[m], 0, None)).sum())
        if not per_token:
            return ll
        return {m: ll[m] / T[m] if T[m] > 0 else float("nan") for m in cfg.modalities}

    def get_modality_weights(self, data=None, cells=None, *, return_format: str = "dataframe"):
        """Mixture weights :math:`w_{nm}` of each modality in each cell's posterior (§2.3):

        .. math:: w_{n\\cdot} = \\mathrm{softmax}_m\\big(\\omega_{n\\cdot}\\ \\text{with absent modalities at } -10^5\\big)

        where :math:`\\omega` is 1 (``"equal"``), the learned vector (``"universal"``), the cell's own
        :math:`\\Omega_n` row (``"cell"``, §11 item 9 fixed; validation/new cells: 1), or the attention
        score :math:`u^\\top\\tanh(W^\\top\\mu_{nm})` (``aggregation="attention"``, §11 item 10 fixed).
        A modality is absent where the cell's raw row sum is 0. Rows sum to 1.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"a": rng.poisson(2, (40, 6)), "b": rng.poisson(2, (40, 5))}
        >>> m = MultimodalAmortizedLDA.from_data(d, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_modality_weights().iloc[0].tolist()
        [0.5, 0.5]
        """
        if return_format not in ("dataframe", "dict", "array"):
            raise ValueError(f"return_format {return_format!r}: use 'dataframe', 'dict' or 'array'")
        ev = self._resolve(data, cells)
        cfg = self.config
        out = np.empty((ev.n, cfg.n_modalities))
        for pos, x, om, extra in self._blocks(ev, 4096):
            out[pos] = guide_eval(self._fit, x, omega=om, **extra)[0]
        if return_format == "array":
            return out
        if return_format == "dict":
            return {m: out[:, i] for i, m in enumerate(cfg.modalities)}
        return pd.DataFrame(out, index=ev.names, columns=list(cfg.modalities))

    def get_top_features_per_topic(self, modality: str, n_features: int = 10, *, include_background: bool = False,
                                   return_scores: bool = False) -> pd.DataFrame:
        """The ``n_features`` features with the largest :math:`\\hat\\phi_{mkf}` per topic, in descending order.

        Returns a DataFrame (rows: rank 0.., columns ``topic_k``) of feature names, or of
        ``(name, phi)`` pairs with ``return_scores=True``.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_top_features_per_topic("rna", 2).shape
        (2, 3)
        """
        phi = self._phi(modality, include_background)
        n = min(int(n_features), phi.shape[1])
        names = np.asarray(self.feature_names_[modality]).astype(str)
        cols = {}
        for k in range(phi.shape[0]):
            order = np.argsort(-phi[k], kind="stable")[:n]
            cols[f"topic_{k}"] = [(names[j], float(phi[k, j])) if return_scores else names[j] for j in order]
        return pd.DataFrame(cols)

    def get_topic_diversity(self, modality: str | None = None, *, include_background: bool = False) -> float:
        """Topic diversity: one minus the mean pairwise cosine similarity of the topics' feature profiles,

        .. math:: D_m = 1 - \\frac{2}{K(K-1)}\\sum_{k<l}\\frac{\\hat\\phi_{mk}\\cdot\\hat\\phi_{ml}}{\\|\\hat\\phi_{mk}\\|\\,\\|\\hat\\phi_{ml}\\|}

        (0: identical topics; 1: topics on disjoint features). ``modality=None``: the mean of
        :math:`D_m` over modalities.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool(0.0 <= m.get_topic_diversity() <= 1.0)
        True
        """
        mods = self.config.modalities if modality is None else [modality]
        vals = []
        for m in mods:
            phi = self._phi(m, include_background)
            u = phi / np.maximum(np.linalg.norm(phi, axis=1, keepdims=True), 1e-300)
            C = u @ u.T
            iu = np.triu_indices(C.shape[0], k=1)
            vals.append(1.0 - float(C[iu].mean()))
        return float(np.mean(vals))

    def get_cell_entropy(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                         batch_size: int = 4096) -> np.ndarray:
        """Entropy of each cell's topic proportions, :math:`H_n = -\\sum_k\\hat\\theta_{nk}\\log(\\hat\\theta_{nk}+10^{-10})`
        (nats; 0 for one topic, :math:`\\log K` for uniform). Fixes §11 item 8 (the reference raises).

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> bool((m.get_cell_entropy() <= np.log(3) + 1e-9).all())
        True
        """
        th = self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed, batch_size=batch_size)
        return -(th * np.log(th + 1e-10)).sum(axis=1)

    def get_topic_variance(self, data=None, cells=None, *, n_samples: int = 100, seed: int = 0,
                           batch_size: int = 4096) -> np.ndarray:
        """Variance of each topic's usage across cells (unbiased), shape (K,):
        :math:`V_k = \\frac1{C-1}\\sum_n(\\hat\\theta_{nk}-\\bar\\theta_k)^2`. Fixes §11 item 8.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_topic_variance().shape
        (3,)
        """
        th = self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed, batch_size=batch_size)
        if th.shape[0] < 2:
            raise ValueError("get_topic_variance needs at least 2 cells")
        return th.var(axis=0, ddof=1)

    def get_learned_dispersion(self, modality: str | None = None):
        """NB dispersion of the NB modalities (``"gamma_poisson"``, ``"nb"``).

        Learned (``learnable_dispersion=True``): the posterior mean of :math:`d` (the square root of the
        overdispersion; variance :math:`\\mu + d^2\\mu^2`, NB size :math:`1/d^2`), the LogNormal mean

        .. math:: \\mathbb E[d] = \\exp(\\text{loc} + \\mathrm{sp}(\\text{scale})^2/2)

        of shape (1,) (global) or (F,). Fixed: ``[dispersion]``, the NB *size* :math:`r` (variance
        :math:`\\mu+\\mu^2/r`), as the reference returns. ``modality=None``: a dict over NB modalities.

        Examples
        --------
        >>> import numpy as np
        >>> m = MultimodalAmortizedLDA.from_data({"rna": np.random.default_rng(0).poisson(2, (40, 6))},
        ...                                      likelihoods=["nb"], n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.get_learned_dispersion("rna").tolist()
        [1.0]
        """
        self._check_trained()
        cfg = self.config
        nb = [m for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik in ("gamma_poisson", "nb")]

        def one(m):
            if cfg.learns_dispersion(m):
                p = self._fit.params
                s = softplus(np.asarray(p[f"dec/{m}/disp_scale"], dtype=np.float64))
                return np.exp(np.asarray(p[f"dec/{m}/disp_loc"], dtype=np.float64) + s * s / 2)
            return np.array([float(cfg.dispersion)])

        if modality is None:
            return {m: one(m) for m in nb}
        if modality not in nb:
            raise ValueError(f"modality {modality!r} has no NB dispersion (NB modalities: {nb})")
        return one(modality)

    def get_likelihood_weights(self, return_format: str = "dataframe"):
        """Per-modality likelihood weights :math:`w_m` (§1.8): 1, :math:`F_{\\rm ref}/F_m` or
        :math:`\\sqrt{F_{\\rm ref}/F_m}` by ``likelihood_weight_mode``, :math:`F_{\\rm ref}` the mean /
        lower median / max of the :math:`F_m`.

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"a": rng.poisson(2, (40, 10)), "b": rng.poisson(2, (40, 30))}
        >>> m = MultimodalAmortizedLDA.from_data(d, n_topics=3, likelihood_weight_mode="inverse_features")
        >>> m.get_likelihood_weights("dict")
        {'a': 2.0, 'b': 0.6666666666666666}
        """
        from ._config import likelihood_weights

        w = likelihood_weights(self.config)
        if return_format == "dict":
            return w
        if return_format != "dataframe":
            raise ValueError(f"return_format {return_format!r}: use 'dataframe' or 'dict'")
        return pd.DataFrame([w], index=["likelihood_weight"])

    def cross_modality_score(self, mod_a: str, mod_b: str, *, normalise: bool = True, return_df: bool = True,
                             include_background: bool = False, data=None, cells=None, n_samples: int = 100,
                             seed: int = 0):
        """SHARE-Topic style feature-feature association between two modalities (§7):

        .. math::
            \\Phi^*_a[k,f] = \\frac{\\hat\\phi_a[k,f]}{\\sum_{k'}\\hat\\phi_a[k',f] + 10^{-12}},\\quad
            s_k = \\frac1C\\sum_n\\hat\\theta_{nk},\\quad
            P_{fg} = \\sum_k\\Phi^*_a[k,f]\\,s_k\\,\\Phi^*_b[k,g]

        divided by :math:`\\max P` when ``normalise``. :math:`\\hat\\theta` uses each cell's own
        :math:`\\Omega` row (§11 item 9 fixed). Returns an :math:`F_a\\times F_b` DataFrame (or array).

        Examples
        --------
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> d = {"a": rng.poisson(2, (40, 6)), "b": rng.poisson(2, (40, 5))}
        >>> m = MultimodalAmortizedLDA.from_data(d, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> float(m.cross_modality_score("a", "b").to_numpy().max())
        1.0
        """
        if self.config.n_modalities < 2:
            raise ValueError("cross_modality_score needs a model with at least 2 modalities")
        if mod_a == mod_b:
            raise ValueError(f"cross_modality_score: give two different modalities (got {mod_a!r} twice)")
        pa = self._phi(mod_a, include_background)
        pb = self._phi(mod_b, include_background)
        sa = pa / (pa.sum(axis=0, keepdims=True) + 1e-12)
        sb = pb / (pb.sum(axis=0, keepdims=True) + 1e-12)
        th = self.get_latent_representation(data, cells, n_samples=n_samples, seed=seed)
        s = (th / th.sum(axis=1, keepdims=True)).mean(axis=0)
        P = (sa * s[:, None]).T @ sb
        if normalise:
            P = P / P.max()
        if not return_df:
            return P
        return pd.DataFrame(P, index=self.feature_names_[mod_a], columns=self.feature_names_[mod_b])

    # ------------------------------------------------------------------ persistence

    def _state_arrays(self) -> dict:
        fit = self._fit
        a = {}
        for group, d in (("params", fit.params), ("bn", fit.bn_state), ("buffers", fit.buffers)):
            for k, v in d.items():
                a[f"{group}|{k}"] = np.asarray(v)
        if self._opt is not None:
            for k in self._opt.m:
                a[f"opt_m|{k}"] = np.asarray(self._opt.m[k])
                a[f"opt_v|{k}"] = np.asarray(self._opt.v[k])
        if self._omega is not None:
            for name, v in zip(("omega", "omega_m", "omega_v", "omega_t"), self._omega):
                a[f"cell|{name}"] = v
        if self._theta_prev is not None:
            a["lag|theta_prev"] = np.asarray(self._theta_prev)
        a["split|train"] = self.train_indices_
        a["split|validation"] = self.validation_indices_
        return a

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Save the trained model to the directory ``path``: ``model.json`` (configuration, names,
        history, settings) and ``arrays.npz`` (parameters, BatchNorm statistics, buffers, AdamW
        moments, per-cell :math:`\\Omega` rows, the split). The data are not saved (a store path is
        recorded and reopened by :meth:`load`).

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> X = np.random.default_rng(0).poisson(2, (40, 6))
        >>> m = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> p = os.path.join(tempfile.mkdtemp(), "lda")
        >>> m.save(p)
        >>> m2 = MultimodalAmortizedLDA.load(p, data={"rna": X})
        >>> bool(np.array_equal(m.get_latent_representation(), m2.get_latent_representation()))
        True
        """
        import dataclasses

        self._check_trained()
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists and is not empty; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        arrays = self._state_arrays()
        keys = {f"a{i}": k for i, k in enumerate(arrays)}
        np.savez(path / "arrays.npz", **{n: arrays[k] for n, k in keys.items()})
        cfg = dataclasses.asdict(self.config)
        if cfg["cell_topic_prior"] is not None and not np.isscalar(cfg["cell_topic_prior"]):
            cfg["cell_topic_prior"] = [float(v) for v in cfg["cell_topic_prior"]]
        fit = self._fit
        meta = {
            "format": _FORMAT,
            "config": cfg,
            "dtype": np.dtype(self.dtype).name,
            "keys": keys,
            "feature_names": {m: [str(v) for v in idx] for m, idx in self.feature_names_.items()},
            "obs_names": None if self._data is None else [str(v) for v in self._data.obs_names],
            "source": None if self._data is None else self._data.source,
            "layers": self.layers_,
            "sample_key": self.sample_key_,
            "spatial_key": self.spatial_key_,
            "batch_key": self.batch_key_,
            "batch_categories": self.batch_categories_,
            "continuous_covariate_keys": self.continuous_covariate_keys_,
            "history": self._history,
            "n_epochs": self.n_epochs_,
            "opt_step": None if self._opt is None else int(self._opt.step),
            "train_settings": self._train_settings,
            "lib_median": {m: float(v) for m, v in fit.lib_median.items()},
            "bern_depth": {m: float(v) for m, v in fit.bern_depth.items()},
            "n_cells": int(fit.n_cells),
            "best_epoch": getattr(self, "best_epoch_", None),
        }
        (path / "model.json").write_text(json.dumps(meta, indent=1, default=float))

    @classmethod
    def load(cls, path: str | Path, data=None) -> MultimodalAmortizedLDA:
        """Load a model saved with :meth:`save`; getters then give the same values as before saving.

        Parameters
        ----------
        path
            The directory written by :meth:`save`.
        data
            The data the model was trained on (same cells and features), to evaluate the registered
            cells or continue training. ``None``: a model trained on an atlas store reopens it;
            otherwise the getters need ``data=``.

        Examples
        --------
        See :meth:`save`.
        """
        path = Path(path)
        meta_file = path / "model.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{str(path)!r} holds no model.json; give a directory written by save()")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a saved MultimodalAmortizedLDA (format {meta.get('format')!r})")
        cfg_d = meta["config"]
        config = TopicModelConfig(**cfg_d)
        reg = None
        obs = meta["obs_names"]
        if data is None and meta["source"] is not None and Path(meta["source"]).exists():
            data = meta["source"]
        if data is not None:
            is_store = isinstance(data, (str, Path))
            reg = _register(data, config.modalities, meta["layers"] or None,
                            None if is_store else meta["sample_key"],
                            None if is_store else meta["spatial_key"], meta["batch_key"],
                            meta["continuous_covariate_keys"])
            for m in config.modalities:
                if reg.X[m].shape[1] != config.n_feat(m):
                    raise ValueError(f"modality {m!r}: data has {reg.X[m].shape[1]} features, the saved model "
                                     f"{config.n_feat(m)}; pass the data the model was trained on")
            if obs is not None and [str(v) for v in reg.obs_names] != obs:
                raise ValueError(f"the data's cells differ from the saved model's ({reg.n_obs} vs {len(obs)} "
                                 "cells, or another order); pass the data the model was trained on, or "
                                 "evaluate new cells with get_*(data=...)")
        model = cls(config, reg, dtype=meta["dtype"])
        model.feature_names_ = {m: pd.Index(v) for m, v in meta["feature_names"].items()}
        model.layers_ = meta["layers"]
        model.sample_key_ = meta["sample_key"]
        model.spatial_key_ = meta["spatial_key"]
        model.batch_key_ = meta["batch_key"]
        model.batch_categories_ = list(meta["batch_categories"])
        model.continuous_covariate_keys_ = meta["continuous_covariate_keys"]
        model._history = list(meta["history"])
        model.n_epochs_ = int(meta["n_epochs"])
        model._train_settings = dict(meta["train_settings"])
        if meta.get("best_epoch") is not None:
            model.best_epoch_ = meta["best_epoch"]
        with np.load(path / "arrays.npz") as z:
            arrays = {k: z[n] for n, k in meta["keys"].items()}
        groups: dict = {}
        for k, v in arrays.items():
            g, name = k.split("|", 1)
            groups.setdefault(g, {})[name] = v
        fit = TopicFit(config, groups["params"], groups.get("bn", {}), groups["buffers"], meta["lib_median"],
                       meta["bern_depth"], None, [], int(meta["n_cells"]))
        fit.history = [{"epoch": r["epoch"], "beta": r["beta"], "loss": r["train_loss"]} for r in model._history]
        model._fit = fit
        if meta["opt_step"] is not None:
            model._opt = AdamWState(int(meta["opt_step"]), dict(groups.get("opt_m", {})), dict(groups.get("opt_v", {})))
        if "cell" in groups:
            c = groups["cell"]
            model._omega = (c["omega"], c["omega_m"], c["omega_v"], c["omega_t"])
        model._theta_prev = groups.get("lag", {}).get("theta_prev")
        model.train_indices_ = groups["split"]["train"]
        model.validation_indices_ = groups["split"]["validation"]
        if model._omega is not None:
            fit.cell_omega = model._omega[0][model.train_indices_]
        return model

    def write(self, store=None, key: str = "topic", *, include_background: bool = False, n_samples: int = 100,
              seed: int = 0) -> None:
        """Write results into the atlas store the model was trained on (never touching X), via
        :func:`atlasfit.io.write_results`: per modality ``obsm["X_{key}"]`` (cells x K topic
        proportions, :meth:`get_latent_representation`, store row order) and
        ``varm["{key}_loadings"]`` (features x K, :meth:`get_feature_topic_dist`).

        Examples
        --------
        >>> import anndata as ad, numpy as np, pandas as pd, tempfile, os
        >>> from atlasfit.io import convert
        >>> a = ad.AnnData(np.random.default_rng(0).poisson(2, (40, 6)).astype(np.float32),
        ...                obs=pd.DataFrame({"s": ["A", "B"] * 20}, index=[f"c{i}" for i in range(40)]))
        >>> store = convert(a, os.path.join(tempfile.mkdtemp(), "a.zarr"), sample_key="s")
        >>> m = MultimodalAmortizedLDA.from_data(store, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> m.write()
        >>> ad.read_zarr(os.path.join(store, "mod", "rna")).obsm["X_topic"].shape
        (40, 3)
        """
        from ...io import open_atlas, write_results

        self._check_trained()
        if store is None:
            if self._data is None or self._data.source is None:
                raise ValueError("write(): give the store path (the model was trained on in-memory data, whose "
                                 "cells must match the store's rows)")
            store = self._data.source
        atlas = open_atlas(store)
        if self._data is None:
            raise ValueError("write(): the model has no data attached; load it with data= first")
        for m in self.config.modalities:
            if m not in atlas.modalities:
                raise ValueError(f"write(): modality {m!r} is not in the store {str(atlas.path)!r} ({atlas.modalities})")
            obs = atlas.obs(m).index
            if not obs.equals(self._data.obs_names):
                raise ValueError(f"write(): the store's cells of modality {m!r} are not the model's cells (in store "
                                 "order); write into the store the model was trained on")
        theta = self.get_latent_representation(n_samples=n_samples, seed=seed)
        obsm = {m: {f"X_{key}": theta} for m in self.config.modalities}
        varm = {m: {f"{key}_loadings": self._phi(m, include_background).T} for m in self.config.modalities}
        write_results(atlas, obsm=obsm, varm=varm)
