"""The user-facing :class:`GEDI` model: single-modality GEDI with a gene-level pathway prior C and
sample covariates H (spec §1, §2.8-2.9), fitted on the engine, with the differential and pathway
outputs of §7.4-7.5.

Data registration and the engine choice are MultiGEDI's (a one-modality MultiGEDI instance does the
registration: atlas store, MuData, AnnData or dict of AnnData; Dask engine for stores or with a
client, in-process otherwise).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...engine import (
    check_count,
    checkpoint_policy,
    gather_by_sample,
    is_distributed,
    plan_shards,
    resolve_device,
    run_fit,
)
from .._factor import SINGLE_OBS_TYPES, MultiGEDI, msh
from .._fingerprint import gedi_fingerprint
from . import _shard as sh
from ._fit import GediContext, initialize_gedi, iterate_gedi
from ._inputs import _align_C, _align_H, _modality_name
from ._kernels import pathway_solver
from ._outputs import _GediOutputs
from ._persist import _GediPersistence

logger = logging.getLogger("atlasfit.gedi")



def _as_multigedi_shared(state, shared) -> dict:
    """GEDI's shared Z, D, o under MultiGEDI's per-modality names (what models/multigedi/_ckpt.py reads)."""
    (m,) = state["mods"]
    return {f"{m}/Z": shared["Z"], f"{m}/D": shared["D"], f"{m}/o": shared["o"]}


def _gedi_dump_local(state, shared) -> dict:
    # MultiGEDI's compact payload: Y left out where it follows from the small state and the data
    from ..multigedi._ckpt import dump_local as compact_dump

    return compact_dump(state, _as_multigedi_shared(state, shared))


def _gedi_restore_local(state, data: dict, shared) -> None:
    from ..multigedi._ckpt import restore_local as compact_restore

    compact_restore(state, data, _as_multigedi_shared(state, shared))


_gedi_dump_local.needs_shared = True
_gedi_restore_local.needs_shared = True


class _Registration(MultiGEDI):
    """MultiGEDI's data registration (atlas store, MuData, AnnData, dict) for GEDI's one modality,
    with GEDI's obs types (``"Y"`` too)."""

    _obs_types = SINGLE_OBS_TYPES


_Registration.__name__ = "GEDI"  # messages of the registration / engine set-up name the user's class


class GEDI(_GediOutputs, _GediPersistence):
    """Single-modality GEDI with an optional pathway prior C and sample covariates H (spec §1–2).

    Per sample i (cells of one batch / donor), the latent log-scale matrix is

        Y_i = (Z + Q_i) diag(D) B_i + (o + o_i) 1ᵀ + 1 s_iᵀ + E_i,   E_i ~ N(0, σ²),

    with counts M_i ~ Poisson(exp(Y_i)) (obs type ``"M"``). With ``C`` the metagenes have the prior
    Z ~ N(C A, σ²): Z = Z₀ + C A with pathway coefficients A (P x K). With ``H`` the sample
    deviations are regressed on the covariates: Q_i ~ N(Q̂_i, σ² S_Qi) with Q̂_i[:, k] = R_k h_i, and
    o_i ~ N(R_o h_i, σ² S_oi).

    Parameters
    ----------
    K
        Number of latent factors.
    C
        Gene-level prior: a genes x pathways DataFrame (index: gene names, matched to the data's
        var_names, extra rows ignored; columns: pathway names), e.g. 0/1 gene-set membership.
        An array with one row per gene (in the data's order) is accepted too.
    H
        Sample covariates: a covariates x samples DataFrame (index: covariate names; columns:
        sample labels, every sample of the data needed). Centre binary covariates (e.g. ±1) or add
        an intercept row, since Q̂_i = R h_i has no intercept of its own.
    mode
        ``"Bsphere"`` (unit-norm cell columns of B, D from the factor norms) or ``"Bl2"``
        (unit-norm factor rows, D fixed), spec §2.2.
    seed
        Seed of the randomised-SVD initialisation (hashed with the modality name, spec §5.3).
    dtype
        ``"float64"`` or ``"float32"`` (state arrays; reductions are float64).
    sample_key
        obs column with the sample labels (in-memory data).
    modality
        Which modality of a MuData / atlas store to fit (default: the only one; ``"rna"`` for an
        AnnData).
    obs_type
        ``"M"`` counts (default), ``"M_list"`` paired counts in ``layers``, ``"X"`` binary, or
        ``"Y"``: a continuous matrix (e.g. log-normalised expression; an atlas store of kind
        ``"continuous"``) that *is* Y: it is never updated and σ² has no variance term (spec §1.2,
        §2.10-2.11). The reference's single-modal ``GEDIModel`` fits ``"Y"`` with Y = log1p of its
        input: give ``log1p`` of the data (e.g. a layer) to reproduce it.
    layer, layers
        Layer of the counts (``None``: ``.X``), or the two layers for ``"M_list"``.
    orthoZ
        Orthogonal Z update (spec §2.3a); ``False``: ridge update.
    S_Qi, S_oi
        Prior variances (in units of σ²) of Q_i and o_i around their covariate means; the
        single-modal defaults are 1 (spec §1.4).
    is_si_fixed
        Keep the per-cell offsets s_i at 0.
    solve_Y_every
        As :class:`~atlasfit.MultiGEDI`: every this many iterations (default 10) the latent Y of
        ``"M"`` / ``"M_list"`` data is solved to its root from Ŷ and the data instead of one Halley step,
        so a checkpoint written then holds no Y and still resumes to the same bits; ``None``: the
        reference's update at every iteration.
    max_shards
        At most this many shards (groups of whole samples); fixed by the data, not by the workers.
    device
        ``"cpu"``, ``"gpu"`` (CuPy state on the workers / in process) or ``"auto"``, as MultiGEDI.

    Attributes
    ----------
    history_
        Per-iteration DataFrame: ``iteration``, ``sigma2``, ``dZ``, ``dA``, ``dR``.
    n_iter_
        Iterations run.
    pathway_names_, covariate_names_, feature_names_, sample_names_
        Labels of the outputs.

    Examples
    --------
    >>> import numpy as np, pandas as pd, anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (80, 30)).astype(np.float32))
    >>> a.obs["sample"] = np.repeat(["s1", "s2", "s3", "s4"], 20)
    >>> C = pd.DataFrame(np.eye(30)[:, :3], index=a.var_names, columns=["p0", "p1", "p2"])
    >>> H = pd.DataFrame([[1.0, -1.0, 1.0, -1.0]], index=["treated"], columns=["s1", "s2", "s3", "s4"])
    >>> m = GEDI(K=3, C=C, H=H, sample_key="sample").fit(a, max_iterations=3, progress=False)
    >>> m.get_A().shape, m.get_diff_Q({"treated": 1.0}).shape
    ((3, 3), (30, 3))
    """

    def __init__(
        self,
        K: int = 10,
        C=None,
        H=None,
        mode: str = "Bsphere",
        seed: int = 0,
        dtype: str = "float64",
        *,
        sample_key: str | None = None,
        modality: str | None = None,
        obs_type: str = "M",
        layer: str | None = None,
        layers: tuple[str, str] | None = None,
        orthoZ: bool = True,
        S_Qi: float = 1.0,
        S_oi: float = 1.0,
        is_si_fixed: bool = False,
        max_shards: int = 64,
        device: str = "cpu",
        solve_Y_every: int | None = 10,
    ):
        if mode not in ("Bsphere", "Bl2"):
            raise ValueError(f"GEDI: mode must be 'Bsphere' or 'Bl2', got {mode!r}")
        if obs_type not in SINGLE_OBS_TYPES:
            raise ValueError(f"GEDI: obs_type must be 'M', 'M_list', 'X' or 'Y', got {obs_type!r}")
        if int(K) < 1:
            raise ValueError(f"GEDI: K must be >= 1, got {K}")
        if device not in ("cpu", "gpu", "auto"):
            raise ValueError(f"GEDI: device must be 'cpu', 'gpu' or 'auto', got {device!r}")
        for nm, v in (("S_Qi", S_Qi), ("S_oi", S_oi)):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"GEDI: {nm} must be a positive number, got {v!r}")
        self.K = int(K)
        self.C = C
        self.H = H
        self.mode = mode
        self.seed = 0 if seed is None else int(seed)
        self.dtype = np.dtype(dtype).name
        self.sample_key = sample_key
        self.modality = modality
        self.obs_type = obs_type
        self.layer = layer
        self.layers = layers
        self.orthoZ = bool(orthoZ)
        self.S_Qi = float(S_Qi)
        self.S_oi = float(S_oi)
        self.is_si_fixed = bool(is_si_fixed)
        self.max_shards = int(max_shards)
        self.device = device
        if solve_Y_every is not None and (isinstance(solve_Y_every, bool) or int(solve_Y_every) < 0):
            raise ValueError(f"GEDI: solve_Y_every must be a positive integer, 0 or None, got {solve_Y_every!r}")
        self.solve_Y_every = int(solve_Y_every) if solve_Y_every else None
        self.shared_ = None
        self._engine = None
        self._local = None
        self._atlas = None

    # ------------------------------------------------------------------ fit

    def fit(self, data, max_iterations: int = 100, *, client=None, progress: Any = None,
            callback=None, checkpoint_every: int | None = None, checkpoint_dir=None,
            resume_from_checkpoint: bool = False) -> GEDI:
        """Fit the model.

        Parameters
        ----------
        data
            AnnData (cells x genes, ``obs[sample_key]``), MuData / dict of AnnData (the modality
            ``modality``), or an atlas store path (shards load on the Dask workers).
        max_iterations
            Block-coordinate-descent iterations (the reference's single-modal default: 100).
        client
            A ``distributed.Client`` to run on; default: in-process for in-memory data, the active
            client or an embedded cluster for a store.
        progress
            ``None``: a bar on a terminal, a log line otherwise; ``False``: silent.
        callback
            ``callback(iteration, shared)`` after every iteration; a truthy return stops the fit.
        checkpoint_every, checkpoint_dir
            Checkpoint the driver's state and every sample's local state (Y included) every this
            many iterations into ``checkpoint_dir`` (MultiGEDI's mechanism: a lost worker rolls all
            shards back to the last checkpoint and replays, bit for bit). Default: for a store fitted
            with a Dask client, every 10 iterations into ``<store>.checkpoints/gedi-<digest>``; otherwise
            none unless ``checkpoint_dir`` is given. ``checkpoint_every=0``: none.
        resume_from_checkpoint
            Continue a fit whose driver was killed from the last checkpoint in ``checkpoint_dir``
            (same data, C, H, settings and seed; another fit's checkpoint is refused before any work).

        Returns
        -------
        GEDI
            ``self``.
        """
        max_iterations = check_count(max_iterations, "max_iterations", "GEDI.fit")
        from ...io import Atlas

        name = _modality_name(data, self.modality)
        cfg: dict = {"obs_type": self.obs_type, "orthoZ": self.orthoZ, "is_si_fixed": self.is_si_fixed}
        if self.obs_type == "M_list":
            cfg["layers"] = self.layers
        elif self.layer is not None:
            cfg["layer"] = self.layer
        reg = _Registration({name: cfg}, sample_key=self.sample_key, K=self.K, mode=self.mode, seed=self.seed,
                        dtype=self.dtype, max_shards=self.max_shards, device=self.device,
                        solve_Y_every=None)  # GEDI's own iteration keeps the reference's Y update
        is_store = isinstance(data, (str, Path, Atlas))
        if not is_store and self.sample_key is None:
            raise ValueError("GEDI: give sample_key, the obs column with the sample labels, for in-memory "
                             "data (e.g. GEDI(K=10, sample_key='sample'))")
        # in-memory counts are checked by CheckedReader below (its errors name the sample)
        reader = reg._register_store(data) if is_store else reg._register_memory(data, check_counts=False)
        plan, config = reg.plan_, reg.config
        genes = np.asarray(reg._feature_names[name]).astype(str)
        samples = tuple(plan.mod_samples[name])
        C = Cnames = solver = None
        if self.C is not None:
            C, Cnames = _align_C(self.C, genes, name)
            solver = pathway_solver(C)
        Hm = Hnames = None
        if self.H is not None:
            Hm, Hnames = _align_H(self.H, tuple(plan.global_samples), name)
        ctx = GediContext(modality=name, obs_type=self.obs_type, orthoZ=self.orthoZ,
                          is_si_fixed=self.is_si_fixed, mode=self.mode, K=self.K, C=C, solver=solver,
                          H=Hm, lamQ=1.0 / self.S_Qi, lamO=1.0 / self.S_oi)
        if plan.N(name) < self.K or len(genes) < self.K:
            raise ValueError(
                f"GEDI: K={self.K} needs at least K cells and K genes; modality {name!r} has "
                f"{plan.N(name)} cells and {len(genes)} genes"
            )
        hcols = {g: (Hm[:, i] if Hm is not None else np.zeros(0)) for i, g in enumerate(plan.global_samples)}
        shards = plan_shards(plan.global_samples, [plan.n_cells[g] for g in plan.global_samples],
                             max_shards=self.max_shards)
        self.close()
        engine = reg._make_engine(shards, client, is_store)
        union = getattr(reg, "_union", None)
        cell_names = None if is_store or union is None else {
            g: np.asarray(union[plan.cells[g]]).astype(str) for g in plan.global_samples}
        gpu = resolve_device(self.device, "GEDI", distributed=is_distributed(engine))
        array_module = "cupy" if gpu else None
        policy = checkpoint_policy(  # before any work: another fit's checkpoint is refused, the directory locked
            "GEDI.fit", store_path=reg._atlas.path if is_store else None, model="gedi",
            distributed=is_distributed(engine), checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, resume=resume_from_checkpoint,
            fingerprint=gedi_fingerprint(self, reg, (C, Cnames), (Hm, Hnames), is_store))
        ck = policy.checkpoint
        try:
            engine.setup(sh.load_gedi_shard, sh.CheckedReader(reader, self.obs_type, genes, cell_names), plan,
                         config, ctx.lamQ, ctx.lamO, hcols, array_module)
        except BaseException:
            policy.release()
            raise
        self._engine = engine
        self._local = None
        shared = run_fit(engine, init=partial(initialize_gedi, plan=plan, config=config, ctx=ctx),
                         step=partial(iterate_gedi, plan=plan, config=config, ctx=ctx,
                                      solve_Y_every=self.solve_Y_every),
                         stop=int(max_iterations), policy=policy, progress=progress, callback=callback,
                         dump_local=_gedi_dump_local, restore_local=_gedi_restore_local, desc="GEDI")
        self.checkpoint_info_ = ck.last_info if ck is not None else None
        self.shared_ = shared
        self.n_iter_ = int(shared["iteration"])
        self.plan_ = plan
        self.ctx_ = ctx
        self.modality_ = name
        self.feature_names_ = genes
        self.sample_names_ = samples
        self.pathway_names_ = Cnames
        self.covariate_names_ = Hnames
        self._row_index = reg._row_index.get(name)
        self._atlas = reg._atlas
        return self

    def close(self) -> None:
        """Release the shard state held by the engine (workers' memory)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # ------------------------------------------------------------------ helpers

    def _check_fitted(self):
        if self.shared_ is None:
            raise RuntimeError("GEDI: call fit() first")

    def _need_C(self, what):
        self._check_fitted()
        if self.ctx_.C is None:
            raise ValueError(f"GEDI.{what}: the model has no pathway prior; fit with GEDI(C=...)")

    def _need_H(self, what):
        self._check_fitted()
        if self.ctx_.H is None:
            raise ValueError(f"GEDI.{what}: the model has no sample covariates; fit with GEDI(H=...)")

    def _gather(self) -> dict:
        """Per-sample B_i, Q_i, o_i, s_i (float64) on the driver (cells x K: small)."""
        if self._local is None:
            if self._engine is None:
                raise RuntimeError("GEDI: the engine of this fit is closed; refit to get cell-level outputs")
            self._local = dict(gather_by_sample(self._engine.map(msh.collect_local)))
            self._local = {g: v[0][0] for g, v in self._local.items()}
        return self._local

    def _cells(self, blocks: dict) -> np.ndarray:
        """Stack per-sample (N_i x ·) blocks into the caller's cell order."""
        first = next(iter(blocks.values()))
        out = np.empty((self.plan_.n_total,) + first.shape[1:], dtype=np.float64)
        for g, blk in blocks.items():
            out[self.plan_.cells[g]] = blk
        return out

    def contrast(self, contrast) -> np.ndarray:
        """A contrast over the covariates as an L-vector h_c.

        Parameters
        ----------
        contrast
            Array of length L (order of :attr:`covariate_names_`), or a dict / Series
            ``{covariate: weight}`` (others 0).
        """
        self._need_H("contrast")
        names = self.covariate_names_
        if isinstance(contrast, (dict, pd.Series)):
            items = {str(k): float(v) for k, v in dict(contrast).items()}
            unknown = [k for k in items if k not in names]
            if unknown:
                raise ValueError(f"GEDI: contrast names unknown covariate {unknown[0]!r}; covariates: {names}")
            hc = np.array([items.get(n, 0.0) for n in names])
        else:
            hc = np.asarray(contrast, dtype=np.float64).reshape(-1)
            if hc.size != len(names):
                raise ValueError(
                    f"GEDI: contrast has {hc.size} entries but H has {len(names)} covariates {names}"
                )
        if not np.all(np.isfinite(hc)):
            raise ValueError("GEDI: contrast must be finite")
        return hc

    # ------------------------------------------------------------------ parameters

    @property
    def history_(self) -> pd.DataFrame:
        self._check_fitted()
        s = self.shared_
        n = len(s["tracking/sigma2"])
        return pd.DataFrame({"iteration": np.arange(1, n + 1), "sigma2": s["tracking/sigma2"],
                             "dZ": s["tracking/dZ"], "dA": s["tracking/dA"], "dR": s["tracking/dR"]})

    def get_Z(self) -> pd.DataFrame:
        """Metagenes Z (genes x K). With C: Z = Z₀ + C A, Z₀ the part outside the pathway prior."""
        self._check_fitted()
        return pd.DataFrame(self.shared_["Z"], index=self.feature_names_)

    def get_D(self) -> np.ndarray:
        """Per-factor scales D (K)."""
        self._check_fitted()
        return np.asarray(self.shared_["D"], dtype=np.float64)

    def get_o(self) -> pd.Series:
        """Global gene offsets o (J)."""
        self._check_fitted()
        return pd.Series(self.shared_["o"], index=self.feature_names_)

    def get_sigma2(self) -> float:
        """Residual variance σ²."""
        self._check_fitted()
        return float(self.shared_["sigma2"])

    def get_A(self) -> pd.DataFrame:
        """Pathway coefficients A (pathways x K), spec §2.8: A = (CᵀC + λ_A I)⁻¹ Cᵀ Z, λ_A = 1.

        A[p, k] is the (ridge) regression coefficient of factor k's metagene on pathway p's gene
        indicator: how strongly the genes of p load on factor k.
        """
        self._need_C("get_A")
        return pd.DataFrame(self.shared_["A"], index=self.pathway_names_)

    def get_R(self):
        """Covariate effects on the sample metagenes, spec §2.9: R (genes x K x covariates) with
        R[:, k, :] = R_k, Q̂_i[:, k] = R_k h_i; returned as an ``xarray.DataArray`` with dims
        ``gene``, ``factor``, ``covariate``."""
        import xarray as xr

        self._need_H("get_R")
        return xr.DataArray(self.shared_["R"], dims=("gene", "factor", "covariate"),
                            coords={"gene": self.feature_names_, "factor": np.arange(self.K),
                                    "covariate": self.covariate_names_})

    def get_Ro(self) -> pd.DataFrame:
        """Covariate effects on the sample offsets (genes x covariates): ô_i = R_o h_i (§2.9)."""
        self._need_H("get_Ro")
        return pd.DataFrame(self.shared_["Ro"], index=self.feature_names_, columns=self.covariate_names_)

    def embedding(self) -> np.ndarray:
        """Cell embedding (DB)ᵀ = (diag(D) B)ᵀ (cells x K, spec §7.2 ``X_gedi``), rows in the caller's
        cell order (the AnnData's rows; the store's rows for a store)."""
        self._check_fitted()
        D = self.get_D()
        loc = self._gather()
        return self._cells({g: (D[:, None] * loc[g]["B"]).T for g in self.sample_names_})

    @property
    def singular_values_(self) -> np.ndarray:
        """Singular values d (K, descending) of the fitted rank-K signal Z·diag(D)·[B_1 … B_I] over
        all cells (spec §7.1, the single-modal factorised SVD), from K x K statistics (no cell gather):
        with the thin QR Z = Q_z R_z and G = Σ_i DB_i DB_iᵀ, the d² are the eigenvalues of R_z G R_zᵀ.
        ``d² / Σ d²`` is the share of the signal's variance (uncentred) per component
        (:func:`atlasfit.pl.variance_explained`)."""
        self._check_fitted()
        _, G = self._db_means()
        G = G * self.plan_.N(self.modality_)
        R = np.linalg.qr(np.asarray(self.shared_["Z"], dtype=np.float64), mode="r")
        ev = np.linalg.eigvalsh(R @ G @ R.T)[::-1]
        return np.sqrt(np.clip(ev, 0.0, None))
