"""Tests for the benchmark memory sampler ``benchmarks/_rss.py``."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks._rss import PeakRSSSampler, run_and_sample, tree_rss  # noqa: E402

MB = 10**6

# The child touches 200 MB of memory (np.ones writes every page, so it is resident, not just
# reserved) and holds it for 1 s, i.e. for >= 5 samples at interval 0.1 s. The sampled peak must
# therefore be at least 200 MB minus slack; 150 MB leaves 50 MB for sampling jitter / allocator
# behaviour while still failing if only the parent (or no child memory) were measured, since the
# parent of the grandchild below is a bare interpreter (~10-30 MB).
_ALLOC_200MB = textwrap.dedent(
    """
    import time, numpy as np
    a = np.ones(200 * 10**6 // 8)
    time.sleep(1.0)
    print(a[-1])
    """
)

# A launcher that allocates nothing itself and runs the allocation in a *grandchild*, so the
# test proves that descendants (not only the direct child) are summed.
_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1]]))
    """
)


def test_run_and_sample_counts_grandchild():
    rc, wall, peak = run_and_sample(
        [sys.executable, "-c", _LAUNCHER, _ALLOC_200MB], interval=0.1, timeout=60
    )
    assert rc == 0
    assert wall >= 1.0  # the grandchild sleeps 1 s
    assert peak >= 150 * MB, f"peak {peak / MB:.0f} MB < 150 MB"


def test_run_and_sample_small_process_is_small():
    # A bare interpreter is far below 150 MB: the threshold above is meaningful.
    rc, _, peak = run_and_sample([sys.executable, "-c", "import time; time.sleep(0.3)"])
    assert rc == 0
    assert 0 < peak < 150 * MB


def test_run_and_sample_timeout_kills():
    t0 = time.perf_counter()
    rc, wall, _ = run_and_sample(
        [sys.executable, "-c", "import time; time.sleep(30)"], interval=0.05, timeout=0.5
    )
    assert rc != 0
    assert time.perf_counter() - t0 < 10


def test_peak_sampler_sees_children():
    with PeakRSSSampler(interval=0.1) as s:
        subprocess.run([sys.executable, "-c", _ALLOC_200MB], check=True, capture_output=True)
    assert s.n_samples >= 5
    assert s.peak_rss_bytes - s.baseline_rss_bytes >= 150 * MB
    assert s.wall_s >= 1.0


def test_bad_interval_and_cmd():
    with pytest.raises(ValueError, match="interval"):
        run_and_sample([sys.executable, "-c", "pass"], interval=1.0)
    with pytest.raises(ValueError, match="interval"):
        PeakRSSSampler(interval=0)
    with pytest.raises(TypeError, match="list of arguments"):
        run_and_sample("echo hi")


def test_tree_rss_of_self_positive():
    import psutil

    assert tree_rss(psutil.Process()) > 0
