"""The ``atlasfit`` command line, end to end on small data (in process)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import zarr

from atlasfit.cli import build_parser, main
from atlasfit.datasets import multigedi_real_5k


@pytest.fixture(scope="module")
def h5mu(tmp_path_factory):
    mdata = multigedi_real_5k()
    keep = mdata["rna"].obs["sample"].isin(["0", "1", "2"]).to_numpy()
    small = mdata[keep].copy()
    path = tmp_path_factory.mktemp("cli") / "real_small.h5mu"
    small.write(path)
    return path, small


def test_convert_info_fit(h5mu, tmp_path, capsys):
    path, small = h5mu
    store = tmp_path / "a.zarr"
    assert main(["convert", str(path), str(store), "--sample-key", "sample"]) == 0
    capsys.readouterr()
    assert main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_samples"] == 3
    assert info["modalities"]["rna"]["n_cells"] == small["rna"].n_obs
    assert main(["fit", str(store), "--modality", "rna:M", "--modality", "splicing:M_list:M1,M2",
                 "--K", "3", "--iterations", "2", "--workers", "1"]) == 0
    emb = zarr.open_group(str(store), mode="r")["mod/rna/obsm/X_multigedi_pca"][...]
    assert emb.shape == (small["rna"].n_obs, 3) and np.isfinite(emb).all()
    # issue 12: not a TTY (captured), so one plain line per iteration with sigma2 of both modalities,
    # and where the checkpoints go and how big they are, before and after the fit
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "iteration " in ln and "sigma2" in ln]
    assert [ln.split("iteration ")[1].split()[0] for ln in lines] == ["1/2", "2/2"], out
    assert all("rna=" in ln and "splicing=" in ln for ln in lines), out
    ck_dir = store.parent / (store.name + ".checkpoints")
    assert f"checkpoints in {ck_dir}" in out and "--checkpoint-every 0" in out, out
    assert "x the store's" in out and "MB" in out, out
    # --resume continues from that checkpoint: only the new iteration runs
    assert main(["fit", str(store), "--modality", "rna:M", "--modality", "splicing:M_list:M1,M2",
                 "--K", "3", "--iterations", "3", "--workers", "1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from the checkpoint at iteration 2" in out, out
    assert [ln.split("iteration ")[1].split()[0] for ln in out.splitlines() if "sigma2" in ln] == ["3/3"], out


def test_errors_are_clear(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "x.zarr", "--modality", "rna:Poisson"])


def test_synth(tmp_path):
    store = tmp_path / "s.zarr"
    assert main(["synth", str(store), "--n-cells", "600", "--n-samples", "3",
                 "--features", "rna=50", "splicing=30", "atac=20"]) == 0
    from atlasfit.io import open_atlas

    atlas = open_atlas(store)
    assert set(atlas.modalities) == {"rna", "splicing", "atac"}
    assert int(atlas.samples["rna"].sum()) == 600


def test_convert_binary_flag_keeps_every_modality(tmp_path, capsys):
    """Issue 11 item 1: `--binary atac` declared atac's kind but dropped every other modality (the CLI
    passed {'atac': 'binary'} as the modalities to keep). A multiome file now converts whole; without
    the flag the NaN error speaks in CLI flags."""
    import anndata as ad
    import mudata as md
    import pandas as pd

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"sample": np.repeat(["a", "b"], 10)}, index=[f"c{i}" for i in range(20)])
    atac = (rng.random((20, 6)) < 0.3).astype(np.float32)
    atac[3, 2] = np.nan  # a missing value: only kind 'binary' allows it
    mdata = md.MuData({"rna": ad.AnnData(rng.poisson(2.0, (20, 5)).astype(np.float32), obs=obs.copy()),
                       "atac": ad.AnnData(atac, obs=obs.copy())})
    src = tmp_path / "multiome.h5mu"
    mdata.write(src)
    store = tmp_path / "m.zarr"
    assert main(["convert", str(src), str(store), "--sample-key", "sample"]) == 2
    err = capsys.readouterr().err
    assert "--binary atac" in err and "kinds=" not in err
    assert main(["convert", str(src), str(store), "--sample-key", "sample", "--binary", "atac"]) == 0
    from atlasfit.io import open_atlas

    atlas = open_atlas(store)
    assert list(atlas.modalities) == ["rna", "atac"]
    assert atlas.kind("atac") == "binary" and atlas.kind("rna") == "counts"
    # an existing store: the advice is the flag, not the keyword argument
    assert main(["convert", str(src), str(store), "--sample-key", "sample", "--binary", "atac"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    assert main(["synth", str(store), "--n-cells", "60", "--n-samples", "2", "--features", "rna=5"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_help_shows_defaults_and_plain_text():
    """Issue 12: every option with a default shows it; the top-level help has no reST markup."""
    import subprocess
    import sys

    top = subprocess.run([sys.executable, "-m", "atlasfit.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "``" not in top and ":func:" not in top and "fit" in top
    for parser in _all_parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text
        for action in parser._actions:
            d = action.default
            if action.option_strings and d not in (None, False, argparse.SUPPRESS, []) and not action.required:
                assert action.help and "default" in parser._get_formatter()._get_help_string(action), (
                    parser.prog, action.dest)
    fit_help = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()
    for needle in ("--K K", "(default: 10)", "(default: 30)", "(default: float64)", "--checkpoint-every"):
        assert needle in fit_help, needle


@pytest.fixture(scope="module")
def store(h5mu, tmp_path_factory):
    path, _ = h5mu
    out = tmp_path_factory.mktemp("cli_store") / "s.zarr"
    assert main(["convert", str(path), str(out), "--sample-key", "sample"]) == 0
    return out


@pytest.mark.parametrize("argv, needles", [
    (["--modality", "foo:M"], ["--modality foo:M", "no modality 'foo'", "rna, splicing"]),
    (["--modality", "splicing:M_list"], ["--modality splicing:M_list:M1,M2"]),
    (["--modality", "rna:M:nolayer"], ["--modality rna:M", "no layer 'nolayer'"]),
    (["--modality", "rna:X"], ["--modality rna:M", "--binary rna"]),
    (["--modality", "rna:M", "--modality", "rna:M"], ["--modality 'rna' is given twice"]),
    (["--modality", "rna:M", "--sample-key", "donor"], ["--sample-key 'donor'", "sorted by 'sample'"]),
    (["--modality", "rna:M", "--resume"], ["--resume: no checkpoint of this fit", "without --resume"]),
])
def test_fit_checks_arguments_before_a_cluster(store, monkeypatch, capsys, argv, needles):
    """Issue 12: bad modalities and flags are refused before a cluster starts, in CLI flags."""
    import atlasfit.cluster

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started before the arguments were checked")

    monkeypatch.setattr(atlasfit.cluster, "get_client", no_cluster)
    monkeypatch.setattr(atlasfit.cluster, "cluster_session", no_cluster)
    assert main(["fit", str(store), *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "sample_key=" not in err and "max_iterations" not in err and "resume_from_checkpoint" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--K", "0"], "--K must be >= 1"),
    (["--iterations", "-1"], "--iterations must be >= 0"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--iterations", "many"], "--iterations needs an integer"),
])
def test_fit_bad_numbers_name_the_flag(capsys, argv, needle):
    with pytest.raises(SystemExit):
        main(["fit", "x.zarr", "--modality", "rna:M", *argv])
    assert needle in capsys.readouterr().err


def test_fit_progress_bar_shows_sigma2(monkeypatch):
    """On a terminal the progress is a tqdm bar whose postfix carries sigma2 (X modalities: fixed, left out)."""
    import io
    import sys

    from atlasfit.cli import _FitProgress

    drawn_to = io.StringIO()  # the bar's file (stderr): read back what it drew
    monkeypatch.setattr(sys, "stderr", drawn_to)
    prog = _FitProgress("bar", 3, {"rna": {"obs_type": "M"}, "atac": {"obs_type": "X"}})
    prog(1, {"rna/sigma2": 0.5, "atac/sigma2": 1.0})
    prog.close()
    drawn = drawn_to.getvalue()
    assert "1/3" in drawn and "sigma2 rna=0.5" in drawn and "atac=" not in drawn


def test_fit_topic_prints_the_loss_per_epoch(store, capsys):
    """Issue 12: the topic model from the command line, one line per epoch with the loss (not a TTY)."""
    assert main(["fit-topic", str(store), "--modality", "rna:multinomial", "--n-topics", "3", "--epochs", "2",
                 "--batch-size", "256", "--workers", "1", "--checkpoint-every", "0"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("atlasfit fit-topic: epoch ")]
    assert [ln.split()[3] for ln in lines] == ["1/2", "2/2"] and all("loss/cell" in ln for ln in lines), out
    theta = zarr.open_group(str(store), mode="r")["mod/rna/obsm/X_topic"][...]
    assert theta.shape[1] == 3 and np.allclose(theta.sum(axis=1), 1.0, atol=1e-4)


def test_fit_topic_bad_modality_names_the_flag(store, capsys, monkeypatch):
    import atlasfit.cluster

    monkeypatch.setattr(atlasfit.cluster, "cluster_session", lambda *a, **k: pytest.fail("cluster started"))
    assert main(["fit-topic", str(store), "--modality", "foo"]) == 2
    assert "--modality foo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit-topic", str(store), "--modality", "rna:poisson"])
    assert "--modality 'rna:poisson'" in capsys.readouterr().err
