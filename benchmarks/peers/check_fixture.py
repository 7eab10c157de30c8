#!/usr/bin/env python
"""Check that a built peer reproduces a shared MultiGEDI fixture.

Runs ``multigedi_ref_runner.py`` with the peer venv's Python on the fixture's
own inputs and configuration (same K, mode, seed, thread count, t sweeps) and
scores the fitted state against the stored ``iter<t>/...`` arrays as
``||out - ref|| / ||ref||`` (Frobenius), both raw and after one sign per
factor (fixtures README, "Comparing"). Writes a JSON report.

Example::

    python benchmarks/peers/check_fixture.py --peer-python /work/peers/mg-sse3/bin/python \
        --fixture /work/shared/fixtures/multigedi_real5k.npz --iterations 10

Run it with any Python that has NumPy (e.g. the atlasfit venv); the peer runs in
its own venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", required=True)
    ap.add_argument("--fixture", default="/work/shared/fixtures/multigedi_real5k.npz")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--num-threads", type=int, default=None, help="default: fixture's")
    ap.add_argument("--report", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    ref = np.load(args.fixture)
    fcfg = json.loads(str(ref["config"]))
    t = args.iterations
    if t not in fcfg["iterations"]:
        raise ValueError(f"fixture stores iterations {fcfg['iterations']}, not {t}")
    cfg = {
        "K": fcfg["K"],
        "mode": fcfg["mode"],
        "seed": fcfg["seed"],
        "iterations": t,
        "num_threads": args.num_threads or fcfg["num_threads"],
        "modalities": [
            {"name": m["name"], "obs_type": m["obs_type"], "orthoZ": m["orthoZ"]}
            for m in fcfg["modalities"]
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path, "w") as fh:
            json.dump(cfg, fh)
        out = os.path.join(tmp, "out")
        cmd = [
            args.peer_python,
            os.path.join(HERE, "multigedi_ref_runner.py"),
            args.fixture,
            cfg_path,
            out,
            "--prefix",
            "input/",
            "--save-fit",
        ]
        subprocess.run(cmd, check=True)
        fit = dict(np.load(os.path.join(out, "fit.npz")))
        pca_cells = np.load(os.path.join(out, "pca.npy"))
        with open(os.path.join(out, "result.json")) as fh:
            res = json.load(fh)

    names = [m["name"] for m in cfg["modalities"]]
    # One sign per factor for the whole state, taken from the first modality's Z.
    z0, z0r = fit[f"{names[0]}/Z"], ref[f"iter{t}/{names[0]}/Z"]
    sign = np.sign(np.sum(z0 * z0r, axis=0))
    sign[sign == 0] = 1.0
    scores = {}
    for n in names:
        z, zr = fit[f"{n}/Z"], ref[f"iter{t}/{n}/Z"]
        scores[f"{n}/Z_raw"] = _rel(z, zr)
        scores[f"{n}/Z"] = _rel(z * sign, zr)
        for k in ("D", "o", "sigma2"):
            scores[f"{n}/{k}"] = _rel(fit[f"{n}/{k}"], ref[f"iter{t}/{n}/{k}"])
    b = np.hstack([fit[f"B/{g}"] for g in fcfg["global_sample_order"]])
    br = np.hstack([ref[f"iter{t}/B/{g}"] for g in fcfg["global_sample_order"]])
    scores["B"] = _rel(b * sign[:, None], br)
    key = f"iter{t}/X_multigedi_pca_sample_grouped"
    if key in ref.files:
        p, pr = fit["pca_sample_grouped"], ref[key]
        psign = np.sign(np.sum(p * pr, axis=0))
        scores["pca_sample_grouped"] = _rel(p * psign, pr)
    key = f"iter{t}/X_multigedi_pca"
    if key in ref.files:  # rows = global cell id: checks the runner's row mapping
        pr = ref[key]
        psign = np.sign(np.sum(pca_cells * pr, axis=0))
        scores["pca_cell_order"] = _rel(pca_cells * psign, pr)
    report = {
        "fixture": args.fixture,
        "peer_python": args.peer_python,
        "iterations": t,
        "num_threads": cfg["num_threads"],
        "scores_rel_frobenius": scores,
        "worst": max(v for k, v in scores.items() if not k.endswith("_raw")),
        "median_iter_s": res["median_iter_s"],
    }
    print(json.dumps(report, indent=1))
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
