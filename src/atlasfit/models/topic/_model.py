"""User-facing :class:`MultimodalAmortizedLDA` (scverse style): the facade over the topic-model modules.

Split as scvi-tools splits model / module / training plan:

* ``_data.py``: registration (AnnData / MuData / dict / atlas store; a store registers metadata only)
  and the training layout (seeded per-sample validation split, the shards' block reader);
* ``_shard.py``: the shard loader (each shard reads its own samples) and the non-step shard functions;
* ``_fit.py``: the one training loop (``init_shared`` + ``epoch_step`` on :func:`atlasfit.engine.run_fit`);
* ``_train.py`` / ``_loss.py`` / ``_nn.py``: the per-step shard functions and the maths;
* ``_evaluate.py`` / ``_summaries.py``: cells to evaluate, the ``get_*`` posterior summaries, the
  per-epoch validation scores (an engine round);
* ``_io.py``: save / load and results written into an atlas store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ...engine import check_count, checkpoint_policy, is_distributed, make_engine, plan_shards, run_fit
from ...engine._preflight import preflight_store
from ._config import TopicModelConfig
from ._data import _as_list, _Registered, register_config, training_layout
from ._evaluate import _EvalMixin
from ._fit import (
    FitPlan,
    _TrainingMixin,
    check_options,
    epoch_step,
    fit_from_shared,
    init_shared,
    resolve_max_shards,
    resolve_steps_per_round,
)
from ._getters import _GettersMixin
from ._io import _PersistenceMixin
from ._optim import AdamWState
from ._reference import model_kwargs, train_kwargs
from ._shard import dump_local, load_shard, restore_local
from ._summaries import _SummariesMixin
from ._train import TopicFit


#: The model's default floating type: float32, as scvi-tools and topomics train. Measured on the planted
#: RNA 2k + peaks 5k atlas (20k cells, batch 1024, one process, this project's 2-core machine): about
#: 1.8x the float64 throughput (docs/topic_model.md); the finite-difference and sparse-vs-dense tests
#: run in float64.
DEFAULT_DTYPE = "float32"


class MultimodalAmortizedLDA(_TrainingMixin, _EvalMixin, _SummariesMixin, _GettersMixin, _PersistenceMixin):
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
        ``"float32"`` (default, as scvi-tools and topomics train) or ``"float64"`` for parameters and
        minibatches. Measured on the planted RNA + peaks atlas (20k cells, batch 1024, one process):
        float32 trains about 1.8x faster than float64; held-out likelihoods agree (docs/topic_model.md).

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

    def __init__(self, config: TopicModelConfig, data: _Registered | None = None, *, dtype: str | None = None):
        self.config = config
        self.dtype = np.dtype(DEFAULT_DTYPE if dtype is None else dtype).type
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
        self._engine = None  # the shards kept after train() for the summaries (close() releases them)
        self._cell_map_cache = None
        self.best_epoch_: int | None = None
        self.kl_weight_ = 1.0  # the KL weight the warm-up reaches (topomics' kl_weight, §1.9; train's default)

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
        dtype: str | None = None,
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
            ``"float32"`` (default, :data:`DEFAULT_DTYPE`) or ``"float64"``.
        **cfg
            Any other :class:`~atlasfit.models.topic.TopicModelConfig` field (``n_hidden``,
            ``weight_mode``, ``likelihood_weight_mode``, ``learnable_dispersion``, ...), or a keyword of
            the reference (topomics): ``dispersion_rna`` (= ``dispersion``), ``aggregation_type``
            (= ``aggregation``), ``categorical_covariate_keys`` (one key = ``batch_key``),
            ``modality_order`` (= ``modalities``), ``layer_dict`` (= ``layers``), ``kl_weight`` (the
            KL weight the warm-up reaches, :attr:`kl_weight_`; unlike the reference, whose training
            ignores it (§3.4), :meth:`train` uses it unless ``kl_kwargs`` sets ``kl_weight``) and
            ``encoder_scale_factor`` (unused by the reference; ignored with a warning).

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
        modalities, layers, batch_key, kl_weight = model_kwargs(f"{cls.__name__}.from_data", modalities, layers,
                                                                batch_key, cfg)
        reg, config = register_config(data, modalities, likelihoods, sample_key, n_topics, layers, spatial_key,
                                      batch_key, continuous_covariate_keys, cfg)
        names = list(config.modalities)
        model = cls(config, reg, dtype=dtype)
        model.kl_weight_ = kl_weight
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
        """Build the model from a MuData (cells aligned across ``mdata.mod``) or an atlas store (a MuData
        layout on disk: path or :class:`atlasfit.io.Atlas`, read by the shards); see :meth:`from_data`.

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

        from ...io import Atlas

        if not isinstance(mdata, (md.MuData, str, Path, Atlas)):
            raise TypeError(f"from_mudata needs a MuData or an atlas store path, got {type(mdata).__name__}; use "
                            "from_data for AnnData or dict inputs")
        return cls.from_data(mdata, modalities, likelihoods, sample_key, n_topics, **kwargs)

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
        max_shards: int | str = "auto",
        theta_bar_sync: str = "exact",
        steps_per_round: int | str = "auto",
        device: str = "cpu",
        decoder_init: str = "kmeans",
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        resume_from_checkpoint: bool = False,
        train_size: float | None = None,
        early_stopping_monitor: str | None = None,
        early_stopping_patience: int | None = None,
        accelerator: str | None = None,
        plan_kwargs: dict | None = None,
        check_val_every_n_epoch: int | None = None,
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
            ``0``: initialise only (data statistics and the k-means start, no step).
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
            :class:`~atlasfit.engine.DaskEngine` (the same bits on any number of workers: reductions in
            shard order). ``None`` (default): a store trains on the active client or an embedded
            LocalCluster (its samples are read by the workers, as MultiGEDI's), in-memory data in this
            process; ``False``: in this process for any data.
        seed
            Keys initialisation, the split, minibatches and noise.
        progress
            Show a tqdm bar over epochs.
        callback
            ``callback(epoch, record)`` after each epoch (``record``: that epoch's ``history_`` row as a
            dict); returning True stops training.
        kl_schedule, kl_kwargs
            :func:`~atlasfit.models.topic.kl_weight_schedule` preset and arguments.
        max_shards
            At most this many shards (groups of whole samples; each lives on one worker). ``"auto"``
            (default): ``max(2, batch_size // 512)``, so that each shard's part of a step has about 512
            cells or more (per-shard fixed costs, :data:`~atlasfit.models.topic._fit.CELLS_PER_SHARD_STEP`);
            with batch 1,024 that is 2 shards, enough for 2 workers: give a larger ``batch_size`` or
            ``max_shards`` to use more workers. It depends on the batch size, never on the workers.
        omega_update, input_median, bernoulli_depth, theta_bar_sync, steps_per_round
            As in :func:`~atlasfit.models.topic.train_serial`. ``steps_per_round="auto"`` (default):
            synchronous steps in process (no client: a round costs nothing there) and 64 local steps
            with periodic averaging per engine round on a Dask cluster (one round per 64 steps; the
            same bits on any number of workers, since shards are fixed by the data). An integer sets
            it everywhere (``1``: synchronous steps); ``theta_bar_sync="lagged"``: one round per step
            with the topic-variance regulariser on.
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
            ``checkpoint_dir`` (default ``<store>.checkpoints/topic-<digest>`` beside the store, one per fit); the
            parameters, AdamW moments and step, BatchNorm statistics, the lagged :math:`\bar\theta`,
            the history and each sample's :math:`\\Omega` rows. A lost worker rolls back to the last
            checkpoint and replays (the same bits); ``resume_from_checkpoint=True`` continues an
            interrupted fit (a new model on the same data, the same ``train`` arguments) up to
            ``max_epochs`` epochs in all; another fit's checkpoint (other model, settings, data or
            seed) is refused before any work, naming what differs, and a second fit on a directory
            in use fails with ``CheckpointLockedError``.

        train_size, early_stopping_monitor, early_stopping_patience, accelerator, plan_kwargs, check_val_every_n_epoch
            The reference's (topomics / scvi-tools) keywords: ``validation_fraction = 1 - train_size``;
            ``early_stopping_monitor="elbo_val"`` = ``monitor="val_loss"``; ``early_stopping_patience`` =
            ``patience``; ``accelerator`` = ``device``; ``plan_kwargs={"optim_kwargs": {"lr": ...},
            "n_epochs_kl_warmup": ..., "max_kl_weight": ...}`` = the AdamW arguments and ``kl_kwargs``;
            ``check_val_every_n_epoch`` is ignored with a warning (every epoch is validated).

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
        ref = (train_size, early_stopping_monitor, early_stopping_patience, accelerator, plan_kwargs,
               check_val_every_n_epoch)
        if any(v is not None for v in ref):
            names_ = ("validation_fraction", "monitor", "patience", "device", "lr", "weight_decay", "betas", "eps",
                      "kl_kwargs")
            o = train_kwargs(f"{type(self).__name__}.train",
                             dict(zip(names_, (validation_fraction, monitor, patience, device, lr, weight_decay, betas,
                                               eps, kl_kwargs)), early_stopping=early_stopping),
                             **dict(zip(("train_size", "early_stopping_monitor", "early_stopping_patience",
                                         "accelerator", "plan_kwargs", "check_val_every_n_epoch"), ref)))
            (validation_fraction, monitor, patience, device, lr, weight_decay, betas, eps,
             kl_kwargs) = (o[k] for k in names_)
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
        max_epochs = check_count(max_epochs, "max_epochs", f"{type(self).__name__}.train")
        shards = plan_shards(names, sizes, max_shards=resolve_max_shards(max_shards, batch_size))
        who = type(self).__name__
        self.close()  # a fresh engine for this call; it is kept afterwards for the summaries
        engine, gpu = make_engine(shards, client=client, store=reg.is_store, device=device, who=who, name="topic")
        if reg.is_store:  # a tiny task per worker: do they all see the driver's store? (HPC: node-local paths)
            preflight_store(engine, reg.atlas.path, who)
        self.device_ = "gpu" if gpu else "cpu"
        start = self.n_epochs_
        kw = dict(kl_kwargs or {})
        if self.kl_weight_ != 1.0:  # topomics' kl_weight (from_data); the default adds nothing (same fingerprint)
            kw.setdefault("kl_weight", self.kl_weight_)
        kw.setdefault("max_epochs", start + max_epochs)
        plan = FitPlan(cfg, self.dtype, N, sizes, batch_size, seed, {"lr": lr, "betas": betas, "eps": eps,
                       "weight_decay": weight_decay}, kl_schedule, kw, input_median, bernoulli_depth,
                       resolve_steps_per_round(steps_per_round, is_distributed(engine)), theta_bar_sync,
                       omega_update, decoder_init)
        # before any work on the data: another fit's checkpoint is refused, the directory locked (released
        # by run_fit, or in the finally below when the setup fails)
        policy = checkpoint_policy(f"{who}.train", store_path=reg.source if reg.is_store else None, model="topic",
                                   distributed=is_distributed(engine), checkpoint_dir=checkpoint_dir,
                                   checkpoint_every=checkpoint_every, resume=resume_from_checkpoint,
                                   fingerprint=self._fingerprint(plan, names, validation_fraction))
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

        ok = False
        try:
            engine.setup(load_shard, reader, layout, cfg, self.dtype, "cupy" if gpu else None)
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
            self._engine = engine  # kept for the summaries (engine rounds on the same shards)
            ok = True
        finally:
            policy.release()
            if not ok:
                engine.close()
        return self

    def _fingerprint(self, plan, names, validation_fraction) -> dict:
        """What a checkpoint of this training records, and a resume must match: the model and ``train``
        settings (:meth:`FitPlan.fingerprint`), the data (store or shapes, samples and training cells)
        and the seed."""
        from .._fingerprint import data_identity

        reg = self._data
        shape = {m: (reg.n_obs, reg.n_features(m)) for m in reg.modalities}
        samples = {"all": reg.sample_counts(), "train": dict(zip(names, (int(n) for n in plan.sizes)))}
        return {"model": type(self).__name__,
                "config": {**plan.fingerprint(), "validation_fraction": float(validation_fraction)},
                "data": data_identity(reg.atlas if reg.is_store else None, shape, samples), "seed": int(plan.seed)}

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
