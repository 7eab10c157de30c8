"""Persistence of :class:`~atlasfit.MultimodalAmortizedLDA`: save / load, and results written into an
atlas store."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from ._config import TopicModelConfig
from ._data import _register
from ._optim import AdamWState
from ._rounds import (
    evaluate_sample,
    light_fit,
    shard_write_theta,
    theta_array_name,
    write_theta,
)
from ._shard import OMEGA_KEYS
from ._train import TopicFit

_FORMAT = "atlasfit.MultimodalAmortizedLDA/1"  # JSON + npz (read-only)
_FORMAT2 = "atlasfit.MultimodalAmortizedLDA/2"  # xarray Dataset in Zarr


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

    def _meta(self) -> dict:
        """Configuration, registration metadata, settings and history (JSON-able)."""
        import dataclasses

        cfg = dataclasses.asdict(self.config)
        if cfg["cell_topic_prior"] is not None and not np.isscalar(cfg["cell_topic_prior"]):
            cfg["cell_topic_prior"] = [float(v) for v in cfg["cell_topic_prior"]]
        fit = self._fit
        return {
            "format": _FORMAT2,
            "config": cfg,
            "dtype": np.dtype(self.dtype).name,
            "feature_names": {m: [str(v) for v in idx] for m, idx in self.feature_names_.items()},
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
            "kl_weight": float(getattr(self, "kl_weight_", 1.0)),
        }

    def to_xarray(self):
        """The trained model as one :class:`xarray.Dataset` (what :meth:`save` writes, in Zarr).

        One variable per array, named ``<group>:<name>`` (``/`` in names becomes ``.``; the exact key
        is in the variable's ``key`` attribute): parameters (``params``), BatchNorm statistics (``bn``),
        buffers, AdamW moments (``opt_m``, ``opt_v``), the lagged mean :math:`\\bar\\theta` (``lag``), the
        split (``split:train``, ``split:validation``: row positions), per-cell :math:`\\Omega` rows and
        their moments (``cell:*``, dims ``cell`` x ``modality``, ``weight_mode="cell"``) and the
        registered cell names (``obs_names``, dim ``cell``). The configuration, registration metadata,
        settings and history are the JSON attribute ``meta``.

        Examples
        --------
        >>> import numpy as np
        >>> X = np.random.default_rng(0).poisson(2, (40, 6))
        >>> m = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> ds = m.to_xarray()
        >>> ds.attrs["atlasfit_model"], ds["params:dec.rna.Z_loc"].shape
        ('MultimodalAmortizedLDA', (3, 6))
        """
        import xarray as xr

        self._check_trained()
        data_vars, used = {}, set()
        for i, (k, v) in enumerate(self._state_arrays().items()):
            name = k.replace("|", ":").replace("/", ".")
            if name in used:
                name = f"{name}#{i}"
            used.add(name)
            v = np.asarray(v)
            if k.startswith("cell|"):
                dims = ("cell", "modality")[: v.ndim]
            elif k.startswith("split|"):
                dims = (f"{k.split('|')[1]}_cell",)
            else:
                dims = tuple(f"{name}_dim{j}" for j in range(v.ndim))
            data_vars[name] = xr.Variable(dims, v, attrs={"key": k})
        if self._data is not None:
            data_vars["obs_names"] = xr.Variable(("cell",), np.asarray(self._data.obs_names.astype(str), dtype=str))
        ds = xr.Dataset(data_vars, coords={"modality": list(self.config.modalities)})
        ds.attrs["atlasfit_model"] = "MultimodalAmortizedLDA"
        ds.attrs["meta"] = json.dumps(self._meta(), default=float)
        return ds

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Save the trained model as an xarray Dataset in Zarr at ``path`` (:meth:`to_xarray`: parameters,
        BatchNorm statistics, buffers, AdamW moments and step, per-cell :math:`\\Omega` rows, the split,
        configuration, registration metadata, settings and history). Written to a sibling directory and
        renamed into place. The data are not saved (a store path is recorded and reopened by :meth:`load`).

        Examples
        --------
        >>> import numpy as np, tempfile, os
        >>> X = np.random.default_rng(0).poisson(2, (40, 6))
        >>> m = MultimodalAmortizedLDA.from_data({"rna": X}, n_topics=3, n_hidden=4).train(1, 20, progress=False)
        >>> p = os.path.join(tempfile.mkdtemp(), "lda.zarr")
        >>> m.save(p)
        >>> m2 = MultimodalAmortizedLDA.load(p, data={"rna": X})
        >>> bool(np.array_equal(m.get_latent_representation(), m2.get_latent_representation()))
        True
        """
        self._check_trained()
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists and is not empty; pass overwrite=True")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:10]}"
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:10]}"
        try:
            self.to_xarray().to_zarr(str(tmp), mode="w", zarr_format=2, consolidated=True)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _read_saved(path: Path) -> tuple[dict, dict, list | None]:
        """``(meta, {key: array}, obs names)`` of a saved model: the Zarr Dataset, or the deprecated
        ``model.json`` + ``arrays.npz`` directory of earlier versions (read-only)."""
        if (path / "model.json").exists():
            import warnings

            warnings.warn(f"{str(path)!r} is a model saved in the old JSON + npz format; it is read, but save() now "
                          "writes an xarray Dataset in Zarr: load it and save it again to convert it",
                          DeprecationWarning, stacklevel=3)
            meta = json.loads((path / "model.json").read_text())
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{str(path)!r} is not a saved MultimodalAmortizedLDA (format {meta.get('format')!r})")
            with np.load(path / "arrays.npz") as z:
                arrays = {k: z[n] for n, k in meta["keys"].items()}
            return meta, arrays, meta["obs_names"]
        if not (path / ".zgroup").exists() and not (path / "zarr.json").exists():
            raise FileNotFoundError(f"{str(path)!r} holds no saved model; give a path written by save()")
        import xarray as xr

        with xr.open_zarr(str(path), consolidated=None) as ds:
            if ds.attrs.get("atlasfit_model") != "MultimodalAmortizedLDA":
                raise ValueError(f"{str(path)!r} is not a saved MultimodalAmortizedLDA "
                                 f"(atlasfit_model={ds.attrs.get('atlasfit_model')!r})")
            meta = json.loads(ds.attrs["meta"])
            arrays = {v.attrs["key"]: np.asarray(v.values) for name, v in ds.data_vars.items() if "key" in v.attrs}
            obs = [str(v) for v in ds["obs_names"].values] if "obs_names" in ds.data_vars else None
        return meta, arrays, obs

    @classmethod
    def load(cls, path: str | Path, data=None) -> _PersistenceMixin:
        """Load a model saved with :meth:`save`; getters then give the same values as before saving.

        Parameters
        ----------
        path
            The path written by :meth:`save` (a model saved in the older JSON + npz directory format is
            read too, with a deprecation warning).
        data
            The data the model was trained on (same cells and features: an atlas store path or
            in-memory data), to evaluate the registered cells or continue training. ``None``: a model
            trained on an atlas store reopens it; otherwise the getters need ``data=``.

        Examples
        --------
        See :meth:`save`.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist; give a path written by save()")
        meta, arrays, obs = cls._read_saved(path)
        cfg_d = meta["config"]
        config = TopicModelConfig(**cfg_d)
        reg = None
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
            if obs is not None and (reg.n_obs != len(obs) or [str(v) for v in reg.obs_names] != obs):
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
        model.kl_weight_ = float(meta.get("kl_weight", 1.0))
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
        :func:`atlasfit.io.write_results` (atomic): per modality ``obsm["X_{key}"]`` (cells x K topic
        proportions, :meth:`get_latent_representation` with ``n_samples``/``seed``, store row order)
        and ``varm["{key}_loadings"]`` (features x K, :meth:`get_feature_topic_dist`).

        For the store the model was trained on, each sample's rows are computed on the shard that
        holds the sample and written there to a temporary per-sample Zarr array, then copied into the
        store chunk by chunk: the driver never holds the cells' data (as :meth:`atlasfit.MultiGEDI.write`).

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
        from ...io._txn import check_writable, staging

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
        varm = {m: {f"{key}_loadings": self._phi(m, include_background).T} for m in self.config.modalities}
        opts = {"n_samples": int(n_samples), "seed": int(seed), "block": 4096}
        reg = self._data
        # all or nothing (docs/store.md, "Results"): the previous results under `key` are replaced as a whole
        legacy = [f"mod/{m}/{w}" for m in atlas.modalities for w in (f"obsm/X_{key}", f"varm/{key}_loadings")]
        owned = {"model": key, "replaces": legacy}
        check_writable(atlas.path, what=f"write the topic model results '{key}' into it")
        if not reg.is_store or Path(atlas.path).resolve() != Path(reg.source).resolve() or \
                self.config.spatial_mode is not None:
            theta = self.get_latent_representation(n_samples=n_samples, seed=seed)  # cells x K, store order
            write_results(atlas, obsm={m: {f"X_{key}": theta} for m in self.config.modalities}, varm=varm, **owned)
            return
        # the store the model was trained on: each sample's rows are computed and written where they live
        import dask.array as da

        with staging(atlas.path, what=f"write the topic model results '{key}' into it") as st:
            tmp = st.path / "theta"
            tmp.mkdir()
            fit = light_fit(self._fit)
            eng = self._summary_engine()
            held = set()
            if eng is not None:
                for part in self._map_summary(eng, shard_write_theta, fit, str(tmp), opts):
                    held.update(part)
            names = reg.sample_names()
            for i, s in enumerate(names):  # samples without training cells (no shard holds them): a few cells
                if s not in held:
                    src = self._driver_source(reg, s, reg.sample_rows()[s], True)
                    n = reg.sample_counts()[s]
                    write_theta(str(tmp), i, evaluate_sample(fit, src, i, np.arange(n), "theta", opts, {}))
            theta = da.concatenate([da.from_zarr(str(tmp / theta_array_name(i))) for i in range(len(names))], axis=0)
            write_results(atlas, obsm={m: {f"X_{key}": theta} for m in self.config.modalities}, varm=varm,
                          staging=st, **owned)
