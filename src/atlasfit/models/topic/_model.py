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

from ...engine import checkpoint_policy, is_distributed, make_engine, plan_shards, run_fit
from ._config import COUNT_LIKELIHOODS, LIKELIHOODS, TopicModelConfig
from ._loss import softmax
from ._data import (
    _as_list,
    _check_modality_values,
    _default_likelihood,
    _dense_rows,
    _is_binary,
    _register,
    _Registered,
    split_indices,
    training_layout,
)
from ._fit import FitPlan, check_options, epoch_step, fit_from_shared, init_shared
from ._optim import AdamWState
from ._params import softplus
from ._shard import OMEGA_KEYS, dump_local, load_shard, restore_local, split_positions, train_positions
from ._spatial import check_adjacency, neighbourhood, normalized_adjacency, sgc_features
from ._summaries import (
    EVAL_BLOCK,
    elbo_block,
    elbo_draws,
    loglik,
    plugin_draws,
    reduce_scores,
    rho,
    score_rows,
    shard_validation,
    token_phis,
)
from ._train import TopicFit, guide_eval, topic_feature_dist

_FORMAT = "atlasfit.MultimodalAmortizedLDA/1"


class _EvalSet:
    """Cells to evaluate: full matrices ``X`` with the selected rows ``idx`` (None: all), and per
    selected cell its Omega row, name, batch code and continuous covariates; the full spatial graphs
    (SGC inputs and GCN neighbourhoods are computed over all cells of ``X``); ``groups``:
    ``[(sample position, positions of its selected cells)]`` (Monte-Carlo keys and sums per sample)."""

    def __init__(self, X, idx, omega, names, batch, cont, graphs, groups):
        self.X, self.idx, self.omega, self.names = X, idx, omega, pd.Index(names)
        self.batch, self.cont, self.graphs = batch, cont, graphs or {}
        self.groups = groups
        self.sgc = None
        self.adj_hat = None

    @property
    def n(self) -> int:
        return len(self.names)


def _groups(reg: _Registered, sel) -> list:
    lab = reg.samples[sel]
    index = {s: i for i, s in enumerate(reg.sample_names())}
    out = []
    for s in dict.fromkeys(lab.tolist()):
        out.append((index[s], np.flatnonzero(lab == s)))
    return sorted(out, key=lambda t: t[0])


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
        self._local: dict = {}  # {sample: {omega, omega_m, omega_v, omega_t}} of the training cells (cell weights)
        self._omega_cache = None
        self._split_cache = None
        self._saved_split = None  # (train, validation) of a loaded model without data
        self._history: list[dict] = []
        self.n_epochs_ = 0
        self.stopped_early_ = False
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
        steps_per_round: int = 8,
        device: str = "cpu",
        decoder_init: str = "kmeans",
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume_from_checkpoint: bool = False,
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
            As in :func:`~atlasfit.models.topic.train_serial` (``steps_per_round > 1``, default 8: local
            steps with periodic averaging, one engine round per that many steps, the same bits in
            process and on any number of workers; ``1``: synchronous steps; ``theta_bar_sync="lagged"``: one
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
        checkpoint_every, checkpoint_dir, resume_from_checkpoint
            Fault tolerance (:func:`atlasfit.engine.checkpoint_policy`): a store fit on a Dask cluster
            checkpoints every ``checkpoint_every`` epochs (default 10; ``0``: never) into
            ``checkpoint_dir`` (default ``<store>.checkpoints/topic`` beside the store); the
            parameters, AdamW moments and step, BatchNorm statistics, the lagged :math:`\bar\theta`,
            the history and each sample's :math:`\\Omega` rows. A lost worker rolls back to the last
            checkpoint and replays (the same bits); ``resume_from_checkpoint=True`` continues an
            interrupted fit (a new model on the same data, the same ``train`` arguments) up to
            ``max_epochs`` epochs in all.

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
        cfg, reg = self.config, self._data
        if monitor not in ("val_loss", "val_ll_per_token"):
            raise ValueError(f"monitor {monitor!r}: use 'val_loss' or 'val_ll_per_token'")
        check_options(input_median=input_median, bernoulli_depth=bernoulli_depth, omega_update=omega_update,
                      decoder_init=decoder_init, theta_bar_sync=theta_bar_sync, steps_per_round=steps_per_round,
                      batch_size=batch_size)
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        settings = {"validation_fraction": float(validation_fraction), "seed": int(seed),
                    "input_median": input_median, "bernoulli_depth": bernoulli_depth}
        first_call = self._fit is None
        if not first_call:
            for k, v in settings.items():
                if self._train_settings.get(k) != v:
                    raise ValueError(f"train() continues the previous fit, which used {k}={self._train_settings.get(k)!r}; "
                                     f"got {k}={v!r} (start a new model to change it)")
        layout, names, sizes, locate, reader = training_layout(reg, dict(zip(cfg.modalities, cfg.likelihoods)),
                                                               validation_fraction, seed)
        N = int(sum(sizes))
        if N < 2:
            raise ValueError(f"validation_fraction={validation_fraction} leaves {N} training cells; "
                             "lower it (training needs at least 2 cells)")
        n_val = reg.n_obs - N
        if early_stopping and n_val == 0:
            raise ValueError("early_stopping needs validation cells: set validation_fraction > 0")
        self._train_settings = settings
        if max_epochs is None:
            max_epochs = max(1, min(int(round(2e7 / reg.n_obs)), 1000))
        shards = plan_shards(names, sizes, max_shards=max_shards)
        who = type(self).__name__
        engine, gpu = make_engine(shards, client=client, store=reg.is_store, device=device, who=who, name="topic")
        self.device_ = "gpu" if gpu else "cpu"
        start = self.n_epochs_
        kw = dict(kl_kwargs or {})
        kw.setdefault("max_epochs", start + max_epochs)
        plan = FitPlan(cfg, self.dtype, N, sizes, batch_size, seed, {"lr": lr, "betas": betas, "eps": eps,
                       "weight_decay": weight_decay}, kl_schedule, kw, input_median, bernoulli_depth,
                       int(steps_per_round), theta_bar_sync, omega_update, decoder_init)
        policy = checkpoint_policy(f"{who}.train", store_path=reg.source if reg.is_store else None, model="topic",
                                   distributed=is_distributed(engine), checkpoint_dir=checkpoint_dir,
                                   checkpoint_every=checkpoint_every, resume=resume_from_checkpoint)
        sign = 1.0 if monitor == "val_loss" else -1.0
        fresh_es = {"best": math.inf, "best_epoch": -1, "waited": 0, "stop": False}

        def init(e):
            if first_call:
                shared = init_shared(e, plan, locate=locate)
            else:
                shared = self._shared_state(plan)
                if self._local:
                    e.map(restore_local, self._local)
            shared["es"] = dict(fresh_es)
            return shared

        def step(e, shared, it):
            if shared.get("fingerprint") != plan.fingerprint():
                raise ValueError(f"{who}.train: the checkpoint was written by a fit with another configuration, data "
                                 "or train() settings; resume with the same model and arguments, or start without "
                                 "resume_from_checkpoint")
            shared = epoch_step(e, shared, it, plan)
            hist = shared["history"]
            if n_val:
                fit = fit_from_shared(cfg, shared, N)
                fit.optimizer = None
                for k, v in self._validate(e, fit, seed, n_eval_samples).items():
                    hist.setdefault(k, []).append(v)
                es = dict(shared["es"])
                score = sign * hist[monitor][-1]
                if score < es["best"] - min_delta:
                    es.update(best=score, best_epoch=int(it), waited=0)
                else:
                    es["waited"] += 1
                es["stop"] = bool(early_stopping and es["waited"] >= patience)
                shared["es"] = es
            return shared

        def each_epoch(it, shared):
            stop = bool(callback(it - 1, self._records(shared, N)[-1])) if callback is not None else False
            return stop or shared["es"]["stop"]

        engine.setup(load_shard, reader, layout, cfg, self.dtype, "cupy" if gpu else None)
        try:
            cell = cfg.weight_mode == "cell"
            shared = run_fit(engine, init=init, step=step, start=start, stop=start + int(max_epochs), policy=policy,
                             dump_local=dump_local if cell else None, restore_local=restore_local if cell else None,
                             progress=progress, callback=each_epoch, desc=who)
            self._fit = fit_from_shared(cfg, shared, N)
            self._opt = self._fit.optimizer
            self._theta_prev = shared["theta_prev"]
            self._history = self._records(shared, N)
            self.n_epochs_ = len(shared["history"]["epoch"])
            es = shared["es"]
            self.stopped_early_ = bool(es["stop"])
            if n_val:
                self.best_epoch_ = None if es["best_epoch"] < 0 else int(es["best_epoch"])
            local = {}
            for part in engine.map(dump_local):
                local.update(part)
            self._local = local
            self._omega_cache = None
            self.checkpoint_info_ = policy.checkpoint.last_info if policy.checkpoint is not None else None
        finally:
            engine.close()
        return self

    def _validate(self, engine, fit: TopicFit, seed: int, n_eval_samples: int) -> dict:
        """``val_loss`` and the per-token scores of the validation cells: an engine round over the shards'
        validation rows (spatial encoders: on the driver, which holds the in-memory graph)."""
        if self.config.spatial_mode is None:
            parts = [item for res in engine.map(shard_validation, fit, seed, n_eval_samples) for item in res]
        else:
            saved, self._fit = self._fit, fit
            try:
                parts = self._score(self._resolve(cells=self.validation_indices_), seed, n_eval_samples)
            finally:
                self._fit = saved
        _, gmean = elbo_draws(fit, n_eval_samples, seed)
        return reduce_scores(parts, fit, gmean, token_phis(fit))

    def _score(self, ev, seed: int, n_samples: int) -> list:
        """Driver-side :func:`~atlasfit.models.topic._summaries.score_rows` per sample of ``ev``."""
        fit = self._fit
        draws, _ = elbo_draws(fit, n_samples, seed)
        phis = token_phis(fit)
        tdraws = plugin_draws(fit) if self.config.batch_offsets else None
        out = []
        for idx, pos in ev.groups:
            blocks = (((idx, int(np.searchsorted(pos, p[0]))), x, om, extra) for p, x, om, extra in
                      self._blocks(ev, EVAL_BLOCK, positions=pos))
            out.append((idx, score_rows(fit, blocks, draws, seed, phis, tdraws)))
        return out

    def _records(self, shared: dict, N: int) -> list:
        h = shared["history"]
        out = []
        for i in range(len(h["epoch"])):
            rec = {"epoch": h["epoch"][i], "beta": h["beta"][i], "train_loss": h["loss"][i],
                   "train_loss_per_cell": h["loss"][i] / N}
            for k, v in h.items():
                if k.startswith("val_") and i < len(v):
                    rec[k] = v[i]
            out.append(rec)
        return out

    def _shared_state(self, plan: FitPlan) -> dict:
        """The driver state of the fit so far (continued training)."""
        fit, opt = self._fit, self._opt
        h = {"epoch": [], "beta": [], "loss": []}
        for rec in self._history:
            h["epoch"].append(rec["epoch"])
            h["beta"].append(rec["beta"])
            h["loss"].append(rec["train_loss"])
            for k, v in rec.items():
                if k.startswith("val_"):
                    h.setdefault(k, []).append(v)
        return {"params": dict(fit.params), "opt_m": dict(opt.m), "opt_v": dict(opt.v), "opt_step": int(opt.step),
                "bn": dict(fit.bn_state), "buffers": dict(fit.buffers), "lib_median": dict(fit.lib_median),
                "bern_depth": dict(fit.bern_depth), "theta_prev": self._theta_prev, "history": h,
                "fingerprint": plan.fingerprint()}

    @property
    def train_indices_(self) -> np.ndarray | None:
        """Row positions of the training cells in the registered data (sorted; None before training)."""
        return None if not self._train_settings else self._split_arrays()[0]

    @property
    def validation_indices_(self) -> np.ndarray | None:
        """Row positions of the validation cells in the registered data (sorted; None before training)."""
        return None if not self._train_settings else self._split_arrays()[1]

    def _split_arrays(self):
        key = (self._train_settings["validation_fraction"], self._train_settings["seed"])
        if self._split_cache is None or self._split_cache[0] != key:
            arrays = split_indices(self._data, *key) if self._data is not None else self._saved_split
            self._split_cache = (key, arrays)
        return self._split_cache[1]

    @property
    def _omega(self):
        """``(omega, omega_m, omega_v, omega_t)`` over every registered cell (``weight_mode="cell"``;
        validation cells keep the start value 1), assembled from the samples' local state."""
        if not self._local:
            return None
        if self._omega_cache is None:
            n, M = self._data.n_obs, self.config.n_modalities
            out = (np.ones((n, M), dtype=self.dtype), np.zeros((n, M), dtype=self.dtype),
                   np.zeros((n, M), dtype=self.dtype), np.zeros(n, dtype=np.int64))
            counts = self._data.sample_counts()
            names = list(counts)
            rows = self._data.sample_rows()
            fr, seed = self._train_settings["validation_fraction"], self._train_settings["seed"]
            for s, d in self._local.items():
                i = names.index(s)
                tr = rows[s][train_positions(counts[s], split_positions(counts[s], fr, seed, i))]
                for a, k in zip(out, OMEGA_KEYS):
                    a[tr] = d[k]
            self._omega_cache = out
        return self._omega_cache

    def _local_from_rows(self, arrays) -> dict | None:
        """Per-sample local state from ``(omega, omega_m, omega_v, omega_t)`` over every registered cell."""
        if self._data is None:
            return None
        counts, rows = self._data.sample_counts(), self._data.sample_rows()
        fr, seed = self._train_settings["validation_fraction"], self._train_settings["seed"]
        out = {}
        for i, s in enumerate(counts):
            tr = rows[s][train_positions(counts[s], split_positions(counts[s], fr, seed, i))]
            if tr.size:
                out[s] = {k: np.array(a[tr]) for k, a in zip(OMEGA_KEYS, arrays)}
        return out

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
            _groups(reg, sel),
        )

    def _blocks(self, ev: _EvalSet, size: int, positions=None):
        """Yield ``(positions, x, Omega rows, forward extras)`` for consecutive blocks of ``size`` cells
        (of ``positions`` in ``ev``, default all):
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
        positions = np.arange(ev.n) if positions is None else np.asarray(positions)
        for lo in range(0, positions.size, size):
            pos = positions[lo:lo + size]
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
        return rho(self._fit, m, theta, draws, batch, phi)

    def _loglik(self, x: dict, theta, draws, batch) -> dict:
        return loglik(self._fit, x, theta, draws, batch)

    def _plugin_draws(self) -> dict:
        return plugin_draws(self._fit)

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
        """ELBO per evaluated cell: per-sample sums over blocks of :data:`EVAL_BLOCK` cells (noise keyed by
        (sample, block), so a row's noise does not depend on memory settings or on the other samples),
        summed in sample order (the per-epoch ``val_loss`` of the shards gives the same value)."""
        if ev.n == 0:
            raise ValueError("no cells to evaluate")
        fit = self._fit
        draws, gmean = elbo_draws(fit, n_samples, seed)
        acc = 0.0
        for idx, pos in ev.groups:
            a = 0.0
            for p, x, om, extra in self._blocks(ev, EVAL_BLOCK, positions=pos):
                a += elbo_block(fit, x, om, extra, draws, seed, (idx, int(np.searchsorted(pos, p[0]))))
            acc += a
        return acc / ev.n - gmean / fit.n_cells

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
