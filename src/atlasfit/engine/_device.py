"""Which array module a fit's kernels run on (NumPy or CuPy); no Dask needed to decide."""

from __future__ import annotations


def gpu_available() -> bool:
    """Whether dask-cuda and CuPy import and CuPy sees a CUDA device.

    Examples
    --------
    >>> isinstance(gpu_available(), bool)
    True
    """
    try:
        import cupy  # noqa: PLC0415 - optional GPU dependency
        import dask_cuda  # noqa: F401, PLC0415 - optional GPU dependency
    except Exception:  # ImportError, or a CUDA runtime that fails while importing
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def resolve_device(device: str, who: str, *, distributed: bool) -> bool:
    """Whether a fit asked for with ``device`` runs its kernels on CuPy.

    ``"cpu"``: no. ``"gpu"``: yes, or a clear error when CuPy/dask-cuda or a CUDA device is missing.
    ``"auto"``: the GPU when one is usable and the fit runs on a Dask cluster (``distributed``; on a
    GPU machine that is a LocalCUDACluster), else the CPU. ``who`` names the model in errors.

    Examples
    --------
    >>> resolve_device("cpu", "MultiGEDI", distributed=True)
    False
    """
    if device not in ("cpu", "gpu", "auto"):
        raise ValueError(f"{who}: device must be 'cpu', 'gpu' or 'auto', got {device!r}")
    if device == "cpu":
        return False
    ok = gpu_available()
    if device == "gpu" and not ok:
        raise RuntimeError(
            f"{who}(device='gpu'): no CUDA device with CuPy found; install atlasfit[gpu-cu12] "
            "(or gpu-cu13) on a machine with an NVIDIA GPU, or use device='cpu'"
        )
    return ok if (device == "gpu" or distributed) else False
