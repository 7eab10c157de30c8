"""Tests for the side-by-side benchmark's ratio rows (``benchmarks/bench_topic_atlas.py``)."""

import math
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.bench_topic_atlas import _median_runs, ratio_rows  # noqa: E402


def _runs():
    # three interleaved repeats of two fits; throughputs chosen so every ratio is exact by hand
    tp = {"atlasfit-default": [30.0, 36.0, 24.0], "atlasfit-memory": [20.0, 18.0, 16.0]}
    return [{"run": x, "repeat": r, "cells_per_s": v[r]} for r in range(3) for x, v in tp.items()]


def test_ratio_rows_median_and_per_repeat():
    runs = _runs()
    by = _median_runs(runs)
    # medians: default 30 (repeat 0), memory 18 (repeat 1)
    assert by["atlasfit-default"]["repeat"] == 0 and by["atlasfit-memory"]["repeat"] == 1
    rows = ratio_rows(runs, by)
    # only the pairs whose two runs were measured
    assert [(q["numerator"], q["denominator"]) for q in rows] == [("atlasfit-default", "atlasfit-memory")]
    q = rows[0]
    assert q["ratio"] == 30.0 / 18.0
    assert q["per_repeat"] == [30.0 / 20.0, 36.0 / 18.0, 24.0 / 16.0]  # 1.5, 2.0, 1.5
    assert q["median_of_per_repeat"] == 1.5


def test_ratio_rows_missing_value_is_nan():
    runs = _runs()
    runs[1]["cells_per_s"] = None  # a failed fit of repeat 0
    q = ratio_rows(runs, _median_runs(runs))[0]
    assert math.isnan(q["per_repeat"][0]) and q["per_repeat"][1] == 2.0


def test_pool_results_pairs_only_shared_repeats(tmp_path):
    import csv

    from benchmarks.bench_topic_atlas import pool_results

    def write(name, rows):
        path = tmp_path / name
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["run", "repeat", "cells_per_s", "peak_rss_tree_mib"])
            w.writeheader()
            w.writerows(rows)
        return str(path)

    # file a: default and memory; file b: default only (must not enter the default/memory ratio)
    a = write("a.csv", [{"run": "atlasfit-default", "repeat": 0, "cells_per_s": 30, "peak_rss_tree_mib": 1},
                        {"run": "atlasfit-memory", "repeat": 0, "cells_per_s": 20, "peak_rss_tree_mib": 1},
                        {"run": "atlasfit-default", "repeat": 1, "cells_per_s": 40, "peak_rss_tree_mib": 1},
                        {"run": "atlasfit-memory", "repeat": 1, "cells_per_s": 20, "peak_rss_tree_mib": 1}])
    b = write("b.csv", [{"run": "atlasfit-default", "repeat": 0, "cells_per_s": 1000, "peak_rss_tree_mib": 1}])
    rows = pool_results([a, b], str(tmp_path), "pooled")
    q = [r for r in rows if (r["numerator"], r["denominator"]) == ("atlasfit-default", "atlasfit-memory")][0]
    assert q["n"] == 2
    assert q["ratio"] == 35.0 / 20.0  # medians over the two paired repeats only: (30+40)/2 over 20
    assert q["per_repeat"] == [1.5, 2.0]
    assert (tmp_path / "pooled.csv").is_file()
