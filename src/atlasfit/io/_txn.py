"""All-or-nothing result writes: a staging area, a commit journal, roll-forward and debris cleanup.

Everything lives in one hidden directory inside the store (zarr lists only directories with zarr
metadata, so zarr, anndata and mudata never see it; it travels with the store when it is copied)::

    <store>/.atlasfit-txn/
        lock              flock: held while a journal is written and applied, and during recovery
        journal.json      exists only between a write's commit point and the end of its apply phase
        <txid>/owner      flock held by the writing process for the whole life of <txid>/
        <txid>/new/eN     staged elements (written before the commit point)
        <txid>/old/eN     replaced or removed elements (deleted after the apply phase)
        <txid>/...        scratch of the writer (e.g. per-sample PCA rows written by the workers)

A write stages every element, then, holding ``lock``, writes ``journal.json`` (a temporary file and
``os.replace``: the commit point) listing every move, applies the moves (each one idempotent given
the journal) and deletes the journal. A kill before the commit point leaves the old contents; a kill
after it is rolled forward by the next :func:`recover` (every :func:`open_atlas` and every write).
Whether a writer is alive is told by its ``owner`` lock, which the kernel drops when the process
dies: recovery never removes the staging of a live writer, and removes every dead one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from pathlib import Path

from ._validate import AtlasValidationError

WORK = ".atlasfit-txn"
_LOCK, _JOURNAL, _OWNER = "lock", "journal.json", "owner"
LOCK_WAIT_S = 120.0  # the longest wait for another writer's apply phase (renames only: milliseconds)
REGISTRY_ATTR = "atlasfit-results"  # attribute of uns/atlasfit_models: {model: [elements it wrote]}
_NOLOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class AtlasReadOnlyError(AtlasValidationError, PermissionError):
    """Raised before any work when results cannot be written because the store is read-only.

    Examples
    --------
    >>> issubclass(AtlasReadOnlyError, ValueError) and issubclass(AtlasReadOnlyError, PermissionError)
    True
    """


def _readonly_reason(d: Path) -> str | None:
    if os.access(d, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "no write permission"


def check_writable(store, paths=(), what: str = "write results into it") -> None:
    """Raise :class:`AtlasReadOnlyError` unless the store and the existing ``paths`` in it can be written.

    Parameters
    ----------
    store
        Store path.
    paths
        Paths relative to the store that a write renames into or out of (checked where they exist).
    what
        What the caller was about to do, for the message.
    """
    path = Path(store).absolute()
    for d in [path, *(path / p for p in paths)]:
        if not d.is_dir():
            continue
        reason = _readonly_reason(d)
        if reason:
            fix = "remount it read-write" if reason.startswith("read-only") else f"chmod -R u+w '{path}'"
            raise AtlasReadOnlyError(
                f"atlas store '{path}' is read-only ({reason} on '{d}'): cannot {what}; make it writable "
                f"(e.g. {fix}) or copy it to a writable place (e.g. cp -r '{path}' copy.zarr) and use the copy"
            )


# ---------------------------------------------------------------------------------------- locks
def _flock(fd: int, blocking: bool) -> bool:
    """True when locked (or when the file system has no locks: see :func:`_alive_by_pid`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in _NOLOCK_ERRNOS:
            return True
        raise


def _try_store_lock(path: Path) -> int | None:
    """The store lock's descriptor, or None if another process holds it."""
    work = path / WORK
    while True:
        try:
            work.mkdir(exist_ok=True)
            fd = os.open(work / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was tidied away between mkdir and open
            continue
        if not _flock(fd, blocking=False):
            os.close(fd)
            return None
        try:  # the lock file may have been unlinked by _tidy while we waited: lock the current one
            same = os.stat(work / _LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def store_lock(path, wait_s: float = LOCK_WAIT_S):
    """Hold the store's lock (waiting up to ``wait_s`` for another writer's apply phase)."""
    path = Path(path)
    deadline = time.monotonic() + wait_s
    while (fd := _try_store_lock(path)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"atlas store '{path}': another process has held {path / WORK / _LOCK} for "
                               f"{wait_s:.0f} s; wait for it to finish, or remove that file if no atlasfit "
                               "process uses the store")
        time.sleep(0.02)
    try:
        yield
    finally:
        os.close(fd)


def _alive_by_pid(owner: Path) -> bool:
    """Fallback where the file system has no locks: this host's dead pids are dead; others live a day."""
    try:
        info = json.loads(owner.read_text())
    except (OSError, ValueError):
        return time.time() - owner.stat().st_mtime < 86400 if owner.exists() else False
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except (OSError, KeyError, ValueError):
            return True
        return True
    return time.time() - float(info.get("started", 0)) < 86400


def _owner_alive(d: Path) -> bool:
    """Whether the process that created staging directory ``d`` still runs (holds its owner lock)."""
    owner = d / _OWNER
    try:
        fd = os.open(owner, os.O_RDONLY)
    except FileNotFoundError:
        return False  # created with its owner under the store lock: no owner = dead, or being deleted
    except OSError:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        except OSError as err:
            if err.errno in _NOLOCK_ERRNOS:
                return _alive_by_pid(owner)
            return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- durability
def _fsync_path(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def _write_json_atomic(target: Path, obj) -> None:
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_path(target.parent)


# ---------------------------------------------------------------------------------------- staging
class Staging:
    """A writer's staging directory (``path``) inside the store's hidden work directory."""

    def __init__(self, store: Path, txid: str, fd: int):
        self.store, self.txid, self._fd = store, txid, fd
        self.path = store / WORK / txid


@contextlib.contextmanager
def staging(store, what: str = "write results into it"):
    """Create a staging directory owned by this process; removed (with its scratch) on exit.

    Checks first that the store is writable (:class:`AtlasReadOnlyError`), and recovers what an
    earlier killed writer left (:func:`recover`).
    """
    path = Path(store).absolute()
    check_writable(path, what=what)
    with store_lock(path):
        _recover_locked(path)
        txid = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        d = path / WORK / txid
        d.mkdir()
        fd = os.open(d / _OWNER, os.O_RDWR | os.O_CREAT, 0o644)
        _flock(fd, blocking=False)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.time()}).encode())
    try:
        yield Staging(path, txid, fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)
        _tidy(path)


def _read_registry(models_dir: Path) -> tuple[dict, dict]:
    """(attributes of uns/atlasfit_models, its registry) — both empty when the group is absent."""
    try:
        attrs = json.loads((models_dir / ".zattrs").read_text())
    except FileNotFoundError:
        return {}, {}
    return attrs, {str(k): [str(t) for t in v] for k, v in dict(attrs.get(REGISTRY_ATTR, {})).items()}


def commit(st: Staging, staged: list[tuple[str, str]], *, models_key: str, model: str | None = None,
           replaces=()) -> None:
    """Commit staged elements ``[(path relative to st.path, target relative to the store)]``.

    Under the store lock: plans the moves (the elements ``model`` wrote before and does not write
    now are removed, as are ``replaces`` that exist and are not written now), updates the registry
    of ``uns/<models_key>``, writes the journal (the commit point) and applies it.
    """
    path, work = st.store, st.store / WORK
    _fsync_tree(st.path)
    with store_lock(path):
        _recover_locked(path)
        targets = [t for _, t in staged]
        models_dir = path / "uns" / models_key
        attrs, registry = _read_registry(models_dir)
        remove: list[str] = []
        if model is not None:
            for t in list(registry.get(model, [])) + [str(r) for r in replaces]:
                if t not in targets and t not in remove and (path / t).exists():
                    remove.append(t)
        gone = set(targets) | set(remove)
        registry = {k: [t for t in v if t not in gone] for k, v in registry.items()}
        if model is not None:
            registry[model] = targets
        registry = {k: v for k, v in registry.items() if v}
        ops: list[dict] = []
        need_models = any(t.startswith(f"uns/{models_key}/") for t in targets) or bool(registry) or \
            REGISTRY_ATTR in attrs
        if need_models:
            attrs = dict(attrs) or {"encoding-type": "dict", "encoding-version": "0.1.0"}
            attrs[REGISTRY_ATTR] = registry
            if models_dir.is_dir():
                (st.path / "registry.zattrs").write_text(json.dumps(attrs, indent=1))
                _fsync_path(st.path / "registry.zattrs")
                ops.append({"op": "file", "new": f"{st.txid}/registry.zattrs",
                            "target": f"uns/{models_key}/.zattrs"})
            else:
                g = st.path / "models-group"
                g.mkdir()
                (g / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
                (g / ".zattrs").write_text(json.dumps(attrs, indent=1))
                _fsync_tree(g)
                ops.append({"op": "put", "new": f"{st.txid}/models-group", "target": f"uns/{models_key}",
                            "old": f"{st.txid}/old/models-group"})
        for i, (rel, target) in enumerate(staged):
            ops.append({"op": "put", "new": f"{st.txid}/{rel}", "target": target, "old": f"{st.txid}/old/p{i}"})
        for i, target in enumerate(remove):
            ops.append({"op": "del", "target": target, "old": f"{st.txid}/old/d{i}"})
        _write_json_atomic(work / _JOURNAL, {"version": 1, "txid": st.txid, "ops": ops})  # commit point
        _apply(path, work / _JOURNAL)


# ---------------------------------------------------------------------------------------- recovery
def _apply(path: Path, journal_file: Path) -> None:
    """Apply a journal's moves (each idempotent: safe to repeat after a kill), then delete it."""
    try:
        journal = json.loads(journal_file.read_text())
        ops = list(journal["ops"])
    except (ValueError, KeyError, TypeError) as err:
        raise AtlasValidationError(f"atlas store '{path}': the result-write journal {journal_file} is damaged "
                                   f"({err}); results may be mixed: write them again") from None
    work = journal_file.parent
    parents = set()
    for op in ops:
        target = path / op["target"]
        parents.add(target.parent)
        if op["op"] == "file":
            new = work / op["new"]
            if new.exists():
                os.replace(new, target)
            continue
        old = work / op["old"]
        if op["op"] == "del":
            if target.exists() and not old.exists():
                old.parent.mkdir(exist_ok=True)
                os.rename(target, old)
            continue
        new = work / op["new"]
        if not new.exists():
            continue  # already moved into place
        if target.exists():
            if old.exists():  # cannot happen with one writer at a time; keep the stranger aside
                old = old.with_name(f"{old.name}-{uuid.uuid4().hex[:8]}")
            old.parent.mkdir(exist_ok=True)
            os.rename(target, old)
        os.rename(new, target)
    for p in parents:
        _fsync_path(p)
    os.unlink(journal_file)
    _fsync_path(work)


def _recover_locked(path: Path) -> None:
    """With the store lock held: roll a committed journal forward, remove dead writers' staging."""
    work = path / WORK
    if not work.is_dir():
        return
    if (work / _JOURNAL).exists():
        _apply(path, work / _JOURNAL)
    for entry in work.iterdir():
        if entry.name in (_LOCK, _JOURNAL):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if not _owner_alive(entry):
                shutil.rmtree(entry, ignore_errors=True)
        else:  # a journal's temporary file (its writer held the lock: dead now)
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _tidy(path: Path) -> None:
    """Remove the work directory when nothing is left in it but the lock (never waits)."""
    work = path / WORK
    if not work.is_dir():
        return
    fd = _try_store_lock(path)
    if fd is None:
        return
    try:
        if {p.name for p in work.iterdir()} <= {_LOCK}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(work / _LOCK)
            with contextlib.suppress(OSError):
                os.rmdir(work)
    finally:
        os.close(fd)


def recover(store, *, wait_s: float = 30.0) -> None:
    """Finish or clean up what a killed result write left in ``store`` (run by :func:`open_atlas`).

    A committed write (journal present) is rolled forward; the staging of writers that are no longer
    running is removed. Never fails on a read-only store: it warns when an interrupted write cannot
    be completed there, and otherwise leaves it alone.
    """
    path = Path(store).absolute()
    work = path / WORK
    if not work.is_dir():
        return
    if _readonly_reason(path) or _readonly_reason(work):
        if (work / _JOURNAL).exists():
            warnings.warn(f"atlas store '{path}' holds an interrupted result write that cannot be completed "
                          "because the store is read-only: some results may come from the old write and some "
                          "from the new; open it once from a process that can write to it", stacklevel=3)
        return
    try:
        with store_lock(path, wait_s=wait_s):
            _recover_locked(path)
    except TimeoutError as err:
        warnings.warn(f"{err} (recovery skipped)", stacklevel=3)
        return
    _tidy(path)
