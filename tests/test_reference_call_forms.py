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
