"""A new user's path (issue 12): stores read without mudata FutureWarnings, the topic model built from
a store path given as a string, and a clear error instead of 'Nanny failed to start' when a script
starts the embedded cluster from its unguarded top level."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mudata as md
import pytest

import atlasfit
from atlasfit._spawn import _unguarded, unguarded_main_call
from atlasfit.datasets import planted_topic_atlas, synthetic_mudata


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "s.zarr"
    mdata = planted_topic_atlas(300, 10, n_genes=25, n_peaks=40, n_topics=3, seed=0).to_mudata()
    return atlasfit.io.convert(mdata, path, sample_key="sample", modalities={"rna": "counts", "atac": "counts"})


def test_reading_a_store_and_building_mudata_emit_no_future_warning(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # mudata's pull_on_update warnings become errors
        m = atlasfit.io.read_mudata(store)
        synthetic_mudata(n_cells=100, n_samples=2, features={"rna": 10}, seed=0)
        planted_topic_atlas(40, 10, n_genes=12, n_peaks=15, n_topics=2, seed=0).to_mudata()
    assert m["rna"].shape == (300, 25) and m["atac"].shape == (300, 40)
    # the behaviour is mudata 0.3's default (modality columns pulled into the global obs) ...
    assert "rna:sample" in m.obs.columns
    # ... and the option is only set inside atlasfit's calls: the user's global setting is untouched
    from mudata._core.config import OPTIONS
    assert OPTIONS["pull_on_update"] is None
    with md.set_options(pull_on_update=False):  # a user's own choice is kept
        assert "rna:sample" not in atlasfit.io.read_mudata(store).obs.columns


def test_read_mudata_names_a_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Zarr store directory"):
        atlasfit.io.read_mudata(tmp_path / "nope.zarr")


def test_topic_model_from_a_store_path_string(store):
    # README: from_mudata takes "your MuData, or a store path"; a str path goes to from_data's store path
    by_str = atlasfit.MultimodalAmortizedLDA.from_mudata(str(store), sample_key="sample", n_topics=3)
    by_path = atlasfit.MultimodalAmortizedLDA.from_data(Path(store), sample_key="sample", n_topics=3)
    assert by_str.config == by_path.config
    assert by_str.config.modalities == ("rna", "atac")
    assert dict(zip(by_str.config.modalities, by_str.config.likelihoods))["atac"] == "bernoulli"


@pytest.mark.parametrize(("src", "line", "unguarded"), [
    ("import x\nx.fit()\n", 2, True),                                       # top level
    ("import x\nif __name__ == '__main__':\n    x.fit()\n", 3, False),      # under the guard
    ("import x\nif '__main__' == __name__:\n    x.fit()\n", 3, False),      # operands swapped
    ("import x\nif __name__ == '__main__':\n    pass\nelse:\n    x.fit()\n", 5, True),  # its else branch
    ("import x\nif True:\n    x.fit()\n", 3, True),                          # another if
    ("def main():\n    x.fit()\nmain()\n", 3, True),                         # main() called unguarded
])
def test_unguarded_lines_are_found(tmp_path, src, line, unguarded):
    p = tmp_path / "script.py"
    p.write_text(src)
    assert _unguarded(p, line) is unguarded


def test_no_guard_needed_with_fork_or_outside_a_script():
    assert unguarded_main_call("fork") is None
    assert unguarded_main_call("spawn") is None  # called from pytest, not from a script's top level


def _run(tmp_path, body: str):
    script = tmp_path / "quick.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)


def test_unguarded_script_gets_a_clear_error_before_any_worker_starts(tmp_path):
    proc = _run(tmp_path, """
        from atlasfit.cluster import get_client
        client = get_client(n_workers=1, quiet=True)
    """)
    assert proc.returncode != 0
    assert "re-imports your script 'quick.py'; line 3" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr
    assert "Nanny failed to start" not in proc.stderr.split("RuntimeError: atlasfit:")[0]
