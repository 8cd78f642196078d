"""``ckpt``: the command line over ckptcore. Each command parses, makes one ckptcore call, prints.

Exit statuses (:data:`EXIT_STATUSES`, also in ``ckpt --help``): 0 done; 1 a check failed
(``verify``: the two checkpoints' outputs differ); 2 the input or the arguments are wrong
(:class:`CkptError`, one line ``ckpt: error: <file>: <problem>``); 70 an internal error (a bug:
the traceback is printed); 74 the machine failed (an ``OSError`` such as a full disk, one line);
75 storage failed to answer (:class:`StorageError`: a dropped connection, a server error; worth
retrying, one line); 130 interrupted. Nothing is left at the destination in any failing case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from ckptcore import __version__, settings
from ckptcore.errors import CkptError, MachineError, StorageError, describe

EX_OK = 0
EX_CHECK_FAILED = 1  # verify: the outputs differ
EX_USAGE = 2  # bad input or arguments (argparse uses 2 as well)
EX_SOFTWARE = 70  # sysexits.h: an internal error (a bug)
EX_IOERR = 74  # sysexits.h: the machine failed (disk full, permission, I/O error)
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, the user is invited to retry
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away

EXIT_STATUSES = {
    EX_OK: "done",
    EX_CHECK_FAILED: "a check failed: verify found the outputs differ",
    EX_USAGE: "the input or the arguments are wrong (one line names the file and the problem)",
    EX_SOFTWARE: "internal error: a bug (the traceback is printed)",
    EX_IOERR: "the machine failed: disk full, file size limit, I/O error",
    EX_TEMPFAIL: "storage failed to answer (connection, server error): try again",
    EX_INTERRUPTED: "interrupted",
    EX_BROKEN_PIPE: "the reader of the output went away (e.g. | head)",
}

EPILOG = (
    """\
examples:
  ckpt inspect checkpoints/                       # a Lightning training folder
  ckpt convert checkpoints/ model.nemo            # training folder -> .nemo (keeps TP/PP)
  ckpt reshard model.nemo model_tp1.nemo --target-tp 1 --target-pp 1
  ckpt verify model.nemo model_tp1.nemo           # same logits?
  ckpt import-hf ./vit-hf model.nemo --target-tp 2
  ckpt export-hf model.nemo ./vit-hf

Paths may be local paths or fsspec URLs (s3://bucket/prefix, file:///...).

environment (ckptcore.settings):
"""
    + settings.describe()
    + """

exit status:
"""
    + "\n".join(f"  {code:<4}{meaning}" for code, meaning in EXIT_STATUSES.items())
)


class _Progress:
    """A tqdm bar over bytes written, on stderr, only when it is a terminal (or forced)."""

    def __init__(self, total: int | None, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
            )

    def __call__(self, key: str, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_enabled(args: argparse.Namespace) -> bool:
    if args.progress == "always":
        return True
    if args.progress == "never":
        return False
    return sys.stderr.isatty()


def _layers(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts like 5,5,6, got {value!r}"
        ) from None


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def _positive_list(value: str) -> list[int]:
    try:
        return [_positive(v) for v in value.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 1,4,16, got {value!r}"
        ) from None


def _concurrency(value: str) -> int:
    n = _positive(value)
    if n > 64:
        raise argparse.ArgumentTypeError(f"expected a whole number 1..64, got {value!r}")
    return n


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def cmd_inspect(args: argparse.Namespace) -> int:
    from ckptcore.api import inspect

    info = inspect(args.path, args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['path']}")
    print(f"  format      {info['format']} ({info['family']})")
    if info["checkpoint"]:
        print(f"  checkpoint  {info['checkpoint']}")
    print(
        f"  layout      {info['layout']}  TP={info['tp']} PP={info['pp']}  layers/stage={info['layers_per_stage']}"
    )
    print(
        f"  parameters  {info['parameters']:,}  ({', '.join(f'{k}: {v:,}' for k, v in info['dtypes'].items())})"
    )
    print(
        f"  weights     {_human(info['tensor_bytes'])} in {len(info['files'])} file(s), {_human(sum(f['bytes'] for f in info['files']))} on disk"
    )
    if info["step"] is not None:
        print(f"  step        {info['step']} (epoch {info['epoch']})")
    for key, value in info["config"].items():
        print(f"  {key:<22}{value}")
    for note in info["notes"]:
        print(f"  note: {note}")
    return 0


def _convert_like(args: argparse.Namespace, target_tp: int | None, target_pp: int | None) -> int:
    from ckptcore.api import convert
    from ckptcore.sources import open_checkpoint

    total = None
    enabled = _progress_enabled(args)
    if enabled:
        from ckptcore.api import plan_conversion

        with open_checkpoint(args.source, args.checkpoint) as ck:
            plan = plan_conversion(ck, target_tp, target_pp, args.precision, args.layers_per_stage)
            total = sum(f.write_bytes for f in plan.files)
    bar = _Progress(total, "writing", enabled)
    try:
        report = convert(
            args.source,
            args.dest,
            checkpoint=args.checkpoint,
            target_tp=target_tp,
            target_pp=target_pp,
            precision=args.precision,
            layers_per_stage=args.layers_per_stage,
            overwrite=args.overwrite,
            workers=args.workers,
            allow_nonfinite=args.allow_nonfinite,
            progress=bar,
        )
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    layout = report.layout
    for note in layout.notes:
        print(f"note: {note}", file=sys.stderr)
    rate = report.tensor_bytes / report.seconds / 1e9 if report.seconds > 0 else 0.0
    print(
        f"wrote {report.destination}: TP={layout.source_tp} PP={layout.source_pp} -> "
        f"TP={layout.target_tp} PP={layout.target_pp}, precision {layout.precision}, "
        f"{_human(report.output_bytes)} in {report.seconds:.2f} s ({rate:.2f} GB/s)"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    return _convert_like(args, args.target_tp, args.target_pp)


def cmd_reshard(args: argparse.Namespace) -> int:
    return _convert_like(args, args.target_tp, args.target_pp)


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptcore.api import verify
    from ckptcore.lineage import VERIFY_METHODS

    report = verify(
        args.a, args.b, tolerance=args.tolerance, images=args.images, run_both=args.run_both
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        verdict = "OK" if report.passed else "MISMATCH"
        how = VERIFY_METHODS.get(report.method, report.method)
        print(
            f"{verdict}: max |logit difference| = {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:g}, {report.images} images; {how})"
        )
    return EX_OK if report.passed else EX_CHECK_FAILED


def cmd_plan(args: argparse.Namespace) -> int:
    from ckptcore.api import plan_conversion
    from ckptcore.sources import open_checkpoint
    from ckptcore.workplan import estimate, work_items

    # Options of the other mode would be ignored: refuse them instead.
    if args.estimate:
        other = {"--checkpoint": args.checkpoint}
    else:
        other = {
            "--source-tp": args.source_tp,
            "--source-pp": args.source_pp,
            "--gbps": args.gbps,
            "--workers-list": args.workers_list,
        }
    given = ", ".join(name for name, value in other.items() if value is not None)
    if given and args.estimate:
        raise CkptError(None, f"{given}: not used with --estimate (a size preset has no files)")
    if given:
        raise CkptError(None, f"{given}: used only with --estimate")
    gbps = args.gbps or 1.0
    if args.estimate:
        from ckptcore.sample import shape_only_checkpoint

        ck = shape_only_checkpoint(args.source, args.source_tp or 1, args.source_pp or 1)
    else:
        ck = open_checkpoint(args.source, args.checkpoint or "last")
    with ck:
        plan = plan_conversion(
            ck, args.target_tp, args.target_pp, args.precision, args.layers_per_stage
        )
        items = work_items(ck, plan, with_ranges=args.json and not args.estimate)
    workers_list = args.workers_list or [1, 4, 16, 64]
    estimates = [estimate(items, n, gbps) for n in workers_list] if args.estimate else []
    if args.json:
        out = {
            "plan": plan.to_json(),
            "items": [i.to_dict() for i in items],
            "estimates": estimates,
        }
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(
        f"{args.source}: TP={plan.source_tp} PP={plan.source_pp} -> TP={plan.target.tp} PP={plan.target.pp} ({plan.family})"
    )
    print(f"{len(items)} work items (one per target rank file)")
    for item in items if len(items) <= 64 else items[:32]:
        print(
            f"  {item.path:<45} {item.tensors:>5} tensors  reads {_human(item.read_bytes):>10}  writes {_human(item.write_bytes):>10}"
        )
    if len(items) > 64:
        print(f"  ... {len(items) - 32} more")
    total_r, total_w = sum(i.read_bytes for i in items), sum(i.write_bytes for i in items)
    print(f"total: reads {_human(total_r)}, writes {_human(total_w)}")
    if estimates:
        print(
            f"wall time, each worker and the flow moving {gbps:g} GB/s: the items; end to end "
            "with the archive written in place by the workers (the flow writes "
            f"{_human(estimates[0]['flow_bytes'])}); end to end staged, packaged and uploaded "
            "by the flow"
        )
    for e in estimates:
        print(
            f"  {e['workers']:>4} workers: items {e['seconds']:8.1f} s   in place "
            f"{e['in_place_seconds']:8.1f} s   staged {e['staged_seconds']:8.1f} s"
        )
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from ckptcore.community.api import import_hf

    report = import_hf(
        args.source,
        args.dest,
        target_tp=args.target_tp,
        target_pp=args.target_pp,
        layout=args.layout,
        source_kind=args.source_kind,
        precision=args.precision,
        layers_per_stage=args.layers_per_stage,
        overwrite=args.overwrite,
    )
    print(
        json.dumps(report.to_dict(), indent=2)
        if args.json
        else f"wrote {report.destination}: TP={report.layout.target_tp} PP={report.layout.target_pp}"
    )
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from ckptcore.community.api import export_hf

    info = export_hf(args.source, args.dest, overwrite=args.overwrite)
    print(json.dumps(info, indent=2, default=str) if args.json else f"wrote {args.dest}")
    return 0


def _add_target(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--target-tp",
        type=_positive,
        default=None,
        required=required,
        help="target tensor-parallel size (default: keep)",
    )
    p.add_argument(
        "--target-pp",
        type=_positive,
        default=None,
        required=required,
        help="target pipeline-parallel size (default: keep)",
    )
    p.add_argument(
        "--layers-per-stage",
        type=_layers,
        default=None,
        metavar="N,N,...",
        help="uneven pipeline split, e.g. 5,5,6 (default: even)",
    )
    p.add_argument(
        "--precision",
        default="keep",
        help="keep (default) | 32 | bf16 | 16: cast floating tensors and set the config's precision",
    )


def _add_write(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="target rank files written in parallel (default 1)",
    )
    p.add_argument(
        "--read-concurrency",
        type=_concurrency,
        default=None,
        metavar="N",
        help="ranged GETs in flight per source object in object storage, 1..64 (default 4, or "
        "CKPT_READ_CONCURRENCY)",
    )
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="accept NaN/Inf weights (default: refuse)"
    )
    p.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: when a terminal)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too: ``ckpt CMD: error: ... (see ckpt CMD --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckpt",
        description="Load, convert, import and repartition NeMo Megatron checkpoints on one CPU process.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"ckpt {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help_: str, example: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add(
        "inspect",
        cmd_inspect,
        "Describe a checkpoint: format, layout, TP/PP, parameters, dtypes, step, config.",
        "ckpt inspect model.nemo --json",
    )
    p.add_argument(
        "path", help=".nemo file, extracted .nemo folder, or training checkpoint folder / .ckpt"
    )
    p.add_argument(
        "--checkpoint",
        default="last",
        help="in a training folder: last (default), latest, or a file name",
    )

    p = add(
        "convert",
        cmd_convert,
        "Convert a Lightning training checkpoint folder (one .ckpt per TP/PP rank) to a .nemo.",
        "ckpt convert exp/checkpoints/ model.nemo --checkpoint last --target-tp 1",
    )
    p.add_argument("source", help="training checkpoint folder (or .nemo)")
    p.add_argument("dest", help="output .nemo path or URL")
    p.add_argument(
        "--checkpoint",
        default="last",
        help="last (the -last.ckpt, default), latest (highest step=), or a file name",
    )
    _add_target(p)
    _add_write(p)

    p = add(
        "reshard",
        cmd_reshard,
        "Change model parallelism: any TP/PP to any TP/PP, streaming and bit-exact.",
        "ckpt reshard model_tp4.nemo model_tp2pp2.nemo --target-tp 2 --target-pp 2",
    )
    p.add_argument("source", help=".nemo file or folder, or a training checkpoint folder")
    p.add_argument("dest", help="output .nemo path or URL")
    p.add_argument(
        "--checkpoint", default="last", help="for training folders: last, latest, or a file name"
    )
    _add_target(p)
    _add_write(p)

    p = add(
        "verify",
        cmd_verify,
        "Run two checkpoints on the same deterministic images; exit 1 if logits differ beyond the "
        "tolerance. Where the second holds the first's tensors bit for bit (a repartition), only "
        "it is run: the first could only give the same logits (--run-both runs it anyway).",
        "ckpt verify a.nemo b.nemo --tolerance 1e-5",
    )
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument(
        "--tolerance", type=float, default=1e-5, help="max |logit difference| (default 1e-5)"
    )
    p.add_argument("--images", type=_positive, default=4, help="number of images (default 4)")
    p.add_argument(
        "--run-both",
        action="store_true",
        help="run both models even where their tensors are bit-identical",
    )

    p = add(
        "plan",
        cmd_plan,
        "Print the repartition plan: one work item per target rank file, with the bytes it reads and writes.",
        "ckpt plan model.nemo --target-tp 2 --json\n  ckpt plan vit-70b --estimate --source-tp 8 --source-pp 4 --target-tp 4 --target-pp 8",
    )
    p.add_argument(
        "source",
        help="a checkpoint; with --estimate a size preset (tiny ... huge, vit-70b, vit-405b)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="for training folders: last (default), latest, or a file name",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="plan a hypothetical model of a size preset (no files) and estimate wall times",
    )
    p.add_argument(
        "--source-tp",
        type=_positive,
        default=None,
        help="with --estimate: the source TP (default 1)",
    )
    p.add_argument(
        "--source-pp",
        type=_positive,
        default=None,
        help="with --estimate: the source PP (default 1)",
    )
    p.add_argument(
        "--gbps",
        type=_positive_float,
        default=None,
        help="with --estimate: bytes moved per worker, GB/s (default 1)",
    )
    p.add_argument(
        "--workers-list",
        type=_positive_list,
        default=None,
        metavar="N,N,...",
        help="with --estimate: worker counts (default 1,4,16,64)",
    )
    _add_target(p)

    p = add(
        "import-hf",
        cmd_import_hf,
        "Import a HuggingFace transformers or timm ViT (folder or URL) into a .nemo.",
        "ckpt import-hf ./vit-base-patch16-224 vit.nemo --target-tp 2",
    )
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument(
        "--source",
        dest="source_kind",
        choices=("transformers", "timm"),
        default=None,
        help="override source detection",
    )
    p.add_argument(
        "--layout",
        choices=("conv1", "linear_encoder"),
        default="conv1",
        help="patch embedding: conv1 (NeMo >= 2.0, default) or linear_encoder (NeMo 1.23)",
    )
    _add_target(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    p = add(
        "export-hf",
        cmd_export_hf,
        "Export a .nemo ViT classifier to a transformers ViTForImageClassification folder.",
        "ckpt export-hf vit.nemo ./vit-hf",
    )
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    concurrency = getattr(args, "read_concurrency", None)
    if not concurrency:
        return _run(args)
    with settings.using(read_concurrency=concurrency):  # for this command only
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except MachineError as exc:
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return EX_IOERR
    except CkptError as exc:
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return EX_USAGE
    except StorageError as exc:
        print(f"ckpt: error: {exc} (storage failure; try again)", file=sys.stderr)
        return EX_TEMPFAIL
    except BrokenPipeError:  # the reader of our output stopped (| head): nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the final flush must not fail again
        return EX_BROKEN_PIPE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ckpt: error: {where}{exc.strerror or describe(exc)}", file=sys.stderr)
        return EX_IOERR
    except KeyboardInterrupt:
        print("ckpt: interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(
            f"ckpt: internal error (a bug, please report it with the traceback above); "
            f"ckpt {__version__}",
            file=sys.stderr,
        )
        return EX_SOFTWARE


def run() -> Any:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
