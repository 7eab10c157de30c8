#!/usr/bin/env bash
# Run the atlasfit demo: bundled real 5k atlas -> Zarr store -> MultiGEDI fit on an embedded
# LocalCluster -> results written into the store + a PNG (in ./atlasfit_demo/): UMAPs of the joint
# embedding and of a plain PCA by sample and by cell group, kNN mixing / purity, convergence.
# Extra arguments go to `atlasfit demo` (e.g. --data synthetic --n-cells 20000).
. "$(dirname "$0")/_venv.sh" plot
# 60 iterations (atlasfit._demo.DEMO_ITERATIONS): the sigma^2 traces have flattened by then
case " $* " in
  *" --iterations"*) ;;
  *) set -- --iterations 60 "$@" ;;
esac
exec atlasfit demo "$@"
