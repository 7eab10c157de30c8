"""Atomic, pickle-free checkpoints of a fit: shared state on the driver, local state per sample.

Layout of a checkpoint directory (it may live anywhere, e.g. ``<store>/atlasfit/checkpoint``)::

    LATEST.json                 pointer: {"version": "v000000010-<token>", "iteration": 10}
    LOCK.json                   while a fit uses the directory: its pid, host, start (_guard.py)
    v000000010-<token>/         one complete version (a Zarr group)
        manifest.json           shared scalars/strings/structure + names of the local arrays +
                                the fingerprint of the fit that wrote it
        shared.npz              shared arrays (np.savez_compressed, loaded with allow_pickle=False)
        local/<sample>/<array>  one Zarr array per sample and array, written by the owning worker,
                                compressed (Blosc zstd level 1, bit shuffle: lossless, in the
                                array's own dtype, so float32 state stays float32 and float64 stays
                                float64 and a resume is bit-identical)

A save writes a new version directory and flushes every file of it to disk (``fsync``; workers
their arrays, the driver the rest), then replaces ``LATEST.json`` atomically (:func:`os.replace`)
and flushes the directory entry, and only then deletes older versions (and leftovers of saves that
crashed): a crash at any point leaves a complete checkpoint readable, and after a save exactly one
version is kept (two exist only while a save runs). Workers write only their own samples' arrays,
so no two workers ever write the same chunk. The directory must be reachable from every worker
(local disk for a LocalCluster, a shared file system on HPC).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from .._xp import to_numpy
from ._guard import canonical

_POINTER = "LATEST.json"
_FORMAT = 1


@dataclass(frozen=True)
class CheckpointInfo:
    """What one :meth:`Checkpoint.save` wrote.

    Attributes
    ----------
    iteration
        Iterations completed at the checkpoint (the loop resumes at this iteration).
    n_bytes
        Bytes on disk of the new version (shared + all local arrays + metadata).
    seconds
        Wall-clock seconds of the save (including the pointer flip and cleanup).
    path
        Directory of the new version.
    raw_bytes
        Bytes of the arrays it holds, uncompressed (``n_bytes / raw_bytes``: the compression ratio).
    dir_bytes
        Bytes on disk of the whole checkpoint directory after the save (older versions removed).
    """

    iteration: int
    n_bytes: int
    seconds: float
    path: str
    raw_bytes: int = 0
    dir_bytes: int = 0


#: Longest per-sample directory name written (bytes): file systems allow 255; the percent-encoded
#: name of a long or non-ASCII sample (29 CJK or ~250 ASCII characters) passed that (issue 11 item 5).
_MAX_KEY = 120


def _sample_key(name: str) -> str:
    """The per-sample directory name: ``s_`` + the percent-encoded name, or for a name whose encoding
    would be longer than :data:`_MAX_KEY` bytes its first 64 encoded characters, ``~`` and 24 hex
    digits of its SHA-256 (the manifest keeps the real names).

    Examples
    --------
    >>> _sample_key("donor 1")
    's_donor%201'
    >>> len(_sample_key("x" * 300)) <= _MAX_KEY
    True
    """
    key = "s_" + quote(str(name), safe="")
    if len(key) <= _MAX_KEY:
        return key
    digest = hashlib.sha256(str(name).encode("utf-8")).hexdigest()[:24]
    return key[:64] + "~" + digest


#: Public name of :func:`_sample_key`: a file-system-safe directory or array name for a sample.
sample_dir_name = _sample_key


def _check_array_name(sample: str, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__")):
        raise ValueError(
            f"checkpoint: dump_local returned array name {name!r} for sample {sample!r}; names "
            "must be non-empty strings without '/' and not starting with '.' or '__'"
        )
    return name


# --------------------------------------------------------------------------- shared (driver)


def _flatten_shared(obj: Mapping, arrays: dict, path: str) -> dict:
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint: shared state at {path or '<root>'!r} must be a dict")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise TypeError(f"checkpoint: shared key {k!r} at {path or '<root>'!r} is not a string")
        where = f"{path}/{k}" if path else k
        if isinstance(v, Mapping):
            out[k] = {"t": "dict", "v": _flatten_shared(v, arrays, where)}
        elif isinstance(v, (np.ndarray, np.generic)) or type(v).__module__.startswith("cupy"):
            a = to_numpy(v)
            if a.dtype.hasobject:
                raise TypeError(
                    f"checkpoint: shared array {where!r} has dtype object; checkpoints are "
                    "pickle-free, convert it to a numeric or fixed-width string dtype"
                )
            name = f"a{len(arrays)}"
            arrays[name] = a
            out[k] = {"t": "scalar" if isinstance(v, np.generic) else "array", "v": name}
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[k] = {"t": "json", "v": v}
        elif isinstance(v, (list, tuple)) and all(
            x is None or isinstance(x, (bool, int, float, str)) for x in v
        ):
            out[k] = {"t": "tuple" if isinstance(v, tuple) else "list", "v": list(v)}
        else:
            raise TypeError(
                f"checkpoint: shared value {where!r} has type {type(v).__name__}; allowed are "
                "dicts, NumPy/CuPy arrays and scalars, bool/int/float/str/None and flat lists of those"
            )
    return out


def _unflatten_shared(tree: dict, arrays) -> dict:
    out: dict[str, Any] = {}
    for k, node in tree.items():
        t, v = node["t"], node["v"]
        if t == "dict":
            out[k] = _unflatten_shared(v, arrays)
        elif t == "array":
            out[k] = arrays[v]
        elif t == "scalar":
            out[k] = arrays[v][()]
        elif t == "tuple":
            out[k] = tuple(v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- local (workers)


def needs_shared(fn) -> bool:
    """Whether a ``dump_local`` / ``restore_local`` takes the driver's shared state as its last argument
    (``fn.needs_shared = True``): a model can then leave out of a checkpoint what it recomputes exactly
    from the shared state (MultiGEDI: the entries of Y set from the prediction alone)."""
    return bool(getattr(fn, "needs_shared", False))


def _write_local(state: dict, spec, local_dir: str, dump_local: Callable, shared=None) -> dict:
    import zarr

    dumped = dump_local(state, shared) if needs_shared(dump_local) else dump_local(state)
    if not isinstance(dumped, Mapping):
        raise TypeError("checkpoint: dump_local(state) must return {sample_name: {array_name: array}}")
    meta: dict[str, dict] = {}
    for sample, arrs in dumped.items():
        if sample not in spec.samples:
            raise ValueError(
                f"checkpoint: dump_local returned sample {sample!r}, which is not in shard "
                f"{spec.index} (samples {list(spec.samples)}); key the dump by the shard's own sample names"
            )
        grp = zarr.open_group(os.path.join(local_dir, _sample_key(sample)), mode="w")
        meta[sample] = {}
        for name, arr in arrs.items():
            _check_array_name(sample, name)
            a = np.ascontiguousarray(to_numpy(arr))
            if a.dtype.hasobject:
                raise TypeError(
                    f"checkpoint: local array {name!r} of sample {sample!r} has dtype object; "
                    "use a numeric dtype"
                )
            z = grp.create_array(name, shape=a.shape, dtype=a.dtype, chunks=_chunks(a),
                                 compressors=_compressor() if a.size else None)
            if a.size:
                z[...] = a
            meta[sample][name] = [list(a.shape), a.dtype.str]
        _fsync_tree(os.path.join(local_dir, _sample_key(sample)))
    return meta


#: Name of the codec of :func:`_compressor` (recorded by benchmarks/bench_checkpoint_size.py).
CODEC = "blosc-zstd-1-bitshuffle"


def _compressor():
    """Lossless compression of the local arrays: Blosc zstd level 1 with bit shuffle. On MultiGEDI's
    checkpoint of the real 5k data (3 iterations) it writes 28.8 MB in float64 and 13.7 MB in float32;
    lz4 (level 5, bit shuffle) wrote 30.9 / 15.2 MB (7-11 % more) but compresses ~3x faster (96 MB of
    float64: 0.43 s against 1.37 s with Blosc's 2 threads; uncompressed 0.19 s). Size is what issue 12
    asks for; a save of the 100k-cell atlas took 77 s (float64) under a load average of 8-11."""
    from zarr.codecs import BloscCodec, BloscShuffle

    return BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.bitshuffle)


def _fsync_file(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without fsync on read-only descriptors (or on directories): best effort
    finally:
        os.close(fd)


def _fsync_tree(path) -> None:
    """Flush every file and directory under ``path`` to disk (before the pointer may name them)."""
    for root, _, files in os.walk(path):
        for f in files:
            _fsync_file(os.path.join(root, f))
        _fsync_file(root)


def _chunks(a: np.ndarray) -> tuple[int, ...]:
    # One chunk per array, split along the first axis into pieces of at most ~128 MiB.
    shape = tuple(max(1, int(n)) for n in a.shape)
    if not shape:
        return ()
    row = max(1, a.itemsize * int(np.prod(shape[1:])))
    return (max(1, min(shape[0], (128 * 2**20) // row)),) + shape[1:]


def _read_local(state: dict, spec, local_dir: str, manifest: dict, restore_local: Callable, shared=None) -> None:
    import zarr

    data: dict[str, dict[str, np.ndarray]] = {}
    for sample in spec.samples:
        names = manifest.get(sample)
        if names is None:
            continue
        base = os.path.join(local_dir, _sample_key(sample))
        data[sample] = {}
        for name, (shape, dtype) in names.items():
            if int(np.prod(shape)) == 0:
                data[sample][name] = np.zeros(shape, dtype=np.dtype(dtype))
            else:
                data[sample][name] = zarr.open_array(os.path.join(base, name), mode="r")[...]
    if needs_shared(restore_local):
        restore_local(state, data, shared)
    else:
        restore_local(state, data)


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------- public class


class Checkpoint:
    """A checkpoint directory: save the fit state atomically, load it back.

    Parameters
    ----------
    path
        Directory (created when missing), reachable from the driver and every worker.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from atlasfit.engine import Checkpoint, SerialEngine, plan_shards
    >>> eng = SerialEngine(plan_shards(["a", "b"], [2, 3]))
    >>> eng.setup(lambda spec: {"y": np.arange(sum(spec.n_cells), dtype=float)})
    >>> ck = Checkpoint(tempfile.mkdtemp())
    >>> dump = lambda st: {"a" if len(st["y"]) == 2 else "b": {"y": st["y"]}}
    >>> info = ck.save(eng, 3, {"v": np.ones(2), "lr": 0.1}, dump)
    >>> it, shared = ck.load_shared()
    >>> it, shared["lr"], shared["v"].tolist()
    (3, 0.1, [1.0, 1.0])
    """

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping | None = None, lock=None):
        self.path = Path(path).absolute()  # workers may run in another directory
        # what every saved version records of the fit that wrote it (atlasfit.engine._guard)
        self.fingerprint = None if fingerprint is None else canonical(fingerprint)
        # the fit's CheckpointLock on this directory, verified before every save (or None)
        self.lock = lock
        self.last_info: CheckpointInfo | None = None
        # iteration of the version this object saved or restored (safe to roll back to)
        self.owned_iteration: int | None = None

    # ------------------------------------------------------------------ pointer

    def latest(self) -> dict | None:
        """The pointer ``{"version", "iteration"}`` of the last complete save, or ``None``."""
        p = self.path / _POINTER
        if not p.is_file():
            return None
        with open(p) as fh:
            return json.load(fh)

    @property
    def iteration(self) -> int | None:
        """Iteration of the last complete checkpoint (``None`` when there is none)."""
        ptr = self.latest()
        return None if ptr is None else int(ptr["iteration"])

    def _version_dir(self) -> Path:
        ptr = self.latest()
        if ptr is None:
            raise FileNotFoundError(
                f"checkpoint {str(self.path)!r} has no complete version ({_POINTER} missing); "
                "start the fit from scratch"
            )
        return self.path / ptr["version"]

    def _manifest(self) -> dict:
        with open(self._version_dir() / "manifest.json") as fh:
            return json.load(fh)

    def saved_fingerprint(self) -> dict | None:
        """The fingerprint recorded by the last complete save (``None``: no checkpoint, or one written
        without a fingerprint)."""
        if self.latest() is None:
            return None
        return self._manifest().get("fingerprint")

    # ------------------------------------------------------------------ save / load

    def save(self, engine, iteration: int, shared: Mapping, dump_local: Callable | None) -> CheckpointInfo:
        """Write ``shared`` (driver) and every shard's ``dump_local(state)`` (owning workers).

        Parameters
        ----------
        engine
            An engine with ``map_spec`` (:class:`SerialEngine` or :class:`DaskEngine`).
        iteration
            Iterations completed (the loop resumes here).
        shared
            Dict of arrays / scalars / strings / nested dicts (no pickles).
        dump_local
            ``dump_local(state) -> {sample_name: {array_name: ndarray}}`` (with
            ``dump_local.needs_shared``: ``dump_local(state, shared)``); ``None`` saves no local state.
            The per-sample values may be any mapping: its arrays are written one at a time.

        Returns
        -------
        CheckpointInfo
            Bytes written and seconds taken (also kept as :attr:`last_info`).
        """
        import zarr

        t0 = time.perf_counter()
        if self.lock is not None:
            self.lock.verify()
        self.path.mkdir(parents=True, exist_ok=True)
        version = f"v{int(iteration):09d}-{uuid.uuid4().hex[:8]}"
        vdir = self.path / version
        arrays: dict[str, np.ndarray] = {}
        tree = _flatten_shared(shared, arrays, "")
        root = zarr.open_group(str(vdir), mode="w")
        root.create_group("local")
        np.savez_compressed(vdir / "shared.npz", **arrays)
        local_meta: dict[str, dict] = {}
        if dump_local is not None:
            parts = engine.map_spec(_write_local, str(vdir / "local"), dump_local,
                                    dict(shared) if needs_shared(dump_local) else None)
            for part in parts:
                local_meta.update(part)
        manifest = {
            "format": _FORMAT,
            "iteration": int(iteration),
            "shared": tree,
            "local": local_meta,
            "shards": [list(s.samples) for s in engine.shards],
            "fingerprint": self.fingerprint,
        }
        with open(vdir / "manifest.json", "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # the new version is durable (workers flushed their arrays) before the pointer names it
        for f in ("shared.npz", "zarr.json", "local/zarr.json", "local", "."):
            _fsync_file(vdir / f)
        tmp = self.path / f".{_POINTER}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as fh:
            json.dump({"version": version, "iteration": int(iteration)}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / _POINTER)
        _fsync_file(self.path)  # the rename itself is durable: only now may older versions go
        for old in self.path.iterdir():
            if old.is_dir() and old.name.startswith("v") and old.name != version:
                shutil.rmtree(old, ignore_errors=True)  # older versions, and saves that crashed half way
            elif old.is_file() and old.name.startswith(f".{_POINTER}."):
                try:  # a pointer a crashed save never renamed
                    old.unlink()
                except OSError:
                    pass
        n_bytes = _du(vdir)
        raw = sum(a.nbytes for a in arrays.values()) + sum(
            int(np.prod(shape)) * np.dtype(dt).itemsize
            for names in local_meta.values() for shape, dt in names.values())
        self.owned_iteration = int(iteration)
        self.last_info = CheckpointInfo(int(iteration), n_bytes, time.perf_counter() - t0, str(vdir),
                                        raw_bytes=int(raw), dir_bytes=_du(self.path))
        return self.last_info

    def load_shared(self) -> tuple[int, dict]:
        """Return ``(iteration, shared)`` of the last complete checkpoint."""
        vdir = self._version_dir()
        man = self._manifest()
        with np.load(vdir / "shared.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return int(man["iteration"]), _unflatten_shared(man["shared"], arrays)

    def restore(self, engine, restore_local: Callable | None) -> tuple[int, dict]:
        """Restore every shard's local state and return ``(iteration, shared)``.

        ``restore_local(state, {sample_name: {array_name: ndarray}})`` runs on each shard's owner
        with the arrays of the shard's samples (NumPy; convert to CuPy inside if needed); with
        ``restore_local.needs_shared`` it gets the checkpoint's shared state as a third argument.
        """
        man = self._manifest()
        shards = [list(s.samples) for s in engine.shards]
        if shards != man["shards"]:
            raise ValueError(
                f"checkpoint {str(self.path)!r} was written with a different shard plan "
                f"({len(man['shards'])} shards) than the engine's ({len(shards)} shards); "
                "re-create the engine with the same plan_shards(...) arguments"
            )
        it, shared = self.load_shared()
        if restore_local is not None:
            engine.map_spec(_read_local, str(self._version_dir() / "local"), man["local"], restore_local,
                            shared if needs_shared(restore_local) else None)
        self.owned_iteration = it
        return it, shared

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, iteration={self.iteration})"
