"""``atlasfit demo``: a bundled real (or synthetic) atlas -> Zarr store -> MultiGEDI fit on the
embedded LocalCluster -> results written into the store + a PNG plot."""

from __future__ import annotations

import time
from pathlib import Path


def run_demo(
    out: str | Path = "atlasfit_demo",
    data: str = "real",
    n_cells: int = 20_000,
    iterations: int = 20,
    K: int = 10,
    n_workers: int | None = None,
) -> dict:
    """Run the end-to-end demo and return a small summary dict.

    Parameters
    ----------
    out
        Output folder (created): the atlas store and the PNG go there.
    data
        ``"real"`` (bundled 5,000 cells x (500 genes + 1,000 splicing events), 27 samples) or
        ``"synthetic"`` (RNA counts + paired counts + binary ATAC-like, partial sample overlap).
    n_cells
        Number of cells of the synthetic atlas.
    iterations, K
        MultiGEDI iterations and factors.
    n_workers
        Workers of the embedded LocalCluster (default: one per core).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atlasfit import MultiGEDI, pl
    from atlasfit.cluster import cluster_session
    from atlasfit.io import convert, open_atlas, to_source_order

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if data == "real":
        from atlasfit.datasets import multigedi_real_5k

        store = out / "real5k.zarr"
        convert(multigedi_real_5k(), store, sample_key="sample", overwrite=True)
        modalities = {
            "rna": {"obs_type": "M"},
            "splicing": {"obs_type": "M_list", "layers": ("M1", "M2")},
        }
        color_key = "sample"
    elif data == "synthetic":
        from atlasfit.datasets import synthetic_atlas

        store = out / f"synthetic_{n_cells}.zarr"
        synthetic_atlas(store, n_cells=n_cells, seed=0, overwrite=True)
        modalities = {
            "rna": {"obs_type": "M"},
            "splicing": {"obs_type": "M_list", "layers": ("M1", "M2")},
            "atac": {"obs_type": "X"},
        }
        color_key = "cell_type"
    else:
        raise ValueError(f"demo: data={data!r} is not one of 'real', 'synthetic'")
    t_store = time.perf_counter() - t0
    atlas = open_atlas(store)
    print(f"atlasfit demo: atlas store {store} ({len(atlas.samples)} samples, "
          + ", ".join(f"{m}: {int(atlas.samples[m].sum()):,} cells x {atlas.var(m).shape[0]:,}"
                      for m in atlas.modalities) + f") built in {t_store:.1f} s")

    model = MultiGEDI(modalities=modalities, sample_key=atlas.sample_key, K=K, seed=0)
    with cluster_session(n_workers=n_workers) as client:
        t1 = time.perf_counter()
        model.fit(store, max_iterations=iterations, client=client)
        t_fit = time.perf_counter() - t1
        model.write(store)
        model.close()
    first = atlas.modalities[0]
    # read the embedding back from the store (written by the workers), rows in store order
    import zarr

    stored = zarr.open_group(str(store), mode="r")[f"mod/{first}/obsm/X_multigedi_pca"][...]
    emb = to_source_order(atlas, first, stored)
    obs = atlas.obs(first)
    labels = to_source_order(atlas, first, obs[color_key].astype(str).to_numpy())

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    pl.convergence(model, ax=axes[0], show=False)
    pl.embedding(emb[:, :2], labels, ax=axes[1], title=f"X_multigedi_pca (PC1/PC2) by {color_key}",
                 show=False)
    fig.tight_layout()
    png = out / "multigedi_demo.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    hist = model.history_
    last = hist[hist["iteration"] == hist["iteration"].max()]
    print(f"atlasfit demo: {iterations} iterations in {t_fit:.1f} s "
          f"({t_fit / max(iterations, 1):.2f} s/iteration incl. initialisation)")
    for _, row in last.iterrows():
        print(f"  {row['modality']:<10} sigma2={row['sigma2']:.4g}  dZ={row['dZ']:.3g}")
    print(f"atlasfit demo: results in {store} (obsm['X_multigedi_pca'], varm, uns/atlasfit_models/"
          f"multigedi); plot {png}")
    return {"store": str(store), "png": str(png), "fit_seconds": t_fit}
