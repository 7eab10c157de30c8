"""scanpy-style tools on in-memory MuData (mirroring multigedi's ``gd.tl``)."""

from __future__ import annotations

import numpy as np

from . import _tl_downstream as _downstream

# the reference's downstream tools (spec §11), defined in ._tl_downstream
svd, pca, variance, dispersion = _downstream.svd, _downstream.pca, _downstream.variance, _downstream.dispersion
pseudotime, vector_field = _downstream.pseudotime, _downstream.vector_field


def multigedi(
    mdata,
    modalities: dict[str, dict],
    sample_key: str,
    *,
    K: int = 10,
    mode: str = "Bsphere",
    max_iterations: int = 30,
    seed: int = 0,
    dtype: str = "float64",
    key_added: str = "multigedi",
    client=None,
    copy: bool = False,
    device: str | None = None,
    progress=None,
    use_gpu: bool | None = None,
    verbose: int | bool | None = None,
    track_interval: int | None = None,
    num_threads: int | None = None,
    gpu_device: int | None = None,
    gpu_output_dir=None,
):
    """Fit MultiGEDI on an in-memory MuData and write the results into it.

    Writes, for every modality ``m``: ``mdata[m].obsm[f"X_{key_added}_pca"]`` (the joint PCA of its
    own cells, **in its own row order** — the reference misaligns rows) and
    ``mdata[m].varm[f"{key_added}_Z"]``; and ``mdata.uns[key_added]`` with ``params``, per-modality
    ``model`` (Z, D, o, sigma2, tracking) and ``svd`` (d, u). Unlike the reference, the seed is
    passed on.

    Parameters
    ----------
    mdata
        MuData (or a dict of AnnData; then ``copy`` must be False and only the AnnData are updated).
    modalities, sample_key, K, mode, max_iterations, seed, dtype
        See :class:`atlasfit.MultiGEDI`.
    key_added
        Prefix of the written keys.
    client
        Optional ``distributed.Client`` to run on (default: in this process).
    copy
        Return an updated copy instead of updating ``mdata``.
    device
        ``"cpu"`` (default), ``"gpu"`` or ``"auto"`` (see :class:`atlasfit.MultiGEDI`).
    progress
        ``None``: a progress bar on a terminal; ``False``: silent.
    use_gpu, verbose, track_interval, num_threads, gpu_device, gpu_output_dir
        The reference's keywords (multigedi 1.1.0), so its calls run unchanged: ``use_gpu`` maps to
        ``device`` (``True`` -> ``"gpu"``, ``False`` -> ``"cpu"``) and ``verbose`` to ``progress``
        (0 -> silent). The others cannot change a result here and are ignored with a one-time
        :class:`atlasfit.ReferenceKeywordWarning`: σ² and dZ are traced every iteration
        (``track_interval``), threads are the Dask workers' (``num_threads``), GPUs are chosen with
        ``CUDA_VISIBLE_DEVICES`` or a ``LocalCUDACluster`` (``gpu_device``), and the reference ignores
        ``gpu_output_dir`` too. A modality's ``layers`` pair may hold ``None`` for ``.X``.

    Returns
    -------
    The updated copy if ``copy``, else ``None``.

    Examples
    --------
    >>> import atlasfit
    >>> mdata = atlasfit.datasets.multigedi_real_5k()
    >>> atlasfit.tl.multigedi(mdata, {"rna": {"obs_type": "M"}}, "sample", K=3,
    ...                       max_iterations=1)  # doctest: +SKIP
    """
    from ._aliases import warn_ignored
    from .models.multigedi import MultiGEDI

    who = "atlasfit.tl.multigedi"
    if use_gpu is not None:
        want = "gpu" if use_gpu else "cpu"
        if device is not None and device != want:
            raise ValueError(f"{who}: use_gpu={use_gpu!r} (the reference's keyword for device={want!r}) "
                             f"contradicts device={device!r}; give one of them")
        device = want
    if verbose is not None and progress is None and not verbose:
        progress = False
    for key, val, why in (
        ("track_interval", track_interval, "sigma2 and dZ are traced every iteration"),
        ("num_threads", num_threads, ("threads are the Dask workers' (client=Client(LocalCluster("
                                       "threads_per_worker=...))) or BLAS's (OMP_NUM_THREADS); results do "
                                       "not depend on them")),
        ("gpu_device", gpu_device, "choose GPUs with CUDA_VISIBLE_DEVICES or a LocalCUDACluster client"),
        ("gpu_output_dir", gpu_output_dir, "the reference ignores it too; results go into mdata"),
    ):
        if val is not None:
            warn_ignored(who, key, why)
    if copy:
        mdata = mdata.copy()
    model = MultiGEDI(modalities, sample_key=sample_key, K=K, mode=mode, seed=seed, dtype=dtype,
                      device=device or "cpu")
    model.fit(mdata, max_iterations=max_iterations, client=client, progress=progress)
    mods = mdata.mod if hasattr(mdata, "mod") else mdata
    st = model.export_state()
    uns = {
        "params": {"modalities": {m: dict(c) for m, c in modalities.items()}, "sample_key": sample_key,
                   "K": K, "mode": mode, "max_iterations": max_iterations, "seed": seed},
        "model": {},
        "svd": {"joint": {"d": st["svd/d"], "u": st["svd/u"]}},
    }
    for m in model.config.names:
        mods[m].obsm[f"X_{key_added}_pca"] = model.embedding(m)
        mods[m].varm[f"{key_added}_Z"] = model.get_Z(m)
        uns["model"][m] = {
            "Z": model.get_Z(m), "D": model.get_D(m), "o": model.get_o(m),
            "sigma2": np.float64(model.get_sigma2(m)),
            "tracking": {"sigma2": st[f"tracking/{m}/sigma2"], "dZ": st[f"tracking/{m}/dZ"]},
        }
    _downstream.write_fit_state(model, mods, uns, key_added)  # for tl.svd / pca / variance / dispersion / vector_field
    if hasattr(mdata, "uns"):
        mdata.uns[key_added] = uns
    model.close()
    return mdata if copy else None


def gedi(
    adata,
    sample_key: str,
    *,
    K: int = 10,
    C=None,
    H=None,
    mode: str = "Bsphere",
    max_iterations: int = 30,
    seed: int = 0,
    dtype: str = "float64",
    layer: str | None = None,
    key_added: str = "gedi",
    client=None,
    copy: bool = False,
):
    """Fit single-modality GEDI (optional pathway prior ``C``, sample covariates ``H``) on an in-memory
    AnnData and write the results into it, as :meth:`atlasfit.GEDI.write` does: ``obsm[f"X_{key_added}"]``
    (cells x K, the AnnData's row order), ``varm[f"{key_added}_Z"]`` and, with ``C``,
    ``varm[f"{key_added}_pathway_assoc"]``; the parameters in ``uns[key_added]``.

    Parameters
    ----------
    adata
        AnnData of counts (``X`` or ``layer``), with the sample labels in ``obs[sample_key]``.
    K, C, H, mode, seed, dtype, layer
        See :class:`atlasfit.GEDI`.
    max_iterations, client
        See :meth:`atlasfit.GEDI.fit`.
    key_added
        Prefix of the written keys.
    copy
        Return an updated copy instead of updating ``adata``.

    Returns
    -------
    The updated copy if ``copy``, else ``None``.
    """
    from .models.gedi import GEDI

    if copy:
        adata = adata.copy()
    model = GEDI(K=K, C=C, H=H, mode=mode, seed=seed, dtype=dtype, sample_key=sample_key, layer=layer)
    try:
        model.fit(adata, max_iterations=max_iterations, client=client, progress=False)
        model.write(adata, key=key_added)
    finally:
        model.close()
    return adata if copy else None
