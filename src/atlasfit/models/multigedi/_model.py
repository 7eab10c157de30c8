"""The user-facing :class:`MultiGEDI` model: data registration, fit on an engine, outputs, save/load.

The maths lives in the sibling modules (pure functions over shards); this class only decides where
the data come from (an atlas store, or an in-memory MuData / AnnData / dict of AnnData), which engine
runs the shard functions (the Dask engine on the active or an embedded cluster for stores; the
in-process engine for in-memory data unless a client is given) and where results go.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...engine import (
    check_count,
    checkpoint_policy,
    is_distributed,
    make_engine,
    plan_shards,
    resolve_device,
    run_fit,
    sample_dir_name,
)
from ...engine._preflight import preflight_store
from . import _shard as sh
from ._config import OBS_TYPES, FitConfig, InMemoryReader, ModalityConfig, make_plan
from ._fit import iterate
from ._init import initialize
from ._outputs import export_state, with_joint_svd
from ._tools import DownstreamMixin

logger = logging.getLogger("atlasfit.multigedi")

_CFG_KEYS = {"obs_type", "orthoZ", "adjustD", "is_si_fixed", "layer", "layers"}


def _write_pca_rows(state, tmp_dir: str) -> list[str]:
    """Shard function: write each sample's joint-PCA rows (left in ``state["pca"]``) to its own zarr
    array ``<tmp_dir>/<sample index>`` (one array per sample: no two workers share a chunk)."""
    import zarr

    from ..._xp import to_numpy

    written = []
    for g, rows in state.pop("pca").items():
        name = _safe(g)
        arr = to_numpy(rows).astype(np.float64)
        z = zarr.open_array(f"{tmp_dir}/{name}", mode="w", shape=arr.shape, dtype=arr.dtype,
                            chunks=(max(1, arr.shape[0]), arr.shape[1]), zarr_format=2)
        z[...] = arr
        written.append(g)
    return written


def _dump_local(state, shared) -> dict:
    # Y of binary / paired-count modalities without the entries a restore recomputes exactly (_ckpt.py)
    from ._ckpt import dump_local

    return dump_local(state, shared)


def _restore_local(state, data: dict, shared) -> None:
    from ._ckpt import restore_local

    restore_local(state, data, shared)


_dump_local.needs_shared = True  # the checkpoint hands them the driver's shared state (engine._checkpoint)
_restore_local.needs_shared = True


def _check_counts(M, m: str, layer, obs_names, var_names) -> None:
    """Counts of an in-memory ``M`` / ``M_list`` modality: finite integers >= 0 (a store's counts were
    checked when it was written); the error names the modality, layer, first cell and feature, and
    the fix. Issue 11 item 8: non-integer counts used to fit silently."""
    from scipy import sparse

    if sparse.issparse(M) and M.format not in ("csr", "csc"):
        M = M.tocsr()
    # CSR / CSC: the stored values are checked as they are, the offending cell found from indptr (no
    # COO copy: tocoo() of anndata's CSR, int64 indptr + int32 indices, fails in SciPy 1.17)
    vals = M.data if sparse.issparse(M) else np.asarray(M)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(vals) | (vals < 0) | (vals != np.round(vals))
    if not bad.any():
        return
    k = int(np.flatnonzero(bad.ravel())[0])
    if not sparse.issparse(M):
        r, c = np.unravel_index(k, vals.shape)
    else:
        major, minor = int(np.searchsorted(M.indptr, k, side="right") - 1), int(M.indices[k])
        r, c = (major, minor) if M.format == "csr" else (minor, major)
    where = "X" if layer is None else f"layer {layer!r}"
    raise ValueError(
        f"MultiGEDI: modality {m!r} ({where}) has obs_type 'M'/'M_list' but holds a value that is not a "
        f"count ({float(vals.ravel()[k])!r} at cell {str(obs_names[r])!r}, feature {str(var_names[c])!r}); pass "
        "the raw counts (e.g. a 'counts' layer: {\"layer\": \"counts\"}), not normalised data"
    )


def _safe(sample: str) -> str:
    # a file-system-safe array name of bounded length, whatever the sample name (issue 11 item 5)
    return sample_dir_name(sample)


def _as_mudata_like(data, sample_key: str | None, names: list[str]):
    """Return ``({mod: AnnData}, root_obs_names or None)`` for in-memory inputs."""
    import anndata as ad

    try:
        import mudata as md
    except ImportError:  # pragma: no cover - mudata is a core dependency
        md = None
    if md is not None and isinstance(data, md.MuData):
        return {m: data.mod[m] for m in names if m in data.mod}, data.obs_names
    if isinstance(data, ad.AnnData):
        if len(names) != 1:
            raise ValueError(
                f"MultiGEDI: an AnnData holds one modality but {len(names)} are configured "
                f"({names}); pass a MuData or a dict {{name: AnnData}}"
            )
        return {names[0]: data}, None
    if isinstance(data, dict):
        return dict(data), None
    raise TypeError(
        f"MultiGEDI.fit: cannot use data of type {type(data).__name__}; give an atlas store path, "
        "an Atlas, a MuData, an AnnData or a dict of AnnData"
    )


class MultiGEDI(DownstreamMixin):
    """Multi-modal GEDI: a cell embedding shared by all modalities of a sample (spec §3).

    Parameters
    ----------
    modalities
        ``{name: {"obs_type": "M" | "M_list" | "X", "orthoZ": bool, "adjustD": bool,
        "is_si_fixed": bool, "layer": str, "layers": (str, str)}}`` in registration order.
        ``obs_type`` ``"M"``: counts; ``"M_list"``: paired counts in two layers (default
        ``("M1", "M2")``; ``None`` in the pair stands for ``.X``, as in the reference, e.g.
        ``(None, "M2")``); ``"X"``: binary {0, 1, NaN}.
    sample_key
        Column of ``obs`` with the sample labels (in-memory data). For an atlas store the store's
        own sample key is used; a different value raises.
    K
        Number of latent factors.
    mode
        ``"Bsphere"`` (unit-norm cell columns of B) or ``"Bl2"`` (unit-norm factor rows).
    seed
        Seed of the randomised SVD initialisation (hashed per modality, spec §5.3).
    dtype
        ``"float64"`` (parity with the reference) or ``"float32"`` (half the memory).
    max_shards
        At most this many shards (groups of whole samples); fixed by the data, never by the
        number of workers, so fits give the same bits on any cluster size.
    device
        ``"cpu"``, ``"gpu"`` (CuPy arrays on dask-cuda workers) or ``"auto"``.
    solve_Y_every
        Every this many iterations (10, 20, ...), round D solves the latent Y of count (``M``) and
        paired-count (``M_list``) modalities to the root of its stationarity condition given Ŷ and the
        data (the exact Y-block minimiser) instead of the reference's one Halley step from the
        previous Y. A checkpoint written at such an iteration (the default ``checkpoint_every`` is
        10) then holds the small state only (about the store's size, instead of 3-9x for a dense Y)
        and still resumes to the same bits. It moves the fit off multigedi 1.1.0's trajectory by
        ~1e-7 relative at iteration 10 (``tests/test_multigedi_model.py``) and ~3e-5 in Z after 30
        iterations on the real 5k data (``benchmarks/results/checkpoint_size.csv``). ``None`` (or 0):
        the reference's update at every iteration (parity 1e-12), and checkpoints that hold Y.
        Part of the fit's settings: the same bits in process, on any number of workers and with
        any checkpoint schedule.

    Attributes
    ----------
    history_
        Per-iteration trace: DataFrame with columns ``iteration``, ``modality``, ``sigma2``, ``dZ``,
        ``objective``.
    n_iter_
        Iterations run.
    singular_values_
        Joint singular values d (spec §7.1).
    checkpoint_info_
        The last checkpoint written (iteration, bytes, seconds, path), or None.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (60, 20)).astype(np.float32))
    >>> a.obs["sample"] = np.repeat(["s1", "s2"], 30)
    >>> m = MultiGEDI({"rna": {"obs_type": "M"}}, sample_key="sample", K=3).fit(a, max_iterations=2)
    >>> m.embedding("rna").shape
    (60, 3)
    """

    #: obs types this class fits (single-modality GEDI's registration adds "Y")
    _obs_types: tuple = OBS_TYPES

    def __init__(
        self,
        modalities: dict[str, dict] | None = None,
        sample_key: str | None = None,
        K: int = 10,
        mode: str = "Bsphere",
        seed: int = 0,
        dtype: str = "float64",
        *,
        max_shards: int = 64,
        device: str = "cpu",
        solve_Y_every: int | None = 10,
    ):
        if not modalities:
            raise ValueError(
                "MultiGEDI: give modalities={name: {'obs_type': 'M' | 'M_list' | 'X'}}, e.g. "
                "{'rna': {'obs_type': 'M'}, 'splicing': {'obs_type': 'M_list', 'layers': ('M1', 'M2')}}"
            )
        mods = []
        for name, cfg in modalities.items():
            cfg = dict(cfg or {})
            unknown = set(cfg) - _CFG_KEYS
            if unknown:
                raise ValueError(
                    f"MultiGEDI: modality {name!r} has unknown settings {sorted(unknown)}; "
                    f"allowed: {sorted(_CFG_KEYS)}"
                )
            if "layers" in cfg and cfg["layers"] is not None:
                cfg["layers"] = tuple(cfg["layers"])
            if cfg.get("obs_type", "M") not in self._obs_types:
                hint = (" ('Y', a continuous matrix used as Y, is single-modality only, as in the reference: "
                        "use atlasfit.GEDI(obs_type='Y'), or model counts with 'M')"
                        if cfg.get("obs_type") == "Y" else "")
                raise ValueError(f"MultiGEDI: modality {name!r} has obs_type {cfg.get('obs_type')!r}; use one of "
                                 f"{self._obs_types}{hint}")
            mods.append(ModalityConfig(name=str(name), **cfg))
        if device not in ("cpu", "gpu", "auto"):
            raise ValueError(f"MultiGEDI: device must be 'cpu', 'gpu' or 'auto', got {device!r}")
        self.config = FitConfig(K=int(K), mode=mode, seed=int(seed), dtype=np.dtype(dtype).type,
                                modalities=mods)
        self.sample_key = sample_key
        self.max_shards = int(max_shards)
        self.device = device
        if solve_Y_every is not None and (isinstance(solve_Y_every, bool) or int(solve_Y_every) < 0):
            raise ValueError(f"MultiGEDI: solve_Y_every must be a positive integer, 0 or None, got {solve_Y_every!r}")
        self.solve_Y_every = int(solve_Y_every) if solve_Y_every else None
        self._engine = None
        self._owned_client = None
        self.plan_ = None
        self.shared_ = None
        self._state_cache: dict | None = None
        self._svd: dict | None = None
        self._atlas = None
        self._feature_names: dict[str, np.ndarray] = {}
        self._row_index: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ data

    def _register_store(self, store):
        from ...io import Atlas, open_atlas

        atlas = store if isinstance(store, Atlas) else open_atlas(store)
        if self.sample_key is not None and self.sample_key != atlas.sample_key:
            raise ValueError(
                f"MultiGEDI: sample_key={self.sample_key!r} but the atlas store {str(atlas.path)!r} is "
                f"sorted by {atlas.sample_key!r}; re-convert the data or pass sample_key=None"
            )
        samples = atlas.samples
        labels, n_features = {}, {}
        for mc in self.config.modalities:
            m = mc.name
            if m not in atlas.modalities:
                raise ValueError(
                    f"MultiGEDI: modality {m!r} is not in the atlas store (it has {atlas.modalities})"
                )
            layers = atlas.layers(m)
            needed = [mc.layer] if mc.obs_type != "M_list" else list(mc.layers)
            for lay in needed:
                if lay is not None and lay not in layers:
                    raise ValueError(
                        f"MultiGEDI: modality {m!r} has no layer {lay!r} (layers: {layers}); set "
                        f"'layers' (M_list) or 'layer' in its config"
                    )
            kind = atlas.kind(m)
            if mc.obs_type == "X" and kind != "binary":
                raise ValueError(
                    f"MultiGEDI: modality {m!r} has obs_type 'X' but the store holds kind {kind!r}; "
                    "convert it with kind 'binary' ({0, 1, NaN} values)"
                )
            if mc.obs_type == "Y" and kind == "binary":
                raise ValueError(
                    f"GEDI: modality {m!r} has obs_type 'Y' (continuous) but the store holds kind 'binary'; "
                    "use obs_type 'X' for {0, 1, NaN} data"
                )
            if mc.obs_type in ("M", "M_list") and kind != "counts":
                raise ValueError(
                    f"MultiGEDI: modality {m!r} has obs_type {mc.obs_type!r} but the store holds kind "
                    f"{kind!r}; counts are needed"
                )
            counts = samples[m]
            present = counts[counts > 0]
            labels[m] = np.repeat(present.index.to_numpy().astype(str), present.to_numpy())
            n_features[m] = int(atlas.var(m).shape[0])
            self._feature_names[m] = atlas.var(m).index.to_numpy()
        self.plan_ = make_plan(labels, n_features)
        self._atlas = atlas
        return atlas

    def _register_memory(self, data, check_counts: bool = True):
        from scipy import sparse

        names = list(self.config.names)
        mods, root_names = _as_mudata_like(data, self.sample_key, names)
        if self.sample_key is None:
            raise ValueError("MultiGEDI: sample_key is needed for in-memory data (the obs column of "
                             "sample labels)")
        labels, n_features, mats, cells = {}, {}, {}, {}
        union = pd.Index(root_names) if root_names is not None else None
        if union is None:
            seen: dict[str, None] = {}
            for m in names:
                if m not in mods:
                    raise ValueError(f"MultiGEDI: modality {m!r} not found in the data ({list(mods)})")
                for c in mods[m].obs_names:
                    seen.setdefault(c, None)
            union = pd.Index(list(seen))
        for mc in self.config.modalities:
            m = mc.name
            if m not in mods:
                raise ValueError(f"MultiGEDI: modality {m!r} not found in the data ({list(mods)})")
            a = mods[m]
            if self.sample_key not in a.obs.columns:
                raise ValueError(
                    f"MultiGEDI: modality {m!r} has no obs column {self.sample_key!r} (sample labels); "
                    f"columns are {list(a.obs.columns)}"
                )
            lab = a.obs[self.sample_key]
            if lab.isna().any():
                first = a.obs_names[np.flatnonzero(lab.isna().to_numpy())[0]]
                raise ValueError(
                    f"MultiGEDI: modality {m!r} cell {first!r} has no sample label in obs"
                    f"[{self.sample_key!r}]; fill or drop such cells"
                )
            labels[m] = lab.astype(str).to_numpy()
            n_features[m] = a.n_vars
            self._feature_names[m] = a.var_names.to_numpy()
            if mc.obs_type == "M_list":
                for lay in mc.layers:
                    if lay is not None and lay not in a.layers:
                        raise ValueError(
                            f"MultiGEDI: modality {m!r} has no layer {lay!r} (layers: {list(a.layers)}); "
                            "None stands for .X"
                        )
                mats[m] = {lay: (a.X if lay is None else a.layers[lay]) for lay in mc.layers}
            else:
                X = a.X if mc.layer is None else a.layers[mc.layer]
                if mc.obs_type == "X" and sparse.issparse(X):
                    X = X.toarray()
                mats[m] = {mc.layer: X}
            if check_counts and mc.obs_type in ("M", "M_list"):
                for lay, M in mats[m].items():
                    _check_counts(M, m, lay, a.obs_names, a.var_names)
            ids = union.get_indexer(a.obs_names)
            cells[m] = ids
            self._row_index[m] = ids
        self.plan_ = make_plan(labels, n_features, cells_by_mod=cells)
        self._union = union
        return InMemoryReader(mats, labels)

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        data,
        max_iterations: int = 30,
        *,
        client=None,
        init_state: dict | None = None,
        tol: float | None = None,
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume_from_checkpoint: bool = False,
        progress: Any = None,
        callback=None,
        threads: int | None = None,
    ) -> MultiGEDI:
        """Fit the model.

        Parameters
        ----------
        data
            An atlas store path (or :class:`atlasfit.io.Atlas`): shards load on the Dask workers
            (the active client, or an embedded LocalCluster). Or in-memory MuData / AnnData / dict
            of AnnData: fitted in this process unless ``client`` is given.
        max_iterations
            Block-coordinate-descent iterations (spec §2, §3.2).
        client
            A ``distributed.Client`` to run on; default: the active one or an embedded cluster for
            stores, in-process for in-memory data.
        init_state
            Flat dict of starting parameters (keys as :meth:`export_state`); priors and
            hyperparameters not given are computed from the data (spec §5.1–5.2).
        tol
            Stop early when every modality's dZ and relative σ² change fall below ``tol``
            (``None``: run all iterations, as the reference).
        checkpoint_every
            Write a checkpoint every this many iterations (shared state on the driver, every
            sample's local state by its owning worker). Default: only for store fits with a Dask
            client, every 10 iterations (and at the start and the end). ``0``: none (no fault
            tolerance, no checkpoint I/O).
        checkpoint_dir
            Where checkpoints go (default: ``<store>.checkpoints/multigedi-<digest of the fit's
            fingerprint>`` beside the store, one directory per fit;
            not inside it, because anndata/mudata read or warn about every top-level entry of a
            store). Per-sample zarr arrays written by the owning workers, plus the driver's state.
        resume_from_checkpoint
            Continue a killed fit from its last checkpoint instead of starting over. The checkpoint
            must be of this fit (same modalities, K, mode, dtype, data and seed: :meth:`fingerprint`);
            another fit's is refused before any work, naming what differs. A checkpoint directory is
            locked while a fit uses it: a second fit on it fails with ``CheckpointLockedError``.
        progress
            ``None``: a progress bar on a terminal and a log line otherwise; ``False``: silent.
        callback
            ``callback(iteration, shared)`` after every iteration (``shared``: the driver's small
            state); a truthy return stops the fit.
        threads
            In-process fits (in-memory data without ``client``): the per-sample work of every round
            runs on this many threads of this process (``None``: the environment variable
            ``ATLASFIT_THREADS`` when set, else one per core); ``1`` runs the samples one after the
            other (:class:`~atlasfit.engine.SerialEngine`, for debugging). The same bits for any
            value. Ignored on a Dask client.
        """
        from ...io import Atlas

        max_iterations = check_count(max_iterations, "max_iterations", "MultiGEDI.fit")
        is_store = isinstance(data, (str, Path, Atlas))
        if is_store:
            reader = self._register_store(data).block_reader()  # small, picklable, no pandas on workers
        else:
            reader = self._register_memory(data)
        plan, config = self.plan_, self.config
        shards = plan_shards(plan.global_samples, [plan.n_cells[g] for g in plan.global_samples],
                             max_shards=self.max_shards)
        self._threads = threads  # read by _make_engine (its signature is shared with GEDI)
        engine = self._make_engine(shards, client, is_store)
        array_module = "cupy" if self._use_gpu(engine) else None
        # the checkpoint before any work on the data: a resume of another fit is refused, the
        # directory is locked (released by run_fit, or below when the setup fails)
        policy = checkpoint_policy(
            "MultiGEDI.fit", store_path=self._atlas.path if is_store else None, model="multigedi",
            distributed=is_distributed(engine), checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, resume=resume_from_checkpoint,
            fingerprint=self.fingerprint(self._atlas if is_store else None),
        )
        ck = policy.checkpoint
        try:
            engine.setup(sh.load_shard, reader, plan, config, array_module)
        except BaseException:
            policy.release()
            raise
        self._engine = engine
        self._state_cache = None
        if tol is not None:
            callback = partial(_converged, names=config.names, tol=float(tol), user=callback)
        shared = run_fit(
            engine, init=partial(initialize, plan=plan, config=config, init_state=init_state),
            step=partial(iterate, plan=plan, config=config, solve_Y_every=self.solve_Y_every), stop=int(max_iterations),
            policy=policy,
            dump_local=_dump_local, restore_local=_restore_local,
            progress=progress, callback=callback, desc="MultiGEDI",
            finish=partial(with_joint_svd, plan=plan, config=config),
        )
        self._svd = shared.pop("svd")  # the joint SVD: the fit's final phase (worker loss replays it)
        self.shared_ = shared
        self.checkpoint_info_ = ck.last_info if ck is not None else None
        self.n_iter_ = int(shared.get("iteration", max_iterations))
        self.singular_values_ = self._svd["d"]
        return self

    def fingerprint(self, store=None) -> dict:
        """What a checkpoint of this fit records, and a resume must match: the model, its settings, the
        registered data (``store``: the :class:`~atlasfit.io.Atlas`, or ``None`` in memory) and the seed."""
        from .._fingerprint import plain_config, plan_identity

        c = self.config
        config = {"K": int(c.K), "mode": c.mode, "dtype": np.dtype(c.dtype).name, "max_shards": self.max_shards,
                  "modalities": [plain_config(m) for m in c.modalities]}
        if self.solve_Y_every:
            config["solve_Y_every"] = self.solve_Y_every
        return {"model": type(self).__name__, "config": config,
                "data": plan_identity(self.plan_, store), "seed": int(c.seed)}

    def _make_engine(self, shards, client, is_store):
        # in process: the samples of a round on one thread per core (ThreadedEngine; same bits as serial)
        engine, self._gpu = make_engine(shards, client=client, store=is_store, device=self.device,
                                        who=type(self).__name__, name="multigedi",
                                        threads=getattr(self, "_threads", None))
        if is_store:  # a tiny task per worker: do they all see the driver's store? (HPC: node-local paths)
            preflight_store(engine, self._atlas.path, type(self).__name__)
        return engine

    def _use_gpu(self, engine) -> bool:
        return resolve_device(self.device, type(self).__name__, distributed=is_distributed(engine))

    # ------------------------------------------------------------------ outputs

    def _check_fitted(self):
        if self.shared_ is None:
            raise RuntimeError("MultiGEDI: call fit() first (or MultiGEDI.load a saved model)")

    @property
    def history_(self) -> pd.DataFrame:
        self._check_fitted()
        rows = []
        obj = np.asarray(self.shared_.get("tracking/objective", []))
        for m in self.config.names:
            s2 = np.asarray(self.shared_[f"{m}/tracking/sigma2"])
            dz = np.asarray(self.shared_[f"{m}/tracking/dZ"])
            for t in range(len(s2)):
                rows.append({"iteration": t + 1, "modality": m, "sigma2": float(s2[t]),
                             "dZ": float(dz[t]) if t < len(dz) else np.nan,
                             "objective": float(obj[t]) if t < len(obj) else np.nan})
        return pd.DataFrame(rows, columns=["iteration", "modality", "sigma2", "dZ", "objective"])

    def get_Z(self, modality: str) -> np.ndarray:
        """Metagenes Z of ``modality`` (J x K)."""
        self._check_fitted()
        return np.asarray(self.shared_[f"{modality}/Z"], dtype=np.float64)

    def get_D(self, modality: str) -> np.ndarray:
        """Per-factor scales D of ``modality`` (K)."""
        self._check_fitted()
        return np.asarray(self.shared_[f"{modality}/D"], dtype=np.float64)

    def get_o(self, modality: str) -> np.ndarray:
        """Global feature offsets o of ``modality`` (J)."""
        self._check_fitted()
        return np.asarray(self.shared_[f"{modality}/o"], dtype=np.float64)

    def get_sigma2(self, modality: str) -> float:
        """Residual variance σ² of ``modality``."""
        self._check_fitted()
        return float(self.shared_[f"{modality}/sigma2"])

    def feature_names(self, modality: str) -> np.ndarray:
        """Feature names of ``modality``."""
        return np.asarray(self._feature_names[modality])

    def export_state(self) -> dict:
        """The fitted state as a flat dict (keys ``<mod>/Z``, ``<mod>/D``, ``<mod>/o``,
        ``<mod>/sigma2``, ``<mod>/Q/<sample>``, ``<mod>/o_i/<sample>``, ``<mod>/s_i/<sample>``,
        ``B/<sample>``, ``X_multigedi_pca``, tracking and ``svd/*``).

        ``X_multigedi_pca`` rows follow the caller's cell order: the union of ``obs_names`` of an
        in-memory MuData (its root order), or for an atlas store the global cells in store order.
        This gathers per-sample state (B is cells x K) on the driver.
        """
        self._check_fitted()
        if self._state_cache is None:
            if self._engine is None:
                raise RuntimeError("MultiGEDI.export_state: the engine of this fit is closed")
            self._state_cache = export_state(self._engine, self.shared_, self.plan_, self.config,
                                             svd=self._svd)
        return dict(self._state_cache)

    def _pca(self) -> np.ndarray:
        """X_multigedi_pca (all cells, caller's order); only the PCA rows travel when nothing is cached."""
        self._check_fitted()
        if self._state_cache is not None:
            return self._state_cache["X_multigedi_pca"]
        if self._engine is None:
            raise RuntimeError("MultiGEDI.embedding: the engine of this fit is closed")
        pca = np.zeros((self.plan_.n_total, self.config.K))
        for part in self._engine.map(sh.pca_rows, self._svd["T"]):
            for g, rows in part:
                pca[self.plan_.cells[g]] = rows
        return pca

    def embedding(self, modality: str | None = None) -> np.ndarray:
        """Joint PCA ``X_multigedi_pca`` (spec §7.1) for the cells of ``modality``.

        Rows follow that modality's cells: the AnnData's row order for in-memory data, the store's
        row order for a store (use :func:`atlasfit.io.to_source_order` for the source's order).
        With ``modality=None``: all cells (see :meth:`export_state`).
        """
        pca = self._pca()
        if modality is None:
            return pca
        if modality not in self.config.names:
            raise KeyError(f"MultiGEDI.embedding: unknown modality {modality!r} ({self.config.names})")
        if modality in self._row_index:
            return pca[self._row_index[modality]]
        rows = np.concatenate([self.plan_.cells[g] for g in self.plan_.mod_samples[modality]])
        return pca[rows]

    def projection(self, modality: str, which: str = "db") -> np.ndarray:
        """Cells x K projection ``DB`` (``which="db"``) or cells x J ``ZDB`` (``"zdb"``) of
        ``modality`` (spec §7.2), rows as :meth:`embedding`."""
        st = self.export_state()
        D = st[f"{modality}/D"]
        blocks = []
        for g in self.plan_.mod_samples[modality]:
            DB = D[:, None] * st[f"B/{g}"]
            blocks.append((st[f"{modality}/Z"] @ DB).T if which == "zdb" else DB.T)
        if which not in ("db", "zdb"):
            raise ValueError(f"projection: which must be 'db' or 'zdb', got {which!r}")
        return self._to_rows(modality, np.concatenate(blocks, axis=0))

    def impute(self, modality: str) -> np.ndarray:
        """Model prediction Ŷ_i = (Z + Q_i) D B_i + (o + o_i)1ᵀ + 1 s_iᵀ (spec §7.3; the
        reference's ``tl.impute`` formula is wrong), cells x J, on the latent (log / logit) scale."""
        st = self.export_state()
        Z, D, o = st[f"{modality}/Z"], st[f"{modality}/D"], st[f"{modality}/o"]
        blocks = []
        for g in self.plan_.mod_samples[modality]:
            W = (Z + st[f"{modality}/Q/{g}"]) * D[None, :]
            Yhat = W @ st[f"B/{g}"] + (o + st[f"{modality}/o_i/{g}"])[:, None] + st[f"{modality}/s_i/{g}"][None, :]
            blocks.append(Yhat.T)
        return self._to_rows(modality, np.concatenate(blocks, axis=0))

    def variance(self, modality: str) -> np.ndarray:
        """Per-feature variance of the imputed values (J), from per-sample statistics
        (:meth:`feature_stats`; no cells gathered)."""
        return self.feature_stats(modality)["variance"].to_numpy()

    def _to_rows(self, modality, grouped):
        """Sample-grouped rows -> the modality's row order (in-memory) / store order (store)."""
        if modality not in self._row_index:
            return grouped
        grouped_ids = np.concatenate([self.plan_.cells[g] for g in self.plan_.mod_samples[modality]])
        pos = pd.Index(grouped_ids).get_indexer(self._row_index[modality])
        return grouped[pos]

    def to_xarray(self):
        """Shared parameters as a labelled :class:`xarray.Dataset` (dims ``feature_<mod>``,
        ``factor``, ``sample``, ``iteration``)."""
        import xarray as xr

        self._check_fitted()
        K = self.config.K
        data_vars, coords = {}, {"factor": np.arange(K)}
        for m in self.config.names:
            fdim = f"feature_{m}"
            coords[fdim] = self.feature_names(m).astype(str)
            data_vars[f"{m}_Z"] = ((fdim, "factor"), self.get_Z(m))
            data_vars[f"{m}_D"] = (("factor",), self.get_D(m))
            data_vars[f"{m}_o"] = ((fdim,), self.get_o(m))
            data_vars[f"{m}_sigma2"] = ((), self.get_sigma2(m))
            s2 = np.asarray(self.shared_[f"{m}/tracking/sigma2"], dtype=np.float64)
            data_vars[f"{m}_tracking_sigma2"] = (("iteration",), s2)
            data_vars[f"{m}_tracking_dZ"] = (("iteration",), np.asarray(self.shared_[f"{m}/tracking/dZ"],
                                                                         dtype=np.float64))
        coords["iteration"] = np.arange(1, len(s2) + 1)
        data_vars["svd_d"] = (("factor",), np.asarray(self.singular_values_, dtype=np.float64))
        ds = xr.Dataset(data_vars, coords=coords)
        ds.attrs["atlasfit_model"] = "MultiGEDI"
        ds.attrs["config"] = json.dumps(self._config_dict())
        return ds

    def _config_dict(self) -> dict:
        return {
            "K": self.config.K, "mode": self.config.mode, "seed": self.config.seed,
            "dtype": np.dtype(self.config.dtype).name, "sample_key": self.sample_key,
            "modalities": {
                mc.name: {"obs_type": mc.obs_type, "orthoZ": mc.orthoZ, "adjustD": mc.adjustD,
                          "is_si_fixed": mc.is_si_fixed, "layer": mc.layer,
                          "layers": list(mc.layers) if mc.layers else None}
                for mc in self.config.modalities
            },
            "n_iter": int(getattr(self, "n_iter_", 0)),
        }

    # ------------------------------------------------------------------ store / persistence

    def write(self, store=None, key: str = "multigedi") -> None:
        """Write results into the atlas store the model was fitted on (never rewriting X).

        Per modality: ``obsm["X_{key}_pca"]`` (rows aligned with the store's rows; written from the
        workers, per-sample, then rechunked to the zarr chunks), ``varm["{key}_Z"]``; and the model
        as an xarray Dataset under ``uns/atlasfit_models/{key}``.
        """
        import dask.array as da

        from ...io import open_atlas, write_results
        from ...io._txn import staging
        from ..multigedi._outputs import store_pca

        self._check_fitted()
        if store is None:
            if self._atlas is None:
                raise ValueError("MultiGEDI.write: give the store path (the model was fitted in memory)")
            atlas = self._atlas
        else:
            atlas = open_atlas(store)
        if self._atlas is None or Path(atlas.path).resolve() != Path(self._atlas.path).resolve():
            raise ValueError(
                f"MultiGEDI.write: the model was not fitted on {str(atlas.path)!r}; results must go to "
                "the store the model was fitted on (rows must match)"
            )
        # all or nothing (docs/store.md, "Results"): the workers' per-sample rows go to this write's
        # staging area inside the store; the previous results under `key` are replaced as a whole
        with staging(atlas.path, what=f"write the MultiGEDI results '{key}' into it") as st:
            tmp = st.path / "pca"
            tmp.mkdir()
            store_pca(self._engine, self.shared_, self.plan_, self.config, svd=self._svd)
            self._engine.map(_write_pca_rows, str(tmp))
            obsm = {}
            for m in self.config.names:
                parts = [da.from_zarr(str(tmp / _safe(g))) for g in self.plan_.mod_samples[m]]
                obsm[m] = {f"X_{key}_pca": da.concatenate(parts, axis=0)}
            varm = {m: {f"{key}_Z": self.get_Z(m)} for m in self.config.names}
            legacy = [f"mod/{m}/{w}" for m in atlas.modalities for w in (f"obsm/X_{key}_pca", f"varm/{key}_Z")]
            write_results(atlas, obsm=obsm, varm=varm, groups={key: self.to_xarray()}, model=key,
                          replaces=legacy, staging=st)

    def save(self, path: str | Path) -> None:
        """Save the fitted model (config + :meth:`export_state`) to a Zarr group at ``path``."""
        import zarr

        state = self.export_state()
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
        root.attrs["atlasfit_model"] = "MultiGEDI"
        root.attrs["config"] = json.dumps(self._config_dict())
        root.attrs["plan"] = json.dumps({
            "modalities": list(self.plan_.modalities),
            "global_samples": list(self.plan_.global_samples),
            "mod_samples": {m: list(v) for m, v in self.plan_.mod_samples.items()},
            "n_cells": {g: int(n) for g, n in self.plan_.n_cells.items()},
            "n_features": {m: int(n) for m, n in self.plan_.n_features.items()},
        })
        root.attrs["feature_names"] = json.dumps({m: [str(x) for x in v]
                                                  for m, v in self._feature_names.items()})
        keys = {}
        for i, (k, v) in enumerate(state.items()):
            name = f"a{i}"
            arr = np.asarray(v)
            root.create_array(name, data=arr) if arr.ndim else root.create_array(name, data=arr.reshape(1))
            keys[name] = [k, arr.ndim == 0]
        root.attrs["keys"] = json.dumps(keys)

    @classmethod
    def load(cls, path: str | Path) -> MultiGEDI:
        """Load a model saved with :meth:`save` (its parameters, state and embedding)."""
        import zarr

        root = zarr.open_group(str(path), mode="r")
        if root.attrs.get("atlasfit_model") != "MultiGEDI":
            raise ValueError(f"MultiGEDI.load: {str(path)!r} is not a saved MultiGEDI model")
        cfg = json.loads(root.attrs["config"])
        mods = {}
        for m, c in cfg["modalities"].items():
            c = {k: v for k, v in c.items() if v is not None}
            mods[m] = c
        model = cls(mods, sample_key=cfg["sample_key"], K=cfg["K"], mode=cfg["mode"], seed=cfg["seed"],
                    dtype=cfg["dtype"])
        state = {}
        for name, (k, scalar) in json.loads(root.attrs["keys"]).items():
            arr = np.asarray(root[name][...])
            state[k] = arr[0] if scalar else arr
        p = json.loads(root.attrs["plan"])
        labels = {m: np.repeat(p["mod_samples"][m], [p["n_cells"][g] for g in p["mod_samples"][m]])
                  for m in p["modalities"]}
        model.plan_ = make_plan(labels, p["n_features"])
        model._feature_names = {m: np.asarray(v) for m, v in json.loads(root.attrs["feature_names"]).items()}
        model._state_cache = state
        shared = {}
        for m in model.config.names:
            for k in ("Z", "U", "S", "D", "o", "sigma2"):
                shared[f"{m}/{k}"] = state[f"{m}/{k}"]
            shared[f"{m}/tracking/sigma2"] = state[f"tracking/{m}/sigma2"]
            shared[f"{m}/tracking/dZ"] = state[f"tracking/{m}/dZ"]
        shared["tracking/objective"] = state["tracking/objective"]
        model.shared_ = shared
        model.n_iter_ = int(cfg.get("n_iter", 0))
        model.singular_values_ = state["svd/d"]
        return model

    def close(self) -> None:
        """Release the shard state held by the engine (workers' memory)."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _converged(it: int, shared: dict, *, names, tol: float, user=None) -> bool:
    """Early-stop rule: every modality's dZ and relative σ² change below ``tol``."""
    if user is not None and user(it, shared):
        return True
    for m in names:
        dz = np.asarray(shared[f"{m}/tracking/dZ"])
        s2 = np.asarray(shared[f"{m}/tracking/sigma2"])
        if len(s2) < 2 or not np.isfinite(dz[-1]) or dz[-1] > tol:
            return False
        if abs(s2[-1] - s2[-2]) > tol * max(abs(s2[-2]), 1e-300):
            return False
    return True
