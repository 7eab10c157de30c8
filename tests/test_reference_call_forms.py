"""The seeds' quickstart calls run verbatim apart from the import (issue 13 item 4).

The calls are written from the references' API sections (``shared/specs/multigedi.md`` §11,
``shared/specs/topic_model.md`` §7-§8) on tiny data: ``import multigedi as gd`` becomes
``import atlasfit as gd``, ``from topomics import MultimodalAmortizedLDA`` becomes ``from atlasfit
import ...``; nothing else changes. Mapped keywords are checked to give the same bits as atlasfit's
own names; ignored ones to warn once.
"""

from __future__ import annotations

import warnings

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp

import atlasfit
from atlasfit import _aliases


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_aliases, "_WARNED", set())


def _splicing_mdata(seed=0, n=60):
    rng = np.random.default_rng(seed)
    labels = np.repeat(["s1", "s2", "s3"], n // 3)
    gene = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, (n, 15)).astype(np.float32)))
    M1 = rng.poisson(1.5, (n, 10)).astype(np.float32)
    M2 = rng.poisson(1.0, (n, 10)).astype(np.float32)
    spl = ad.AnnData(sp.csr_matrix(M1))  # the reference's layout: .X = M1 (inclusion), layers["M2"]
    spl.layers["M2"] = sp.csr_matrix(M2)
    for a in (gene, spl):
        a.obs_names = [f"c{i}" for i in range(n)]
        a.obs["sample"] = labels
    return md.MuData({"gene": gene, "splicing": spl})


def test_multigedi_quickstart_verbatim():
    import atlasfit as gd  # the reference: import multigedi as gd

    mdata = _splicing_mdata()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gd.tl.multigedi(
            mdata,
            modalities={"gene": {"obs_type": "M"},
                        "splicing": {"obs_type": "M_list", "layers": (None, "M2")}},
            sample_key="sample",
            K=3,
            mode="Bsphere",
            max_iterations=3,
            track_interval=1,
            num_threads=0,
            verbose=0,
            use_gpu=False,
        )
    ignored = sorted(str(w.message).split(":")[1].strip().split("=")[0] for w in rec
                     if issubclass(w.category, atlasfit.ReferenceKeywordWarning))
    assert ignored == ["num_threads", "track_interval"]
    emb = mdata["gene"].obsm["X_multigedi_pca"]
    assert emb.shape == (60, 3) and np.isfinite(emb).all()

    # (None, "M2") is .X and layer M2: the same bits as naming a copy of .X
    ref = _splicing_mdata()
    ref["splicing"].layers["M1"] = ref["splicing"].X.copy()
    atlasfit.tl.multigedi(ref, {"gene": {"obs_type": "M"},
                                "splicing": {"obs_type": "M_list", "layers": ("M1", "M2")}},
                          "sample", K=3, max_iterations=3, progress=False)
    assert np.array_equal(emb, ref["gene"].obsm["X_multigedi_pca"])


def test_multigedi_reference_keywords_map_or_refuse():
    mdata = _splicing_mdata()
    with pytest.raises(ValueError, match="use_gpu=True.*contradicts device='cpu'"):
        atlasfit.tl.multigedi(mdata, {"gene": {}}, "sample", K=2, use_gpu=True, device="cpu")
    with pytest.raises(ValueError, match="has no layer 'M3'.*None stands for .X"):
        atlasfit.tl.multigedi(mdata, {"splicing": {"obs_type": "M_list", "layers": (None, "M3")}}, "sample",
                              K=2, max_iterations=1, progress=False)
    with warnings.catch_warnings(record=True) as rec:  # once per process and keyword
        warnings.simplefilter("always")
        for _ in range(2):
            atlasfit.tl.multigedi(mdata, {"gene": {}}, "sample", K=2, max_iterations=0, gpu_output_dir="out",
                                  verbose=False)
    assert sum(issubclass(w.category, atlasfit.ReferenceKeywordWarning) for w in rec) == 1


def _rna_atac_mdata(seed=0, n=60):
    rng = np.random.default_rng(seed)
    rna = ad.AnnData(rng.poisson(2.0, (n, 12)).astype(np.float32))
    atac = ad.AnnData((rng.random((n, 15)) < 0.3).astype(np.float32))
    for a in (rna, atac):
        a.obs_names = [f"c{i}" for i in range(n)]
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["batch"] = np.tile(["b1", "b2"], n // 2)
    return mdata


def test_topomics_quickstart_verbatim():
    # the reference: from topomics import MultimodalAmortizedLDA
    from atlasfit import MultimodalAmortizedLDA

    mdata = _rna_atac_mdata()
    model = MultimodalAmortizedLDA.from_mudata(
        mdata,
        modality_order=["rna", "atac"],
        categorical_covariate_keys=["batch"],
        likelihoods=["gamma_poisson", "bernoulli"],
        n_topics=3,
        n_hidden=8,
        dispersion_rna=1.0,
        aggregation_type="moe",
        kl_weight=1.0,
        weight_mode="cell",
    )
    model.train(max_epochs=2, batch_size=32, lr=1e-2, early_stopping=True, early_stopping_monitor="elbo_val",
                early_stopping_patience=10, train_size=0.9, plan_kwargs={"optim_kwargs": {"lr": 1e-2}})
    theta = model.get_cell_topic_dist()
    assert theta.shape == (60, 3) and np.allclose(theta.sum(axis=1), 1.0)
    assert model.get_feature_topic_dist("rna").shape == (12, 3)
    assert model.get_top_features_per_topic("rna", n_features=5).shape == (5, 3)
    assert model.batch_key_ == "batch" and model.config.n_batches == 2
    assert len(model.validation_indices_) == 6  # train_size=0.9 of 60 cells
    for v in (model.get_entropy(), model.get_entropy_weight(), model.get_topic_variance_weight(),
              model.get_last_entropy(), model.get_last_topic_variance()):
        assert np.isfinite(v)


def test_topomics_keywords_give_the_same_bits_as_atlasfit_names():
    from atlasfit import MultimodalAmortizedLDA

    def fit(train_kw=None, **kw):
        m = MultimodalAmortizedLDA.from_mudata(_rna_atac_mdata(), n_topics=3, n_hidden=6, **kw)
        return m.train(1, 20, progress=False, kl_schedule="constant", **(train_kw or {}))

    ref = fit(dispersion_rna=2.0, aggregation_type="attention", categorical_covariate_keys=["batch"], kl_weight=0.5)
    own = fit({"kl_kwargs": {"kl_weight": 0.5}}, dispersion=2.0, aggregation="attention", batch_key="batch")
    assert ref.config == own.config
    assert ref.history_["beta"].tolist() == [0.5]  # kl_weight reaches the schedule (the reference's intent, §1.9)
    assert np.array_equal(ref.get_latent_representation(), own.get_latent_representation())
    with pytest.raises(ValueError, match="one categorical covariate"):
        MultimodalAmortizedLDA.from_mudata(_rna_atac_mdata(), categorical_covariate_keys=["batch", "x"])
    with pytest.raises(TypeError, match="not both"):
        MultimodalAmortizedLDA.from_mudata(_rna_atac_mdata(), dispersion_rna=1.0, dispersion=2.0)
    with pytest.raises(ValueError, match="kl_weight must be a positive number"):
        MultimodalAmortizedLDA.from_mudata(_rna_atac_mdata(), kl_weight=0)
    with pytest.raises(ValueError, match="plan_kwargs keys \\['foo'\\]"):
        ref.train(1, 20, progress=False, plan_kwargs={"foo": 1})
    with pytest.warns(atlasfit.ReferenceKeywordWarning, match="encoder_scale_factor"):
        MultimodalAmortizedLDA.from_mudata(_rna_atac_mdata(), encoder_scale_factor=1e6)


def test_gedi_reference_call_form():
    import atlasfit as gd  # the reference: import multigedi as gd

    spl = _splicing_mdata()["splicing"].copy()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gd.tl.gedi(spl, "sample", n_latent=3, layer=None, layer2="M2", max_iterations=3, track_interval=5,
                   mode="Bsphere", ortho_Z=True, key_added="gedi", random_state=0, verbose=False, n_jobs=-1)
    assert sum(issubclass(w.category, atlasfit.ReferenceKeywordWarning) for w in rec) == 2  # track_interval, n_jobs
    own = _splicing_mdata()["splicing"].copy()
    atlasfit.tl.gedi(own, "sample", K=3, obs_type="M_list", layers=(None, "M2"), max_iterations=3, seed=0)
    assert spl.obsm["X_gedi"].shape == (60, 3)
    assert np.array_equal(spl.obsm["X_gedi"], own.obsm["X_gedi"])
    with pytest.raises(TypeError, match="n_latent"):
        gd.tl.gedi(spl, "sample", K=4, n_latent=3)
