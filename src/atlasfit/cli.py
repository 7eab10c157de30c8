"""The ``atlasfit`` command line: ``convert``, ``synth``, ``info``, ``validate``, ``fit``, ``demo``.

Progress bars show on a terminal and stay quiet in non-interactive logs (one line per stage instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _modality_arg(text: str) -> tuple[str, dict]:
    """Parse ``NAME:OBS_TYPE[:LAYER1,LAYER2][:noortho]`` into a MultiGEDI modality config."""
    parts = text.split(":")
    if len(parts) < 2 or parts[1] not in {"M", "M_list", "X"}:
        raise argparse.ArgumentTypeError(
            f"--modality {text!r}: expected NAME:OBS_TYPE[:LAYERS][:noortho] with OBS_TYPE one of "
            "M, M_list, X (e.g. rna:M, splicing:M_list:M1,M2, atac:X)"
        )
    cfg: dict = {"obs_type": parts[1]}
    for extra in parts[2:]:
        if extra == "noortho":
            cfg["orthoZ"] = False
        elif extra:
            layers = extra.split(",")
            if parts[1] == "M_list":
                if len(layers) != 2:
                    raise argparse.ArgumentTypeError(
                        f"--modality {text!r}: M_list needs two layers, e.g. splicing:M_list:M1,M2"
                    )
                cfg["layers"] = tuple(layers)
            else:
                cfg["layer"] = layers[0]
    return parts[0], cfg


def _cli_advice(msg: str) -> str:
    """A convert error's advice in command-line flags (the library speaks in keyword arguments).

    Examples
    --------
    >>> _cli_advice("modality 'atac': NaN; replace NaN/inf values (or declare the modality kind 'binary' if NaN marks missing values)")
    "modality 'atac': NaN; replace NaN/inf values (or declare the modality binary with --binary atac if NaN marks missing values)"
    """
    import re

    m = re.search(r"modality '([^']+)'", msg)
    name = m.group(1) if m else "MODALITY"
    msg = msg.replace("declare the modality kind 'binary'", f"declare the modality binary with --binary {name}")
    return re.sub(r"pass kinds=\{'([^']+)': 'continuous'\}",
                  r"convert it from Python with atlasfit.io.convert(..., kinds={'\1': 'continuous'}) (the command line "
                  "has no flag for continuous data)", msg)


def _cmd_convert(args) -> int:
    from atlasfit.io import convert

    kinds = None
    if args.binary:
        kinds = {m: "binary" for m in args.binary}
    t0 = time.perf_counter()
    try:
        path = convert(args.source, args.store, sample_key=args.sample_key, kinds=kinds, overwrite=args.overwrite)
    except FileExistsError as err:
        raise FileExistsError(f"{args.store!r} exists; pass --overwrite to replace it") from err
    except ValueError as err:  # the library's advice, in command-line terms
        raise ValueError(_cli_advice(str(err))) from err
    print(f"atlasfit: wrote atlas store {path} in {time.perf_counter() - t0:.1f} s")
    return _cmd_info(argparse.Namespace(store=str(path), json=False))


def _cmd_synth(args) -> int:
    from atlasfit.datasets import synthetic_atlas

    features = {}
    for spec in args.features:
        name, _, n = spec.partition("=")
        features[name] = int(n)
    t0 = time.perf_counter()
    if os.path.exists(args.store) and not args.overwrite:
        raise FileExistsError(f"{args.store!r} exists; pass --overwrite to replace it")
    path = synthetic_atlas(
        args.store,
        n_cells=args.n_cells,
        n_samples=args.n_samples,
        features=features or None,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"atlasfit: wrote synthetic atlas {path} ({args.n_cells} cells) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_info(args) -> int:
    from atlasfit.io import open_atlas

    atlas = open_atlas(args.store)
    info = {
        "store": str(atlas.path),
        "sample_key": atlas.sample_key,
        "n_samples": int(len(atlas.samples)),
        "modalities": {
            m: {
                "n_cells": int(atlas.samples[m].sum()),
                "n_features": int(atlas.var(m).shape[0]),
                "n_samples": int((atlas.samples[m] > 0).sum()),
                "kind": atlas.kind(m),
                "layers": list(atlas.layers(m)),
            }
            for m in atlas.modalities
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"atlas store {info['store']}: {info['n_samples']} samples (key {info['sample_key']!r})")
        for m, d in info["modalities"].items():
            layers = ", ".join(d["layers"]) or "-"
            print(f"  {m:<12} {d['n_cells']:>10,} cells x {d['n_features']:>7,} features  "
                  f"{d['n_samples']:>4} samples  kind={d['kind']}  layers: {layers}")
    return 0


def _cmd_validate(args) -> int:
    from atlasfit.io import validate

    if not os.path.isdir(args.store):
        raise FileNotFoundError(f"{args.store!r} is not a directory; give an atlas store (atlasfit convert writes one)")
    t0 = time.perf_counter()
    report = validate(args.store, deep=not args.fast)
    print(report)
    print(f"atlasfit: validated in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_fit(args) -> int:
    from atlasfit.io._txn import check_writable

    # the results go into the store: refuse a read-only one before starting a cluster and fitting
    check_writable(args.store, what="write the fit's results into it (atlasfit fit writes them into the store)")

    from atlasfit import MultiGEDI
    from atlasfit.cluster import cluster_session

    modalities = dict(args.modality)
    model = MultiGEDI(
        modalities=modalities, sample_key=args.sample_key, K=args.K, mode=args.mode, seed=args.seed,
        dtype=args.dtype,
    )
    with cluster_session(gpu=args.gpu, n_workers=args.workers) as client:
        model.fit(args.store, max_iterations=args.iterations, client=client)
        model.write(args.store)
        model.close()
    print(f"atlasfit: fitted MultiGEDI (K={args.K}, {args.iterations} iterations); results written to "
          f"{args.store}")
    return 0


def _cmd_demo(args) -> int:
    from atlasfit._demo import run_demo

    run_demo(out=args.out, data=args.data, n_cells=args.n_cells, iterations=args.iterations, K=args.K,
             n_workers=args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``atlasfit`` command."""
    p = argparse.ArgumentParser(prog="atlasfit", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert .h5ad/.h5mu/.zarr into a sample-sorted atlas store")
    c.add_argument("source")
    c.add_argument("store")
    c.add_argument("--sample-key", required=True)
    c.add_argument("--binary", nargs="*", default=[], help="modalities holding binary {0,1,NaN} data")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_convert)

    s = sub.add_parser("synth", help="write a synthetic multi-modal atlas with ground truth")
    s.add_argument("store")
    s.add_argument("--n-cells", type=int, default=100_000)
    s.add_argument("--n-samples", type=int, default=16)
    s.add_argument("--features", nargs="*", default=[], help="e.g. rna=2000 splicing=1000 atac=500")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_synth)

    v = sub.add_parser("validate", help="check an atlas store: every chunk and every sample's integrity record")
    v.add_argument("store")
    v.add_argument("--fast", action="store_true",
                   help="metadata only (seconds); says what it did not check")
    v.set_defaults(func=_cmd_validate)

    i = sub.add_parser("info", help="describe an atlas store")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)

    f = sub.add_parser("fit", help="fit MultiGEDI on an atlas store and write the results into it")
    f.add_argument("store")
    f.add_argument("--modality", type=_modality_arg, action="append", required=True,
                   help="NAME:OBS_TYPE[:LAYERS][:noortho], e.g. rna:M splicing:M_list:M1,M2 atac:X")
    f.add_argument("--sample-key", default=None)
    f.add_argument("--K", type=int, default=10)
    f.add_argument("--mode", default="Bsphere", choices=["Bsphere", "Bl2"])
    f.add_argument("--iterations", type=int, default=30)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    f.add_argument("--workers", type=int, default=None, help="workers of the embedded LocalCluster")
    f.add_argument("--gpu", default=False, choices=[False, True, "auto"],
                   type=lambda v: {"true": True, "false": False, "auto": "auto"}[v.lower()])
    f.set_defaults(func=_cmd_fit)

    d = sub.add_parser("demo", help="real 5k atlas (or synthetic) -> store -> fit -> results + plot")
    d.add_argument("--out", default="atlasfit_demo")
    d.add_argument("--data", default="real", choices=["real", "synthetic"])
    d.add_argument("--n-cells", type=int, default=20_000, help="synthetic data only")
    d.add_argument("--iterations", type=int, default=20)
    d.add_argument("--K", type=int, default=10)
    d.add_argument("--workers", type=int, default=None)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atlasfit`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError) as err:
        print(f"atlasfit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
