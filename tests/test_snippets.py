"""Every ```python block of README.md and docs/*.md runs as written (issue 12).

Each block is written as a standalone script into a fresh temporary directory and run there with this
Python, twice in a row (a rerun must work on what the first run left behind: stores, saved models,
checkpoints); both runs must exit 0. Blocks that start a Dask cluster show the
``if __name__ == "__main__":`` guard, since the cluster's spawned worker processes import the script
again. Two blocks run at a time (different blocks in different directories), so the whole check
takes about half the sum of its scripts' times on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return _FENCE.findall(path.read_text())


BLOCKS = [(f"{p.relative_to(ROOT)}#{i}", code) for p in DOCS for i, code in enumerate(python_blocks(p))]


def run_twice(name: str, code: str, where: Path, timeout: float = 300.0) -> list[str]:
    """Run ``code`` as ``where/snippet.py`` twice; return one failure message per failed run."""
    where.mkdir(parents=True)
    script = where / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "")}
    failures = []
    for run in (1, 2):
        try:
            proc = subprocess.run([sys.executable, script.name], cwd=where, capture_output=True, text=True,
                                  timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            failures.append(f"{name}, run {run}: still running after {timeout:.0f} s")
            break
        if proc.returncode != 0:
            failures.append(f"{name}, run {run}: exit {proc.returncode}\n--- stderr (end) ---\n"
                            f"{proc.stderr[-3000:]}\n--- stdout (end) ---\n{proc.stdout[-1000:]}")
            break
    return failures


def test_markdown_blocks_are_found():
    # the fence pattern must see the blocks the docs have (README: the MultiGEDI and topic snippets)
    names = [n for n, _ in BLOCKS]
    assert "README.md#0" in names and "README.md#1" in names
    assert any(n.startswith("docs/quickstart.md#") for n in names)
    assert python_blocks(Path(__file__)) == []  # this file has no fence at a line start


def test_every_python_block_runs_as_a_script_twice(tmp_path):
    assert BLOCKS
    # the blocks that start a Dask cluster (guarded) take longest: start them first, so that the two
    # lanes end together
    order = sorted(enumerate(BLOCKS), key=lambda item: "__main__" not in item[1][1])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(
            lambda item: run_twice(item[1][0], item[1][1], tmp_path / f"b{item[0]:02d}"), order))
    failures = [f for r in results for f in r]
    assert not failures, "\n\n".join(failures)


if __name__ == "__main__":  # time each block: python tests/test_snippets.py [name-substring]
    import resource
    import tempfile
    import time

    def _cpu():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    pick = sys.argv[1] if len(sys.argv) > 1 else ""
    with tempfile.TemporaryDirectory() as d:
        for i, (name, code) in enumerate(BLOCKS):
            if pick not in name:
                continue
            t, c = time.perf_counter(), _cpu()
            fails = run_twice(name, code, Path(d) / f"b{i:02d}")
            print(f"{name:28s} {time.perf_counter() - t:6.1f} s wall {_cpu() - c:6.1f} s CPU (both runs)  "
                  f"{'ok' if not fails else 'FAILED'}", flush=True)
            for f in fails:
                print(f)
