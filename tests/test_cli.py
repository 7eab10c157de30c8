"""The ``atlasfit`` command line, end to end on small data (in process)."""

from __future__ import annotations

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
