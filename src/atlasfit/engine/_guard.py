"""What keeps a checkpoint directory to one fit: the fit's fingerprint and a lock.

* **Fingerprint.** A model describes its fit as a small dict of named parts of plain data, e.g.
  ``{"model": "MultiGEDI", "config": {"K": 10, ...}, "data": {"store": ..., "shape": ...},
  "seed": 0}``. Every checkpoint version records it (``manifest.json``); a resume whose fingerprint
  differs is refused before any work with :class:`CheckpointMismatchError`, naming every differing
  part with the checkpoint's and this fit's values. The engine knows nothing of models: it only
  canonicalises, hashes and compares the dict.
* **Lock.** :class:`CheckpointLock` is a file ``LOCK.json`` in the checkpoint directory, created
  with ``O_CREAT | O_EXCL`` (atomic on local disks, NFSv3+, Lustre, GPFS), holding the pid, host,
  start time and a random token of its fit; a daemon thread refreshes its modification time every
  :data:`HEARTBEAT_S` seconds. A second fit on the same directory gets
  :class:`CheckpointLockedError`. A lock is *stale*, and taken over, when its pid is dead on this
  host, when it was left by an earlier fit of this very process that did not release it, or when its
  heartbeat is older than :data:`STALE_AFTER_S` (a driver killed on another node of a cluster:
  its pid cannot be checked from here, so the next fit waits for the heartbeat to go stale).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np

#: Name of the lock file inside a checkpoint directory.
LOCK_NAME = "LOCK.json"
#: Seconds between two refreshes of a held lock's modification time.
HEARTBEAT_S = 30.0
#: A lock whose modification time is older than this (seconds, measured on the file system's clock)
#: belongs to a fit that is gone (killed on another host) and is taken over. Generous against NFS
#: attribute caching (up to 60 s) and slow metadata servers.
STALE_AFTER_S = 300.0

# tokens of the locks this process holds now (a lock file with our pid but an unknown token was left
# by an earlier fit of this process and is stale)
_HELD: set[str] = set()


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by another fit (model, configuration, data or seed) than the one
    asked to resume from it. ``differences`` lists ``(part, checkpoint value, this fit's value)``."""

    def __init__(self, message: str, differences: list | tuple = ()):
        super().__init__(message)
        self.differences = list(differences)

    def __reduce__(self):
        return (type(self), (self.args[0], self.differences))


class CheckpointLockedError(RuntimeError):
    """Another fit holds the checkpoint directory (or took it over from this one)."""


# --------------------------------------------------------------------------- fingerprint


def canonical(obj: Any, where: str = "fingerprint") -> Any:
    """``obj`` as plain JSON data: dicts with string keys, lists, str, int, float, bool, None.

    NumPy scalars become Python numbers, dtypes and paths strings, tuples lists; an array becomes its
    values (up to 16) or ``"<shape> <dtype> sha256:<16 hex>"``. Anything else is an error naming the
    part: a model gives plain data.

    Examples
    --------
    >>> canonical({"K": np.int64(3), "dtype": np.dtype("float32"), "layers": ("M1", "M2")})
    {'K': 3, 'dtype': 'float32', 'layers': ['M1', 'M2']}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else repr(v)
    if isinstance(obj, np.dtype) or (isinstance(obj, type) and issubclass(obj, np.generic)):
        return np.dtype(obj).name
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): canonical(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return canonical(obj.tolist(), where)
        if obj.size <= 16:
            return canonical(obj.tolist(), where)
        a = np.ascontiguousarray(obj)
        digest = hashlib.sha256(a.tobytes()).hexdigest()[:16]
        return f"{'x'.join(map(str, a.shape))} {a.dtype.name} sha256:{digest}"
    raise TypeError(
        f"checkpoint fingerprint: {where} has type {type(obj).__name__}; give plain data (dicts, lists, "
        "str, numbers, bool, None, small arrays) or a hash of it"
    )


def fingerprint_digest(fingerprint: Mapping) -> str:
    """8 hex digits of the SHA-256 of the canonical JSON of ``fingerprint`` (names a default
    checkpoint directory per fit: :func:`~atlasfit.engine.default_checkpoint_dir`).

    Examples
    --------
    >>> fingerprint_digest({"model": "m", "seed": 0}) == fingerprint_digest({"seed": 0, "model": "m"})
    True
    """
    text = json.dumps(canonical(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _flatten(obj: Any, prefix: str, out: dict) -> None:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}[{i}]", out)
        out.setdefault(f"{prefix}#len", len(obj))
    else:
        out[prefix] = obj


_MISSING = object()


def fingerprint_differences(old: Mapping | None, new: Mapping) -> list[tuple[str, Any, Any]]:
    """``[(part, old value, new value)]`` of two fingerprints, parts as dotted paths (``config.K``).

    Examples
    --------
    >>> fingerprint_differences({"config": {"K": 3}, "seed": 0}, {"config": {"K": 4}, "seed": 0})
    [('config.K', 3, 4)]
    """
    a, b = {}, {}
    _flatten(canonical(old or {}), "", a)
    _flatten(canonical(new), "", b)
    diffs = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            diffs.append((key.replace("#len", " (length)"), "<absent>" if va is _MISSING else va,
                          "<absent>" if vb is _MISSING else vb))
    return diffs


def _show(v: Any, limit: int = 100) -> str:
    s = v if isinstance(v, str) and v == "<absent>" else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe_differences(diffs) -> str:
    """One line per difference: ``part: <checkpoint value> (checkpoint) -> <value> (this fit)``."""
    return "\n".join(f"  {k}: {_show(a)} (checkpoint) -> {_show(b)} (this fit)" for k, a, b in diffs)


def mismatch_error(who: str, path, old: Mapping | None, new: Mapping, *, extra: str = "") -> CheckpointMismatchError:
    """The :class:`CheckpointMismatchError` of resuming fit ``new`` from a checkpoint of ``old``."""
    diffs = fingerprint_differences(old, new)
    return CheckpointMismatchError(
        f"{who}: cannot resume from the checkpoint in {str(path)!r}: it was written by another fit (another "
        f"configuration, data or seed). What differs:\n{describe_differences(diffs)}\n{extra}"
        "Fix: resume with the same model, settings, data and seed as the checkpointed fit; or start a new fit "
        f"without resume_from_checkpoint (give another checkpoint_dir=, or delete {str(path)!r}).",
        diffs,
    )


# --------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot test): assume alive
    return True


def _fs_now(directory: Path) -> float:
    """Now on the clock of the file system holding ``directory`` (a probe file's mtime), so lock ages
    are measured on one clock even when hosts' clocks differ."""
    probe = directory / f".lock-probe-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


class CheckpointLock:
    """An exclusive lock on a checkpoint directory (see the module docstring).

    Parameters
    ----------
    directory
        The checkpoint directory (created when missing).
    who
        The fit's name in errors, e.g. ``"MultiGEDI.fit"``.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> lock = CheckpointLock(d, "demo").acquire()
    >>> try:
    ...     CheckpointLock(d, "other").acquire()
    ... except CheckpointLockedError:
    ...     print("locked")
    locked
    >>> lock.release()
    >>> CheckpointLock(d, "other").acquire().release()
    """

    def __init__(self, directory: str | os.PathLike, who: str = "atlasfit"):
        self.directory = Path(directory).absolute()
        self.path = self.directory / LOCK_NAME
        self.who = who
        self.token: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    def _stale_reason(self, holder: dict) -> str | None:
        host, pid = holder.get("host"), holder.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                if holder.get("token") not in _HELD:
                    return "left by an earlier fit of this process"
                return None
            if not _pid_alive(pid):
                return f"its process {pid} on this host is gone"
        try:
            age = _fs_now(self.directory) - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "released meanwhile"
        if age > STALE_AFTER_S:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def _locked_error(self, holder: dict) -> CheckpointLockedError:
        try:
            age = f", last heartbeat {max(0.0, _fs_now(self.directory) - os.stat(self.path).st_mtime):.0f} s ago"
        except OSError:
            age = ""
        who = holder.get("who", "a fit")
        return CheckpointLockedError(
            f"{self.who}: the checkpoint directory {str(self.directory)!r} is in use by another fit ({who}, pid "
            f"{holder.get('pid', '?')} on host {holder.get('host', '?')!r}, started {holder.get('started', '?')}{age}). "
            "Two fits must not share a checkpoint directory. Fix: give this fit another checkpoint_dir= (or wait "
            f"for the other fit to end). If that fit is gone, its lock is taken over automatically once its process "
            f"is seen dead on its host or its heartbeat is {STALE_AFTER_S:.0f} s old; or delete {str(self.path)!r}."
        )

    def acquire(self) -> CheckpointLock:
        """Take the lock (``self``), taking over a stale one; :class:`CheckpointLockedError` when held."""
        self.directory.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(), "who": self.who, "token": token,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released between our two calls
                reason = self._stale_reason(holder)
                if reason is None:
                    raise self._locked_error(holder) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.token = token
            _HELD.add(token)
            self._start_heartbeat()
            return self
        raise CheckpointLockedError(
            f"{self.who}: could not lock the checkpoint directory {str(self.directory)!r} (other fits keep "
            "taking it); give this fit another checkpoint_dir="
        )

    def _take_over(self, holder: dict) -> None:
        # move the stale lock aside atomically (one taker wins); if what we moved is not the lock we
        # judged stale (a fresh one replaced it meanwhile), put it back
        aside = self.directory / f".{LOCK_NAME}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside) as fh:
                moved = json.load(fh)
        except (OSError, ValueError):
            moved = {}
        if holder and moved.get("token") != holder.get("token"):
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        try:
            os.unlink(aside)
        except OSError:
            pass

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"atlasfit-lock-{self.token[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.owned():
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def owned(self) -> bool:
        """Whether the lock file is still this lock's."""
        holder = self._holder()
        return bool(self.token) and holder is not None and holder.get("token") == self.token

    def verify(self) -> None:
        """Raise :class:`CheckpointLockedError` when another fit took the lock over (e.g. this process
        was suspended past :data:`STALE_AFTER_S`): writing on would mix two fits' checkpoints."""
        if self.token is None:
            return
        if self.lost or not self.owned():
            self.lost = True
            raise CheckpointLockedError(
                f"{self.who}: lost the lock on the checkpoint directory {str(self.directory)!r}: another fit "
                f"took it over (this fit's heartbeat was older than {STALE_AFTER_S:.0f} s, e.g. it was "
                "suspended); stopping before writing into it. Give each fit its own checkpoint_dir="
            )

    def release(self) -> None:
        """Drop the lock (idempotent); the file is removed only while it is still this lock's."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self.token is None:
            return
        try:
            if self.owned():
                os.unlink(self.path)
        except OSError:
            pass
        _HELD.discard(self.token)
        self.token = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self.token is not None

    def __enter__(self) -> CheckpointLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"CheckpointLock({str(self.directory)!r}, held={self.held})"
