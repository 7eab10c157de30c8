"""Posterior summaries of the registered cells as engine rounds (spec §5, §7; issue 10 item 2).

Every per-cell summary of :class:`~atlasfit.MultimodalAmortizedLDA` is computed per sample, where the
sample's rows live: on the shards of the training engine (training and validation rows of a sample
put back in the sample's cell order), or on the driver for new data (CSR rows, never the whole matrix
densified). What comes back is small: :math:`\\hat\\theta` / mixture-weight rows (cells x K, cells x M)
or sums; sums are reduced over samples in sample order with :func:`atlasfit.engine.ordered_sum`.

Noise is keyed by (seed, stream, sample position, first evaluated cell of the block within the
sample), so a result does not depend on how samples are grouped into shards, on the number of
workers, or on whether it ran on the driver or on a worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..._xp import to_numpy
from ._loss import softmax
from ._shard import train_positions
from ._summaries import (
    EVAL_BLOCK,
    elbo_block,
    elbo_draws,
    eval_rows,
    loglik,
    plugin_draws,
    token_phis,
    token_sums,
)
from ._train import TopicFit, guide_eval

# --------------------------------------------------------------------------- row sources


class FullRows:
    """The rows of one sample (``x[m]``: CSR or dense, the sample's rows at ``rows``, or all of ``x``),
    with their optional :math:`\\Omega` rows and covariates (aligned with ``x``); :meth:`take` gives the
    rows at sorted positions of the sample as CSR blocks (dense input is converted block by block)."""

    def __init__(self, x: dict, omega=None, batch=None, cont=None, rows=None):
        self.x, self.omega, self.batch, self.cont = x, omega, batch, cont
        self.rows = rows  # the sample's rows in x (None: x holds only the sample)

    def take(self, P: np.ndarray, dtype):
        R = P if self.rows is None else self.rows[P]
        x = {m: _csr_rows(X, R, dtype) for m, X in self.x.items()}
        extra = {}
        if self.batch is not None:
            extra["batch"] = np.asarray(self.batch)[R]
        if self.cont is not None:
            extra["cont_covariates"] = np.asarray(np.asarray(self.cont)[R], dtype=dtype)
        om = None if self.omega is None else np.asarray(self.omega[R], dtype=dtype)
        return x, om, extra


class ShardRows:
    """One sample of a shard: its training rows (``state["x"]`` from ``tr_off``) and validation rows
    (``state["val"]["x"]`` from ``val_off``, at the sample positions ``vpos``) put back in the
    sample's cell order; validation cells get the start value of :math:`\\Omega` (ones)."""

    def __init__(self, state: dict, n: int, tr_off: int, vpos: np.ndarray, val_off: int):
        self.state, self.vpos, self.tr_off, self.val_off = state, np.asarray(vpos, dtype=np.int64), tr_off, val_off
        self.tr = train_positions(n, self.vpos)

    def take(self, P: np.ndarray, dtype):
        st, val = self.state, self.state["val"]
        j = np.searchsorted(self.vpos, P)
        is_val = (j < self.vpos.size) & (self.vpos[np.minimum(j, max(self.vpos.size - 1, 0))] == P) \
            if self.vpos.size else np.zeros(P.size, dtype=bool)
        rt = self.tr_off + np.searchsorted(self.tr, P[~is_val])
        rv = self.val_off + j[is_val]
        order = np.argsort(np.concatenate([np.flatnonzero(~is_val), np.flatnonzero(is_val)]), kind="stable")

        def merge(a, b):
            if sp.issparse(a):
                return sp.vstack([a, b], format="csr")[order]
            return np.concatenate([a, b], axis=0)[order]

        x = {m: _csr_rows(merge(to_csr(st["x"][m])[rt], to_csr(val["x"][m])[rv]), None, dtype)
             for m in st["x"]}
        extra = {}
        if "batch" in st or "batch" in val:
            extra["batch"] = merge(to_numpy(st["batch"])[rt], np.asarray(val["batch"])[rv])
        if "cont" in st or "cont" in val:
            extra["cont_covariates"] = np.asarray(merge(to_numpy(st["cont"])[rt], np.asarray(val["cont"])[rv]),
                                                  dtype=dtype)
        om = None
        if "omega" in st:
            om = np.ones((P.size, st["omega"].shape[1]), dtype=dtype)
            om[~is_val] = to_numpy(st["omega"])[rt]
        return x, om, extra


def to_csr(X):
    """A SciPy CSR view of shard rows (CuPy rows are copied to the host)."""
    if sp.issparse(X):
        return X.tocsr()
    if hasattr(X, "get") and not isinstance(X, np.ndarray):  # cupyx sparse / cupy dense
        X = X.get()
        return X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
    return sp.csr_matrix(np.asarray(X))


def _csr_rows(X, P, dtype) -> sp.csr_matrix:
    sub = X if P is None else X[P]
    sub = sub.tocsr() if sp.issparse(sub) else sp.csr_matrix(np.asarray(sub))
    return sub.astype(dtype, copy=False)


def shard_sources(state) -> dict:
    """``{sample: (sample position, cells, ShardRows)}`` of a shard (every cell of its samples)."""
    return {s: (idx, n, ShardRows(state, n, tr_off, vpos, voff)) for s, idx, n, tr_off, vpos, voff in state["cells"]}


# --------------------------------------------------------------------------- per-sample evaluation


def theta_block(fit: TopicFit, x, om, extra, n_samples: int, seed: int, key) -> np.ndarray:
    """:math:`\\hat\\theta` of one block (float64): the mean over ``n_samples`` draws of
    :math:`\\mathrm{softmax}(\\bar\\mu + \\sqrt{\\bar v}\\epsilon)`, noise keyed by (seed, 977, ``*key``);
    :math:`\\mathrm{softmax}(\\bar\\mu)` for ``n_samples <= 0``."""
    _, mbar, vbar, _ = guide_eval(fit, x, omega=om, **extra)
    if n_samples <= 0:
        th = softmax(mbar, axis=1)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 977, *(int(k) for k in key)]))
        sd = np.sqrt(vbar)
        th = np.zeros_like(mbar)
        for _ in range(int(n_samples)):
            th = th + softmax(mbar + sd * np.asarray(rng.standard_normal(mbar.shape), dtype=mbar.dtype), axis=1)
        th = th / n_samples
    return np.asarray(to_numpy(th), dtype=np.float64)


def evaluate_sample(fit: TopicFit, src, index: int, P: np.ndarray, what: str, opts: dict, ctx: dict):
    """One summary of the cells ``P`` (sorted positions in the sample) of the sample at ``index``.

    ``what``: ``"theta"`` (rows, cells x K), ``"weights"`` (rows, cells x M), ``"elbo"`` (the sum of
    :func:`~atlasfit.models.topic._summaries.elbo_block` over blocks of :data:`EVAL_BLOCK` cells),
    ``"tokens"`` (per-token sums with :math:`\\hat\\theta`), ``"loglik"`` (each modality's
    log-likelihood at :math:`\\hat\\theta` and the plug-in global latents). ``opts``: ``n_samples``,
    ``seed``, ``block``; ``ctx``: the draws and :math:`\\hat\\phi` computed once per round.
    """
    cfg = fit.cfg
    dtype = fit.params[next(iter(fit.params))].dtype
    seed = int(opts.get("seed", 0))
    if what == "elbo":
        acc = 0.0  # blocks added in order (deterministic)
        for lo in range(0, P.size, EVAL_BLOCK):
            x, om, extra = src.take(P[lo:lo + EVAL_BLOCK], dtype)
            acc += elbo_block(fit, eval_rows(cfg, x, dtype), om, extra, ctx["draws"], seed, (index, lo))
        return {"n": int(P.size), "elbo": float(acc)}
    block = int(opts.get("block", 4096))
    rows, sums = [], {}
    for lo in range(0, P.size, block):
        x, om, extra = src.take(P[lo:lo + block], dtype)
        if what == "weights":
            rows.append(np.asarray(to_numpy(guide_eval(fit, x, omega=om, **extra)[0]), dtype=np.float64))
            continue
        th = theta_block(fit, x, om, extra, int(opts.get("n_samples", 100)), seed, (index, lo))
        if what == "theta":
            rows.append(th)
        elif what == "tokens":
            for m, (a, t) in token_sums(fit, x, th, extra.get("batch"), ctx["phis"], ctx["tdraws"]).items():
                sums.setdefault(f"ll/{m}", []).append(a)
                sums.setdefault(f"T/{m}", []).append(t)
        elif what == "loglik":
            xd = eval_rows(cfg, x, np.float64)
            batch = extra.get("batch")
            lp = loglik(fit, xd, th, ctx["plugin"], None if batch is None else np.asarray(batch))
            for m, lik in zip(cfg.modalities, cfg.likelihoods):
                sums.setdefault(f"ll/{m}", []).append(float(lp[m].sum()))
                xv = xd[m].data if sp.issparse(xd[m]) else xd[m]
                T = xd[m].shape[0] * xd[m].shape[1] if lik == "gaussian" else np.round(np.clip(xv, 0, None)).sum()
                sums.setdefault(f"T/{m}", []).append(float(T))
        else:
            raise ValueError(f"unknown summary {what!r}")
    if what in ("theta", "weights"):
        width = cfg.n_topics if what == "theta" else cfg.n_modalities
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, width))
    return {k: float(sum(v, 0.0)) for k, v in sums.items()}  # blocks added in order


def round_context(fit: TopicFit, what: str, opts: dict) -> dict:
    """What every sample of a round shares (draws, :math:`\\hat\\phi`), computed once per shard."""
    ctx: dict = {}
    if what == "elbo":
        ctx["draws"], _ = elbo_draws(fit, int(opts.get("n_samples", 10)), int(opts.get("seed", 0)))
    elif what == "tokens":
        ctx["phis"] = token_phis(fit)
        ctx["tdraws"] = plugin_draws(fit) if fit.cfg.batch_offsets else None
    elif what == "loglik":
        ctx["plugin"] = plugin_draws(fit)
    return ctx


def shard_summary(state, fit: TopicFit, request, what: str, opts: dict) -> list:
    """Shard function: ``[(sample, result)]`` of :func:`evaluate_sample` for the requested samples
    (``request``: ``{sample: sorted positions}``, or None for every cell of every sample)."""
    ctx = round_context(fit, what, opts)
    out = []
    for s, (idx, n, src) in shard_sources(state).items():
        if request is None:
            P = np.arange(n)
        elif s in request:
            P = np.asarray(request[s], dtype=np.int64)
        else:
            continue
        out.append((s, evaluate_sample(fit, src, idx, P, what, opts, ctx)))
    return out


def theta_array_name(index: int) -> str:
    """The temporary zarr array of one sample's :math:`\\hat\\theta` rows (named by sample position)."""
    return f"sample{int(index)}"


def write_theta(tmp_dir: str, index: int, theta: np.ndarray) -> None:
    """One sample's :math:`\\hat\\theta` rows as its own zarr array (no two writers share a chunk)."""
    import zarr

    arr = np.asarray(theta, dtype=np.float64)
    z = zarr.open_array(str(Path(tmp_dir) / theta_array_name(index)), mode="w", shape=arr.shape, dtype=arr.dtype,
                        chunks=(max(1, arr.shape[0]), max(1, arr.shape[1])), zarr_format=2)
    z[...] = arr


def shard_write_theta(state, fit: TopicFit, tmp_dir: str, opts: dict) -> list:
    """Shard function: write every sample's :math:`\\hat\\theta` (all its cells, sample order) to
    ``<tmp_dir>/sample<position>``; returns the samples written."""
    done = []
    for s, (idx, n, src) in shard_sources(state).items():
        write_theta(tmp_dir, idx, evaluate_sample(fit, src, idx, np.arange(n), "theta", opts, {}))
        done.append(s)
    return done


def light_fit(fit: TopicFit) -> TopicFit:
    """The fit without what the summaries never read (AdamW moments, per-cell rows, history): what a
    round sends to the shards."""
    return TopicFit(fit.cfg, fit.params, fit.bn_state, fit.buffers, fit.lib_median, fit.bern_depth, None, [],
                    fit.n_cells, None)
