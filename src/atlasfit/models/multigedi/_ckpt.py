"""MultiGEDI's checkpoint payload without the entries of Y that a restore recomputes exactly.

Some entries of Y are a function of the small state and the data alone, whatever Y was before. Every
(sample, modality) carries a tag ``y_from`` that says which (set where Y is written: the loader and
round D, :func:`~._shard.y_update_sample`):

* ``("init",)``: Y is still its starting value (§1.2), a function of the raw data (the checkpoint at
  iteration 0);
* ``("solved", σ²)``: round D solved Y to the root of its stationarity condition from the prediction
  Ŷ = (Z + Q_i) D B_g + (o + o_i)1ᵀ + 1 s_iᵀ, the data and σ² (:func:`~._kernels.solve_Y_counts`,
  :func:`~._kernels.solve_Y_paired`): MultiGEDI does this every ``solve_Y_every`` iterations (default
  10, as ``checkpoint_every``), so a checkpoint written then needs no Y of count modalities on disk;
* ``None``: one Halley step from the previous Y (the reference's update). Then only binary modalities
  (``X``: Y = E[Y* | X, Ŷ], every entry) and the entries of paired counts (``M_list``) where both counts
  are 0 (the safeguard clamps the step to [Ŷ − σ²M2, Ŷ + σ²M1] = [Ŷ, Ŷ]) are functions of Ŷ.

At the end of an iteration, Z, D, o (shared) and B_g, Q_i, o_i, s_i (local) are still those round D
used, so a checkpoint written then can leave those entries out (the others are written as one
vector, in row-major order) and a restore recomputes them with the same operations, in the same cell
blocks. Exactness does not rest on that argument: the dump recomputes them and keeps out only the entries
whose bits equal Y's (the others are listed in a bit mask and written as they are), and records the
SHA-256 of Y, which the restore checks (a mismatch is a clear error, never a silently different resume).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from ..._xp import get_xp, to_numpy
from . import _shard as sh
from ._kernels import densify, solve_Y_counts, solve_Y_paired, update_Y_binary
from ._shard import Y_BLOCK_BYTES, cell_blocks, initial_Y_block

_RES, _EXC, _SHA, _FROM = "~Yval", "~Yexc", "~Ysha", "~Yfrom"
_SUFFIXES = (_RES, _EXC, _SHA, _FROM)


def _compact(loc) -> bool:
    """Whether a (sample, modality) may have entries of Y that a restore recomputes (not obs type Y)."""
    return bool(set(loc["raw"]) & {"X", "M", "M1"})


def _tag_code(tag) -> np.ndarray:
    """``y_from`` as a float64 pair (0: a Halley step, 1: the start, 2: solved; σ² of the solve)."""
    if tag is None:
        return np.array([0.0, 0.0])
    if tag[0] == "init":
        return np.array([1.0, 0.0])
    return np.array([2.0, float(tag[1])])


def _tag(code) -> tuple | None:
    code = np.asarray(code, dtype=np.float64)
    return {0: None, 1: ("init",), 2: ("solved", float(code[1]), None)}[int(code[0])]


def _same_yhat(loc, B, Z, D, o, digest) -> bool:
    """Whether Ŷ now has the bits round D solved Y from (its SHA-256, recorded by round D): then the
    solve, a function of Ŷ, the data and σ², gives Y's bits again and need not be rerun here."""
    if digest is None:
        return False
    h = hashlib.sha256()
    for _, Yhat in sh.yhat_blocks(loc, B, Z, D, o):
        sh.digest_update(h, Yhat)
    return h.digest() == digest


def _derived_blocks(loc, B, Z, D, o, tag):
    """``(slice, mask, value)`` per cell block: the entries of Y that follow from the small state and the
    data (see the module's docstring) and their value, computed with the operations of
    :func:`~._shard.y_update_sample` (and of the loader for ``("init",)``)."""
    Y = loc["Y"]
    xp, dt = get_xp(Y), Y.dtype
    raw = loc["raw"]
    if tag is not None and tag[0] == "init":
        for sl in cell_blocks(Y.shape[1], Y.shape[0], Y_BLOCK_BYTES, 8):
            yield sl, xp.ones((Y.shape[0], sl.stop - sl.start), dtype=bool), initial_Y_block(raw, sl, xp, dt)
        return
    if tag is None and "M" in raw:
        return
    s2 = np.dtype(dt).type(tag[1]) if tag is not None else None
    for sl, Yhat in sh.yhat_blocks(loc, B, Z, D, o):
        everywhere = xp.ones(Yhat.shape, dtype=bool)
        if "X" in raw:
            yield sl, everywhere, update_Y_binary(Yhat, raw["X"][:, sl]).astype(dt, copy=False)
        elif "M" in raw:
            yield sl, everywhere, solve_Y_counts(Yhat, densify(raw["M"][:, sl], xp, dt), s2).astype(dt, copy=False)
        else:
            M1 = densify(raw["M1"][:, sl], xp, dt)
            M2 = densify(raw["M2"][:, sl], xp, dt)
            if s2 is not None:
                yield sl, everywhere, solve_Y_paired(Yhat, M1, M2, s2).astype(dt, copy=False)
            else:
                yield sl, (M1 == 0) & (M2 == 0), Yhat


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _sha(Y) -> np.ndarray:
    h = hashlib.sha256()
    sh.digest_update(h, Y)  # no copy of a contiguous NumPy Y
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _params(shared: Mapping, m: str):
    return shared[f"{m}/Z"], shared[f"{m}/D"], shared[f"{m}/o"]


def compact_Y(loc, B, shared: Mapping, m: str) -> dict:
    """``{"~Yval": the entries of Y a restore cannot recompute (row-major vector), "~Yexc": packed bit mask
    of the entries that should be recomputable but differ (kept in ~Yval; empty when none), "~Ysha":
    SHA-256 of Y, "~Yfrom": how Y was last set (:func:`_tag_code`)}`` of one (sample, modality)."""
    Y = to_numpy(loc["Y"])
    tag = loc.get("y_from")
    if tag is not None and tag[0] == "solved" and _same_yhat(loc, B, *_params(shared, m), tag[2]):
        return {_RES: Y[:0, :0].ravel(), _EXC: np.zeros(0, dtype=np.uint8), _SHA: _sha(Y), _FROM: _tag_code(tag)}
    derived = np.zeros(Y.shape, dtype=bool)
    exc = np.zeros(Y.shape, dtype=bool)
    for sl, mask, value in _derived_blocks(loc, B, *_params(shared, m), tag):
        mask = to_numpy(mask)
        same = _bits(np.ascontiguousarray(Y[:, sl])) == _bits(np.ascontiguousarray(to_numpy(value)))
        derived[:, sl] = mask & same
        exc[:, sl] = mask & ~same
    packed = np.packbits(exc.ravel()) if exc.any() else np.zeros(0, dtype=np.uint8)
    return {_RES: Y[~derived], _EXC: packed, _SHA: _sha(Y), _FROM: _tag_code(tag)}


class _SamplePayload(Mapping):
    """One sample's checkpoint arrays, computed when the writer asks for them (one at a time, so a
    checkpoint never holds a second copy of a whole shard's Y)."""

    def __init__(self, state, g: str, base: dict, shared: Mapping):
        self.state, self.g, self.base, self.shared = state, g, base, shared
        self.keys_ = []
        self.lazy: dict[str, str] = {}
        for k in base:
            m, _, name = k.rpartition("/")
            if name == "Y" and m and _compact(state["mods"][m][g]):
                for suffix in _SUFFIXES:
                    self.keys_.append(m + suffix)
                    self.lazy[m + suffix] = m
            else:
                self.keys_.append(k.replace("/", "~"))
        self.names = {k.replace("/", "~"): k for k in base}
        self.cache: dict[str, dict] = {}

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __getitem__(self, key: str):
        m = self.lazy.get(key)
        if m is None:
            return self.base[self.names[key]]
        if m not in self.cache:
            self.cache = {m: compact_Y(self.state["mods"][m][self.g], self.state["B"][self.g], self.shared, m)}
        return self.cache[m][key[len(m):]]


def dump_local(state, shared) -> dict:
    """Checkpoint payload of a shard: :func:`~._shard.dump_local`'s arrays (names with '~' for '/'),
    Y of binary and paired-count modalities as ``<m>~Yval`` / ``<m>~Yexc`` / ``<m>~Ysha``."""
    return {g: _SamplePayload(state, g, d, shared) for g, d in sh.dump_local(state).items()}


def restore_local(state, data: dict, shared) -> None:
    """Inverse of :func:`dump_local`: the other arrays first, then the left-out entries of Y recomputed
    from them and ``shared``, then Y's SHA-256 checked."""
    base, compact = {}, []
    for g, d in data.items():
        out = {}
        for k, v in d.items():
            for suffix in _SUFFIXES:
                if k.endswith(suffix):
                    m = k[: -len(suffix)]
                    if suffix == _RES:  # Y is filled in below; its current array stands in for now
                        out[f"{m}/Y"] = to_numpy(state["mods"][m][g]["Y"])
                        compact.append((g, m))
                    break
            else:
                out[k.replace("~", "/")] = v
        base[g] = out
    sh.restore_local(state, base)
    for g, m in compact:
        loc = state["mods"][m][g]
        Y = loc["Y"]
        xp = get_xp(Y)
        exc_bits = data[g][m + _EXC]
        exc = (np.unpackbits(exc_bits, count=Y.size).reshape(Y.shape).astype(bool) if exc_bits.size
               else None)
        derived = xp.zeros(Y.shape, dtype=bool)
        tag = _tag(data[g][m + _FROM]) if (m + _FROM) in data[g] else None  # older checkpoints: a Halley step
        loc["y_from"] = tag
        for sl, mask, value in _derived_blocks(loc, state["B"][g], *_params(shared, m), tag):
            if exc is not None:
                mask = mask & ~xp.asarray(exc[:, sl])
            Y[:, sl] = xp.where(mask, value, Y[:, sl])
            derived[:, sl] = mask
        kept = data[g][m + _RES]
        if int(kept.size) != int(Y.size - int(derived.sum())):
            raise RuntimeError(
                f"MultiGEDI checkpoint: sample {g!r}, modality {m!r}: {kept.size} saved entries of Y, but "
                f"{int(Y.size - int(derived.sum()))} are not recomputable on restore; the checkpoint does not "
                "belong to this data (or is damaged); start the fit anew"
            )
        Y[~derived] = xp.asarray(kept, dtype=Y.dtype)
        if not np.array_equal(_sha(Y), np.asarray(data[g][m + _SHA])):
            raise RuntimeError(
                f"MultiGEDI checkpoint: the latent state Y of sample {g!r}, modality {m!r} recomputed on restore "
                "differs from the one saved (SHA-256): this machine computes the prediction with other bits than "
                "the one that wrote the checkpoint. Resume on the same kind of machine and software, or start the "
                "fit anew"
            )


dump_local.needs_shared = True
restore_local.needs_shared = True
