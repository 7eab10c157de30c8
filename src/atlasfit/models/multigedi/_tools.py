"""Downstream outputs of a fitted :class:`~atlasfit.MultiGEDI` (mixed into the class): per-modality
SVD / PCA (spec §7.1), feature variance and dispersion of the imputation (§7.3), pseudotime and the
vector field (§7.6). All run as reductions of small per-sample statistics on the engine that holds
the fit (or, for a loaded model, on its saved state); only the per-cell outputs come back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import _dynamics as dyn
from ._moments import LocalStates, feature_stats, state_from_export
from ._svd import check_modality, gather_rows, modality_svd


class DownstreamMixin:
    """Methods of :class:`~atlasfit.MultiGEDI` for the reference's ``tl.svd`` / ``tl.pca`` /
    ``tl.variance`` / ``tl.dispersion`` / ``tl.pseudotime`` / ``tl.vector_field``."""

    # ------------------------------------------------------------------ plumbing

    def _downstream_engine(self):
        self._check_fitted()
        if self._engine is not None:
            return self._engine
        if self._state_cache is not None:  # a loaded model: its saved per-sample state
            return LocalStates(state_from_export(self._state_cache, self.plan_, self.config.names))
        raise RuntimeError("MultiGEDI: the engine of this fit is closed; refit, or save() before close() "
                           "and load() the model, to compute cell-level outputs")

    def _cell_ids(self, modality: str | None) -> np.ndarray:
        """Global cell ids of the rows of :meth:`embedding` (``modality``: its rows; None: all cells)."""
        if modality is None:
            return np.arange(self.plan_.n_total)
        if modality in self._row_index:
            return np.asarray(self._row_index[modality])
        return np.concatenate([self.plan_.cells[g] for g in self.plan_.mod_samples[modality]])

    def _samples(self, modality: str | None):
        return self.plan_.global_samples if modality is None else self.plan_.mod_samples[modality]

    def _rows(self, T, modality: str | None) -> np.ndarray:
        """Rows B_gᵀ T of the cells of ``modality`` (or all), in :meth:`embedding`'s row order."""
        samples = self._samples(modality)
        parts = gather_rows(self._downstream_engine(), self.plan_, T, samples)
        full = np.zeros((self.plan_.n_total, np.shape(T)[1]))
        for g in samples:
            full[self.plan_.cells[g]] = parts[g]
        return full[self._cell_ids(modality)]

    # ------------------------------------------------------------------ SVD / PCA (§7.1)

    def svd(self, modality: str | None = None) -> dict:
        """Factorised SVD of the rank-K reconstruction (spec §7.1): joint (``modality=None``, the fit's
        ``X_multigedi_pca``) or of one modality, X = Z_m diag(D_m) with the shared B of that
        modality's samples (the reference's ``tl.svd(modality=m)``).

        Returns
        -------
        dict
            ``d`` (singular values), ``u`` (features x r left singular vectors, features of the
            modality, or of every modality stacked in registration order), ``T`` (K x r: a cell's
            PCA row is B_gᵀ T). r = min(J, K).
        """
        self._check_fitted()
        check_modality(self.config, modality, "svd")
        if modality is None and self._svd is not None:
            return dict(self._svd)
        held = self.__dict__.get("_svd_by_modality")
        if held is None or held[0] is not self.shared_:  # a refit replaces shared_
            held = self.__dict__["_svd_by_modality"] = (self.shared_, {})
        cache = held[1]
        if modality not in cache:
            cache[modality] = modality_svd(self._downstream_engine(), self.shared_, self.plan_, self.config, modality)
        return dict(cache[modality])

    def pca(self, modality: str | None = None, n_components: int | None = None) -> np.ndarray:
        """PCA coordinates V diag(d) = (X B)ᵀ U (uncentred, spec §7.1) of the per-modality
        (``modality``) or joint (``None``) reconstruction; rows as :meth:`embedding`.

        Examples
        --------
        >>> import numpy as np, anndata as ad, atlasfit
        >>> rng = np.random.default_rng(0)
        >>> a = ad.AnnData(rng.poisson(2.0, (60, 20)).astype(np.float32))
        >>> a.obs["sample"] = np.repeat(["s1", "s2"], 30)
        >>> m = atlasfit.MultiGEDI({"rna": {}}, sample_key="sample", K=3).fit(a, max_iterations=2)
        >>> m.pca("rna", n_components=2).shape
        (60, 2)
        """
        T = self.svd(modality)["T"]
        if n_components is not None:
            n_components = int(n_components)
            if not 1 <= n_components <= T.shape[1]:
                raise ValueError(f"MultiGEDI.pca: n_components must be in 1..{T.shape[1]}, got {n_components}")
            T = np.ascontiguousarray(T[:, :n_components])
        return self._rows(T, modality)

    def cell_embedding(self, modality: str | None = None) -> np.ndarray:
        """The shared embedding B (cells x K; unit-norm rows under ``Bsphere``); rows as :meth:`embedding`."""
        self._check_fitted()
        check_modality(self.config, modality, "cell_embedding")
        return self._rows(np.eye(self.config.K), modality)

    # ------------------------------------------------------------------ variance / dispersion (§7.3)

    def feature_stats(self, modality: str) -> pd.DataFrame:
        """Per-feature ``mean``, ``variance`` and ``dispersion`` (variance / mean, 0 where mean ≤ 0) of
        the imputed latent values Ŷ (:meth:`impute`) over the modality's cells, from per-sample K x K
        statistics (no J x N array is formed). The reference's ``tl.variance`` / ``tl.dispersion``."""
        self._check_fitted()
        check_modality(self.config, modality, "feature_stats")
        st = feature_stats(self._downstream_engine(), self.shared_, self.plan_.mod_samples[modality], modality)
        return pd.DataFrame({k: st[k] for k in ("mean", "variance", "dispersion")},
                            index=pd.Index(self.feature_names(modality).astype(str), name="feature"))

    def dispersion(self, modality: str) -> np.ndarray:
        """Per-feature dispersion (variance / mean, 0 where mean ≤ 0) of the imputed values (J)."""
        return self.feature_stats(modality)["dispersion"].to_numpy()

    # ------------------------------------------------------------------ dynamics (§7.6)

    def pseudotime(self, start, *, modality: str | None = None, representation: str = "pca",
                   n_components: int | None = None) -> np.ndarray:
        """Pseudotime (spec §7.6): distance of every cell to the centroid of the ``start`` cells in a
        representation, min–max scaled to [0, 1].

        Parameters
        ----------
        start
            Boolean mask or integer indices over the rows of :meth:`embedding` (``modality``).
        modality
            ``None``: all cells; else that modality's cells (and, for ``"pca"``, its own PCA).
        representation
            ``"pca"`` (joint PCA, or the modality's PCA with ``modality``), ``"db"`` (D_m B, needs
            ``modality``) or ``"B"`` (the shared embedding).
        n_components
            Use the first components of ``"pca"`` only.

        Returns
        -------
        numpy.ndarray
            One value per row of :meth:`embedding` (``modality``).
        """
        self._check_fitted()
        check_modality(self.config, modality, "pseudotime")
        K = self.config.K
        if representation == "pca":
            T = self.svd(modality)["T"]
            if n_components is not None:
                T = np.ascontiguousarray(T[:, : int(n_components)])
        elif representation == "db":
            if modality is None:
                raise ValueError("MultiGEDI.pseudotime: representation='db' needs modality= (D is per modality)")
            T = np.diag(self.get_D(modality))
        elif representation == "B":
            T = np.eye(K)
        else:
            raise ValueError(f"MultiGEDI.pseudotime: representation must be 'pca', 'db' or 'B', got {representation!r}")
        ids = self._cell_ids(modality)
        start_ids = ids[dyn.start_indices(start, len(ids))]
        samples = self._samples(modality)
        owner = np.full(self.plan_.n_total, -1)
        pos = np.zeros(self.plan_.n_total, dtype=np.int64)
        for k, g in enumerate(samples):
            c = np.asarray(self.plan_.cells[g])
            owner[c] = k
            pos[c] = np.arange(len(c))
        positions = {}
        for k, g in enumerate(samples):
            sel = start_ids[owner[start_ids] == k]
            if sel.size:
                positions[g] = np.sort(pos[sel])
        out = dyn.pseudotime(self._downstream_engine(), T, positions, samples)
        full = np.zeros(self.plan_.n_total)
        for g in samples:
            full[self.plan_.cells[g]] = out[g]
        return full[ids]

    def sample_offsets(self, modality: str) -> pd.DataFrame:
        """The fitted sample offsets o_i of ``modality`` (features x samples)."""
        self._check_fitted()
        check_modality(self.config, modality, "sample_offsets")
        from ...engine._reduce import gather_by_sample

        got = gather_by_sample(self._downstream_engine().map(dyn.sample_offsets, modality))
        samples = list(self.plan_.mod_samples[modality])
        E = np.stack([got[g][0][0] for g in samples], axis=1)
        return pd.DataFrame(E, index=self.feature_names(modality).astype(str), columns=samples)

    def vector_field(self, start_contrast, end_contrast, modality: str, n_steps: int = 10) -> dict:
        """Vector field (spec §7.6): the offset effect at contrasts interpolated between two contrasts
        over the modality's samples, field(t) = Σ_i c_i(t) o_i with c(t) = (1 − t) c₀ + t c₁.

        Parameters
        ----------
        start_contrast, end_contrast
            Vectors over the modality's samples (order of ``plan_.mod_samples[modality]``) or dicts
            ``{sample: weight}``; e.g. ``{"d0": 1}`` to ``{"d3": 1}``.
        modality
            The modality whose offsets are used.
        n_steps
            Grid points on [0, 1].

        Returns
        -------
        dict
            ``t``, ``contrasts`` (n_steps x samples), ``field`` (n_steps x features), ``velocity``
            (features, constant: Σ_i (c₁ − c₀)_i o_i), ``features``, ``samples``.
        """
        E = self.sample_offsets(modality)
        names = list(E.columns)
        c0 = dyn.contrast_vector(start_contrast, names, "start_contrast")
        c1 = dyn.contrast_vector(end_contrast, names, "end_contrast")
        out = dyn.vector_field(E.to_numpy(), c0, c1, n_steps)
        out["features"] = np.asarray(E.index)
        out["samples"] = np.asarray(names)
        return out
