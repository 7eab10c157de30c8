"""The ``atlasfit`` command line: ``convert``, ``synth``, ``info``, ``validate``, ``fit``, ``fit-topic``,
``demo``.

Progress bars show on a terminal; in non-interactive logs ``fit`` prints one plain line per
iteration instead. Arguments are checked before a Dask cluster starts, and errors name the command
line's flags (``--modality``, ``--iterations``), not the library's keyword arguments.
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


#: Library keyword arguments -> the ``fit`` command's flags, for errors raised below the command line.
_FIT_FLAGS = (
    ("without resume_from_checkpoint", "without --resume"),
    ("resume_from_checkpoint", "--resume"),
    ("give another checkpoint_dir=", "give another --checkpoint-dir"),
    ("another checkpoint_dir=", "another --checkpoint-dir"),
    ("checkpoint_dir=", "--checkpoint-dir"),
    ("checkpoint_every", "--checkpoint-every"),
    ("max_iterations", "--iterations"),
    ("pass sample_key=None", "leave out --sample-key"),
    ("sample_key=", "--sample-key "),
    ("set 'layers' (M_list) or 'layer' in its config",
     "name the layers in --modality (NAME:M_list:LAYER1,LAYER2 or NAME:M:LAYER)"),
)


def _fit_advice(msg: str) -> str:
    """A library error of ``atlasfit fit`` in command-line flags.

    Examples
    --------
    >>> _fit_advice("MultiGEDI.fit: max_iterations must be an integer >= 0 (0: initialise only), got -1")
    'MultiGEDI.fit: --iterations must be an integer >= 0 (0: initialise only), got -1'
    """
    for lib, flag in _FIT_FLAGS:
        msg = msg.replace(lib, flag)
    return msg


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _check_fit_args(args, atlas) -> dict:
    """Everything ``atlasfit fit`` can check before a cluster starts; returns the modality configs.

    Errors name the flags: ``--modality`` (unknown modality, missing layer, kind that does not match the
    obs type, given twice), ``--sample-key``.
    """
    modalities: dict[str, dict] = {}
    for name, cfg in args.modality:
        if name in modalities:
            raise ValueError(f"--modality {name!r} is given twice; give each modality once")
        modalities[name] = cfg
    if args.sample_key is not None and args.sample_key != atlas.sample_key:
        raise ValueError(
            f"--sample-key {args.sample_key!r}: the atlas store {str(atlas.path)!r} is sorted by "
            f"{atlas.sample_key!r}; leave out --sample-key (or convert the data again with --sample-key "
            f"{args.sample_key!r})"
        )
    example = {"M": "rna:M", "M_list": "splicing:M_list:M1,M2", "X": "atac:X"}
    for name, cfg in modalities.items():
        ot = cfg["obs_type"]
        if name not in atlas.modalities:
            raise ValueError(
                f"--modality {name}:{ot}: the store has no modality {name!r}; it has "
                f"{', '.join(atlas.modalities)} (atlasfit info {args.store} lists them)"
            )
        layers = list(atlas.layers(name))
        if ot == "M_list" and "layers" not in cfg:
            raise ValueError(
                f"--modality {name}:M_list needs its two layers, e.g. --modality {name}:M_list:"
                f"{','.join(layers[:2]) if len(layers) >= 2 else 'M1,M2'} (the store's layers of {name!r}: "
                f"{', '.join(layers) or 'none'})"
            )
        for lay in cfg.get("layers", ()) + ((cfg["layer"],) if cfg.get("layer") else ()):
            if lay not in layers:
                raise ValueError(
                    f"--modality {name}:{ot}: modality {name!r} has no layer {lay!r}; its layers: "
                    f"{', '.join(layers) or 'none (leave the layer out to use X)'}"
                )
        kind = atlas.kind(name)
        if ot == "X" and kind != "binary":
            raise ValueError(
                f"--modality {name}:X: the store holds {name!r} as {kind!r}, but obs type X needs binary data; "
                f"use --modality {name}:M for counts, or convert it again with --binary {name}"
            )
        if ot in ("M", "M_list") and kind != "counts":
            raise ValueError(
                f"--modality {name}:{ot}: the store holds {name!r} as {kind!r}, but obs type {ot} needs counts"
                + (f"; use --modality {name}:X for binary data" if kind == "binary" else "")
                + f" (e.g. {example['X' if kind == 'binary' else ot]})"
            )
    return modalities


class _FitProgress:
    """One line per MultiGEDI iteration with σ² per modality: a tqdm bar on a terminal, plain lines
    (stdout, flushed) otherwise.

    ``mode``: ``"auto"`` (a bar when stderr is a terminal), ``"bar"``, ``"lines"`` or ``"none"``.
    """

    def __init__(self, mode: str, total: int, modalities: dict):
        self.total = total
        self.t0 = time.perf_counter()
        # σ² of X modalities is fixed at 1: not worth a column
        self.names = [m for m, cfg in modalities.items() if cfg["obs_type"] != "X"]
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        if mode == "bar" and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="MultiGEDI", unit="it", file=sys.stderr)

    def _sigma2(self, shared) -> str:
        parts = [f"{m}={float(shared[f'{m}/sigma2']):.5g}" for m in self.names if f"{m}/sigma2" in shared]
        return " ".join(parts)

    def __call__(self, iteration: int, shared) -> None:
        s2 = self._sigma2(shared)
        if self.bar is not None:
            self.bar.n = iteration
            self.bar.set_postfix_str(f"sigma2 {s2}" if s2 else "", refresh=True)
        elif self.mode == "lines":
            obj = shared.get("tracking/objective")
            tail = f"  objective {float(obj[-1]):.6g}" if obj is not None and len(obj) else ""
            print(f"atlasfit fit: iteration {iteration}/{self.total}  sigma2 {s2 or '-'}{tail}  "
                  f"({time.perf_counter() - self.t0:.1f} s)", flush=True)
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _cmd_fit(args) -> int:
    from atlasfit.io import open_atlas
    from atlasfit.io._txn import check_writable

    if not os.path.isdir(args.store):
        raise FileNotFoundError(f"{args.store!r} is not a directory; give an atlas store (atlasfit convert or "
                                "atlasfit synth writes one)")
    atlas = open_atlas(args.store)
    modalities = _check_fit_args(args, atlas)
    # the results go into the store: refuse a read-only one before starting a cluster and fitting
    check_writable(args.store, what="write the fit's results into it (atlasfit fit writes them into the store)")

    from atlasfit import MultiGEDI
    from atlasfit.engine import default_checkpoint_dir

    try:
        model = MultiGEDI(
            modalities=modalities, sample_key=args.sample_key, K=args.K, mode=args.mode, seed=args.seed,
            dtype=args.dtype, solve_Y_every=args.solve_y_every,
        )
        model._register_store(atlas)  # the model's own checks of the data, still before any cluster
    except (ValueError, KeyError) as err:
        raise ValueError(_fit_advice(str(err))) from err

    store_bytes = _du(Path(args.store))
    if args.checkpoint_every != 0 or args.resume:
        ck_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(
            atlas.path, "multigedi", model.fingerprint(atlas))
        if args.resume and not (ck_dir / "LATEST.json").is_file():
            others = sorted(d.name for d in ck_dir.parent.glob("multigedi*") if (d / "LATEST.json").is_file())
            raise FileNotFoundError(
                f"--resume: no checkpoint of this fit in {str(ck_dir)!r}; run without --resume to start it"
                + (f" (checkpoints of fits with other settings lie beside it: {', '.join(others)}; --resume needs "
                   "the same --modality, --K, --mode, --dtype and --seed as the fit that wrote one)" if others else "")
            )
        itemsize = 4 if args.dtype == "float32" else 8
        n_cells = {m: int(atlas.samples[m].sum()) for m in modalities}
        n_feat = {m: int(atlas.var(m).shape[0]) for m in modalities}
        dense = sum(n_cells[m] * n_feat[m] for m in modalities) * itemsize
        every = args.checkpoint_every
        if args.solve_y_every and every % args.solve_y_every == 0:
            # the small state: B (K x cells), per modality s_i, s_i0 (cells) and Q_i, o_i (features x (K + 1)
            # per sample); Y of every modality is rebuilt on resume (benchmarks/bench_checkpoint_size.py)
            small = itemsize * (args.K * max(n_cells.values()) + sum(
                2 * n_cells[m] + int(len(atlas.samples[m])) * n_feat[m] * (args.K + 1) for m in modalities))
            what = (f"about {_mb(small)}: the small state only, the latent state Y being solved every "
                    f"{args.solve_y_every} iterations and rebuilt on --resume (a save at another iteration, e.g. "
                    f"--iterations not a multiple of {args.solve_y_every}, holds Y of count modalities: up to "
                    f"{_mb(dense * 0.87)})")
        else:
            # an upper bound: Y of every modality compressed (~0.87 of float64, ~0.82 of float32); binary and
            # paired-count modalities write less (benchmarks/bench_checkpoint_size.py, docs/engine.md)
            what = f"at most about {_mb(dense * 0.87)}, mostly the latent state Y, cells x features, compressed"
        print(f"atlasfit fit: checkpoints in {ck_dir} every {args.checkpoint_every} iterations (only the last "
              f"complete one is kept: {what}; the store is {_mb(store_bytes)}); --checkpoint-every 0 turns them off",
              flush=True)
    else:
        print("atlasfit fit: no checkpoints (--checkpoint-every 0): a lost worker ends the fit", flush=True)

    from atlasfit.cluster import cluster_session

    if args.resume:
        with open(ck_dir / "LATEST.json") as fh:
            start = f"resuming from the checkpoint at iteration {json.load(fh)['iteration']}"
    else:
        start = "initialising (randomised SVD per sample)"
    print(f"atlasfit fit: MultiGEDI K={args.K}, {args.iterations} iterations, {args.dtype}; {start} ...", flush=True)
    progress = _FitProgress(args.progress, args.iterations, modalities)
    t0 = time.perf_counter()
    try:
        with cluster_session(gpu=args.gpu, n_workers=args.workers, profile=args.profile) as client:
            model.fit(args.store, max_iterations=args.iterations, client=client, progress=False,
                      callback=progress, checkpoint_every=args.checkpoint_every,
                      checkpoint_dir=args.checkpoint_dir, resume_from_checkpoint=args.resume)
            model.write(args.store)
            model.close()
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise type(err)(_fit_advice(str(err))) from err
    except RuntimeError as err:
        from atlasfit.engine import CheckpointLockedError

        if isinstance(err, CheckpointLockedError):
            raise CheckpointLockedError(_fit_advice(str(err))) from err
        raise
    finally:
        progress.close()
    print(f"atlasfit: fitted MultiGEDI (K={args.K}, {model.n_iter_} iterations) in "
          f"{time.perf_counter() - t0:.1f} s; results written to {args.store}")
    info = model.checkpoint_info_
    if info is not None:
        ck_bytes = _du(Path(info.path).parent)
        print(f"atlasfit fit: checkpoint (iteration {info.iteration}) in {Path(info.path).parent}: "
              f"{_mb(ck_bytes)} ({ck_bytes / max(store_bytes, 1):.1f}x the store's {_mb(store_bytes)}); "
              "atlasfit fit ... --resume continues from it, delete the directory to free the space")
        beside = Path(args.store).absolute()
        beside = beside.with_name(beside.name + ".checkpoints")
        others = [d for d in beside.glob("*") if d.is_dir() and d.resolve() != Path(info.path).parent.resolve()]
        if others:  # one directory per fit's settings: earlier fits' checkpoints stay until deleted
            print(f"atlasfit fit: {beside} also holds the checkpoints of {len(others)} other fit(s) of this store "
                  f"({_mb(sum(_du(d) for d in others))}): {', '.join(sorted(d.name for d in others))}")
    return 0


def _topic_modality_arg(text: str) -> tuple[str, str | None]:
    """Parse ``NAME[:LIKELIHOOD]`` of ``atlasfit fit-topic --modality``."""
    from atlasfit.models.topic._config import LIKELIHOODS

    name, _, lik = text.partition(":")
    if not name or (lik and lik not in LIKELIHOODS):
        raise argparse.ArgumentTypeError(
            f"--modality {text!r}: expected NAME[:LIKELIHOOD] with LIKELIHOOD one of {', '.join(LIKELIHOODS)} "
            "(e.g. rna:multinomial, atac:bernoulli)"
        )
    return name, (lik or None)


class _EpochProgress:
    """One line per topic-model epoch with the loss: a tqdm bar on a terminal, plain lines otherwise."""

    def __init__(self, mode: str, total: int | None):
        self.total, self.t0, self.bar = total, time.perf_counter(), None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="topic model", unit="epoch", file=sys.stderr)

    def __call__(self, epoch: int, record) -> None:
        done = int(epoch) + 1  # the callback's epoch counts from 0
        parts = [f"loss/cell {float(record['train_loss_per_cell']):.6g}"]
        if record.get("val_loss") is not None:
            parts.append(f"val_loss {float(record['val_loss']):.6g}")
        if record.get("val_ll_per_token") is not None:
            parts.append(f"val_ll/token {float(record['val_ll_per_token']):.5g}")
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str("  ".join(parts), refresh=True)
        elif self.mode == "lines":
            of = f"/{self.total}" if self.total else ""
            print(f"atlasfit fit-topic: epoch {done}{of}  {'  '.join(parts)}  "
                  f"({time.perf_counter() - self.t0:.1f} s)", flush=True)
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_fit_topic(args) -> int:
    from atlasfit.io import open_atlas
    from atlasfit.io._txn import check_writable

    if not os.path.isdir(args.store):
        raise FileNotFoundError(f"{args.store!r} is not a directory; give an atlas store (atlasfit convert or "
                                "atlasfit synth writes one)")
    atlas = open_atlas(args.store)
    chosen = args.modality or [(m, None) for m in atlas.modalities]
    names = [m for m, _ in chosen]
    for m in names:
        if m not in atlas.modalities:
            raise ValueError(f"--modality {m}: the store has no modality {m!r}; it has {', '.join(atlas.modalities)}")
        if names.count(m) > 1:
            raise ValueError(f"--modality {m!r} is given twice; give each modality once")
    check_writable(args.store, what="write the fit's results into it (atlasfit fit-topic writes them into the store)")

    from atlasfit import MultimodalAmortizedLDA

    likelihoods = {m: lik for m, lik in chosen if lik is not None} or None
    if likelihoods is not None and len(likelihoods) != len(chosen):
        raise ValueError("--modality: give a likelihood for every modality (NAME:LIKELIHOOD) or for none")
    try:  # registration reads the store's metadata only: still before any cluster
        lda = MultimodalAmortizedLDA.from_data(args.store, modalities=names, likelihoods=likelihoods,
                                               n_topics=args.n_topics, dtype=args.dtype)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(_fit_advice(str(err)).replace("n_topics", "--n-topics")) from err
    cfg = lda.config
    store_bytes = _du(Path(args.store))
    print(f"atlasfit fit-topic: {len(names)} modalities ("
          + ", ".join(f"{m}: {lik}" for m, lik in zip(cfg.modalities, cfg.likelihoods))
          + f"), {args.n_topics} topics, {args.epochs if args.epochs is not None else 'default'} epochs",
          flush=True)
    if args.checkpoint_every == 0 and not args.resume:
        print("atlasfit fit-topic: no checkpoints (--checkpoint-every 0): a lost worker ends the fit", flush=True)

    from atlasfit.cluster import cluster_session

    progress = _EpochProgress(args.progress, args.epochs)
    t0 = time.perf_counter()
    try:
        with cluster_session(n_workers=args.workers, profile=args.profile) as client:
            lda.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      client=client, progress=False, callback=progress, checkpoint_every=args.checkpoint_every,
                      checkpoint_dir=args.checkpoint_dir, resume_from_checkpoint=args.resume)
            lda.write(args.store, key=args.key)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise type(err)(_fit_advice(str(err)).replace("max_epochs", "--epochs")) from err
    except RuntimeError as err:
        from atlasfit.engine import CheckpointLockedError

        if isinstance(err, CheckpointLockedError):
            raise CheckpointLockedError(_fit_advice(str(err))) from err
        raise
    finally:
        progress.close()
    print(f"atlasfit: trained the topic model ({lda.n_epochs_} epochs) in {time.perf_counter() - t0:.1f} s; "
          f"results written to {args.store} (obsm['X_{args.key}'], varm['{args.key}_loadings'])")
    info = getattr(lda, "checkpoint_info_", None)
    if info is not None:
        ck_bytes = _du(Path(info.path).parent)
        print(f"atlasfit fit-topic: checkpoint (epoch {info.iteration}) in {Path(info.path).parent}: "
              f"{_mb(ck_bytes)} ({ck_bytes / max(store_bytes, 1):.2f}x the store's {_mb(store_bytes)}); "
              "--resume continues from it, delete the directory to free the space")
    return 0


def _cmd_demo(args) -> int:
    from atlasfit._demo import run_demo

    run_demo(out=args.out, data=args.data, n_cells=args.n_cells, iterations=args.iterations, K=args.K,
             n_workers=args.workers)
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help already says it, or there is none to show:
    flags, required options); descriptions and epilogs printed as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or action.required or d is None or d is False or d is argparse.SUPPRESS
                or (isinstance(d, list) and not d) or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _count(flag: str, minimum: int):
    """An argparse type: an integer >= ``minimum``, the error naming ``flag``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} needs an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {minimum}, got {value}")
        return value

    return parse


_DESCRIPTION = """\
atlasfit: fit multi-sample, multi-modal single-cell models (MultiGEDI) on atlas-size data with Dask.
'atlasfit COMMAND --help' shows a command's options and their defaults."""

_FIT_EPILOG = """\
examples:
  atlasfit fit real5k.zarr --modality rna:M --modality splicing:M_list:M1,M2 --K 10
  atlasfit fit atlas.zarr --modality rna:M --modality atac:X --iterations 50 --dtype float32

progress: one line per iteration with sigma2 per modality (a bar on a terminal).
checkpoints: beside the store in STORE.checkpoints/ (only the last complete one is kept; with the
defaults, --checkpoint-every and --solve-y-every 10, it holds the small state only: about the store's
size or less); --checkpoint-every 0 turns them off, --resume continues a killed fit from the last one."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``atlasfit`` command."""
    p = argparse.ArgumentParser(prog="atlasfit", description=_DESCRIPTION, formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    c = sub.add_parser("convert", formatter_class=_HelpFormatter,
                       help="convert .h5ad/.h5mu/.zarr into a sample-sorted atlas store")
    c.add_argument("source", help=".h5ad, .h5mu or .zarr (AnnData / MuData) to convert")
    c.add_argument("store", help="the atlas store (a Zarr directory) to write")
    c.add_argument("--sample-key", required=True, help="obs column naming each cell's sample")
    c.add_argument("--binary", nargs="*", default=[], metavar="MODALITY",
                   help="modalities holding binary {0,1,NaN} data (e.g. atac)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing store")
    c.set_defaults(func=_cmd_convert)

    s = sub.add_parser("synth", formatter_class=_HelpFormatter,
                       help="write a synthetic multi-modal atlas with ground truth")
    s.add_argument("store", help="the atlas store (a Zarr directory) to write")
    s.add_argument("--n-cells", type=_count("--n-cells", 1), default=100_000, help="cells in all")
    s.add_argument("--n-samples", type=_count("--n-samples", 1), default=16, help="samples")
    s.add_argument("--features", nargs="*", default=[], metavar="NAME=N",
                   help="features per modality, e.g. rna=2000 splicing=1000 atac=500 (default: those three)")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing store")
    s.set_defaults(func=_cmd_synth)

    v = sub.add_parser("validate", formatter_class=_HelpFormatter,
                       help="check an atlas store: every chunk and every sample's integrity record")
    v.add_argument("store", help="the atlas store to check")
    v.add_argument("--fast", action="store_true",
                   help="metadata only (seconds); says what it did not check")
    v.set_defaults(func=_cmd_validate)

    i = sub.add_parser("info", formatter_class=_HelpFormatter, help="describe an atlas store")
    i.add_argument("store", help="the atlas store to describe")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_cmd_info)

    f = sub.add_parser("fit", formatter_class=_HelpFormatter, epilog=_FIT_EPILOG,
                       help="fit MultiGEDI on an atlas store and write the results into it",
                       description="Fit MultiGEDI on an atlas store and write the results into it "
                                   "(obsm['X_multigedi_pca'], varm, the fitted model).")
    f.add_argument("store", help="atlas store (atlasfit convert / synth write one)")
    f.add_argument("--modality", type=_modality_arg, action="append", required=True,
                   help="NAME:OBS_TYPE[:LAYERS][:noortho], once per modality; OBS_TYPE M (counts), M_list "
                        "(paired counts, two layers) or X (binary), e.g. rna:M splicing:M_list:M1,M2 atac:X")
    f.add_argument("--sample-key", default=None, help="the store's sample column (default: the one it is sorted by)")
    f.add_argument("--K", type=_count("--K", 1), default=10, help="latent factors")
    f.add_argument("--mode", default="Bsphere", choices=["Bsphere", "Bl2"], help="normalisation of B")
    f.add_argument("--iterations", type=_count("--iterations", 0), default=30,
                   help="block-coordinate-descent iterations (0: initialise only)")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    f.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the fit (float32: half the memory and checkpoint size)")
    f.add_argument("--workers", type=_count("--workers", 1), default=None,
                   help="workers of the embedded LocalCluster (default: one per usable core)")
    f.add_argument("--gpu", default=False, choices=[False, True, "auto"], metavar="{false,true,auto}",
                   type=lambda v: {"true": True, "false": False, "auto": "auto"}.get(v.lower(), v),
                   help="true: a LocalCUDACluster (one worker per GPU); auto: GPUs when available; default: false")
    f.add_argument("--profile", default=None, metavar="PROFILE",
                   help="run the workers from a cluster profile: a name in deploy/profiles (slurm-cpu, pbs-cpu, ...) "
                        "or a YAML path; SLURM/PBS jobs are submitted and the fit waits for their workers "
                        "(the profile's startup_timeout); --workers and --gpu are then ignored")
    f.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                   help="auto: a bar on a terminal, one plain line per iteration otherwise")
    f.add_argument("--checkpoint-every", type=_count("--checkpoint-every", 0), default=10,
                   help="checkpoint every this many iterations (and at the start and the end); 0: none")
    f.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default: STORE.checkpoints/multigedi-<digest of the fit's settings>)")
    f.add_argument("--solve-y-every", type=_count("--solve-y-every", 0), default=10,
                   help="every this many iterations the latent Y is solved from the small state and the data, so a "
                        "checkpoint at those iterations holds no Y (about the store's size); 0: multigedi 1.1.0's "
                        "Y update at every iteration (parity 1e-12) and checkpoints that hold Y (3-9x the store)")
    f.add_argument("--resume", action="store_true",
                   help="continue a killed fit of the same settings from its last checkpoint")
    f.set_defaults(func=_cmd_fit)

    t = sub.add_parser("fit-topic", formatter_class=_HelpFormatter,
                       help="train the multimodal topic model on an atlas store, results into it",
                       description="Train MultimodalAmortizedLDA (one encoder per modality, mixture of experts) "
                                   "on an atlas store on Dask workers and write topic proportions and loadings "
                                   "into it.",
                       epilog="example:\n  atlasfit fit-topic atlas.zarr --modality rna:multinomial "
                              "--modality atac:bernoulli --n-topics 10 --epochs 25 --batch-size 256 --lr 0.05\n\n"
                              "progress: one line per epoch with the training loss per cell and the held-out "
                              "loss (a bar on a terminal).")
    t.add_argument("store", help="atlas store (atlasfit convert / synth write one)")
    t.add_argument("--modality", type=_topic_modality_arg, action="append", default=None,
                   help="NAME[:LIKELIHOOD], once per modality (default: every modality of the store, likelihoods "
                        "chosen from the data: bernoulli for binary, gamma_poisson for RNA-like names, multinomial "
                        "for other counts)")
    t.add_argument("--n-topics", type=_count("--n-topics", 1), default=20, help="topics")
    t.add_argument("--epochs", type=_count("--epochs", 0), default=None,
                   help="epochs (default: about 2e7 / cells, between 1 and 1000)")
    t.add_argument("--batch-size", type=_count("--batch-size", 2), default=128, help="cells per minibatch")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="precision")
    t.add_argument("--key", default="topic", help="results go to obsm['X_KEY'] and varm['KEY_loadings']")
    t.add_argument("--workers", type=_count("--workers", 1), default=None,
                   help="workers of the embedded LocalCluster (default: one per usable core)")
    t.add_argument("--profile", default=None, metavar="PROFILE",
                   help="run the workers from a cluster profile (a name in deploy/profiles or a YAML path), "
                        "e.g. slurm-cpu; --workers is then ignored")
    t.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                   help="auto: a bar on a terminal, one plain line per epoch otherwise")
    t.add_argument("--checkpoint-every", type=_count("--checkpoint-every", 0), default=10,
                   help="checkpoint every this many epochs; 0: none")
    t.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default: STORE.checkpoints/topic-<digest of the fit's settings>)")
    t.add_argument("--resume", action="store_true",
                   help="continue a killed fit of the same settings from its last checkpoint")
    t.set_defaults(func=_cmd_fit_topic)

    d = sub.add_parser("demo", formatter_class=_HelpFormatter,
                       help="real 5k atlas (or synthetic) -> store -> fit -> results + plot")
    d.add_argument("--out", default="atlasfit_demo", help="output directory (store and plot)")
    d.add_argument("--data", default="real", choices=["real", "synthetic"], help="which atlas")
    d.add_argument("--n-cells", type=_count("--n-cells", 1), default=20_000, help="cells (synthetic data only)")
    d.add_argument("--iterations", type=_count("--iterations", 0), default=60,
                   help="MultiGEDI iterations (60: the real 5k data's sigma^2 has flattened)")
    d.add_argument("--K", type=_count("--K", 1), default=10, help="latent factors")
    d.add_argument("--workers", type=_count("--workers", 1), default=None,
                   help="workers of the embedded LocalCluster (default: one per usable core)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``atlasfit`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError, TimeoutError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
        print(f"atlasfit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from atlasfit.engine import CheckpointLockedError  # noqa: PLC0415

        if not isinstance(err, CheckpointLockedError):
            raise
        print(f"atlasfit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
