"""The topic model's one training loop (the training plan), on the fit driver of :mod:`atlasfit.engine`.

* :func:`init_shared`: the data statistics of the shards (median library, Bernoulli depth, the
  background :math:`b^0`), the parameters (:func:`~atlasfit.models.topic.init_params`, the k-means
  start from at most 2,000 cells gathered from the shards), AdamW moments and BatchNorm statistics;
* :func:`epoch_step`: one epoch = one iteration of :func:`atlasfit.engine.run_fit`: synchronous
  steps (one or two engine rounds each, ``theta_bar_sync``) or local steps with periodic averaging
  (``steps_per_round > 1``).

The driver's ``shared`` state (a dict of arrays, scalars and flat lists: checkpointable) holds the
parameters, AdamW moments and step count, BatchNorm statistics, buffers, the lagged
:math:`\\bar\\theta`, the data statistics and the per-epoch history. Both
:func:`~atlasfit.models.topic.train_serial` and :meth:`~atlasfit.MultimodalAmortizedLDA.train` run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._config import TopicModelConfig, kl_weight_schedule
from ._loss import combine_loss, topic_variance
from ._optim import AdamWState, adamw_init, adamw_step, owned_copies
from ._params import (
    background_init,
    draw_global_noise,
    init_bn_state,
    init_params,
    kmeans_from_rows,
    kmeans_rows,
    make_buffers,
)
from ._shard import OMEGA_KEYS, shard_pop_stats, split_positions, train_positions
from ._summaries import (
    EVAL_BLOCK,
    elbo_draws,
    plugin_draws,
    reduce_scores,
    score_rows,
    shard_validation,
    token_phis,
)
from ._train import (
    TopicFit,
    _average_round,
    _full_grads,
    _merge_median,
    _shard_backward,
    _shard_forward,
    _shard_local_steps,
    _shard_step,
    _step_size,
    _update_bn,
)


@dataclass
class FitPlan:
    """Everything an epoch needs besides the shards and ``shared`` (fixed for one ``train`` call)."""

    cfg: TopicModelConfig
    dtype: type
    n_cells: int
    sizes: list
    batch_size: int
    seed: int
    opt: dict
    kl_schedule: str
    kl_kwargs: dict
    input_median: object = "dataset"
    bernoulli_depth: str = "dataset"
    steps_per_round: int = 1
    theta_bar_sync: str = "exact"
    omega_update: str = "all"
    decoder_init: str = "kmeans"

    @property
    def n_steps(self) -> int:
        return max(1, math.ceil(self.n_cells / self.batch_size))

    def fingerprint(self) -> dict:
        """The ``config`` part of the checkpoint fingerprint (what a resumed fit must match; the data
        and seed are parts of their own: :meth:`~atlasfit.MultimodalAmortizedLDA.train`)."""
        from .._fingerprint import plain_config

        return {"model": plain_config(self.cfg), "dtype": np.dtype(self.dtype).name, "batch_size": int(self.batch_size),
                "input_median": str(self.input_median), "bernoulli_depth": self.bernoulli_depth,
                "steps_per_round": int(self.steps_per_round), "theta_bar_sync": self.theta_bar_sync,
                "omega_update": self.omega_update}


#: ``steps_per_round="auto"`` on a distributed engine: local steps per engine round. Each round
#: broadcasts the parameters and Adam moments and brings every shard's back (~12 MiB per shard in
#: float32). Measured on a 60k-cell planted store (2 workers, batch 1024, sparse kernels):
#: 19.5k / 21.4k / 22.7k training cells/s at 16 / 32 / 64 local steps per round; on the 100k side-by-side
#: store after the blocked AdamW update (benchmarks/bench_topic_atlas.py --side-by-side
#: --steps-per-round S): 26.7k / 27.8k / 27.9k cells/s at 32 / 64 / 128, the same held-out per-token
#: likelihood to 0.001 nats (-6.328 for all three; one process -6.323; docs/topic_model.md). 128 is one
#: round per epoch at 100k cells (88 steps of 1,024; 64 made it two) and ~8 per epoch at 1M: each round
#: also leaves both workers idle while the driver gathers, averages and broadcasts (~0.09 s on the 100k
#: store), and the held-out likelihood did not move between 32 and 128.
DISTRIBUTED_STEPS_PER_ROUND = 128


#: ``max_shards="auto"``: a shard's part of each step should hold at least this many cells. Every
#: shard pays fixed costs per step (with local steps: its own AdamW update of ~1M parameters, the
#: global draws and KL, the step's global noise: ~7.5 ms in float32 on this project's machine) next to
#: ~61 µs per cell for the forward and backward passes (planted RNA 2k + peaks 5k, K = 10): at 512
#: cells per shard part the fixed costs are ~19% of a shard-step, at 256 ~32%, at 32 (a 1,024-cell
#: step over 32 one-sample shards) ~80%.
CELLS_PER_SHARD_STEP = 512


def resolve_max_shards(max_shards, batch_size: int) -> int:
    """``"auto"``: ``max(2, batch_size // CELLS_PER_SHARD_STEP)`` shards of whole samples at most (2
    for a 1,024-cell batch: both workers of a 2-worker cluster busy; ask for more shards, or a larger
    batch, to use more workers). It depends on the batch size only, never on the workers, so a fit
    gives the same bits on any number of workers.

    Examples
    --------
    >>> resolve_max_shards("auto", 1024), resolve_max_shards("auto", 8192), resolve_max_shards(64, 1024)
    (2, 16, 64)
    """
    if max_shards == "auto":
        return max(2, int(batch_size) // CELLS_PER_SHARD_STEP)
    if isinstance(max_shards, bool) or not isinstance(max_shards, (int, np.integer)) or max_shards < 1:
        raise ValueError(f"max_shards must be 'auto' or an integer >= 1, got {max_shards!r}")
    return int(max_shards)


def resolve_steps_per_round(steps_per_round, distributed: bool) -> int:
    """``"auto"``: synchronous steps (1) in process, where a round costs nothing and every local step
    would run one AdamW update per shard; :data:`DISTRIBUTED_STEPS_PER_ROUND` on a cluster. The value
    depends on the engine's kind only, never on the number of workers, so a fit gives the same bits
    on 1, 2 or 8 workers.

    Examples
    --------
    >>> resolve_steps_per_round("auto", False), resolve_steps_per_round("auto", True), resolve_steps_per_round(4, True)
    (1, 64, 4)
    """
    if steps_per_round == "auto":
        return DISTRIBUTED_STEPS_PER_ROUND if distributed else 1
    return int(steps_per_round)


def check_options(*, input_median, bernoulli_depth, omega_update, decoder_init, theta_bar_sync, steps_per_round,
                  batch_size) -> None:
    """Clear errors for the training options shared by ``train_serial`` and ``train``."""
    if isinstance(input_median, (int, float)) and not isinstance(input_median, bool):
        if not input_median > 0:
            raise ValueError(f"input_median as a scale factor must be > 0, got {input_median}")
    elif input_median not in ("dataset", "minibatch"):
        raise ValueError(f"input_median {input_median!r}: use 'dataset', 'minibatch' or a positive scale factor")
    if bernoulli_depth not in ("dataset", "minibatch"):
        raise ValueError(f"bernoulli_depth {bernoulli_depth!r}: use 'dataset' or 'minibatch'")
    if omega_update not in ("all", "minibatch"):
        raise ValueError(f"omega_update {omega_update!r}: use 'all' (reference) or 'minibatch' (lazy)")
    if decoder_init not in ("zeros", "kmeans"):
        raise ValueError(f"decoder_init {decoder_init!r}: use 'zeros' (reference) or 'kmeans'")
    if theta_bar_sync not in ("exact", "lagged"):
        raise ValueError(f"theta_bar_sync {theta_bar_sync!r}: use 'exact' (two rounds per step) or 'lagged' (one round)")
    if steps_per_round != "auto" and (
        isinstance(steps_per_round, bool) or not isinstance(steps_per_round, (int, np.integer)) or steps_per_round < 1
    ):
        raise ValueError(f"steps_per_round must be 'auto' or an integer >= 1, got {steps_per_round!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm and the topic variance need 2 cells), got {batch_size}")


# --------------------------------------------------------------------------- k-means rows from the shards


def _shard_rows(state, want: dict) -> list:
    """Shard function: ``[(sample, positions, {m: CSR float64 rows})]`` of the requested training rows
    (``want[sample]``: positions among the sample's training cells)."""
    out = []
    for s, off, _ in state["samples"]:
        pos = want.get(s)
        if pos is None or not len(pos):
            continue
        r = off + np.asarray(pos, dtype=np.int64)
        out.append((s, np.asarray(pos), {m: sp.csr_matrix(X[r], dtype=np.float64) for m, X in state["x"].items()}))
    return out


def gather_rows(engine, locate, rows: np.ndarray, modalities) -> dict:
    """The training rows ``rows`` (positions in the training set) as ``{m: CSR}`` in the order of
    ``rows``, gathered from the shards; ``locate(rows) -> {sample: (positions within the sample's
    training cells, positions in rows)}``. A small result (``len(rows)`` rows) whatever the data size."""
    want = locate(np.asarray(rows))
    got = {}
    for part in engine.map(_shard_rows, {s: pos for s, (pos, _) in want.items()}):
        for s, pos, X in part:
            got[s] = (pos, X)
    blocks = {m: [] for m in modalities}
    targets = []
    for s, (pos, target) in want.items():
        if not len(pos):
            continue
        gpos, X = got[s]
        if not np.array_equal(gpos, pos):
            raise RuntimeError(f"k-means rows: sample {s!r} returned other rows than asked")
        targets.append(np.asarray(target))
        for m in modalities:
            blocks[m].append(X[m])
    order = np.argsort(np.concatenate(targets), kind="stable")
    return {m: sp.vstack(b, format="csr")[order] for m, b in blocks.items()}


def memory_locator(labels):
    """``locate`` of :func:`gather_rows` for a training set whose cells carry the sample ``labels``
    (any interleaving of samples)."""
    lab = np.asarray(labels).astype(str)

    def locate(rows):
        rows = np.asarray(rows, dtype=np.int64)
        sel = lab[rows]
        out = {}
        for s in dict.fromkeys(sel.tolist()):
            idx = np.flatnonzero(sel == s)
            out[s] = (np.searchsorted(np.flatnonzero(lab == s), rows[idx]), idx)
        return out

    return locate


def contiguous_locator(names, n_train):
    """``locate`` of :func:`gather_rows` for a training set made of the samples ``names`` one after the
    other (``n_train``: their training cells), as in an atlas store."""
    names = list(names)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(n_train, dtype=np.int64))])

    def locate(rows):
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(offsets, rows, side="right") - 1
        out = {}
        for i in dict.fromkeys(which.tolist()):
            idx = np.flatnonzero(which == i)
            out[names[i]] = (rows[idx] - offsets[i], idx)
        return out

    return locate


# --------------------------------------------------------------------------- init and one epoch


def init_shared(engine, plan: FitPlan, *, params: dict | None = None, locate=None) -> dict:
    """The driver's state before the first epoch (see the module docstring)."""
    cfg, dtype, N = plan.cfg, plan.dtype, plan.n_cells
    dstats = engine.map(shard_pop_stats)
    fixed = isinstance(plan.input_median, (int, float)) and not isinstance(plan.input_median, bool)
    lib_median, bern_depth, b0 = {}, {}, {}
    for m in cfg.modalities:
        lib_median[m] = float(plan.input_median) if fixed else _merge_median(dstats, m)
        bern_depth[m] = sum(s[m]["lib_sum"] for s in dstats) / N
        if cfg.has_background(m):
            b0[m] = background_init(sum(s[m]["x_over_lib"] for s in dstats), N, cfg.bg_offset)
    buffers = make_buffers(cfg, b0, dtype)
    if params is None:
        p = init_params(cfg, plan.seed, dtype)
        mods = [m for m, lik in zip(cfg.modalities, cfg.likelihoods) if lik != "gaussian"]
        if plan.decoder_init == "kmeans" and mods and not cfg.horseshoe:
            rows, rng = kmeans_rows(N, plan.seed)
            sub = gather_rows(engine, locate, rows, mods)
            p.update(kmeans_from_rows(cfg, sub, buffers, rng, dtype=dtype))
    else:
        p = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    opt = adamw_init(p)
    return {
        "params": p, "opt_m": opt.m, "opt_v": opt.v, "opt_step": 0, "bn": init_bn_state(cfg, dtype),
        "buffers": buffers, "lib_median": lib_median, "bern_depth": {m: float(v) for m, v in bern_depth.items()},
        "theta_prev": None, "history": {"epoch": [], "beta": [], "loss": []},
    }


def epoch_step(engine, shared: dict, epoch: int, plan: FitPlan) -> dict:
    """One epoch of minibatch AdamW on the shards (``epoch`` keys the KL weight, minibatches and noise)."""
    cfg, dtype, N, seed, opt = plan.cfg, plan.dtype, plan.n_cells, plan.seed, plan.opt
    n_steps = plan.n_steps
    p, buffers = shared["params"], shared["buffers"]
    bn = dict(shared["bn"])
    opt_state = AdamWState(int(shared["opt_step"]), dict(shared["opt_m"]), dict(shared["opt_v"]))
    theta_prev = shared["theta_prev"]
    med_arg = None if plan.input_median == "minibatch" else shared["lib_median"]
    depth_arg = shared["bern_depth"] if plan.bernoulli_depth == "dataset" else None
    beta = kl_weight_schedule(epoch, plan.kl_schedule, **plan.kl_kwargs)
    needs_theta_bar = bool(cfg.topic_variance_weight)
    fwd_kw: dict = {}  # extra keyword arguments of _shard_forward, the same every step
    losses: list = []
    last = None  # summed statistics of the epoch's last minibatch (get_last_entropy / get_last_topic_variance)
    if plan.steps_per_round > 1:  # local steps with periodic averaging
        for s0 in range(0, n_steps, plan.steps_per_round):
            steps = list(range(s0, min(n_steps, s0 + plan.steps_per_round)))
            res = engine.map(_shard_local_steps, p, opt_state.m, opt_state.v, opt_state.step, steps, seed, epoch,
                             n_steps, buffers, med_arg, depth_arg, N, beta, opt, plan.omega_update, fwd_kw)
            p = _average_round(res, p, opt_state, bn, cfg, N, beta, len(steps), losses)
            for i in reversed(range(len(steps))):
                live = [r["steps"][i] for r in res if r["steps"][i] is not None]
                if live:
                    last = {k: sum(s[k] for s in live) for k in ("n", "entropy", "theta_sum", "theta_sq_sum")}
                    break
    else:
        # the epoch's own copies of the parameters and moments, updated in place by every step (the
        # incoming ``shared`` stays as it was: the fit driver may roll back to it)
        p = owned_copies(p)
        opt_state.m, opt_state.v = owned_copies(opt_state.m), owned_copies(opt_state.v)
        for step in range(n_steps):
            B = _step_size(plan.sizes, step, n_steps)
            if B == 0:
                continue
            gnoise = draw_global_noise(cfg, (seed, epoch, step), dtype)
            t = opt_state.step + 1
            fwd = (p, gnoise, buffers, seed, epoch, step, n_steps, med_arg, depth_arg)
            if not needs_theta_bar or (plan.theta_bar_sync == "lagged" and theta_prev is not None):
                out = engine.map(_shard_step, fwd, (N / B, beta, B, theta_prev, t, opt, plan.omega_update), fwd_kw)
                fstats, shard_grads = [o[0] for o in out], [o[1] for o in out]
                live = [s for s in fstats if s["n"] > 0]
                tot = {k: sum(s[k] for s in live) for k in live[0]}
            else:
                fstats = engine.map(_shard_forward, *fwd, **fwd_kw)
                live = [s for s in fstats if s["n"] > 0]
                tot = {k: sum(s[k] for s in live) for k in live[0]}
                shard_grads = engine.map(_shard_backward, N / B, beta, B, tot["theta_sum"] / B, t, opt,
                                         plan.omega_update)
            if tot["n"] != B:
                raise RuntimeError(f"step {step}: shards used {tot['n']} cells, the plan has {B}")
            theta_prev = tot["theta_sum"] / B
            last = tot
            grads: dict = {}
            for sg in shard_grads:  # shard order: deterministic
                for k, v in sg.items():
                    grads[k] = grads[k] + v if k in grads else v
            grads, gval = _full_grads(p, gnoise, grads, beta, cfg, buffers)
            losses.append(combine_loss(tot, cfg, cell_scale=N / B, beta=beta, global_value=gval))
            p = adamw_step(p, grads, opt_state, **opt, inplace=True)
            _update_bn(bn, tot, B, cfg)
    hist = {k: list(v) for k, v in shared["history"].items()}
    loss = float(np.mean(losses)) if losses else float("nan")
    for k, v in (("epoch", int(epoch)), ("beta", float(beta)), ("loss", loss)) + _last_batch(last, cfg):
        hist.setdefault(k, []).append(v)
    out = dict(shared)
    out.update(params=p, opt_m=opt_state.m, opt_v=opt_state.v, opt_step=int(opt_state.step), bn=bn,
               theta_prev=theta_prev, history=hist)
    return out


def _last_batch(tot: dict | None, cfg: TopicModelConfig) -> tuple:
    """``(("last_entropy", H̄), ("last_topic_variance", V̄))`` of a minibatch's summed statistics:
    H̄ = (1/B) Σ_n H(θ_n) with the training entropy H(θ) = -Σ_k θ_k log(θ_k + 1e-5) (§3.1) and
    V̄ = (1/K) Σ_k Var_n(θ_nk), the unbiased variance over the minibatch's cells (the regulariser
    uses the sum, K V̄); θ_n are the training draws. NaN without a minibatch."""
    if not tot or int(tot["n"]) == 0:
        return (("last_entropy", math.nan), ("last_topic_variance", math.nan))
    n = int(tot["n"])
    return (("last_entropy", float(tot["entropy"]) / n),
            ("last_topic_variance", topic_variance(tot["theta_sum"], tot["theta_sq_sum"], n) / cfg.n_topics))


def fit_from_shared(cfg: TopicModelConfig, shared: dict, n_cells: int) -> TopicFit:
    """The :class:`~atlasfit.models.topic.TopicFit` of a driver state."""
    h = shared["history"]
    fit = TopicFit(cfg, dict(shared["params"]), dict(shared["bn"]), dict(shared["buffers"]),
                   dict(shared["lib_median"]), dict(shared["bern_depth"]), None,
                   [{"epoch": e, "beta": b, "loss": v} for e, b, v in zip(h["epoch"], h["beta"], h["loss"])],
                   int(n_cells), AdamWState(int(shared["opt_step"]), dict(shared["opt_m"]), dict(shared["opt_v"])))
    return fit


class _TrainingMixin:
    """What :meth:`~atlasfit.MultimodalAmortizedLDA.train` keeps between calls: the validation round,
    the history records, the driver state of a continued fit, the split and the per-cell :math:`\\Omega`."""

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
                if (k.startswith(("val_", "last_"))) and i < len(v):
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
            for k in ("last_entropy", "last_topic_variance"):  # NaN for epochs recorded before they existed
                h.setdefault(k, []).append(rec.get(k, math.nan))
        return {"params": dict(fit.params), "opt_m": dict(opt.m), "opt_v": dict(opt.v), "opt_step": int(opt.step),
                "bn": dict(fit.bn_state), "buffers": dict(fit.buffers), "lib_median": dict(fit.lib_median),
                "bern_depth": dict(fit.bern_depth), "theta_prev": self._theta_prev, "history": h}

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
            from ._data import split_indices  # noqa: PLC0415 - _data imports this module

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
