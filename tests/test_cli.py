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
