"""The ``flaxcnn`` command: train, sweep, cv, evaluate, lr-find, export, parity, port, tune, presets, models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from flaxcnn.errors import ConfigError, FlaxcnnError


def _number_list(kind: type, flag: str):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {kind.__name__} values, e.g. "
                                             f"{'0,1,2,3' if kind is int else '0.01,0.05'}; got {text!r}")
        return values

    return parse


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """One option per settable :class:`~flaxcnn.train.config.TrainConfig` field, generated from
    the field: flag, type, choices, help and default. Unset options stay None (see
    :func:`config_from_args`)."""
    from flaxcnn.train.config import GROUPS, flag_of, help_text, settings, value_type

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, s in settings():
        flag = flag_of(f.name)
        if flag is None:
            continue
        target = p if s.group is None else groups.setdefault(s.group, p.add_argument_group(GROUPS[s.group]))
        if value_type(f.name) is bool:  # a switch away from the default
            target.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true", default=None,
                                help=help_text(f.name))
        else:
            target.add_argument(flag, dest=f.name, type=s.parse or value_type(f.name), choices=s.choices or None,
                                metavar=s.metavar, default=None, help=help_text(f.name))


def _add_process_options(p: argparse.ArgumentParser) -> None:
    """One process per host, joined by jax.distributed (see docs/scaling.md)."""
    g = p.add_argument_group("multi-process (default: the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                             "JAX_PROCESS_ID environment variables; none set: one process)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    g.add_argument("--num-processes", type=int, help="number of processes in the job")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")


def config_from_args(args: argparse.Namespace):
    """The run's settings: the fields' defaults, then the preset's, then the options given."""
    from flaxcnn.train.config import TrainConfig, apply_preset, flag_of, settings

    config = TrainConfig()
    if args.preset:
        config = apply_preset(config, args.preset)
    config = dataclasses.replace(config, **{f.name: getattr(args, f.name) for f, _ in settings()
                                            if flag_of(f.name) and getattr(args, f.name, None) is not None})
    config.validate()
    out = getattr(args, "out", None) or f"runs/{_run_name(config)}"
    return dataclasses.replace(config, out=out)


def _run_name(config) -> str:
    """MODEL-DATASET, with the model the data set defaults to (``--dataset speech``: convnet)."""
    return f"{config.resolved().model}-{config.dataset}"


def cmd_train(args: argparse.Namespace) -> int:
    from flaxcnn.train import distributed
    from flaxcnn.train.loop import fit

    config = config_from_args(args)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.lr_find:
        from flaxcnn.train.lr_finder import find_lr

        result = find_lr(config, quiet=args.quiet)
        config = dataclasses.replace(config, lr=result.suggestion)
        print(f"training with the suggested learning rate {result.suggestion:.3g}")
    fit(config, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flaxcnn.train.sweep import run_sweep

    config = config_from_args(args)
    failed = [m for m in run_sweep(config, args.out or f"runs/sweep-{_run_name(config)}",
                                   seeds=args.seeds, lrs=args.lrs, weight_decays=args.weight_decays,
                                   strategy=args.strategy, overwrite=args.overwrite,
                                   quiet=args.quiet)["members"] if m["status"] != "ok"]
    return 1 if failed else 0


def cmd_cv(args: argparse.Namespace) -> int:
    from flaxcnn.train.crossval import merge_files, run_cv

    if args.merge:
        if not args.out:
            raise ConfigError("--merge needs --out, the folder for the merged cv.json and cv.md")
        merge_files(args.merge, args.out, quiet=args.quiet)
        return 0
    config = config_from_args(args)
    run_cv(config, args.out or f"runs/cv-{_run_name(config)}", folds=args.folds,
           seeds=args.seeds, quiet=args.quiet, final=args.final, only_folds=args.only_folds)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flaxcnn.train.loop import load_run

    if args.split == "all":
        return _evaluate_all(args)

    session, state, epoch = load_run(args.run, args.checkpoint, data_dir=args.data_dir)
    result = {"run": args.run, "checkpoint": args.checkpoint, "epoch": epoch, "model": session.config.model,
              "dataset": session.dataset.name}
    for split in ("train", "val", "test"):
        if split in session.device_arrays:
            metrics = session.evaluate(state, split)
            result[f"{split}_accuracy"] = metrics["accuracy"]
            result[f"{split}_loss"] = metrics["loss"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.run} ({args.checkpoint} checkpoint, epoch {epoch}): " + "  ".join(
            f"{s} acc {result[f'{s}_accuracy']:.4f} loss {result[f'{s}_loss']:.4f}"
            for s in ("train", "val", "test") if f"{s}_accuracy" in result))
    return 0


def _evaluate_all(args: argparse.Namespace) -> int:
    from flaxcnn.train.evaluation import evaluate_all

    result = evaluate_all(args.run, args.data_dir, args.checkpoint, args.out)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.run} ({args.checkpoint} checkpoint, epoch {result['epoch']}) on {result['data']}: "
          f"accuracy {result['accuracy']:.4f} ({result['count']} examples)")
    for row in result["per_class"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        print(f"  {row['class']:<12} {acc:>7}  ({row['correct']}/{row['count']})")
    print(f"confusion matrix: {result['confusion_png']}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from flaxcnn.train.loop import fit
    from flaxcnn.train.lr_finder import find_lr

    config = config_from_args(args)
    result = find_lr(config, start_lr=args.start_lr, end_lr=args.end_lr, num_iter=args.num_iter,
                     diverge_th=args.diverge_th, smooth_f=args.smooth_f, out=args.plot, quiet=args.quiet)
    print(f"suggested learning rate: {result.suggestion:.4g}  ({len(result.lrs)} steps"
          f"{', stopped at divergence' if result.diverged else ''}; plot: {result.plot})")
    if args.apply:
        fit(dataclasses.replace(config, lr=result.suggestion), resume=False, quiet=args.quiet)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flaxcnn.extras import require

    torch = require("torch", "flaxcnn export")
    from flaxcnn import convert
    from flaxcnn.train.loop import load_run
    from flaxcnn.train.state import to_model

    session, state, epoch = load_run(args.run, args.checkpoint)
    model = to_model(session.graphs, state)
    torch.save(convert.to_torch_state_dict(model), args.out)
    print(f"wrote {args.out}: state_dict of {session.config.model} ({args.checkpoint} checkpoint, epoch {epoch}); "
          f"load it with {session.spec.torch_reference.replace(':', '.')}"
          f"(num_classes={session.config.num_classes or session.dataset.num_classes}).load_state_dict("
          f"torch.load(path, weights_only=True))")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from flaxcnn.extras import require

    require("torch", "flaxcnn parity")  # the PyTorch references
    from parity.__main__ import main as parity_main

    return parity_main(([] if args.json is None else ["--json", args.json]) + (["--models", *args.models]
                                                                                  if args.models else [])
                       + (["--layers"] if args.layers else []))


def cmd_presets(args: argparse.Namespace) -> int:
    from flaxcnn.train.config import PRESETS, as_options

    for name, (description, overrides) in PRESETS.items():
        print(f"{name:<16} {description}\n{'':<16} {as_options(overrides)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from flaxcnn.models.registry import MODELS

    for name, spec in MODELS.items():
        print(f"{name:<15} {spec.domain:<7} input {spec.input_chw}  loss {spec.loss:<14} {spec.description}")
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    from flaxcnn.extras import require

    require("torch", "flaxcnn port")  # the model to port is a PyTorch module
    from flaxcnn.port.cli import run

    return run(args.model, args.input_shape, args.out, kwargs=args.kwargs, state_dict=args.state_dict,
               batch=args.batch, class_name=args.class_name)


def cmd_tune(args: argparse.Namespace) -> int:
    from flaxcnn.models.registry import MODELS
    from flaxcnn.tune import resolve_models, tune

    names = args.models or list(MODELS)
    print(f"timing every CPU implementation of each layer of {', '.join(names)} at batch {args.batch_size}")
    result = tune(resolve_models(names, args.batch_size, args.input_shape), args.out)
    kept = len(result["policy"].overrides)
    print(f"wrote {args.out}: {kept} override(s) of the default rule; train with --conv-policy {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flaxcnn", description="The CIFAR-2 and speech CNN labs in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (defaults reproduce lab 8's Net on CIFAR-2)")
    _add_training_options(p)
    p.add_argument("--out", help="run directory (default runs/MODEL-DATASET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or broken run in --out")
    p.add_argument("--lr-find", action="store_true", help="run the LR finder first and train with its suggestion")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_process_options(p)
    p.set_defaults(func=cmd_train)

    from flaxcnn.train.config import STRATEGIES

    p = sub.add_parser("sweep", help="train every combination of --seeds/--lrs/--weight-decays, one run each")
    _add_training_options(p)
    p.add_argument("--seeds", type=_number_list(int, "--seeds"), help="e.g. 0,1,2,3 (default: --seed)")
    p.add_argument("--lrs", type=_number_list(float, "--lrs"), help="e.g. 0.01,0.05 (default: --lr)")
    p.add_argument("--weight-decays", type=_number_list(float, "--weight-decays"),
                   help="e.g. 0,0.001 (default: --weight-decay)")
    p.add_argument("--strategy", choices=STRATEGIES, default="auto",
                   help="vmap: one compiled program for all models; sequential: one run after another; "
                        "auto: sequential on CPU, vmap elsewhere (see docs/scaling.md)")
    p.add_argument("--out", help="sweep directory, one run directory per combination inside "
                                 "(default runs/sweep-MODEL-DATASET)")
    p.add_argument("--overwrite", action="store_true", help="replace runs of the same names in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("cv", help="k-fold cross-validation (speech: speaker-grouped), one run per fold and seed")
    _add_training_options(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seeds", type=_number_list(int, "--seeds"), help="e.g. 0,1,2 (default: --seed)")
    p.add_argument("--out", help="cv directory: seed<S>/fold<K>/ runs, cv.json, cv.md "
                                 "(default runs/cv-MODEL-DATASET); finished runs in it are reused")
    p.add_argument("--only-folds", type=_number_list(int, "--only-folds"),
                   help="train only these folds (1-based, e.g. 2,3) to spread a protocol over processes")
    p.add_argument("--final", action="store_true",
                   help="then train the final model on every example into OUT/final (seed: the first seed)")
    p.add_argument("--merge", nargs="+", metavar="CV_JSON",
                   help="train nothing: merge cv.json files (or their folders) of one protocol, e.g. seeds run on "
                        "different machines, into OUT/cv.json and cv.md")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("evaluate", help="accuracy and loss of a run's checkpoint on every split")
    p.add_argument("--run", required=True)
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    p.add_argument("--data-dir", help="evaluate on this data folder instead of the run's")
    p.add_argument("--split", choices=["splits", "all"], default="splits",
                   help="splits: train/val/test as in training (default); all: every example of the folder, "
                        "with per-class accuracy and a confusion-matrix PNG")
    p.add_argument("--out", help="--split all: folder for eval_all.json and confusion.png "
                                 "(default RUN_DIR/eval-all-<folder>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("lr-find", help="Ignite's FastaiLRFinder: exponential LR sweep, suggestion, plot")
    _add_training_options(p)
    p.add_argument("--out", help="run directory used by --apply (default runs/MODEL-DATASET)")
    p.add_argument("--start-lr", type=float, default=1e-8)
    p.add_argument("--end-lr", type=float, default=1e-3)
    p.add_argument("--num-iter", type=int, default=None, help="default: one epoch of batches")
    p.add_argument("--diverge-th", type=float, default=1.05)
    p.add_argument("--smooth-f", type=float, default=0.05)
    p.add_argument("--plot", default="lr_finder.png")
    p.add_argument("--apply", action="store_true", help="then train with the suggested learning rate")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("export", help="write a run's weights as a PyTorch state_dict (.pt)")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help="prove every model equal to its PyTorch reference")
    p.add_argument("--json")
    p.add_argument("--models", nargs="+")
    p.add_argument("--layers", action="store_true",
                   help="layer-by-layer report naming the first layer that diverges")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("tune", help="time each CPU convolution's implementations here and write a conv policy file")
    p.add_argument("models", nargs="*", help="registered models or FILE.py:NAME (default: every registered model)")
    p.add_argument("--input-shape", type=_number_list(int, "--input-shape"),
                   help="C,H,W of a FILE.py:NAME model that declares no input_chw")
    p.add_argument("--batch-size", type=int, default=64, help="the training batch to time (default 64)")
    p.add_argument("--out", required=True, help="the policy file to write (use it with --conv-policy FILE)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("port", help="port a PyTorch model (FILE.py:NAME) to a Flax NNX module with a proof")
    p.add_argument("model", help="FILE.py:NAME, NAME an nn.Module class or a function returning one")
    p.add_argument("--input-shape", required=True, help="C,H,W of one input, e.g. 3,32,32")
    p.add_argument("--kwargs", help='JSON object of NAME\'s arguments, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--state-dict", help="weights to port (torch.save(model.state_dict()), read weights_only)")
    p.add_argument("--batch", type=int, default=4, help="examples in the traced and proven batch (default 4)")
    p.add_argument("--class-name", help="the top NNX class's name (default: the torch class's)")
    p.add_argument("--out", required=True, help="folder for model.py, weights.npz and parity.json")
    p.set_defaults(func=cmd_port)

    sub.add_parser("presets", help="list the named lab runs").set_defaults(func=cmd_presets)
    sub.add_parser("models", help="list the registered models").set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from flaxcnn import cpu_memory

    cpu_memory.keep_freed_memory()  # process-wide, before JAX starts its threads (see flaxcnn.cpu_memory)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FlaxcnnError as error:
        print(f"flaxcnn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flaxcnn: interrupted; the latest completed epoch is checkpointed (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "config_from_args", "ConfigError"]
