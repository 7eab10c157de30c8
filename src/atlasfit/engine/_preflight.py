"""Before a store fit on Dask workers: can every worker see the store the driver sees?

On HPC clusters the workers run on compute nodes, and a path that works on the login node (its
``/tmp``, a local disk, a relative path) may not exist there, or may hold another copy of the data.
One tiny task per worker (:func:`probe_store`) reports whether the path is a directory there and a
digest of the store's root metadata; :func:`preflight_store` compares them with the driver's before
any shard is loaded and names the workers (and their hosts) that see no store or another one.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

#: The store's root metadata files whose bytes identify it (zarr v3, then v2).
_ROOT_METADATA = ("zarr.json", ".zgroup", ".zattrs")


class StoreNotVisibleError(FileNotFoundError):
    """The atlas store is missing (or another one) on some Dask workers."""


def probe_store(path: str) -> dict:
    """What this process sees at ``path``: ``{"host", "exists", "digest", "error"}``.

    ``digest`` is a SHA-256 of the store's root metadata files (``None`` when there is none).

    Examples
    --------
    >>> probe_store("/nonexistent/atlas.zarr")["exists"]
    False
    """
    out: dict[str, Any] = {"host": socket.gethostname(), "exists": False, "digest": None, "error": None}
    try:
        p = Path(path)
        out["exists"] = p.is_dir()
        if out["exists"]:
            h = hashlib.sha256()
            found = False
            for name in _ROOT_METADATA:
                f = p / name
                if f.is_file():
                    h.update(name.encode() + b"\0" + f.read_bytes())
                    found = True
            out["digest"] = h.hexdigest() if found else None
    except OSError as e:  # permission denied, stale NFS handle, ...
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def visibility_problems(path: str, driver: dict, workers: dict[str, dict]) -> list[str]:
    """One line per worker that does not see the driver's store at ``path`` (empty: all do).

    Examples
    --------
    >>> me = {"host": "login1", "exists": True, "digest": "ab", "error": None}
    >>> visibility_problems("/s.zarr", me, {"tcp://10.0.0.5:1": {"host": "node5", "exists": False,
    ...                                     "digest": None, "error": None}})
    ["worker tcp://10.0.0.5:1 on node5: no directory '/s.zarr' there"]
    """
    out = []
    for addr, r in sorted(workers.items()):
        where = f"worker {addr} on {r.get('host', '?')}"
        if r.get("error"):
            out.append(f"{where}: cannot read {path!r} ({r['error']})")
        elif not r.get("exists"):
            out.append(f"{where}: no directory {path!r} there")
        elif r.get("digest") != driver.get("digest"):
            out.append(f"{where}: {path!r} holds another store (its root metadata differs from the driver's copy)")
    return out


def preflight_store(engine: Any, path: str | os.PathLike, who: str = "atlasfit", timeout: float = 120.0) -> None:
    """Check that every worker of a Dask ``engine`` sees the store at ``path`` as the driver does.

    In-process engines are not checked (the driver reads the store). Waits up to ``timeout`` seconds
    for a first worker (the error then lists the batch jobs and why they wait).

    Raises
    ------
    StoreNotVisibleError
        Naming each worker (address and host) that sees no store, or another one, at the path.
    """
    client = getattr(engine, "client", None)
    if client is None:
        return
    from .._jobqueue import wait_for_workers  # noqa: PLC0415

    path = os.path.abspath(os.fspath(path))
    wait_for_workers(client, 1, timeout)
    driver = probe_store(path)
    workers = client.run(probe_store, path)
    problems = visibility_problems(path, driver, workers)
    if problems:
        raise StoreNotVisibleError(
            f"{who}: the atlas store {path!r} is not visible to {len(problems)} of {len(workers)} Dask worker(s) "
            f"as the driver (on {driver['host']}) sees it:\n  " + "\n  ".join(problems) +
            "\nWorkers started by a batch system run on other nodes: put the store (and the checkpoint "
            "directory) on a file system every node mounts (a shared home, project or scratch space), not "
            "on the login node's /tmp or local disk, and pass its absolute path."
        )
