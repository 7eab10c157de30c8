#!/usr/bin/env bash
# Run the atlasfit demo: bundled real 5k atlas -> Zarr store -> MultiGEDI fit on an embedded
# LocalCluster -> results written into the store + a PNG plot (in ./atlasfit_demo/).
# Extra arguments go to `atlasfit demo` (e.g. --data synthetic --n-cells 20000).
. "$(dirname "$0")/_venv.sh" plot
exec atlasfit demo "$@"
