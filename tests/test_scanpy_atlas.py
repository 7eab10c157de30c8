"""scanpy's downstream path on an atlasfit-shaped embedding at atlas size (issue 12).

Above 8,192 cells ``sc.pp.neighbors`` switches from exact neighbours to pynndescent; with pynndescent
0.7 next to SciPy >= 1.17 that path raised ``AttributeError: 'csr_array' object has no attribute
'getnnz'`` (the extras now pin ``pynndescent<0.7``). 20,000 cells keep this test on that path.

Data: a planted embedding, 8 well-separated Gaussian clusters in 10 dimensions (centres drawn
N(0, 6^2), cells N(centre, 1)), in ``obsm["X_multigedi_pca"]`` where MultiGEDI writes its embedding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

sc = pytest.importorskip("scanpy")
pytest.importorskip("igraph")
pytest.importorskip("leidenalg")

N_CELLS, N_CLUSTERS, DIM = 20_000, 8, 10


def test_neighbors_umap_leiden_on_20k_cells():
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 6.0, (N_CLUSTERS, DIM))
    truth = rng.integers(0, N_CLUSTERS, N_CELLS)
    emb = (centres[truth] + rng.normal(size=(N_CELLS, DIM))).astype(np.float32)
    adata = ad.AnnData(np.zeros((N_CELLS, 1), np.float32))
    adata.obsm["X_multigedi_pca"] = emb
    assert adata.n_obs > 8192  # scanpy's pynndescent path (exact neighbours below)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numba / umap chatter is not what this test is about
        sc.pp.neighbors(adata, n_neighbors=15, use_rep="X_multigedi_pca", random_state=0)
        sc.tl.umap(adata, maxiter=50, random_state=0)  # few epochs: the path, not the picture
        sc.tl.leiden(adata, flavor="igraph", n_iterations=2, resolution=0.2, random_state=0)

    conn = adata.obsp["connectivities"]
    assert conn.shape == (N_CELLS, N_CELLS) and conn.nnz >= N_CELLS * 14
    umap = adata.obsm["X_umap"]
    assert umap.shape == (N_CELLS, 2) and np.isfinite(umap).all()
    # the planted clusters are 6 standard deviations apart per axis: Leiden must find them
    ari = adjusted_rand_score(truth, adata.obs["leiden"].astype(int).to_numpy())
    assert ari > 0.95, ari
