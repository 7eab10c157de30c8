"""Refuse to start an embedded cluster from a script's unguarded top level.

Dask's local workers are started with ``multiprocessing``'s ``spawn`` method (the default of
``distributed.worker.multiprocessing-method``; ``forkserver`` behaves the same way): each new process
imports the user's script again, as the module ``__mp_main__``. A script that converts and fits at its
top level, outside ``if __name__ == "__main__":``, therefore runs again in every worker process, which
fails there (``FileExistsError`` from the second convert, a second cluster started inside a worker)
and leaves the user with ``RuntimeError: Nanny failed to start``. :func:`check_main_guard` sees the
situation before any process is started and says what to change.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

_REEXEC_METHODS = ("spawn", "forkserver")


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    t = node.test
    if len(t.ops) != 1 or not isinstance(t.ops[0], ast.Eq):
        return False
    sides = [t.left, t.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def _unguarded(path: Path, lineno: int) -> bool:
    """Whether line ``lineno`` of the script lies in a top-level statement that is not inside an
    ``if __name__ == "__main__":`` block (False when the file cannot be read or parsed)."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False
    for node in tree.body:
        end = getattr(node, "end_lineno", node.lineno) or node.lineno
        if node.lineno <= lineno <= end:
            if _is_main_guard(node) and lineno > node.lineno:
                # inside the guard's body (its else: branch runs on re-import: unguarded)
                body_end = max(getattr(s, "end_lineno", s.lineno) for s in node.body)
                return lineno > body_end
            return True
    return False


def unguarded_main_call(method: str | None = None) -> tuple[str, int] | None:
    """``(script, line)`` of the main script's top-level line that (indirectly) called us, when that
    line would run again in every spawned worker process; ``None`` otherwise.

    ``None`` for interactive sessions (no ``__main__.__file__``), for calls made from functions of
    the script (they run only when called), under an ``if __name__ == "__main__":`` guard, or when
    the workers are started with ``fork``.

    Examples
    --------
    >>> unguarded_main_call() is None   # called from a doctest, not from a script's top level
    True
    """
    if method is None:
        import dask.config  # noqa: PLC0415

        method = dask.config.get("distributed.worker.multiprocessing-method", "spawn")
    if method not in _REEXEC_METHODS:
        return None
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main is None or not main_file:
        return None
    main_dict = vars(main)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main_dict and frame.f_code.co_name == "<module>":
            path = Path(frame.f_code.co_filename)
            if path.suffix == ".py" and _unguarded(path, frame.f_lineno):
                return str(path), frame.f_lineno
            return None
        frame = frame.f_back
    return None


def in_spawned_reimport() -> bool:
    """True while a spawned process re-imports the main script (``__mp_main__``) and that import
    is what called us."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            return True
        frame = frame.f_back
    return False


def check_main_guard(what: str = "the embedded Dask LocalCluster") -> None:
    """Raise :class:`RuntimeError` when starting ``what`` here would make every worker process run
    the user's script again (see the module docstring); do nothing otherwise.

    Examples
    --------
    >>> check_main_guard()   # from a doctest: nothing to refuse
    """
    if in_spawned_reimport():
        raise RuntimeError(
            f"atlasfit: {what} was asked for while a Dask worker process was re-importing your script: "
            "the code that converts and fits runs at the script's top level. Put it under "
            "`if __name__ == \"__main__\":` (and use overwrite=True in convert so that reruns work).")
    hit = unguarded_main_call()
    if hit is not None:
        script, line = hit
        raise RuntimeError(
            f"atlasfit: {what} starts its worker processes with 'spawn', which re-imports your script "
            f"{Path(script).name!r}; line {line} (which needs the cluster) is at the script's top level, so "
            "every worker would run it again and fail ('Nanny failed to start'). Put the script's work "
            "under `if __name__ == \"__main__\":` (and use overwrite=True in convert so that reruns work), "
            "or run the workers as threads of this process (distributed.Client(processes=False) before the fit)."
        )
