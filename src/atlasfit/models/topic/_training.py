"""``MultimodalAmortizedLDA.train``: checks the call, plans the shards and the engine, and runs the
one training loop (:mod:`._fit`: ``init_shared`` + ``epoch_step``) on :func:`atlasfit.engine.run_fit`
with checkpoints, resume and worker-loss recovery. Kept apart from the facade (``_model.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ...engine import (
    check_count,
    checkpoint_policy,
    is_distributed,
    make_engine,
    plan_shards,
    run_fit,
)
from ...engine._preflight import preflight_store
from ._data import training_layout
from ._fit import (
    FitPlan,
    check_options,
    epoch_step,
    fit_from_shared,
    init_shared,
    resolve_max_shards,
    resolve_steps_per_round,
)
from ._reference import train_kwargs
from ._shard import dump_local, load_shard, restore_local


class _TrainMethod:
    """``train`` and the checkpoint fingerprint of :class:`~atlasfit.models.topic.MultimodalAmortizedLDA`."""

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
    ) -> MultimodalAmortizedLDA:  # noqa: F821 - the facade class
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
            synchronous steps in process (no client: a round costs nothing there) and 128 local steps
            with periodic averaging per engine round on a Dask cluster (one round per 128 steps; the
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
        >>> from atlasfit import MultimodalAmortizedLDA
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
