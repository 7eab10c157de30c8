"""Start a LocalCUDACluster (one dask-cuda worker per visible GPU) and keep it running.

    python deploy/launch_localcuda.py --rmm-pool-size 0.8 --scheduler-file scheduler.json

Other processes connect with ``Client(scheduler_file="scheduler.json")``; atlasfit then uses that
client (``atlasfit.fit(store)``). Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rmm-pool-size", default="0.8", help="RMM pool per GPU (bytes, or a fraction)")
    ap.add_argument("--protocol", default="tcp", choices=["tcp", "ucx"])
    ap.add_argument("--scheduler-file", default="scheduler.json")
    args = ap.parse_args(argv)
    try:
        from dask_cuda import LocalCUDACluster
        from distributed import Client
    except ImportError as err:
        raise SystemExit(f"launch_localcuda: {err}; install atlasfit[gpu-cu12] (or gpu-cu13)") from err
    from atlasfit.cluster import gpu_available

    if not gpu_available():
        raise SystemExit("launch_localcuda: no CUDA device visible to CuPy; check drivers / CUDA_VISIBLE_DEVICES")
    pool = float(args.rmm_pool_size) if "." in args.rmm_pool_size else args.rmm_pool_size
    # managed memory is never combined with UCX (see docs/deploy.md)
    cluster = LocalCUDACluster(rmm_pool_size=pool, protocol=args.protocol, rmm_managed_memory=False)
    client = Client(cluster)
    client.write_scheduler_file(args.scheduler_file)
    print(f"LocalCUDACluster with {len(cluster.workers)} GPU workers at {cluster.scheduler_address}; "
          f"dashboard {cluster.dashboard_link}; scheduler file {args.scheduler_file}")
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while not stop:
        time.sleep(1)
    client.close()
    cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
