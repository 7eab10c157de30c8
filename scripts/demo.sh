#!/usr/bin/env bash
# Run the atlasfit demo: bundled real 5k atlas -> Zarr store -> MultiGEDI fit on an embedded
# LocalCluster (60 iterations) -> results written into the store + a PNG (in ./atlasfit_demo/): UMAPs
# of the joint embedding and of a plain PCA by sample and by cell group, kNN mixing / purity, convergence.
# Extra arguments go to `atlasfit demo` (e.g. --data synthetic --n-cells 20000, --iterations 30).
. "$(dirname "$0")/_venv.sh" plot
exec atlasfit demo "$@"
