"""Synthetic multi-sample, multi-modal atlas with planted ground truth, generated sample by sample.

Generative model (notation of ``specs/multigedi.md``; cells x features on output)
------------------------------------------------------------------------------------
Global (drawn from ``default_rng([seed, 0])``):

* sample proportions ``w_i ~ LogNormal(0, sample_size_sd)``; sample sizes ``N_i`` = ``n_cells``
  split by ``w_i / sum(w)`` (largest remainder, at least one cell each);
* cell-type centres ``c_t ~ N(0, type_sep^2 I_K)`` and global type frequencies
  ``pi ~ Dirichlet(2 * 1_T)``.

Per sample ``i`` (``default_rng([seed, 1, i])``): latent shift ``delta_i ~ N(0, sample_shift_sd^2 I_K)``,
type composition ``pi_i ~ Dirichlet(composition_concentration * T * pi)`` and a mean log library
``l_i = log(library_size) + N(0, sample_library_sd^2)``.

Per cell (block ``b`` of ``_BLOCK`` cells of sample ``i``: ``default_rng([seed, 2, i, b])``):
type ``t ~ Cat(pi_i)``, latent ``b = c_t + delta_i + N(0, cell_sd^2 I_K)`` (``obsm["latent_true"]``),
log library ``s = l_i + N(0, library_sd^2) - library_sd^2 / 2``.

Per modality ``m`` (``default_rng([seed, 3, crc32(m)])``): loadings ``Z_m ~ N(0, loading_scale^2 / K)``
(J x K), feature offsets ``o_m`` and the set of samples it is measured in (a fraction
``overlap[m]`` of them); per (modality, sample) (``default_rng([seed, 4, i, crc32(m)])``) sample
feature offsets ``o_mi ~ N(0, sample_offset_sd^2)``. With ``eta = Z_m b + o_m + o_mi`` the cells'
data are drawn from ``default_rng([seed, 5, i, crc32(m), b])``:

* obs type ``"M"`` (counts): ``Y = eta + s + N(0, residual_sd^2)``, ``X ~ Poisson(exp(Y))``; ``o_m``
  are log feature proportions (so ``exp(s)`` is roughly the library size);
* obs type ``"M_list"`` (paired counts): ``total ~ Poisson(exp(d_m + s - log(library_size)))`` with
  per-feature log depths ``d_m``; where ``total > 0``, ``Y = eta + N(0, residual_sd^2)``,
  ``M1 ~ Binomial(total, logistic(Y))``, ``M2 = total - M1``; stored as layers ``M1``, ``M2`` and
  ``X = M1 + M2``;
* obs type ``"X"`` (binary): probit ``X = 1{eta + a + N(0, 1) > 0}`` with a per-cell offset
  ``a ~ N(0, atac_cell_sd^2)``; a fraction ``atac_missing`` of entries is NaN; dense float32.

Every random draw is keyed by (seed, sample index[, modality][, cell block]) on a fixed grid of
``_BLOCK`` cells, and the arithmetic is done per grid block, so a sample's bits never depend on which
other samples are generated, in which order, or on memory-driven chunking.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._rows import _collect_blocks, _RowAppender

__all__ = [
    "SyntheticParams",
    "iter_synthetic_atlas",
    "synthetic_mudata",
    "synthetic_truth",
]

_BLOCK = 1024  # cells per random-stream block; part of the bit-level definition of the generator
_MAX_LOG_RATE = 25.0  # clip for exp() of Poisson log-rates (exp(25) ~ 7e10 is far above any real count)

DEFAULT_FEATURES: dict[str, int] = {"rna": 2000, "splicing": 1000, "atac": 500}
DEFAULT_OVERLAP: dict[str, float] = {"atac": 0.7}
DEFAULT_OBS_TYPES: dict[str, str] = {"rna": "M", "splicing": "M_list", "atac": "X"}
OBS_TYPES = ("M", "M_list", "X")
# atlas store kind of each obs type (argument ``kinds`` of ``atlasfit.io.write_atlas``)
STORE_KINDS: dict[str, str] = {"M": "counts", "M_list": "counts", "X": "binary"}
_VAR_PREFIX = {"rna": "gene", "splicing": "event", "atac": "peak"}


@dataclass(frozen=True)
class SyntheticParams:
    """Noise levels and scales of the synthetic atlas (see the module docstring for the model).

    Parameters
    ----------
    type_sep
        Standard deviation of the cell-type centres in the latent space.
    cell_sd
        Within-type standard deviation of the cells around their type centre.
    sample_shift_sd
        Standard deviation of the per-sample latent shift.
    composition_concentration
        Dirichlet concentration (per type) of a sample's cell-type proportions around the global
        ones; smaller means more uneven compositions across samples.
    sample_size_sd
        Log-normal standard deviation of the sample proportions (uneven sample sizes).
    loading_scale
        Loadings are ``N(0, loading_scale**2 / K_true)``.
    sample_offset_sd
        Standard deviation of the per-sample feature offsets ``o_i`` (batch effect).
    residual_sd
        Standard deviation of the Gaussian residual on the log-rate / logit (``sigma`` of the spec)
        for the count modalities.
    library_size
        Typical library size (total counts per cell) of a ``"M"`` modality.
    library_sd
        Log-normal standard deviation of the per-cell library size within a sample.
    sample_library_sd
        Standard deviation of the per-sample mean log library size.
    feature_mean_sd
        Log-normal standard deviation of the baseline feature proportions of ``"M"`` modalities.
    splicing_depth
        Mean total count per (cell, feature) of a ``"M_list"`` modality.
    splicing_depth_sd
        Standard deviation of the per-feature log depth of a ``"M_list"`` modality.
    psi_offset_sd
        Standard deviation of the per-feature baseline logit of a ``"M_list"`` modality.
    atac_rate
        Typical fraction of ones of a ``"X"`` modality (sets the mean feature offset).
    atac_offset_sd
        Standard deviation of the per-feature offsets of a ``"X"`` modality (probit scale).
    atac_cell_sd
        Standard deviation of the per-cell offset of a ``"X"`` modality (probit scale).
    atac_missing
        Fraction of entries of a ``"X"`` modality set to NaN.

    Examples
    --------
    >>> from atlasfit.datasets import SyntheticParams
    >>> SyntheticParams(cell_sd=0.2).cell_sd
    0.2
    """

    type_sep: float = 1.0
    cell_sd: float = 0.35
    sample_shift_sd: float = 0.3
    composition_concentration: float = 5.0
    sample_size_sd: float = 0.5
    loading_scale: float = 1.0
    sample_offset_sd: float = 0.25
    residual_sd: float = 0.3
    library_size: float = 200.0
    library_sd: float = 0.4
    sample_library_sd: float = 0.3
    feature_mean_sd: float = 1.5
    splicing_depth: float = 0.28
    splicing_depth_sd: float = 1.0
    psi_offset_sd: float = 1.0
    atac_rate: float = 0.2
    atac_offset_sd: float = 0.5
    atac_cell_sd: float = 0.3
    atac_missing: float = 0.01

    def __post_init__(self):
        for name, value in asdict(self).items():
            v = float(value)
            if not np.isfinite(v) or v < 0:
                raise ValueError(
                    f"SyntheticParams.{name}={value!r} must be a finite number >= 0"
                )
        for name in ("library_size", "splicing_depth", "composition_concentration"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SyntheticParams.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.atac_rate < 1:
            raise ValueError(f"SyntheticParams.atac_rate must be in (0, 1), got {self.atac_rate!r}")
        if not 0 <= self.atac_missing < 1:
            raise ValueError(
                f"SyntheticParams.atac_missing must be in [0, 1), got {self.atac_missing!r}"
            )


def _crc(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _probit_inv(p: float) -> float:
    """Standard normal quantile (for the atac offset); scipy is a core dependency."""
    from scipy.special import ndtri

    return float(ndtri(p))


def _allocate(n: int, w: np.ndarray) -> np.ndarray:
    """Split ``n`` into ``len(w)`` positive integers proportional to ``w`` (largest remainder)."""
    k = len(w)
    extra = n - k
    p = w / w.sum()
    raw = p * extra
    base = np.floor(raw).astype(np.int64)
    left = extra - int(base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:left]] += 1
    return base + 1


@dataclass(frozen=True)
class _Design:
    """Validated arguments plus every small (non cell-sized) ground-truth array."""

    seed: int
    n_cells: int
    K: int
    params: SyntheticParams
    sample_names: list[str]
    sample_sizes: np.ndarray
    type_names: list[str]
    type_centres: np.ndarray
    type_freq: np.ndarray
    sample_shift: np.ndarray
    composition: np.ndarray
    log_library_mean: np.ndarray
    modalities: dict  # mod -> dict(obs_type, J, samples (sorted int array), loadings, offset, ...)


def _validate(n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params):
    def _posint(name, v, low=1):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        return int(v)

    n_samples = _posint("n_samples", n_samples)
    n_cells = _posint("n_cells", n_cells)
    if n_cells < n_samples:
        raise ValueError(
            f"n_cells={n_cells} is smaller than n_samples={n_samples}; every sample needs at least "
            "one cell: raise n_cells or lower n_samples"
        )
    n_cell_types = _posint("n_cell_types", n_cell_types)
    K_true = _posint("K_true", K_true)
    seed = _posint("seed", seed, low=0)
    features = dict(DEFAULT_FEATURES if features is None else features)
    if not features:
        raise ValueError("features is empty; give at least one modality, e.g. {'rna': 2000}")
    for mod, J in features.items():
        if not isinstance(mod, str) or not mod or "/" in mod:
            raise ValueError(f"modality name {mod!r} must be a non-empty string without '/'")
        _posint(f"features[{mod!r}]", J)
    features = {m: int(j) for m, j in features.items()}
    if overlap is None:  # the default names atac; drop it when atac is not generated
        overlap = {m: f for m, f in DEFAULT_OVERLAP.items() if m in features}
    overlap = dict(overlap)
    for mod, frac in overlap.items():
        if mod not in features:
            raise ValueError(
                f"overlap names modality {mod!r}, which is not in features {sorted(features)}; "
                "remove it or add the modality to features"
            )
        if not (isinstance(frac, (int, float, np.floating)) and 0 < float(frac) <= 1):
            raise ValueError(
                f"overlap[{mod!r}]={frac!r} must be a fraction of samples in (0, 1]"
            )
    obs_types = dict(obs_types or {})
    resolved = {}
    for mod in features:
        t = obs_types.get(mod, DEFAULT_OBS_TYPES.get(mod))
        if t is None:
            raise ValueError(
                f"modality {mod!r} has no default obs type; pass obs_types={{{mod!r}: 'M'}} "
                f"(one of {OBS_TYPES})"
            )
        if t not in OBS_TYPES:
            raise ValueError(f"obs_types[{mod!r}]={t!r} is not one of {OBS_TYPES}")
        resolved[mod] = t
    extra = sorted(set(obs_types) - set(features))
    if extra:
        raise ValueError(f"obs_types names modalities {extra} that are not in features")
    if params is None:
        params = SyntheticParams()
    elif not isinstance(params, SyntheticParams):
        raise TypeError(f"params must be a SyntheticParams, got {type(params).__name__}")
    return n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, resolved, params


def _design(n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params):
    (n_cells, n_samples, features, T, K, overlap, seed, obs_types, prm) = _validate(
        n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params
    )
    width = max(2, len(str(n_samples - 1)))
    sample_names = [f"S{i:0{width}d}" for i in range(n_samples)]

    g = _rng(seed, 0)
    w = g.lognormal(0.0, prm.sample_size_sd, n_samples)
    sizes = _allocate(n_cells, w)
    centres = g.normal(0.0, prm.type_sep, (T, K))
    type_freq = g.dirichlet(np.full(T, 2.0))

    shift = np.empty((n_samples, K))
    comp = np.empty((n_samples, T))
    loglib = np.empty(n_samples)
    for i in range(n_samples):
        r = _rng(seed, 1, i)
        shift[i] = r.normal(0.0, prm.sample_shift_sd, K)
        alpha = np.maximum(prm.composition_concentration * T * type_freq, 1e-3)
        comp[i] = r.dirichlet(alpha)
        loglib[i] = np.log(prm.library_size) + r.normal(0.0, prm.sample_library_sd)

    mods: dict[str, dict] = {}
    for mod, J in features.items():
        t = obs_types[mod]
        r = _rng(seed, 3, _crc(mod))
        frac = float(overlap.get(mod, 1.0))
        n_in = max(1, int(round(frac * n_samples)))
        chosen = np.arange(n_samples) if n_in >= n_samples else np.sort(
            r.choice(n_samples, n_in, replace=False)
        )
        loadings = r.normal(0.0, prm.loading_scale / np.sqrt(K), (J, K))
        info = {"obs_type": t, "J": J, "samples": chosen, "loadings": loadings}
        if t == "M":
            logp = r.normal(0.0, prm.feature_mean_sd, J)
            m = logp.max()
            info["feature_offset"] = logp - (m + np.log(np.exp(logp - m).sum()))
        elif t == "M_list":
            info["feature_offset"] = r.normal(0.0, prm.psi_offset_sd, J)
            sd = prm.splicing_depth_sd
            info["log_depth"] = np.log(prm.splicing_depth) - sd * sd / 2 + r.normal(0.0, sd, J)
        else:
            info["feature_offset"] = _probit_inv(prm.atac_rate) + r.normal(
                0.0, prm.atac_offset_sd, J
            )
        mods[mod] = info

    # every sample must be measured by at least one modality: give orphans to the most covered one
    covered = np.zeros(n_samples, bool)
    for info in mods.values():
        covered[info["samples"]] = True
    if not covered.all():
        best = max(mods, key=lambda m: (len(mods[m]["samples"]), -list(mods).index(m)))
        mods[best]["samples"] = np.union1d(mods[best]["samples"], np.flatnonzero(~covered))

    for mod, info in mods.items():
        offs = np.empty((len(info["samples"]), info["J"]))
        for k, i in enumerate(info["samples"]):
            offs[k] = _rng(seed, 4, int(i), _crc(mod)).normal(0.0, prm.sample_offset_sd, info["J"])
        info["sample_offset"] = offs
        info["sample_row"] = {int(i): k for k, i in enumerate(info["samples"])}

    return _Design(
        seed=seed, n_cells=n_cells, K=K, params=prm, sample_names=sample_names,
        sample_sizes=sizes, type_names=[f"type{t}" for t in range(T)], type_centres=centres,
        type_freq=type_freq, sample_shift=shift, composition=comp, log_library_mean=loglib,
        modalities=mods,
    )


def _truth_dict(d: _Design) -> dict:
    mods = {}
    for mod, info in d.modalities.items():
        entry = {
            "obs_type": info["obs_type"],
            "samples": np.array([d.sample_names[i] for i in info["samples"]], dtype=str),
            "loadings": info["loadings"],
            "feature_offset": info["feature_offset"],
            "sample_offset": info["sample_offset"],
        }
        if "log_depth" in info:
            entry["log_depth"] = info["log_depth"]
        mods[mod] = entry
    return {
        "seed": d.seed,
        "n_cells": d.n_cells,
        "K_true": d.K,
        "sample_names": np.array(d.sample_names, dtype=str),
        "sample_sizes": d.sample_sizes.copy(),
        "cell_types": np.array(d.type_names, dtype=str),
        "type_centres": d.type_centres.copy(),
        "type_frequency": d.type_freq.copy(),
        "sample_shift": d.sample_shift.copy(),
        "composition": d.composition.copy(),
        "log_library_mean": d.log_library_mean.copy(),
        "params": {k: float(v) for k, v in asdict(d.params).items()},
        "modalities": mods,
    }


# ----------------------------------------------------------------------------- per-block kernels


def _cells_block(d: _Design, i: int, b: int, n: int):
    """Cell types, latent positions and log library sizes of cells [b*_BLOCK, b*_BLOCK + n)."""
    prm = d.params
    r = _rng(d.seed, 2, i, b)
    types = r.choice(len(d.type_names), size=n, p=d.composition[i])
    latent = d.type_centres[types] + d.sample_shift[i] + r.normal(0.0, prm.cell_sd, (n, d.K))
    loglib = d.log_library_mean[i] - prm.library_sd**2 / 2 + r.normal(0.0, prm.library_sd, n)
    return types, latent, loglib


def _csr_from_dense_int(a: np.ndarray) -> sp.csr_matrix:
    m = sp.csr_matrix(a)
    m.data = m.data.astype(np.int32, copy=False)
    m.indices = m.indices.astype(np.int32, copy=False)
    m.indptr = m.indptr.astype(np.int32, copy=False)
    return m


def _mod_block(d: _Design, mod: str, i: int, b: int, latent: np.ndarray, loglib: np.ndarray):
    """Data of one modality for one cell block; returns a dict of arrays and the cell offsets."""
    prm = d.params
    info = d.modalities[mod]
    r = _rng(d.seed, 5, i, _crc(mod), b)
    n = latent.shape[0]
    J = info["J"]
    eta = latent @ info["loadings"].T
    eta += info["feature_offset"] + info["sample_offset"][info["sample_row"][i]]
    t = info["obs_type"]
    if t == "M":
        eta += loglib[:, None]
        if prm.residual_sd > 0:
            eta += prm.residual_sd * r.standard_normal((n, J), dtype=np.float32)
        np.minimum(eta, _MAX_LOG_RATE, out=eta)
        counts = r.poisson(np.exp(eta, out=eta))
        return {"X": _csr_from_dense_int(counts)}, loglib
    if t == "M_list":
        log_mu = info["log_depth"][None, :] + (loglib - np.log(prm.library_size))[:, None]
        np.minimum(log_mu, _MAX_LOG_RATE, out=log_mu)
        total = r.poisson(np.exp(log_mu))
        rows, cols = np.nonzero(total)
        tot = total[rows, cols]
        y = eta[rows, cols]
        if prm.residual_sd > 0:
            y = y + prm.residual_sd * r.standard_normal(y.shape[0])
        m1 = r.binomial(tot, 1.0 / (1.0 + np.exp(-y)))
        m2 = tot - m1
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])

        def _mk(vals):
            keep = vals > 0
            ip = np.zeros(n + 1, np.int64)
            np.cumsum(np.bincount(rows[keep], minlength=n), out=ip[1:])
            return sp.csr_matrix(
                (vals[keep].astype(np.int32), cols[keep].astype(np.int32), ip.astype(np.int32)),
                shape=(n, J),
            )

        xtot = sp.csr_matrix(
            (tot.astype(np.int32), cols.astype(np.int32), indptr.astype(np.int32)), shape=(n, J)
        )
        return {"X": xtot, "M1": _mk(m1), "M2": _mk(m2)}, None
    # "X": probit binary with a per-cell offset and missing entries
    cell_off = r.normal(0.0, prm.atac_cell_sd, n)
    eta += cell_off[:, None]
    eta += r.standard_normal((n, J))
    x = (eta > 0).astype(np.float32)
    if prm.atac_missing > 0:
        x[r.random((n, J)) < prm.atac_missing] = np.nan
    return {"X": x}, cell_off


def _var_names(mod: str, J: int) -> pd.Index:
    prefix = _VAR_PREFIX.get(mod, f"{mod}_")
    return pd.Index([f"{prefix}{j}" for j in range(J)])


def _sample_item(d: _Design, i: int, var_cache: dict, n_threads: int = 1):
    import anndata as ad

    name = d.sample_names[i]
    n_i = int(d.sample_sizes[i])
    mods = [m for m, info in d.modalities.items() if i in info["sample_row"]]
    n_blocks = -(-n_i // _BLOCK)
    types = np.empty(n_i, np.int64)
    latent = np.empty((n_i, d.K), np.float32)
    parts: dict[str, dict[str, _RowAppender]] = {m: {} for m in mods}
    n_cols = {m: d.modalities[m]["J"] for m in mods}
    offsets: dict[str, np.ndarray] = {}

    def _block(b: int):
        lo = b * _BLOCK
        n = min(_BLOCK, n_i - lo)
        t_b, lat_b, lib_b = _cells_block(d, i, b, n)
        return lo, n, t_b, lat_b, [(m, *_mod_block(d, m, i, b, lat_b, lib_b)) for m in mods]

    if n_threads > 1 and n_blocks > 1:
        # blocks have their own generators: threads change the speed, never the bits
        from concurrent.futures import ThreadPoolExecutor

        def _windowed(ex, width):  # in order, at most ``width`` blocks in flight / waiting
            pending = deque()
            for b in range(n_blocks):
                pending.append(ex.submit(_block, b))
                if len(pending) >= width:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

        with ThreadPoolExecutor(min(n_threads, n_blocks)) as ex:
            _collect_blocks(_windowed(ex, 2 * n_threads), types, latent, parts, offsets, n_i,
                            n_cols)
    else:
        _collect_blocks(map(_block, range(n_blocks)), types, latent, parts, offsets, n_i, n_cols)

    obs_names = pd.Index([f"{name}_c{j}" for j in range(n_i)])
    sample_col = pd.Categorical([name] * n_i, categories=d.sample_names)
    type_col = pd.Categorical.from_codes(types, categories=d.type_names)
    out = {}
    for m in mods:
        info = d.modalities[m]
        stacked = {k: app.finish() for k, app in parts[m].items()}
        parts[m].clear()
        obs = pd.DataFrame({"sample": sample_col, "cell_type": type_col}, index=obs_names)
        if m in offsets:
            obs["offset_true"] = offsets[m]
        if m not in var_cache:
            var_cache[m] = pd.DataFrame(index=_var_names(m, info["J"]))
        layers = {k: v for k, v in stacked.items() if k != "X"}
        out[m] = ad.AnnData(
            X=stacked["X"], obs=obs, var=var_cache[m].copy(), layers=layers or None,
            obsm={"latent_true": latent.copy() if len(mods) > 1 else latent},
        )
    return name, out


# ----------------------------------------------------------------------------- public API

_COMMON_DOC = """    n_cells
        Total number of cells over all samples.
    n_samples
        Number of samples (named ``"S00"``, ``"S01"``, ...).
    features
        Modality name -> number of features. Default ``{"rna": 2000, "splicing": 1000, "atac": 500}``.
    n_cell_types
        Number of planted cell types (``obs["cell_type"]``: ``"type0"``, ...).
    K_true
        Dimension of the planted latent space (``obsm["latent_true"]``).
    overlap
        Modality name -> fraction of samples in which it is measured (default ``{"atac": 0.7}``;
        unnamed modalities are measured in every sample). A sample that no modality would measure
        is given to the modality with the widest coverage.
    seed
        Non-negative integer; every draw is keyed by ``(seed, sample index, ...)``.
    obs_types
        Modality name -> MultiGEDI obs type ``"M"`` (counts), ``"M_list"`` (paired counts) or
        ``"X"`` (binary). Defaults: ``rna`` -> ``"M"``, ``splicing`` -> ``"M_list"``,
        ``atac`` -> ``"X"``; other names must be given.
    params
        Noise levels and scales, :class:`SyntheticParams` (default ``SyntheticParams()``)."""


def synthetic_truth(
    n_cells: int = 10_000,
    n_samples: int = 16,
    features: Mapping[str, int] | None = None,
    n_cell_types: int = 8,
    K_true: int = 10,
    overlap: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    obs_types: Mapping[str, str] | None = None,
    params: SyntheticParams | None = None,
) -> dict:
    """Small ground-truth arrays of a synthetic atlas, without generating any cell.

    Parameters
    ----------
{common}

    Returns
    -------
    dict
        ``sample_names``, ``sample_sizes``, ``cell_types``, ``type_centres`` (T x K),
        ``type_frequency``, ``sample_shift`` (I x K), ``composition`` (I x T),
        ``log_library_mean`` (I), ``params``, scalars ``seed``, ``n_cells``, ``K_true`` and
        ``modalities[mod]`` with ``obs_type``, ``samples`` (names), ``loadings`` (J x K),
        ``feature_offset`` (J), ``sample_offset`` (one row per measured sample, J), and
        ``log_depth`` (J) for ``"M_list"``. Per-cell truth lives in the generated data
        (``obs["cell_type"]``, ``obsm["latent_true"]``, ``obs["offset_true"]``).

    Examples
    --------
    >>> from atlasfit.datasets import synthetic_truth
    >>> t = synthetic_truth(n_cells=1000, n_samples=4, features={{"rna": 50}}, K_true=3)
    >>> t["modalities"]["rna"]["loadings"].shape, int(t["sample_sizes"].sum())
    ((50, 3), 1000)
    """
    d = _design(n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params)
    return _truth_dict(d)


def iter_synthetic_atlas(
    n_cells: int = 10_000,
    n_samples: int = 16,
    features: Mapping[str, int] | None = None,
    n_cell_types: int = 8,
    K_true: int = 10,
    overlap: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    obs_types: Mapping[str, str] | None = None,
    params: SyntheticParams | None = None,
    samples: Sequence[int | str] | None = None,
    n_threads: int = 1,
) -> Iterator[tuple[str, dict]]:
    """Generate a synthetic atlas one sample at a time (the stream of ``atlasfit.io.write_atlas``).

    Only one sample's cells are in memory at a time; within a sample, rates are computed in
    blocks of 1,024 cells.

    Parameters
    ----------
{common}
    samples
        Generate only these samples (indices or names), in the order given. A sample's data are
        bit-identical whether it is generated alone or with the others.
    n_threads
        Threads generating the 1,024-cell blocks of a sample in parallel (NumPy's random draws
        release the GIL). The data do not depend on it.

    Yields
    ------
    tuple of (str, dict of str to anndata.AnnData)
        ``(sample_name, {modality: AnnData})`` for the modalities measured in that sample, all
        with the same cells (``f"{{sample}}_c{{j}}"``) in the same order. Obs columns ``sample``
        and ``cell_type`` (categoricals over all samples / types), ``offset_true`` (the per-cell
        offset ``s`` of ``"M"`` and ``"X"`` modalities), obsm ``latent_true`` (float32, cells x
        K_true). ``"M"``: ``X`` CSR int32; ``"M_list"``: layers ``M1``, ``M2`` and ``X = M1 + M2``
        (CSR int32); ``"X"``: dense float32 in {{0, 1, NaN}}.

    Examples
    --------
    >>> from atlasfit.datasets import iter_synthetic_atlas
    >>> stream = iter_synthetic_atlas(n_cells=600, n_samples=3, seed=1)
    >>> name, mods = next(stream)
    >>> name, mods["rna"].n_vars, mods["splicing"].layers["M1"].dtype
    ('S00', 2000, dtype('int32'))
    """
    n_threads = _check_threads(n_threads)
    d = _design(n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params)
    if samples is None:
        order = list(range(len(d.sample_names)))
    else:
        order = []
        for s in samples:
            if isinstance(s, str):
                if s not in d.sample_names:
                    raise ValueError(
                        f"samples: unknown sample {s!r}; names are {d.sample_names[0]!r}.."
                        f"{d.sample_names[-1]!r}"
                    )
                order.append(d.sample_names.index(s))
            elif isinstance(s, (int, np.integer)) and 0 <= int(s) < len(d.sample_names):
                order.append(int(s))
            else:
                raise ValueError(
                    f"samples: {s!r} is neither a sample name nor an index in "
                    f"[0, {len(d.sample_names)})"
                )
    return _iterate(d, order, n_threads)


def _iterate(d: _Design, order: list[int], n_threads: int = 1):
    var_cache: dict = {}
    for i in order:
        yield _sample_item(d, i, var_cache, n_threads)


def _check_threads(n_threads) -> int:
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 1:
        raise ValueError(f"n_threads must be an integer >= 1, got {n_threads!r}")
    return int(n_threads)


def synthetic_mudata(
    n_cells: int = 2_000,
    n_samples: int = 4,
    features: Mapping[str, int] | None = None,
    n_cell_types: int = 8,
    K_true: int = 10,
    overlap: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    obs_types: Mapping[str, str] | None = None,
    params: SyntheticParams | None = None,
):
    """Synthetic atlas as an in-memory MuData (small sizes: tests and tutorials).

    Same data as :func:`iter_synthetic_atlas` with the same arguments, samples concatenated in
    order.

    Parameters
    ----------
{common}

    Returns
    -------
    mudata.MuData
        One modality per entry of ``features`` (cells of the samples it is measured in), root obs
        columns ``sample`` and ``cell_type``, root obsm ``latent_true`` and
        ``uns["synthetic_truth"]`` (see :func:`synthetic_truth`).

    Examples
    --------
    >>> from atlasfit.datasets import synthetic_mudata
    >>> mdata = synthetic_mudata(n_cells=800, n_samples=4, seed=0)
    >>> mdata.n_obs, mdata["atac"].n_obs < mdata.n_obs
    (800, True)
    """
    import anndata as ad
    import mudata as md

    d = _design(n_cells, n_samples, features, n_cell_types, K_true, overlap, seed, obs_types, params)
    per_mod: dict[str, list] = {m: [] for m in d.modalities}
    root_obs, root_latent = [], []
    for _name, mods in _iterate(d, list(range(len(d.sample_names)))):
        first = next(iter(mods.values()))
        root_obs.append(first.obs[["sample", "cell_type"]])
        root_latent.append(first.obsm["latent_true"])
        for m, a in mods.items():
            per_mod[m].append(a)
    adatas = {}
    for m, lst in per_mod.items():
        a = ad.concat(lst, axis=0, merge="same")
        a.var = lst[0].var.copy()
        adatas[m] = a
    mdata = _new_mudata(md, adatas)
    obs = pd.concat(root_obs)
    latent = np.concatenate(root_latent, axis=0)
    pos = obs.index.get_indexer(mdata.obs_names)
    mdata.obs["sample"] = obs["sample"].iloc[pos].to_numpy()
    mdata.obs["cell_type"] = obs["cell_type"].iloc[pos].to_numpy()
    mdata.obsm["latent_true"] = latent[pos]
    mdata.uns["synthetic_truth"] = _truth_dict(d)
    return mdata


def _new_mudata(md, adatas):
    """MuData from modalities without mudata's FutureWarning about pulling obs on update."""
    from ..io._mudata import mudata_options

    with mudata_options():
        return md.MuData(adatas)


def _with_common_doc(f):
    """Fill ``{common}`` in ``f``'s docstring with the parameters every generator shares."""
    f.__doc__ = f.__doc__.replace("{common}", _COMMON_DOC).replace("{{", "{").replace("}}", "}")
    return f


for _f in (synthetic_truth, iter_synthetic_atlas, synthetic_mudata):
    _with_common_doc(_f)
del _f
