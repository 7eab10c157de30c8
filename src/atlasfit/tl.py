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
    solve_Y_every: int | None = 10,
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
    modalities, sample_key, K, mode, max_iterations, seed, dtype, solve_Y_every
        See :class:`atlasfit.MultiGEDI` (``solve_Y_every=None``: multigedi 1.1.0's Y update at every
        iteration, parity 1e-12; the default moves the result by ~1e-7 at iteration 10).
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
                      device=device or "cpu", solve_Y_every=solve_Y_every)
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
    K: int | None = None,
    C=None,
    H=None,
    mode: str = "Bsphere",
    max_iterations: int = 30,
    seed: int | None = None,
    dtype: str = "float64",
    layer: str | None = None,
    key_added: str = "gedi",
    client=None,
    copy: bool = False,
    obs_type: str | None = None,
    layers: tuple | None = None,
    orthoZ: bool | None = None,
    n_latent: int | None = None,
    layer2: str | None = None,
    ortho_Z: bool | None = None,
    random_state: int | None = None,
    verbose: bool | None = None,
    track_interval: int | None = None,
    n_jobs: int | None = None,
):
    """Fit single-modality GEDI (optional pathway prior ``C``, sample covariates ``H``) on an in-memory
    AnnData and write the results into it, as :meth:`atlasfit.GEDI.write` does: ``obsm[f"X_{key_added}"]``
    (cells x K, the AnnData's row order), ``varm[f"{key_added}_Z"]`` and, with ``C``,
    ``varm[f"{key_added}_pathway_assoc"]``; the parameters in ``uns[key_added]``.

    Parameters
    ----------
    adata
        AnnData of counts (``X`` or ``layer``), with the sample labels in ``obs[sample_key]``.
    K, C, H, mode, seed, dtype, layer, obs_type, layers, orthoZ
        See :class:`atlasfit.GEDI` (defaults: K=10, seed=0, obs_type ``"M"``: counts).
    max_iterations, client
        See :meth:`atlasfit.GEDI.fit`.
    key_added
        Prefix of the written keys.
    copy
        Return an updated copy instead of updating ``adata``.
    n_latent, layer2, ortho_Z, random_state, verbose, track_interval, n_jobs
        The reference's keywords (multigedi 1.1.0 ``tl.gedi``): ``n_latent`` = ``K``, ``ortho_Z`` =
        ``orthoZ``, ``random_state`` = ``seed``, ``layer2`` = obs type ``"M_list"`` with
        ``layers=(layer, layer2)`` (``None``: ``.X``), ``verbose`` shows progress; ``track_interval`` and
        ``n_jobs`` cannot change a result and are ignored with a one-time
        :class:`atlasfit.ReferenceKeywordWarning`. Unlike the reference, whose single-modal model fits
        ``log1p`` of its input as a continuous Y, the default here models counts (obs type ``"M"``);
        ``obs_type="Y"`` on ``log1p`` of the data is the reference's model.

    Returns
    -------
    The updated copy if ``copy``, else ``None``.
    """
    from ._aliases import warn_ignored
    from .models.gedi import GEDI

    who = "atlasfit.tl.gedi"

    def pick(name, value, alias, alias_value, default):
        if alias_value is not None:
            if value is not None and value != alias_value:
                raise TypeError(f"{who}: give {name}= or its reference alias {alias}=, not both")
            return alias_value
        return default if value is None else value

    K = pick("K", K, "n_latent", n_latent, 10)
    seed = pick("seed", seed, "random_state", random_state, 0)
    orthoZ = pick("orthoZ", orthoZ, "ortho_Z", ortho_Z, True)
    if layer2 is not None:
        if obs_type not in (None, "M_list") or layers is not None:
            raise TypeError(f"{who}: layer2= (the reference's paired counts: layers=(layer, layer2), obs_type "
                            "'M_list') cannot be combined with obs_type= or layers=")
        obs_type, layers, layer = "M_list", (layer, layer2), None
    for key, val, why in (("track_interval", track_interval, "sigma2 and dZ are traced every iteration"),
                          ("n_jobs", n_jobs, "threads are the Dask workers' or BLAS's; results do not depend on them")):
        if val is not None:
            warn_ignored(who, key, why)
    if copy:
        adata = adata.copy()
    model = GEDI(K=K, C=C, H=H, mode=mode, seed=seed, dtype=dtype, sample_key=sample_key, layer=layer,
                 obs_type=obs_type or "M", layers=layers, orthoZ=orthoZ)
    try:
        model.fit(adata, max_iterations=max_iterations, client=client, progress=None if verbose else False)
        model.write(adata, key=key_added)
    finally:
        model.close()
    return adata if copy else None
