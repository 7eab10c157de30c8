"""The topic model's summaries as engine rounds, ``write`` into the store, and the Zarr save format
(issue 10 items 2 and 5).

Data: 240 cells in 3 samples (sorted by sample, as a store holds them), RNA Poisson(2) counts on 12
genes and ATAC Bernoulli(0.25) on 10 peaks, seed 0; K=3, 2 epochs. The assertions are identities
(the same computation on other hosts, workers or formats), not fitted values.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import atlasfit
from atlasfit.models.topic import MultimodalAmortizedLDA
from atlasfit.models.topic._data import _Registered
from _topic_dtype import float64_topic_default  # noqa: F401 - float64 default for this module


N, K = 240, 3
# steps_per_round pinned: its "auto" default is 1 in process and 128 on a cluster (the in-memory and store fits
# below must train alike)
TRAIN = {"max_epochs": 2, "batch_size": 40, "lr": 0.05, "progress": False, "validation_fraction": 0.2, "seed": 2,
         "steps_per_round": 4}
MODEL = {"likelihoods": {"rna": "multinomial", "atac": "bernoulli"}, "n_topics": K, "n_hidden": 8, "weight_mode": "cell"}


def _mudata():
    rng = np.random.default_rng(0)
    rna = rng.poisson(2.0, (N, 12)).astype(np.float32)
    atac = (rng.random((N, 10)) < 0.25).astype(np.float32)
    obs = pd.DataFrame({"sample": np.repeat(["A", "B", "C"], [90, 80, 70])}, index=[f"c{i}" for i in range(N)])
    mods = {}
    for name, X, pre in (("rna", rna, "g"), ("atac", atac, "p")):
        a = ad.AnnData(sp.csr_matrix(X), obs=obs.copy())
        a.var_names = [f"{pre}{j}" for j in range(X.shape[1])]
        mods[name] = a
    mdata = md.MuData(mods)
    mdata.obs["sample"] = obs["sample"]
    return mdata


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("topic") / "atlas.zarr"
    return atlasfit.io.convert(_mudata(), path, sample_key="sample", modalities={"rna": "counts", "atac": "binary"})


@pytest.fixture(scope="module")
def memory_model():
    m = MultimodalAmortizedLDA.from_mudata(_mudata(), sample_key="sample", **MODEL)
    return m.train(**TRAIN)


@pytest.fixture(scope="module")
def two_workers():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client


SUMMARIES = [
    ("get_latent_representation", {}),
    ("get_latent_representation", {"cells": [200, 3, 91, 3], "n_samples": 5, "seed": 4, "batch_size": 7}),
    ("get_latent_representation", {"n_samples": 0}),
    ("get_cell_topic_dist", {"cells": "validation"}),
    ("get_cell_entropy", {}),
    ("get_topic_variance", {"cells": "train"}),
    ("get_modality_weights", {"return_format": "array"}),
    ("get_elbo", {}),
    ("get_elbo", {"cells": "validation", "n_samples": 2}),
    ("get_perplexity", {}),
    ("get_perplexity_per_modality", {"cells": "train"}),
    ("get_likelihood_per_modality", {}),
]


def _values(model):
    out = []
    for name, kw in SUMMARIES:
        kw = dict(kw)
        if kw.get("cells") == "validation":
            kw["cells"] = model.validation_indices_
        elif kw.get("cells") == "train":
            kw["cells"] = model.train_indices_
        out.append(getattr(model, name)(**kw))
    return out


def _assert_same(a, b):
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x == y
        else:
            np.testing.assert_array_equal(x, y)


def test_store_summaries_are_engine_rounds_equal_to_in_memory_and_on_two_workers(store, memory_model, two_workers,
                                                                                 monkeypatch):
    want = _values(memory_model)
    on_store = MultimodalAmortizedLDA.from_data(store, **MODEL).train(**TRAIN, client=two_workers)
    # the same training (store blocks = in-memory rows, shards of whole samples, ordered reductions)
    for k, v in memory_model._fit.params.items():
        np.testing.assert_array_equal(on_store._fit.params[k], v)
    assert on_store._engine is not None  # kept after train() for the summaries

    # the driver never reads the store's matrices: every summary runs on the shards
    def no_driver_read(self):
        raise AssertionError("the driver read the store")

    monkeypatch.setattr(_Registered, "X", property(no_driver_read))
    _assert_same(_values(on_store), want)
    # engine closed: the shards are re-created from the store (serially here: no client given, so the
    # active two-worker client is reused) with their Omega rows
    on_store.close()
    assert on_store._engine is None
    _assert_same(_values(on_store), want)
    monkeypatch.undo()
    on_store.close()
    # the in-memory model's summaries also run as rounds, on its kept SerialEngine or re-created ones
    memory_model.close()
    _assert_same(_values(memory_model), want)


def test_write_equals_latent_representation_and_keeps_x(store, tmp_path):
    import shutil

    path = shutil.copytree(store, tmp_path / "copy.zarr")
    before = ad.read_zarr(f"{path}/mod/rna").X.toarray()
    m = MultimodalAmortizedLDA.from_data(str(path), **MODEL).train(**TRAIN)
    m.write(n_samples=3, seed=5)
    theta = m.get_latent_representation(n_samples=3, seed=5)
    for mod in ("rna", "atac"):
        a = ad.read_zarr(f"{path}/mod/{mod}")
        np.testing.assert_array_equal(a.obsm["X_topic"], theta)
    np.testing.assert_array_equal(ad.read_zarr(f"{path}/mod/rna").X.toarray(), before)
    m.close()


def test_new_data_go_through_csr_blocks(memory_model):
    mdata = _mudata()
    # the registered cells passed again as new data: the same samples (sample_key column), the same noise
    # keys; new cells have no Omega rows of their own (equal weights), as the validation cells
    val = memory_model.validation_indices_
    np.testing.assert_array_equal(memory_model.get_latent_representation(mdata, n_samples=4)[val],
                                  memory_model.get_latent_representation(n_samples=4)[val])
    # dense input is converted block by block; no sample column: one sample, per-cell n_samples=0 values
    d = {m: mdata[m].X.toarray() for m in ("rna", "atac")}
    omega_free = memory_model.get_latent_representation(d, n_samples=0)
    assert omega_free.shape == (N, K)
    np.testing.assert_allclose(omega_free.sum(axis=1), 1.0, atol=1e-12)


def test_zarr_save_load_round_trip_and_continued_training(memory_model, tmp_path):
    mdata = _mudata()
    memory_model.save(tmp_path / "m.zarr")
    ds = __import__("xarray").open_zarr(tmp_path / "m.zarr")
    assert ds.attrs["atlasfit_model"] == "MultimodalAmortizedLDA" and ds["cell:omega"].dims == ("cell", "modality")
    loaded = MultimodalAmortizedLDA.load(tmp_path / "m.zarr", data=mdata)
    for k, v in memory_model._fit.params.items():
        np.testing.assert_array_equal(loaded._fit.params[k], v)
    for k, v in memory_model._opt.m.items():
        np.testing.assert_array_equal(loaded._opt.m[k], v)
    _assert_same(_values(loaded), _values(memory_model))
    # continued training after load == uninterrupted training
    loaded.train(**{**TRAIN, "max_epochs": 1})
    one = MultimodalAmortizedLDA.from_mudata(_mudata(), sample_key="sample", **MODEL).train(**{**TRAIN, "max_epochs": 3})
    for k, v in one._fit.params.items():
        np.testing.assert_array_equal(loaded._fit.params[k], v)
    for x, y in zip(loaded._omega, one._omega):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        loaded.save(tmp_path / "m.zarr")
    loaded.save(tmp_path / "m.zarr", overwrite=True)
    assert MultimodalAmortizedLDA.load(tmp_path / "m.zarr").n_epochs_ == 3
    with pytest.raises(FileNotFoundError, match="written by save"):
        MultimodalAmortizedLDA.load(tmp_path / "nothing")


def test_old_json_npz_format_is_still_read():
    # tests/data/topic_model_v1: saved by the JSON + npz writer of commit 8d53dbd (60 cells, rng seed 7:
    # rna Poisson(2) 6 genes, atac Bernoulli(0.3) 5 peaks; K=3, n_hidden=4, weight_mode="cell", 2 epochs)
    path = Path(__file__).parent / "data" / "topic_model_v1"
    rng = np.random.default_rng(7)
    d = {"rna": rng.poisson(2.0, (60, 6)).astype(float), "atac": (rng.random((60, 5)) < 0.3).astype(float)}
    with pytest.warns(DeprecationWarning, match="old JSON \\+ npz format"):
        m = MultimodalAmortizedLDA.load(path, data=d)
    with np.load(path / "arrays.npz") as z:
        import json

        keys = json.loads((path / "model.json").read_text())["keys"]
        for n, k in keys.items():
            if k.startswith("params|"):
                np.testing.assert_array_equal(m._fit.params[k.split("|", 1)[1]], z[n])
    th = m.get_latent_representation()
    assert th.shape == (60, 3) and np.isfinite(th).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.n_epochs_ == 2
