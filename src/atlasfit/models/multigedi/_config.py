"""Configuration, sample plan and in-memory data reader for MultiGEDI fits.

Everything here is small and picklable: it travels to every shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OBS_TYPES = ("M", "M_list", "X")
#: Observation types of a single-modality GEDI: MultiGEDI's and ``"Y"`` (the continuous matrix is
#: given and never updated, spec §1.2; MultiGEDI has no "Y", as the reference).
SINGLE_OBS_TYPES = (*OBS_TYPES, "Y")
MODES = ("Bsphere", "Bl2")


@dataclass(frozen=True)
class ModalityConfig:
    """Settings of one modality (one "spoke" of the hub).

    Parameters
    ----------
    name
        Modality name (as in the data reader / MuData).
    obs_type
        ``"M"`` counts (Poisson-log-normal), ``"M_list"`` two count layers (binomial-logit-normal),
        ``"X"`` binary {0, 1, NaN} (probit); ``"Y"`` a continuous matrix used as Y itself
        (single-modality GEDI only, spec §1.2).
    orthoZ
        Orthogonal Z update (polar factor + diagonal, spec §2.3a) instead of the ridge solve.
    adjustD
        Set D from the norms of the shared B rows (spec §2.2).
    is_si_fixed
        Keep the per-cell offsets s_i at their starting values.
    layer
        Layer passed to ``reader.read_block`` for ``"M"`` and ``"X"`` (``None``: the main matrix).
    layers
        The two layers for ``"M_list"`` (default ``("M1", "M2")``).

    Examples
    --------
    >>> ModalityConfig("rna", "M").obs_type
    'M'
    """

    name: str
    obs_type: str = "M"
    orthoZ: bool = True
    adjustD: bool = True
    is_si_fixed: bool = False
    layer: str | None = None
    layers: tuple[str, str] | None = None

    def __post_init__(self):
        if self.obs_type not in SINGLE_OBS_TYPES:
            raise ValueError(
                f"modality {self.name!r}: obs_type {self.obs_type!r} is not supported; "
                f"use one of {OBS_TYPES} (or 'Y' in single-modality GEDI)"
            )
        if self.obs_type == "M_list":
            layers = ("M1", "M2") if self.layers is None else tuple(self.layers)
            if len(layers) != 2:
                raise ValueError(
                    f"modality {self.name!r}: obs_type 'M_list' needs exactly two layers, got {layers!r}"
                )
            object.__setattr__(self, "layers", layers)
        elif self.layers is not None:
            raise ValueError(
                f"modality {self.name!r}: 'layers' is only for obs_type 'M_list'; use 'layer' for "
                f"obs_type {self.obs_type!r}"
            )


@dataclass(frozen=True)
class FitConfig:
    """Settings of one MultiGEDI fit.

    Parameters
    ----------
    K
        Number of latent factors (shared by all modalities).
    mode
        Normalisation of the shared B: ``"Bsphere"`` (unit cell columns) or ``"Bl2"`` (unit rows).
    seed
        Integer seed of the hashed rSVD test matrices (spec §5.3).
    dtype
        ``numpy.float64`` (parity with the reference) or ``numpy.float32`` (state arrays in float32).
    modalities
        One :class:`ModalityConfig` per modality, in registration order.

    Examples
    --------
    >>> cfg = FitConfig(K=5, modalities=[ModalityConfig("rna", "M")])
    >>> cfg.modality("rna").orthoZ
    True
    """

    K: int
    mode: str = "Bsphere"
    seed: int = 0
    dtype: Any = np.float64
    modalities: tuple[ModalityConfig, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if int(self.K) < 1:
            raise ValueError(f"FitConfig: K must be >= 1, got {self.K}")
        if self.mode not in MODES:
            raise ValueError(f"FitConfig: unknown mode {self.mode!r}; use one of {MODES}")
        dt = np.dtype(self.dtype)
        if dt not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise ValueError(f"FitConfig: dtype must be float64 or float32, got {dt}")
        object.__setattr__(self, "dtype", dt)
        mods = tuple(self.modalities)
        if not mods:
            raise ValueError("FitConfig: give at least one ModalityConfig in 'modalities'")
        names = [m.name for m in mods]
        if len(set(names)) != len(names):
            raise ValueError(f"FitConfig: duplicate modality names in {names}")
        object.__setattr__(self, "modalities", mods)
        object.__setattr__(self, "K", int(self.K))
        object.__setattr__(self, "seed", 0 if self.seed is None else int(self.seed))

    @property
    def names(self) -> tuple[str, ...]:
        """Modality names in registration order."""
        return tuple(m.name for m in self.modalities)

    def modality(self, name: str) -> ModalityConfig:
        """The :class:`ModalityConfig` called ``name``."""
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"FitConfig has no modality {name!r}; modalities are {self.names}")


@dataclass(frozen=True)
class SamplePlan:
    """Which samples each modality holds, in which order, and where their cells go.

    Build it with :func:`make_plan`. It depends only on the labels (never on the engine).

    Attributes
    ----------
    modalities
        Modality names, registration order.
    global_samples
        Global sample order: first-seen union over modalities in registration order.
    n_cells
        Cells per global sample.
    mod_samples
        Per modality, its samples in local (first-seen) order.
    n_features
        Per modality, J.
    cells
        Per global sample, the caller's row ids (0..n_total-1) of its cells, in input order.
    n_total
        Number of distinct cells over all modalities.
    """

    modalities: tuple[str, ...]
    global_samples: tuple[str, ...]
    n_cells: dict
    mod_samples: dict
    n_features: dict
    cells: dict
    n_total: int

    def N(self, mod: str) -> int:
        """Total number of cells of modality ``mod``."""
        return int(sum(self.n_cells[g] for g in self.mod_samples[mod]))

    def offset(self, mod: str, sample: str) -> int:
        """Row offset of ``sample``'s first cell in modality ``mod``'s local sample order."""
        off = 0
        for g in self.mod_samples[mod]:
            if g == sample:
                return off
            off += self.n_cells[g]
        raise KeyError(f"modality {mod!r} has no sample {sample!r}")

    def mods_of(self, sample: str) -> tuple[str, ...]:
        """Modalities holding ``sample``, registration order."""
        return tuple(m for m in self.modalities if sample in self.mod_samples[m])

    def largest_modality(self, sample: str) -> str:
        """The modality with the largest J among those holding ``sample`` (ties: registered first)."""
        best = None
        for m in self.mods_of(sample):
            if best is None or self.n_features[m] > self.n_features[best]:
                best = m
        return best

    def init_modalities(self) -> tuple[str, ...]:
        """Modalities that are the largest one of at least one sample (rSVD-initialised, §5.4)."""
        chosen = {self.largest_modality(g) for g in self.global_samples}
        return tuple(m for m in self.modalities if m in chosen)


def _first_seen(labels) -> list[str]:
    seen: dict[str, None] = {}
    for lab in labels:
        seen.setdefault(lab, None)
    return list(seen)


def make_plan(labels_by_mod: dict, n_features: dict, cells_by_mod: dict | None = None) -> SamplePlan:
    """Build the :class:`SamplePlan` from per-cell sample labels.

    Parameters
    ----------
    labels_by_mod
        ``{modality: labels}`` in registration order; one label per cell (row) of that modality,
        in the modality's input order. Labels are converted with ``str``.
    n_features
        ``{modality: J}``.
    cells_by_mod
        Optional ``{modality: ids}``: the caller's row id (0..n_total-1) of every cell of that
        modality. Default: the cells of a sample are identified across modalities by position;
        the ids follow the first modality that holds all cells, or, when none does, samples are
        numbered in global order.

    Returns
    -------
    SamplePlan

    Examples
    --------
    >>> plan = make_plan({"rna": ["a", "b", "a"]}, {"rna": 10})
    >>> plan.global_samples, plan.cells["a"].tolist()
    (('a', 'b'), [0, 2])
    """
    mods = tuple(labels_by_mod)
    if not mods:
        raise ValueError("make_plan: labels_by_mod is empty; give one label vector per modality")
    labs = {m: np.asarray([str(x) for x in np.asarray(labels_by_mod[m]).tolist()]) for m in mods}
    mod_samples = {m: tuple(_first_seen(labs[m].tolist())) for m in mods}
    glob: list[str] = []
    for m in mods:
        for g in mod_samples[m]:
            if g not in glob:
                glob.append(g)
    n_cells: dict[str, int] = {}
    for m in mods:
        for g in mod_samples[m]:
            n = int(np.sum(labs[m] == g))
            if g in n_cells and n_cells[g] != n:
                raise ValueError(
                    f"modality {m!r} has {n} cells in sample {g!r} but an earlier modality has "
                    f"{n_cells[g]}; a shared sample must hold the same cells in every modality"
                )
            n_cells.setdefault(g, n)
    for m in mods:
        if m not in n_features:
            raise ValueError(f"make_plan: n_features has no entry for modality {m!r}")
    cells: dict[str, np.ndarray] = {}
    if cells_by_mod is not None:
        for m in mods:
            if m not in cells_by_mod:
                raise ValueError(f"make_plan: cells_by_mod has no entry for modality {m!r}")
            ids = np.asarray(cells_by_mod[m], dtype=np.int64)
            if ids.shape != labs[m].shape:
                raise ValueError(
                    f"make_plan: modality {m!r} has {labs[m].size} labels but {ids.size} cell ids"
                )
            for g in mod_samples[m]:
                got = ids[labs[m] == g]
                if g in cells and not np.array_equal(cells[g], got):
                    raise ValueError(
                        f"modality {m!r} sample {g!r}: cell ids differ from an earlier modality's; "
                        "a shared sample must hold the same cells in the same order in every modality"
                    )
                cells.setdefault(g, got)
        allc = np.concatenate([cells[g] for g in glob])
        n_total = int(allc.size)
        if np.unique(allc).size != n_total or allc.min() < 0 or allc.max() != n_total - 1:
            raise ValueError(
                "make_plan: cell ids must be a permutation of 0..n_total-1 over the union of samples"
            )
    else:
        full = [m for m in mods if set(mod_samples[m]) == set(glob)]
        if full:
            ref = full[0]
            for g in mod_samples[ref]:
                cells[g] = np.flatnonzero(labs[ref] == g).astype(np.int64)
            n_total = int(labs[ref].size)
        else:
            off = 0
            for g in glob:
                cells[g] = np.arange(off, off + n_cells[g], dtype=np.int64)
                off += n_cells[g]
            n_total = off
    return SamplePlan(
        modalities=mods,
        global_samples=tuple(glob),
        n_cells=n_cells,
        mod_samples=mod_samples,
        n_features={m: int(n_features[m]) for m in mods},
        cells=cells,
        n_total=n_total,
    )


class InMemoryReader:
    """Dict-backed reader with the atlas store's ``read_block`` signature.

    Parameters
    ----------
    data
        ``{modality: matrix}`` or ``{modality: {layer: matrix}}``; matrices are cells x features
        (scipy.sparse or dense). The main matrix of a modality is layer ``None``.
    labels_by_mod
        ``{modality: labels}``, one label per row.

    Examples
    --------
    >>> import numpy as np
    >>> r = InMemoryReader({"rna": np.arange(6).reshape(3, 2)}, {"rna": ["a", "b", "a"]})
    >>> r.read_block("rna", "a").tolist()
    [[0, 1], [4, 5]]
    """

    def __init__(self, data: dict, labels_by_mod: dict):
        self._data = {}
        for m, v in data.items():
            self._data[m] = dict(v) if isinstance(v, dict) else {None: v}
        self._rows = {}
        for m, lab in labels_by_mod.items():
            lab = np.asarray([str(x) for x in np.asarray(lab).tolist()])
            self._rows[m] = {g: np.flatnonzero(lab == g) for g in _first_seen(lab.tolist())}

    def read_block(self, mod: str, sample: str, layer: str | None = None):
        """Return the cells x features block of ``sample`` in modality ``mod`` (input row order)."""
        if mod not in self._data:
            raise KeyError(f"InMemoryReader has no modality {mod!r}")
        layers = self._data[mod]
        if layer not in layers:
            raise KeyError(
                f"InMemoryReader: modality {mod!r} has no layer {layer!r}; layers are {list(layers)}"
            )
        rows = self._rows[mod].get(str(sample))
        if rows is None:
            raise KeyError(f"InMemoryReader: modality {mod!r} has no sample {sample!r}")
        mat = layers[layer]
        return mat[rows]

    def n_features(self, mod: str) -> int:
        """Number of features (columns) of ``mod``."""
        return int(next(iter(self._data[mod].values())).shape[1])
