"""Trainer on the engine protocol, and posterior summaries (spec §3.6, §5, §6).

A synchronous optimisation step (``steps_per_round=1``) is one or two engine rounds:

* ``_shard_step`` (one round, used whenever the step's global statistics are known beforehand):
  every shard takes its part of the step's minibatch, runs the forward and the backward pass with
  the broadcast parameters, the step's global noise, the global minibatch size :math:`B` (known from
  the sample sizes) and :math:`\\bar\\theta` (only the topic-variance gradient needs it), updates its
  per-cell :math:`\\Omega` rows and returns its gradient with small sums (loss terms,
  :math:`\\sum\\theta`, :math:`\\sum\\theta^2`, BatchNorm sums).
* ``_shard_forward`` then ``_shard_backward`` (two rounds) when the topic-variance regulariser is on
  and ``theta_bar_sync="exact"``: the first round's :math:`\\sum\\theta` gives the step's exact
  global :math:`\\bar\\theta` for the second. ``theta_bar_sync="lagged"`` uses the previous step's
  global :math:`\\bar\\theta` instead and keeps one round per step.

The driver sums the statistics in shard order, adds the global KL gradient once, applies AdamW and
broadcasts the new parameters.

With ``steps_per_round=S > 1`` (local steps with periodic averaging, ``_shard_local_steps``) every
shard runs :math:`S` AdamW steps on its own part of :math:`S` consecutive minibatches with its own
copy of the parameters and Adam moments; the driver then averages parameters and moments weighted
by the cells each shard used, in shard order, and broadcasts the average: one round per :math:`S`
steps. See ``docs/topic_model.md`` for the choices made for the statistics that are not additive
over cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..._xp import to_numpy
from ...engine import plan_shards, run_fit
from ._config import TopicModelConfig
from ._loss import (
    backward_cells,
    combine_loss,
    encoder_inputs,
    forward_cells,
    global_draws,
    global_draws_backward,
    global_kl,
    masked_softmax,
    moment_match,
    softmax,
    sparse_kernel_ok,
    topic_feature_logits,
)
from ._nn import encoder_eval
from ._optim import AdamWState, adamw_step, adamw_update, owned_copies
from ._params import draw_cell_noise, draw_global_noise, softplus
from ._spatial import minibatch_extras
from ._sparse import minibatch_rows, row_sums, xp_of


@dataclass
class TopicFit:
    """Result of :func:`train_serial`.

    Attributes
    ----------
    cfg
        The model configuration.
    params
        Trained global parameters (NumPy).
    bn_state
        BatchNorm running statistics (eval mode).
    buffers
        Fixed buffers (priors, likelihood weights, background :math:`b^0`).
    lib_median, bern_depth
        Dataset median library per count modality and mean depth per Bernoulli modality.
    cell_omega
        (n_cells, M) per-cell mixing logits in the caller's cell order (``weight_mode="cell"``), else None.
    history
        One dict per epoch: ``epoch``, ``beta``, ``loss`` (mean over steps of the full-data-scale loss).
    n_cells
        :math:`N`.
    """

    cfg: TopicModelConfig
    params: dict
    bn_state: dict
    buffers: dict
    lib_median: dict
    bern_depth: dict
    cell_omega: np.ndarray | None
    history: list = field(default_factory=list)
    n_cells: int = 0
    optimizer: AdamWState | None = None


# --------------------------------------------------------------------------- data checks


def _check_data(data: Mapping, cfg: TopicModelConfig) -> int:
    n = None
    for m, F, lik in zip(cfg.modalities, cfg.n_features, cfg.likelihoods):
        if m not in data:
            raise ValueError(f"modality {m!r} is missing from data (got {sorted(data)}); pass one matrix per modality")
        X = data[m]
        if X.ndim != 2 or X.shape[1] != F:
            raise ValueError(f"modality {m!r}: data has shape {X.shape}; expected (n_cells, {F})")
        if n is None:
            n = X.shape[0]
        elif X.shape[0] != n:
            raise ValueError(f"modality {m!r} has {X.shape[0]} cells, the first modality has {n}; align the rows")
        vals = X.data if hasattr(X, "tocsr") else np.asarray(X)
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"modality {m!r} has non-finite values; remove or impute them")
        if lik != "gaussian" and vals.size and vals.min() < 0:
            raise ValueError(f"modality {m!r} has negative values; likelihood {lik!r} needs counts >= 0")
        if lik == "bernoulli" and vals.size and not np.all((vals == 0) | (vals == 1)):
            raise ValueError(f"modality {m!r}: likelihood 'bernoulli' needs 0/1 data; binarise it first (x > 0)")
    if not n:
        raise ValueError("data has no cells")
    return int(n)


def _to_xp(d: dict, xp) -> dict:
    if xp is np:
        return d
    return {k: xp.asarray(v) for k, v in d.items()}


def _np(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out[k] = v if isinstance(v, (int, float)) else np.asarray(to_numpy(v))
    return out


# --------------------------------------------------------------------------- shard functions


def _step_rows(state, seed, epoch, step, n_steps):
    """Local row positions of this shard's part of the step's minibatch, sample by sample."""
    if state.get("_perm_epoch") != epoch:
        state["_perm"] = [
            np.random.default_rng(np.random.SeedSequence([seed, epoch, sid, 11])).permutation(k)
            for sid, _, k in state["parts"]
        ]
        state["_perm_epoch"] = epoch
    out = []
    for (sid, off, k), perm in zip(state["parts"], state["_perm"]):
        lo = (step * k) // n_steps
        hi = ((step + 1) * k) // n_steps
        out.append((sid, off + perm[lo:hi]))
    return out


def _shard_forward(state, params, gnoise, buffers, seed, epoch, step, n_steps, lib_median, bern_depth, draws=None):
    """``draws``: :func:`global_draws` of ``params`` and ``gnoise`` when the caller has them (used on the CPU)."""
    cfg = state["cfg"]
    dtype = state["dtype"]
    chunks = _step_rows(state, seed, epoch, step, n_steps)
    local = np.concatenate([c for _, c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
    state["_local"] = local
    if local.size == 0:
        state["_cache"] = None
        return {"n": 0}
    # CSR rows stay CSR for the modalities with sparse-exact kernels (densified rows otherwise)
    x = {m: minibatch_rows(state["x"][m], local, dtype, sparse=sparse_kernel_ok(cfg, m),
                           device=state.get("array_module")) for m in cfg.modalities}
    xp = xp_of(x[cfg.modalities[0]])
    noises = [draw_cell_noise(cfg, len(c), (seed, epoch, step, sid), dtype) for sid, c in chunks if len(c)]
    cnoise = {k: xp.asarray(np.concatenate([nz[k] for nz in noises])) for k in noises[0]}
    p = _to_xp(params, xp)
    buf = _to_xp(buffers, xp)
    if draws is None or xp is not np:
        draws = global_draws(p, _to_xp(gnoise, xp), cfg, buf)
    omega = xp.asarray(state["omega"][local]) if "omega" in state else None
    # batch codes, covariates, SGC inputs, GCN graph (neighbour sampling keyed by (seed, epoch, step, sample))
    extra = minibatch_extras(state, local, lib_median, xp, key=(seed, epoch, step))
    cache, stats = forward_cells(
        p, x, cnoise, cfg, buf, draws, lib_median=lib_median, bern_depth=bern_depth, cell_omega=omega, **extra
    )
    state["_cache"] = cache
    state["_params"] = p
    return _np(stats)


def _shard_backward(state, cell_scale, beta, n_batch, theta_bar, t, opt, omega_update="all"):
    cfg = state["cfg"]
    cache = state.pop("_cache", None)
    grads = {}
    g_omega = None
    if cache is not None:
        grads = backward_cells(
            state["_params"], cache, cfg, cell_scale=cell_scale, beta=beta, n_batch=n_batch, theta_bar=theta_bar
        )
        g_omega = grads.pop("omega_cell", None)
    state.pop("_params", None)
    if "omega" in state:
        if omega_update == "all":
            # reference behaviour (spec §6, §11 item 3): every row is decayed and moved by its moments
            G = np.zeros_like(state["omega"])
            if g_omega is not None:
                G[state["_local"]] = to_numpy(g_omega)
            state["omega"], state["omega_m"], state["omega_v"] = adamw_update(
                state["omega"], G, state["omega_m"], state["omega_v"], t, **opt
            )
        elif g_omega is not None:
            # lazy AdamW: only the minibatch rows move, each with its own step count for the bias correction
            r = state["_local"]
            state["omega_t"][r] += 1
            step = state["omega_t"][r][:, None]
            new = adamw_update(state["omega"][r], to_numpy(g_omega), state["omega_m"][r], state["omega_v"][r], step, **opt)
            state["omega"][r], state["omega_m"][r], state["omega_v"][r] = new
    return _np(grads)


def _shard_step(state, fwd_args, bwd_args, fwd_kw=None):
    """Forward and backward pass of one synchronous step in one round (the global statistics the
    backward needs, ``bwd_args``, are known before the round). Returns ``(stats, grads)``."""
    stats = _shard_forward(state, *fwd_args, **(fwd_kw or {}))
    grads = _shard_backward(state, *bwd_args)
    return stats, grads


def _full_grads(p, gnoise, cell_grads, beta, cfg, buffers, draws=None):
    """Parameter gradients of the step's loss from the summed per-cell gradients: chain the
    gradients w.r.t. the global draws into the variational parameters and add
    :math:`\\beta\\nabla\\mathcal G` once (``draws``: :func:`global_draws` of ``p`` and ``gnoise``
    when the caller has them). Returns ``(grads, global_value)``."""
    grads = dict(cell_grads)
    gval, gkl = global_kl(p, gnoise, cfg, buffers)
    if draws is None:
        draws = global_draws(p, gnoise, cfg, buffers)
    for k, v in global_draws_backward(p, gnoise, draws, grads, cfg).items():
        grads[k] = grads[k] + v if k in grads else v
    for k, v in gkl.items():
        grads[k] = grads[k] + beta * v if k in grads else beta * v
    return {k: grads.get(k, np.zeros_like(v)) for k, v in p.items()}, gval


def _shard_local_steps(
    state, params, m, v, t0, steps, seed, epoch, n_steps, buffers, lib_median, bern_depth,
    n_total, beta, opt, omega_update, fwd_kw=None,
):
    """``steps_per_round > 1``: run the listed steps locally on this shard's parts of their minibatches.

    The shard starts from the broadcast parameters and Adam moments (step count ``t0``) and runs one
    AdamW step per listed step on the gradient of its local objective
    :math:`\\frac{N}{B_s}\\sum_{n\\in\\mathcal B_s}\\mathcal C_n + \\beta\\mathcal G + s\\lambda_V V(\\Theta_{\\mathcal B_s})`
    (:math:`B_s`: its cells in the step; the same global noise as every other shard, drawn here from
    the key (seed, epoch, step)). Returns its parameters, moments, the number of cells it used and
    the per-step sums the driver needs for the loss and the BatchNorm running statistics.
    """
    cfg = state["cfg"]
    dtype = state["dtype"]
    # own copies (the broadcast arrays may be shared with this worker's other shards), updated in place
    st = AdamWState(step=int(t0), m=owned_copies(m), v=owned_copies(v))
    p = owned_copies(params)
    n_used = 0
    per_step = []
    for i, step in enumerate(steps):
        t = int(t0) + i + 1
        gnoise = draw_global_noise(cfg, (seed, epoch, step), dtype)
        draws = global_draws(p, gnoise, cfg, buffers)  # for the forward (on the CPU) and the gradient
        stats = _shard_forward(state, p, gnoise, buffers, seed, epoch, step, n_steps, lib_median, bern_depth,
                               draws=draws, **(fwd_kw or {}))
        bs = int(stats["n"])
        theta_bar = stats["theta_sum"] / bs if bs else None
        cell = _shard_backward(state, n_total / max(bs, 1), beta, bs, theta_bar, t, opt, omega_update)
        if bs == 0:
            per_step.append(None)
            continue
        grads, gval = _full_grads(p, gnoise, cell, beta, cfg, buffers, draws=draws)
        st.step = t - 1
        p = adamw_step(p, grads, st, **opt, inplace=True)
        n_used += bs
        stats["global_value"] = gval
        per_step.append(stats)
    return {"n": n_used, "params": p, "m": st.m, "v": st.v, "steps": per_step}


def _weighted_mean(arrays, weights):
    """:math:`\\sum_s w_s a_s` in shard order (a single weight of 1 returns the array's own bits)."""
    out = None
    for a, w in zip(arrays, weights):
        if w == 0.0:
            continue
        out = w * a if out is None else out + w * a
    return out


def _step_size(sizes: Sequence[int], step: int, n_steps: int) -> int:
    """Global minibatch size of ``step``: the sum over samples of their chunk sizes (see :func:`_step_rows`)."""
    return int(sum(((step + 1) * k) // n_steps - (step * k) // n_steps for k in sizes))


# --------------------------------------------------------------------------- driver


def _merge_median(stats_list, m):
    vals = np.concatenate([s[m]["lib_vals"] for s in stats_list])
    cnts = np.concatenate([s[m]["lib_counts"] for s in stats_list])
    order = np.argsort(vals, kind="stable")
    vals, cnts = vals[order], cnts[order]
    n = int(cnts.sum())
    k = (n - 1) // 2  # lower median, torch convention
    return float(vals[np.searchsorted(np.cumsum(cnts), k + 1)])


def train_serial(
    data: Mapping,
    cfg: TopicModelConfig,
    *,
    sample: Sequence | None = None,
    n_epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    kl_schedule: str = "scvi400",
    kl_kwargs: dict | None = None,
    seed: int = 0,
    input_median: str | float = "dataset",
    bernoulli_depth: str = "dataset",
    max_shards: int | str = "auto",
    dtype=np.float64,
    params: dict | None = None,
    omega_update: str = "all",
    engine_factory: Callable | None = None,
    callback: Callable | None = None,
    theta_bar_sync: str = "exact",
    steps_per_round: int | str = "auto",
    device: str = "cpu",
    decoder_init: str = "kmeans",
) -> TopicFit:
    """Fit MultimodalAmortizedLDA with minibatch AdamW over shards of whole samples (serial engine).

    Parameters
    ----------
    data
        ``{modality: (n_cells, F_m) array}`` (NumPy or SciPy sparse), rows aligned across modalities.
    cfg
        Model configuration.
    sample
        Sample label per cell (``None``: one sample). Shards are groups of whole samples
        (:func:`~atlasfit.engine.plan_shards`).
    n_epochs, batch_size
        Each epoch has :math:`\\lceil N/\\text{batch\\_size}\\rceil` steps; every sample's cells are
        permuted (key (seed, epoch, sample)) and split into that many consecutive chunks, chunk ``step``
        going into the step's minibatch, so every cell is used once per epoch.
    lr, betas, eps, weight_decay
        AdamW (torch defaults; the paper uses lr 1e-2).
    kl_schedule, kl_kwargs
        :func:`~atlasfit.models.topic.kl_weight_schedule` preset and extra arguments (``max_epochs`` is
        filled in with ``n_epochs``).
    seed
        Keys parameter init, minibatches, per-cell noise (seed, epoch, step, sample) and global noise
        (seed, epoch, step).
    input_median
        ``"dataset"``: encoder inputs normalised by the dataset median library (fixed, so inference
        does not depend on batch composition); ``"minibatch"``: median of each shard's minibatch part
        (the reference when there is one shard).
    bernoulli_depth
        Mean depth for ``bernoulli_scaling="reference"``: ``"dataset"`` or ``"minibatch"`` (shard part).
    omega_update
        ``weight_mode="cell"``: ``"all"`` (reference: AdamW decays and moves every row of
        :math:`\\Omega` at every step, :math:`O(N)` work per step) or ``"minibatch"`` (lazy AdamW: only
        the rows in the minibatch are updated, each with its own step count in the bias correction).
    max_shards, engine_factory
        Shard plan limit (``"auto"``: ``max(2, batch_size // 512)``, :func:`~atlasfit.models.topic._fit.resolve_max_shards`);
        ``engine_factory(shards)`` builds the engine (default
        :class:`~atlasfit.engine.SerialEngine`; e.g. ``lambda sh: DaskEngine(client, sh)``). The
        result is the same bits on any engine and any number of workers.
    dtype
        Floating dtype of parameters and minibatches.
    params
        Initial parameters (default :func:`~atlasfit.models.topic.init_params` with ``seed``).
    callback
        ``callback(epoch, fit)`` after each epoch.
    theta_bar_sync
        Only matters when the topic-variance regulariser is on (``cfg.topic_variance_weight != 0``),
        whose gradient needs the global minibatch mean :math:`\\bar\\theta`. ``"exact"``: two engine
        rounds per step (forward, then backward with the step's own :math:`\\bar\\theta`).
        ``"lagged"``: one round per step, with the previous step's global :math:`\\bar\\theta` (the
        fit's first step uses two rounds). Without the regulariser every step is one round.
    steps_per_round
        ``1``: synchronous steps (the shards' gradients are summed before each AdamW step).
        ``S > 1``: local steps with periodic averaging: each shard runs ``S`` AdamW steps on its own
        parts of ``S`` consecutive minibatches with its own copy of the parameters and Adam moments
        (its gradient scaled by :math:`N/B_s`, its own :math:`\\bar\\theta`), then parameters and
        moments are averaged weighted by the cells each shard used, in shard order. One engine round
        per ``S`` steps; rounds do not cross epochs. ``"auto"`` (default): 1 in process and
        :data:`~atlasfit.models.topic._fit.DISTRIBUTED_STEPS_PER_ROUND` (128) with an ``engine_factory``
        (:func:`~atlasfit.models.topic._fit.resolve_steps_per_round`: it depends on the kind of engine,
        never on the number of workers, so a fit on Dask gives the same bits on any number of workers);
        with a single shard (one sample) local steps are the synchronous steps.
    decoder_init
        ``"kmeans"`` (default, :func:`~atlasfit.models.topic.kmeans_decoder_init`) or ``"zeros"``
        (the reference); ignored when ``params`` is given.
    device
        ``"cpu"``, ``"gpu"`` (minibatch kernels on CuPy; a clear error without a CUDA device) or
        ``"auto"`` (the GPU when one is usable and an ``engine_factory`` is given).

    Returns
    -------
    TopicFit

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.models.topic import TopicModelConfig, train_serial
    >>> rng = np.random.default_rng(0)
    >>> X = rng.poisson(2.0, (40, 12)).astype(float)
    >>> cfg = TopicModelConfig(("rna",), (12,), ("gamma_poisson",), n_topics=3, n_hidden=8)
    >>> fit = train_serial({"rna": X}, cfg, n_epochs=2, batch_size=16)
    >>> len(fit.history), fit.params["dec/rna/Z_loc"].shape
    (2, (3, 12))
    """
    from ...engine import make_engine
    from ._fit import (
        FitPlan,
        check_options,
        epoch_step,
        fit_from_shared,
        init_shared,
        memory_locator,
        resolve_max_shards,
        resolve_steps_per_round,
    )
    from ._shard import Layout, MemoryBlocks, dump_local, load_shard

    check_options(input_median=input_median, bernoulli_depth=bernoulli_depth, omega_update=omega_update,
                  decoder_init=decoder_init, theta_bar_sync=theta_bar_sync, steps_per_round=steps_per_round,
                  batch_size=batch_size)
    N = _check_data(data, cfg)
    labels = np.zeros(N, dtype=np.int64) if sample is None else np.asarray(sample)
    if labels.shape != (N,):
        raise ValueError(f"sample has {labels.shape} entries; expected one label per cell ({N})")
    lab = labels.astype(str)
    names, first = np.unique(lab, return_index=True)
    names = [str(n) for n in names[np.argsort(first)]]
    rows = {s: np.flatnonzero(lab == s) for s in names}
    sizes = [len(rows[s]) for s in names]
    order = {s: i for i, s in enumerate(names)}
    layout = Layout(n=dict(zip(names, sizes)), index=order, sid=order)
    shards = plan_shards(names, sizes, max_shards=resolve_max_shards(max_shards, batch_size))
    if engine_factory is None:
        engine, gpu = make_engine(shards, device=device, who="train_serial", name="topic")
    else:
        from ...engine import resolve_device

        gpu = resolve_device(device, "train_serial", distributed=True)
        engine = engine_factory(shards)
    kw = dict(kl_kwargs or {})
    kw.setdefault("max_epochs", n_epochs)
    plan = FitPlan(cfg, dtype, N, sizes, batch_size, seed, {"lr": lr, "betas": betas, "eps": eps,
                   "weight_decay": weight_decay}, kl_schedule, kw, input_median, bernoulli_depth,
                   resolve_steps_per_round(steps_per_round, engine_factory is not None), theta_bar_sync,
                   omega_update, decoder_init)

    def each_epoch(it, shared):
        if callback is not None:
            callback(it - 1, fit_from_shared(cfg, shared, N))

    engine.setup(load_shard, MemoryBlocks(dict(data), rows), layout, cfg, dtype, "cupy" if gpu else None)
    try:
        shared = run_fit(engine, init=lambda e: init_shared(e, plan, params=params, locate=memory_locator(lab)),
                         step=lambda e, sh, it: epoch_step(e, sh, it, plan), stop=int(n_epochs), progress=False,
                         callback=each_epoch, desc="train_serial")
        fit = fit_from_shared(cfg, shared, N)
        local = {}
        for part in engine.map(dump_local):
            local.update(part)
        if local:
            om = np.empty((N, cfg.n_modalities), dtype=dtype)
            for s, d in local.items():
                om[rows[s]] = d["omega"]
            fit.cell_omega = om
    finally:
        engine.close()
    return fit


def _average_round(res, p, opt_state, bn, cfg, N, beta, n_round_steps, losses):
    """Driver side of ``steps_per_round > 1``: average the shards' parameters and Adam moments
    weighted by the cells each used (shard order), advance the step count, record each step's loss
    and update the BatchNorm running statistics from the step's global sums. Returns the parameters."""
    n_tot = sum(r["n"] for r in res)
    opt_state.step += n_round_steps
    if n_tot == 0:
        return p
    w = [r["n"] / n_tot for r in res]
    p = {k: _weighted_mean([r["params"][k] for r in res], w) for k in p}
    opt_state.m = {k: _weighted_mean([r["m"][k] for r in res], w) for k in p}
    opt_state.v = {k: _weighted_mean([r["v"][k] for r in res], w) for k in p}
    for i in range(n_round_steps):
        live = [r["steps"][i] for r in res if r["steps"][i] is not None]
        if not live:
            continue
        B = sum(s["n"] for s in live)
        gval = sum(s["n"] * s["global_value"] for s in live) / B
        tot = {k: sum(s[k] for s in live) for k in live[0] if k != "global_value"}
        losses.append(combine_loss(tot, cfg, cell_scale=N / B, beta=beta, global_value=gval))
        _update_bn(bn, tot, B, cfg)
    return p


def _update_bn(bn: dict, tot: dict, B: int, cfg: TopicModelConfig) -> None:
    """Running statistics from the *global* minibatch (sums over shards), torch momentum convention
    (unbiased variance for the running estimate)."""
    mom = cfg.bn_momentum
    for m in cfg.modalities:
        for l in range(cfg.n_layers):
            s1 = tot[f"bn/{m}/{l}/s1"]
            s2 = tot[f"bn/{m}/{l}/s2"]
            mean = s1 / B
            var = (s2 - s1 * mean) / max(B - 1, 1)
            bn[f"enc/{m}/rm{l}"] = (1 - mom) * bn[f"enc/{m}/rm{l}"] + mom * mean
            bn[f"enc/{m}/rv{l}"] = (1 - mom) * bn[f"enc/{m}/rv{l}"] + mom * var


# --------------------------------------------------------------------------- posterior summaries


def guide_eval(fit: TopicFit, x: Mapping, *, omega=None, **extra):
    """Eval-mode guide (§5) on the rows ``x[m]`` (dense or CSR): encoders with BatchNorm running statistics and
    no dropout on the inputs of :func:`~atlasfit.models.topic._loss.encoder_inputs` (``extra``: its
    ``batch``, ``cont_covariates``, ``enc_inputs``, ``graph``), then the trained aggregation: mixture
    weights ``w`` (n, M) (``omega``: these rows' per-cell weights for ``weight_mode="cell"``; without
    them every present modality weighs the same) and the moment-matched :math:`(\\bar\\mu, \\bar v)`.
    Runs on the array module of ``x``. Returns ``(w, mbar, vbar, batch codes)``."""
    cfg = fit.cfg
    first = x[cfg.modalities[0]]
    xp = xp_of(first)
    dtype = first.dtype
    p = _to_xp(fit.params, xp)
    bn = _to_xp(fit.bn_state, xp)
    batch, inputs = encoder_inputs(cfg, x, lib_median=fit.lib_median, **extra)
    mus, vs, pres = [], [], []
    for m in cfg.modalities:
        pres.append(row_sums(x[m]) > 0)
        xh, gcn = inputs[m]
        mu, v = encoder_eval(p, f"enc/{m}/", xh, bn, cfg.n_layers, cfg.bn_eps, cfg.var_eps, gcn=gcn)
        mus.append(mu)
        vs.append(v)
    mus, vs, pres = xp.stack(mus), xp.stack(vs), xp.stack(pres, axis=1)
    if cfg.aggregation == "attention":
        w, _ = masked_softmax((xp.tanh(mus @ p["att/W"]) @ p["att/u"]).T, pres, clamp=False)
    else:
        if cfg.weight_mode == "universal":
            om = xp.broadcast_to(p["mix/omega"][None, :], pres.shape)
        elif cfg.weight_mode == "cell" and omega is not None:
            om = xp.asarray(omega, dtype=dtype)
        else:
            om = xp.ones(pres.shape, dtype=dtype)
        w, _ = masked_softmax(om, pres, clamp=True)
    mbar, vbar, _ = moment_match(w, mus, vs)
    return w, mbar, vbar, batch


def topic_proportions(
    fit: TopicFit,
    data: Mapping,
    *,
    n_samples: int = 100,
    seed: int = 0,
    cell_omega=None,
    batch=None,
    cont_covariates=None,
    batch_size: int = 4096,
    sample=None,
) -> np.ndarray:
    """Posterior mean topic proportions :math:`\\hat\\theta_n = \\frac1S\\sum_s\\mathrm{softmax}(\\bar\\mu_n + \\sqrt{\\bar v_n}\\epsilon_s)` (§5).

    Eval mode (BatchNorm running statistics, no dropout), the dataset median library (so the result
    does not depend on ``batch_size``, fixing §11 item 12), and the *trained* aggregation (attention
    included, fixing §11 item 10). For ``weight_mode="cell"`` pass ``cell_omega`` rows aligned with
    ``data`` (e.g. ``fit.cell_omega`` for the training cells); without it every present modality gets
    equal weight. ``n_samples=0`` returns :math:`\\mathrm{softmax}(\\bar\\mu_n)`. Encoder covariates:
    ``batch`` (per-cell integer codes) and ``cont_covariates`` (N, C), aligned with ``data``, as
    :func:`~atlasfit.models.topic._loss.encoder_inputs` needs them. Spatial encoders need the graph
    of the evaluated cells: use :meth:`atlasfit.MultimodalAmortizedLDA.get_latent_representation`.

    Cells are evaluated per sample (``sample``: a label per cell; default one sample) in blocks of
    ``batch_size`` cells, and the noise of a block is keyed by (seed, 977, sample position in order of
    first appearance, first cell of the block within the sample): the key of
    :meth:`~atlasfit.MultimodalAmortizedLDA.get_latent_representation`, so the same values on the same rows.

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.models.topic import TopicModelConfig, train_serial
    >>> X = np.random.default_rng(0).poisson(2.0, (30, 8)).astype(float)
    >>> cfg = TopicModelConfig(("rna",), (8,), ("multinomial",), n_topics=3, n_hidden=4)
    >>> fit = train_serial({"rna": X}, cfg, n_epochs=1, batch_size=10)
    >>> topic_proportions(fit, {"rna": X}, n_samples=10).sum(axis=1).round(6).min()
    np.float64(1.0)
    """
    cfg = fit.cfg
    N = _check_data(data, cfg)
    if cfg.spatial_mode is not None:
        raise ValueError(f"topic_proportions: spatial_mode={cfg.spatial_mode!r} needs the evaluated cells' spatial "
                         "graph; use MultimodalAmortizedLDA.get_latent_representation(data) instead")
    if cfg.needs_batch and batch is None:
        raise ValueError("topic_proportions: this model encodes a categorical covariate; pass batch=<codes per cell>")
    if cfg.n_cont_encoded and cont_covariates is None:
        raise ValueError("topic_proportions: this model encodes continuous covariates; pass cont_covariates=(N, C)")
    dtype = fit.params[next(iter(fit.params))].dtype
    out = np.empty((N, cfg.n_topics))
    if sample is None:
        groups = [np.arange(N)]
    else:
        lab = np.asarray(sample).astype(str)
        if lab.shape != (N,):
            raise ValueError(f"topic_proportions: sample has {lab.shape[0]} labels for {N} cells; give one per cell")
        _, first, inv = np.unique(lab, return_index=True, return_inverse=True)
        groups = [np.flatnonzero(inv == j) for j in np.argsort(first, kind="stable")]
    blocks = [(i, lo, g[lo:lo + batch_size]) for i, g in enumerate(groups) for lo in range(0, g.size, batch_size)]
    for i, lo, rows in blocks:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 977, i, lo]))
        x = {m: minibatch_rows(data[m], rows, dtype) for m in cfg.modalities}  # CSR stays CSR (encoders only)
        xp = xp_of(x[cfg.modalities[0]])
        extra = {}
        if cfg.needs_batch:
            extra["batch"] = np.asarray(batch)[rows]
        if cfg.n_cont_encoded:
            extra["cont_covariates"] = xp.asarray(np.asarray(cont_covariates)[rows], dtype=dtype)
        om = None if cell_omega is None else np.asarray(cell_omega)[rows]
        _, mbar, vbar, _ = guide_eval(fit, x, omega=om, **extra)
        if n_samples <= 0:
            th = softmax(mbar, axis=1)
        else:
            sd = xp.sqrt(vbar)
            th = xp.zeros_like(mbar)
            for _ in range(n_samples):
                e = xp.asarray(rng.standard_normal(mbar.shape), dtype=dtype)
                th = th + softmax(mbar + sd * e, axis=1)
            th = th / n_samples
        out[rows] = to_numpy(th)
    return out


def topic_feature_dist(
    fit: TopicFit, modality: str, *, include_background: bool = True, n_samples: int = 0, seed: int = 0
) -> np.ndarray:
    """Topic-feature distributions :math:`\\hat\\phi_{mk}` (K, F_m) (§5).

    Count modalities: :math:`\\mathrm{softmax}_f(M^\\phi_{mk} + b_m)` with
    :math:`b_m = b^0_m + \\text{bg\\_loc}_m` (``n_samples=0``, plug-in at the variational means), or the
    Monte-Carlo mean of :math:`\\mathrm{softmax}_f(M^\\phi + \\mathrm{sp}(S^\\phi)\\odot e + b_m)`.
    Unlike the reference (§11 item 13) the background is included by default, as in the likelihood.
    Gaussian modalities: the mean logits :math:`M^\\phi_m` (no softmax). With the horseshoe prior the
    logits are :func:`~atlasfit.models.topic.topic_feature_logits` (plug-in only).

    Examples
    --------
    >>> import numpy as np
    >>> from atlasfit.models.topic import TopicModelConfig, train_serial
    >>> X = np.random.default_rng(0).poisson(2.0, (30, 8)).astype(float)
    >>> cfg = TopicModelConfig(("rna",), (8,), ("multinomial",), n_topics=3, n_hidden=4)
    >>> fit = train_serial({"rna": X}, cfg, n_epochs=1, batch_size=10)
    >>> topic_feature_dist(fit, "rna").sum(axis=1).round(6).tolist()
    [1.0, 1.0, 1.0]
    """
    cfg = fit.cfg
    if modality not in cfg.modalities:
        raise ValueError(f"unknown modality {modality!r}; the model has {cfg.modalities}")
    p = fit.params
    if cfg.horseshoe and n_samples > 0:
        raise ValueError("topic_feature_dist: n_samples > 0 draws the logistic-normal prior's logits; with "
                         "topic_feature_prior_type='horseshoe' use n_samples=0 (plug-in at the LogNormal means)")
    loc = np.asarray(topic_feature_logits(p, cfg, modality), dtype=np.float64)
    if cfg.likelihood(modality) == "gaussian":
        return loc
    b = np.zeros(loc.shape[1])
    if include_background and cfg.has_background(modality):
        b = np.asarray(fit.buffers[f"b0/{modality}"], dtype=np.float64)
        if cfg.learns_background(modality):
            b = b + p[f"dec/{modality}/bg_loc"]
    if n_samples <= 0:
        return softmax(loc + b[None, :], axis=1)
    s = softplus(np.asarray(p[f"dec/{modality}/Z_scale"], dtype=np.float64))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 978]))
    acc = np.zeros_like(loc)
    for _ in range(n_samples):
        acc += softmax(loc + s * rng.standard_normal(loc.shape) + b[None, :], axis=1)
    return acc / n_samples


def per_token_log_likelihood(theta, phi, x) -> float:
    """Mean log-probability per count token, :math:`\\sum_{nf}x_{nf}\\log(\\theta_n\\phi)_f/\\sum_{nf}x_{nf}`.

    A held-out score without any :math:`N/B` factor (cf. §11 item 7) and without the multinomial
    coefficient; ``exp(-value)`` is the perplexity.

    Examples
    --------
    >>> import numpy as np
    >>> round(per_token_log_likelihood(np.array([[1.0]]), np.array([[0.5, 0.5]]), np.array([[3, 1]])), 6)
    -0.693147
    """
    theta = np.asarray(theta, dtype=np.float64)
    phi = np.asarray(phi, dtype=np.float64)
    X = x.toarray() if hasattr(x, "toarray") else np.asarray(x, dtype=np.float64)
    rho = np.clip(theta @ phi, 1e-300, None)
    tot = X.sum()
    if tot <= 0:
        raise ValueError("per_token_log_likelihood: x has no counts")
    return float((X * np.log(rho)).sum() / tot)
