"""Command line: argument parsing and printing only; the work happens in the library."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from kdistill import __version__

log = logging.getLogger("kdistill")

EXIT_USAGE = 2


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )


def _load_config(args: argparse.Namespace):
    from kdistill import config

    path = args.config
    if path is None and getattr(args, "resume", False) and args.out:
        saved = Path(args.out) / "config.yaml"
        path = saved if saved.is_file() else None
    return config.load(path, args.overrides)


def _run_folder(args: argparse.Namespace, cfg, kind: str) -> Path:
    if args.out:
        return Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.out) / f"{cfg.data.name}-{kind}-{stamp}"


def _print_summary(metrics: dict, folder: Path) -> None:
    from kdistill.report import text_table

    print(text_table(metrics))
    print()
    print(f"verdict: {metrics['comparison']['verdict']}")
    print(f"         {metrics['comparison']['nll']['verdict']}")
    print(f"run folder: {folder}  (report: {folder / 'report.html'})")


def cmd_run(args: argparse.Namespace) -> int:
    from kdistill.pipeline import run_pipeline

    cfg = _load_config(args)
    folder = _run_folder(args, cfg, "run")
    metrics = run_pipeline(cfg, folder, resume=args.resume)
    _print_summary(metrics, folder)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from kdistill.pipeline import run_pipeline

    cfg = _load_config(args)
    folder = _run_folder(args, cfg, "distill")
    metrics = run_pipeline(cfg, folder, resume=args.resume, teacher_path=args.teacher)
    _print_summary(metrics, folder)
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from kdistill.pipeline import train_teacher_only

    cfg = _load_config(args)
    folder = train_teacher_only(cfg, _run_folder(args, cfg, "teacher"), resume=args.resume)
    print(f"teacher saved in {folder}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kdistill.export import ExportError, export_run, format_parity

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats:
        # export_run takes an empty list as "all formats"; an empty flag is more likely a typo.
        raise ExportError(
            f"--formats {args.formats!r} names no format; give a comma-separated list out of "
            "safetensors, onnx, pt2"
        )
    manifest = export_run(args.run_dir, formats)
    folder = Path(args.run_dir) / "export"
    for name, entry in manifest["files"].items():
        print(f"{folder / name}  {entry['bytes']} bytes  sha256 {entry['sha256'][:16]}")
    print("\n".join(format_parity(manifest)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from kdistill.predict import predict_file

    text = predict_file(args.model, args.input, args.output)
    if args.output is None:
        sys.stdout.write(text)
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    if config_required:
        parser.add_argument("config", help="YAML config file")
    else:
        parser.add_argument(
            "config",
            nargs="?",
            default=None,
            help="YAML config file (default: the built-in digits config)",
        )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. distill.temperature=8 student.hidden=[64]",
    )
    parser.add_argument(
        "--out", default=None, help="run folder (default: a new folder under run.out, 'runs/')"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out; finished models are reused",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdistill",
        description="Distill a small classifier from a large one and measure whether it helped.",
    )
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the whole pipeline into a run folder")
    _add_config_arguments(run, config_required=False)
    run.set_defaults(handler=cmd_run)

    teacher = commands.add_parser("train-teacher", help="train and save a teacher only")
    _add_config_arguments(teacher, config_required=True)
    teacher.set_defaults(handler=cmd_train_teacher)

    distill = commands.add_parser("distill", help="distill from a saved teacher")
    _add_config_arguments(distill, config_required=True)
    distill.add_argument(
        "--teacher",
        required=True,
        help="teacher folder (model.safetensors + model.json) or a run folder",
    )
    distill.set_defaults(handler=cmd_distill)

    export = commands.add_parser(
        "export", help="export a run's student to RUN_DIR/export and check parity"
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run")
    export.add_argument(
        "--formats",
        default="safetensors,onnx,pt2",
        help="comma-separated formats out of safetensors, onnx, pt2 (default: all three)",
    )
    export.set_defaults(handler=cmd_export)

    predict = commands.add_parser("predict", help="predict classes for new data")
    predict.add_argument(
        "model",
        metavar="MODEL",
        help="export folder, or its .onnx, .pt2 or .safetensors file "
        "(.pt2 loading can unpickle: use only trusted .pt2 files)",
    )
    predict.add_argument(
        "input", metavar="INPUT", help="CSV with a header row, .npz with array x, or IDX file"
    )
    predict.add_argument(
        "--output",
        default=None,
        help="CSV file for id,class,class_name,prob_* rows (default: standard output)",
    )
    predict.set_defaults(handler=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes positionals only before the first option, so KEY=VALUE overrides written
    # after --out or --teacher come back as unknown arguments; they are overrides all the same.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        overrides = [a for a in unknown if "=" in a and not a.startswith("-")]
        if overrides != unknown or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides.extend(overrides)
    # With no config file, the first KEY=VALUE lands in the CONFIG slot: move it back.
    config_argument = getattr(args, "config", None)
    if (
        config_argument is not None
        and "=" in config_argument
        and not Path(config_argument).exists()
    ):
        args.overrides.insert(0, args.config)
        args.config = None
        if args.command != "run":
            parser.error(f"{args.command} needs a CONFIG file before any KEY=VALUE override")
    if getattr(args, "resume", False) and not args.out:
        parser.error("--resume needs --out RUN_DIR, the folder of the run to continue")
    _setup_logging(args.verbose)

    from kdistill.checkpoint import CheckpointError
    from kdistill.config import ConfigError
    from kdistill.data import DataError
    from kdistill.export import ExportError
    from kdistill.pipeline import RunError
    from kdistill.predict import PredictError
    from kdistill.trainer import DivergenceError

    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"kdistill: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (
        DataError,
        CheckpointError,
        RunError,
        ExportError,
        PredictError,
        DivergenceError,
    ) as error:
        print(f"kdistill: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as error:
        # torch raises OutOfMemoryError on CUDA; its CPU allocator raises a plain RuntimeError
        # ("DefaultCPUAllocator: can't allocate memory" in torch 2.13).
        import torch

        out_of_memory = getattr(torch, "OutOfMemoryError", ())
        if not isinstance(error, out_of_memory) and "allocate" not in str(error):
            raise
        print(
            f"kdistill: error: out of memory ({error}); use smaller teacher.hidden or "
            "student.hidden, or a smaller train.batch_size",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except MemoryError:
        print(
            "kdistill: error: out of memory; use smaller teacher.hidden or student.hidden, "
            "or a smaller train.batch_size",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kdistill: interrupted; continue with --resume and the same --out", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
