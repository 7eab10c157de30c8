"""Persistence of :class:`~atlasfit.MultimodalAmortizedLDA`: save / load, and results written into an
atlas store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ._config import TopicModelConfig
from ._data import _register
from ._optim import AdamWState
from ._shard import OMEGA_KEYS
from ._train import TopicFit

_FORMAT = "atlasfit.MultimodalAmortizedLDA/1"


class _PersistenceMixin:
    """``save`` / ``load`` / ``write``."""

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
    def load(cls, path: str | Path, data=None) -> _PersistenceMixin:
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
                if reg.n_features(m) != config.n_feat(m):
                    raise ValueError(f"modality {m!r}: data has {reg.n_features(m)} features, the saved model "
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
        model._saved_split = (groups["split"]["train"], groups["split"]["validation"])
        if "cell" in groups:
            c = groups["cell"]
            model._local = model._local_from_rows(tuple(c[k] for k in OMEGA_KEYS))
            if model._local is None:  # no data attached: keep the rows for save()
                model._local, model._omega_cache = {"": {}}, tuple(c[k] for k in OMEGA_KEYS)
        model._theta_prev = groups.get("lag", {}).get("theta_prev")
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
