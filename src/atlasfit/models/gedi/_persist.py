"""Results and persistence of a fitted :class:`~atlasfit.GEDI`: the labelled parameters
(:meth:`to_xarray`), results written next to the data (:meth:`write`), :meth:`save` / :meth:`load`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._fit import GediContext
from ._kernels import pathway_solver

if TYPE_CHECKING:
    from ._model import GEDI


class _GediPersistence:
    """Mixin of :class:`~atlasfit.GEDI`: to_xarray, write, save and load."""

    # ------------------------------------------------------------------ results / persistence

    def to_xarray(self):
        """Fitted parameters as a labelled :class:`xarray.Dataset`: ``Z`` (gene, factor), ``D``
        (factor), ``o`` (gene), ``sigma2``, ``A`` (pathway, factor), ``R`` (gene, factor, covariate),
        ``Ro`` (gene, covariate) and the per-iteration tracking (iteration)."""
        import json

        import xarray as xr

        self._check_fitted()
        s = self.shared_
        coords = {"gene": self.feature_names_.astype(str), "factor": np.arange(self.K),
                  "iteration": np.arange(1, len(s["tracking/sigma2"]) + 1)}
        dv = {"Z": (("gene", "factor"), s["Z"]), "D": (("factor",), s["D"]), "o": (("gene",), s["o"]),
              "sigma2": ((), float(s["sigma2"]))}
        for t in ("sigma2", "dZ", "dA", "dR"):
            dv[f"tracking_{t}"] = (("iteration",), np.asarray(s[f"tracking/{t}"], dtype=np.float64))
        if self.ctx_.C is not None:
            coords["pathway"] = np.asarray(self.pathway_names_, dtype=str)
            dv["A"] = (("pathway", "factor"), s["A"])
        if self.ctx_.H is not None:
            coords["covariate"] = np.asarray(self.covariate_names_, dtype=str)
            dv["R"] = (("gene", "factor", "covariate"), s["R"])
            dv["Ro"] = (("gene", "covariate"), s["Ro"])
        ds = xr.Dataset(dv, coords=coords)
        ds.attrs["atlasfit_model"] = "GEDI"
        ds.attrs["config"] = json.dumps(self._config_dict())
        return ds

    def _config_dict(self) -> dict:
        return {"K": self.K, "mode": self.mode, "seed": self.seed, "dtype": self.dtype,
                "sample_key": self.sample_key, "modality": self.modality_, "obs_type": self.obs_type,
                "layer": self.layer, "layers": list(self.layers) if self.layers else None,
                "orthoZ": self.orthoZ, "S_Qi": self.S_Qi, "S_oi": self.S_oi,
                "is_si_fixed": self.is_si_fixed, "device": self.device,
                "n_iter": int(getattr(self, "n_iter_", 0))}

    def write(self, target=None, key: str = "gedi") -> None:
        """Write the results next to the data (the reference's ``tl.gedi`` layout, spec §7.7).

        ``obsm["X_{key}"]`` = (DB)ᵀ (cells x K), ``varm["{key}_Z"]`` = Z, with C also
        ``varm["{key}_pathway_assoc"]`` = Z Aᵀ; the parameters as :meth:`to_xarray`.

        Parameters
        ----------
        target
            ``None`` or the store path for a model fitted on an atlas store (results go into that
            store with :func:`atlasfit.io.write_results`, parameters under
            ``uns/atlasfit_models/{key}``); or the AnnData the model was fitted on (written in
            place, parameters as a dict in ``uns[key]``).
        key
            Name of the result entries.
        """
        import anndata as ad

        from ...io import open_atlas, write_results

        self._check_fitted()
        obsm = {f"X_{key}": self.embedding()}
        varm = {f"{key}_Z": np.asarray(self.shared_["Z"])}
        if self.ctx_.C is not None:
            varm[f"{key}_pathway_assoc"] = self.pathway_associations().to_numpy()
        if isinstance(target, ad.AnnData):
            if target.n_obs != self.plan_.n_total or list(target.var_names) != list(self.feature_names_):
                raise ValueError(
                    f"GEDI.write: the AnnData ({target.n_obs} cells x {target.n_vars} genes) is not the one "
                    f"the model was fitted on ({self.plan_.n_total} cells x {len(self.feature_names_)} genes)"
                )
            target.obsm.update(obsm)
            target.varm.update(varm)
            ds = self.to_xarray()
            labels = {c: np.asarray(ds[c].values).astype(str) for c in ("pathway", "covariate") if c in ds.coords}
            target.uns[key] = {k: np.asarray(v.values) for k, v in ds.data_vars.items()} | labels | {
                "config": ds.attrs["config"]}
            return
        if self._atlas is None:
            raise ValueError("GEDI.write: the model was fitted in memory; pass the AnnData it was fitted on")
        atlas = self._atlas if target is None else open_atlas(target)
        if Path(atlas.path).resolve() != Path(self._atlas.path).resolve():
            raise ValueError(
                f"GEDI.write: the model was not fitted on {str(atlas.path)!r}; results must go to the store "
                "the model was fitted on (rows must match)"
            )
        m = self.modality_
        write_results(atlas, obsm={m: obsm}, varm={m: varm}, groups={key: self.to_xarray()}, model=key)

    def save(self, path) -> None:
        """Save the fitted model (settings, shared parameters, per-sample B_i, Q_i, o_i, s_i, C, H)
        to a Zarr group; :meth:`load` restores every output, cell-level ones included."""
        import json

        import zarr

        self._check_fitted()
        loc = self._gather()
        m = self.modality_
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        root.attrs["atlasfit_model"] = "GEDI"
        root.attrs["config"] = json.dumps(self._config_dict())
        root.attrs["names"] = json.dumps({
            "genes": [str(x) for x in self.feature_names_], "samples": list(self.sample_names_),
            "pathways": self.pathway_names_, "covariates": self.covariate_names_,
            "shared_scalars": {k: float(v) for k, v in self.shared_.items() if np.ndim(v) == 0}})
        for k, v in self.shared_.items():
            if np.ndim(v):
                root.create_array(f"shared/{k.replace('/', '~')}", data=np.asarray(v))
        for i, g in enumerate(self.sample_names_):
            root.create_array(f"local/{i}/B", data=loc[g]["B"])
            for nm in ("Q", "o_i", "s_i"):
                root.create_array(f"local/{i}/{nm}", data=loc[g][f"{m}/{nm}"])
            root.create_array(f"local/{i}/cells", data=np.asarray(self.plan_.cells[g], dtype=np.int64))
        if self.ctx_.C is not None:
            root.create_array("C", data=self.ctx_.C)
        if self.ctx_.H is not None:
            root.create_array("H", data=self.ctx_.H)

    @classmethod
    def load(cls, path) -> GEDI:
        """Load a model written by :meth:`save`.

        Examples
        --------
        >>> import numpy as np, anndata as ad, tempfile, os
        >>> from atlasfit import GEDI
        >>> rng = np.random.default_rng(0)
        >>> a = ad.AnnData(rng.poisson(2.0, (40, 12)).astype(np.float32))
        >>> a.obs["sample"] = np.repeat(["s1", "s2"], 20)
        >>> m = GEDI(K=2, sample_key="sample").fit(a, max_iterations=2, progress=False)
        >>> p = os.path.join(tempfile.mkdtemp(), "gedi.zarr"); m.save(p)
        >>> bool(np.array_equal(GEDI.load(p).embedding(), m.embedding()))
        True
        """
        import json

        import zarr

        from ..multigedi import SamplePlan

        root = zarr.open_group(str(path), mode="r")
        if root.attrs.get("atlasfit_model") != "GEDI":
            raise ValueError(f"GEDI.load: {str(path)!r} is not a saved GEDI model")
        cfg = json.loads(root.attrs["config"])
        names = json.loads(root.attrs["names"])
        model = cls(K=cfg["K"], mode=cfg["mode"], seed=cfg["seed"], dtype=cfg["dtype"],
                    sample_key=cfg["sample_key"], modality=cfg["modality"], obs_type=cfg["obs_type"],
                    layer=cfg["layer"], layers=tuple(cfg["layers"]) if cfg["layers"] else None,
                    orthoZ=cfg["orthoZ"], S_Qi=cfg["S_Qi"], S_oi=cfg["S_oi"], is_si_fixed=cfg["is_si_fixed"])
        m = cfg["modality"]
        shared = dict(names["shared_scalars"])
        shared["iteration"] = int(shared.get("iteration", cfg["n_iter"]))
        for k in root["shared"].array_keys():
            shared[k.replace("~", "/")] = np.asarray(root[f"shared/{k}"][...])
        samples = list(names["samples"])
        local, cells = {}, {}
        for i, g in enumerate(samples):
            grp = f"local/{i}"
            local[g] = {"B": np.asarray(root[f"{grp}/B"][...])}
            for nm in ("Q", "o_i", "s_i"):
                local[g][f"{m}/{nm}"] = np.asarray(root[f"{grp}/{nm}"][...])
            cells[g] = np.asarray(root[f"{grp}/cells"][...])
        model.plan_ = SamplePlan(modalities=(m,), global_samples=tuple(samples),
                                 n_cells={g: len(cells[g]) for g in samples},
                                 mod_samples={m: tuple(samples)}, n_features={m: len(names["genes"])},
                                 cells=cells, n_total=int(sum(len(c) for c in cells.values())))
        C = np.asarray(root["C"][...]) if "C" in root else None
        H = np.asarray(root["H"][...]) if "H" in root else None
        model.ctx_ = GediContext(modality=m, obs_type=cfg["obs_type"], orthoZ=cfg["orthoZ"],
                                 is_si_fixed=cfg["is_si_fixed"], mode=cfg["mode"], K=cfg["K"], C=C,
                                 solver=None if C is None else pathway_solver(C), H=H,
                                 lamQ=1.0 / cfg["S_Qi"], lamO=1.0 / cfg["S_oi"])
        model.shared_ = shared
        model.n_iter_ = int(cfg["n_iter"])
        model.modality_ = m
        model.feature_names_ = np.asarray(names["genes"])
        model.sample_names_ = tuple(samples)
        model.pathway_names_ = names["pathways"]
        model.covariate_names_ = names["covariates"]
        model._row_index = None
        model._local = local
        return model
