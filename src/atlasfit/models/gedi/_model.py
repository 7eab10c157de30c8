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
    ordered_sum,
    plan_shards,
    resolve_device,
    run_fit,
)
from .._factor import MultiGEDI, dump_local, msh, restore_local
from .._fingerprint import gedi_fingerprint
from . import _shard as sh
from ._fit import GediContext, initialize_gedi, iterate_gedi
from ._kernels import diff_exp, diff_O, diff_Q, pathway_solver

logger = logging.getLogger("atlasfit.gedi")


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


class GEDI:
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
        ``"M"`` counts (default), ``"M_list"`` paired counts in ``layers`` or ``"X"`` binary
        (spec §1.2).
    layer, layers
        Layer of the counts (``None``: ``.X``), or the two layers for ``"M_list"``.
    orthoZ
        Orthogonal Z update (spec §2.3a); ``False``: ridge update.
    S_Qi, S_oi
        Prior variances (in units of σ²) of Q_i and o_i around their covariate means; the
        single-modal defaults are 1 (spec §1.4).
    is_si_fixed
        Keep the per-cell offsets s_i at 0.
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
    ):
        if mode not in ("Bsphere", "Bl2"):
            raise ValueError(f"GEDI: mode must be 'Bsphere' or 'Bl2', got {mode!r}")
        if obs_type not in ("M", "M_list", "X"):
            raise ValueError(f"GEDI: obs_type must be 'M', 'M_list' or 'X', got {obs_type!r}")
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
        reg = MultiGEDI({name: cfg}, sample_key=self.sample_key, K=self.K, mode=self.mode, seed=self.seed,
                        dtype=self.dtype, max_shards=self.max_shards, device=self.device)
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
                         step=partial(iterate_gedi, plan=plan, config=config, ctx=ctx),
                         stop=int(max_iterations), policy=policy, progress=progress, callback=callback,
                         dump_local=dump_local, restore_local=restore_local, desc="GEDI")
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

    # ------------------------------------------------------------------ differential (§7.4)

    def get_diff_Q(self, contrast) -> pd.DataFrame:
        """Metagene effect of a covariate contrast (spec §7.4): diffQ = [R_1 h_c, …, R_K h_c]
        (genes x K), h_c the contrast vector over H's covariates (no rotation of H, as in the
        reference's fit).

        Examples
        --------
        See :class:`GEDI`.
        """
        hc = self.contrast(contrast)
        return pd.DataFrame(diff_Q(self.shared_["R"], hc), index=self.feature_names_)

    def get_diff_O(self, contrast) -> pd.Series:
        """Offset effect of a contrast (spec §7.4): diffO = R_o h_c (genes): the change of the sample
        gene offset o_i that the contrast predicts."""
        hc = self.contrast(contrast)
        return pd.Series(diff_O(self.shared_["Ro"], hc), index=self.feature_names_)

    def get_diff_exp(self, contrast, include_offset: bool = False) -> np.ndarray:
        """Cell-level differential expression of a contrast (spec §7.4), cells x genes, log scale:
        diffExp = Σ_k (R_k h_c)(D_k B[k, :]) = diffQ · DB, plus diffO in every cell when
        ``include_offset`` (the reference's "full" mode). Rows in the caller's cell order."""
        dQ = self.get_diff_Q(contrast).to_numpy()
        dO = self.get_diff_O(contrast).to_numpy() if include_offset else 0.0
        D = self.get_D()
        loc = self._gather()
        return self._cells({g: (diff_exp(dQ, D[:, None] * loc[g]["B"]) + np.reshape(dO, (-1, 1))).T
                            for g in self.sample_names_})

    def diff_expression(self, contrast, include_offset: bool = True) -> pd.DataFrame:
        """Per-gene differential expression of a contrast (spec §7.4 summarised over cells).

        With d = diffO (if ``include_offset``, else 0), q_j = row j of diffQ and the cell averages
        m = (1/N) Σ_n DB_n, G = (1/N) Σ_n DB_n DB_nᵀ (reduced per sample, no cell gather):

        - ``mean`` = d_j + q_jᵀ m: average log-fold change of gene j over cells;
        - ``rms`` = sqrt(d_j² + 2 d_j q_jᵀ m + q_jᵀ G q_j): root-mean-square over cells of
          d_j + diffExp[j, n], the size of the effect whatever its sign in each cell type;
          rank genes by it for a contrast that acts through the factors.

        Returns
        -------
        pandas.DataFrame
            Genes x (``mean``, ``rms``, ``offset``), sorted by ``rms`` descending.
        """
        dQ = self.get_diff_Q(contrast).to_numpy()
        dO = self.get_diff_O(contrast).to_numpy() if include_offset else np.zeros(len(dQ))
        m, G = self._db_means()
        qm = dQ @ m
        ms = dO * dO + 2.0 * dO * qm + np.einsum("jk,kl,jl->j", dQ, G, dQ)
        df = pd.DataFrame({"mean": dO + qm, "rms": np.sqrt(np.clip(ms, 0.0, None)), "offset": dO},
                          index=self.feature_names_)
        return df.sort_values("rms", ascending=False, kind="stable")

    def _db_means(self):
        """m = (1/N) Σ_n DB_n and G = (1/N) Σ_n DB_n DB_nᵀ, reduced per sample in global order."""
        D = self.get_D()
        order = self.sample_names_
        N = self.plan_.N(self.modality_)
        if self._engine is not None:
            res = gather_by_sample(self._engine.map(sh.db_moments, D))
            stats = [res[g][0] for g in order]
        else:  # a loaded model: from the saved per-sample state
            loc = self._gather()
            stats = []
            for g in order:
                DB = D[:, None] * loc[g]["B"]
                stats.append((DB.sum(axis=1), DB @ DB.T))
        return ordered_sum([s[0] for s in stats]) / N, ordered_sum([s[1] for s in stats]) / N

    # ------------------------------------------------------------------ pathways (§7.5)

    def pathway_associations(self) -> pd.DataFrame:
        """Gene-pathway associations (spec §7.5): Z Aᵀ (genes x pathways): gene j's metagene
        projected on pathway p's factor signature A[p, :]."""
        self._need_C("pathway_associations")
        return pd.DataFrame(self.shared_["Z"] @ self.shared_["A"].T, index=self.feature_names_,
                            columns=self.pathway_names_)

    def top_pathway_genes(self, pathway: str, n: int = 20) -> list[str]:
        """The ``n`` genes with the largest absolute association with ``pathway`` (spec §7.5)."""
        assoc = self.pathway_associations()
        if pathway not in assoc.columns:
            raise KeyError(f"GEDI: unknown pathway {pathway!r}; pathways: {list(assoc.columns)[:10]}...")
        col = assoc[pathway].abs().to_numpy()
        idx = np.argsort(-col, kind="stable")[:n]
        return [str(g) for g in assoc.index[idx]]

    def pathway_scores(self) -> pd.DataFrame:
        """Per-cell pathway activity (spec §7.2/§7.5): ADB = A diag(D) B (C used unrotated, so
        C_rot = I), cells x pathways, rows in the caller's cell order."""
        self._need_C("pathway_scores")
        A, D = self.shared_["A"], self.get_D()
        loc = self._gather()
        scores = self._cells({g: (A @ (D[:, None] * loc[g]["B"])).T for g in self.sample_names_})
        return pd.DataFrame(scores, columns=self.pathway_names_)

    def pathway_gradient(self, pathway: str) -> np.ndarray:
        """Direction of ``pathway`` in the embedding (spec §7.5): A[p, :] ∘ D (K), the same for every
        cell."""
        A = self.get_A()
        if pathway not in A.index:
            raise KeyError(f"GEDI: unknown pathway {pathway!r}")
        return A.loc[pathway].to_numpy() * self.get_D()

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
                                 n_cells={g: int(len(cells[g])) for g in samples},
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
