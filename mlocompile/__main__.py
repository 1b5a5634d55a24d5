"""Command line: run an MLO program and print or draw what mlocompile compiled.

    mlocompile run   EXAMPLE [--compile fx] [--iters N] [--out DIR] [--nproc N] [--[no-]progress]
    mlocompile ir    EXAMPLE          # the annotated IR
    mlocompile code  EXAMPLE          # the generated Python of every step
    mlocompile graph EXAMPLE -o FILE  # diagram (.svg/.png/.pdf/.dot), --kind program|step, --detail blocks|ops
    mlocompile cost  EXAMPLE          # static FLOPs / memory estimates
    mlocompile plot  RUN_DIR -o FILE.png [--smooth N]  # losses and validation metrics

EXAMPLE is a script path (its ``build()`` returns an Engine) or ``module:function``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import mlocompile as mlo
from mlocompile import distributed
from mlocompile.engine import Engine
from mlocompile.errors import CliError, MLOError
from mlocompile.monitor import RUN_MARKER, metric_panels, plot_metrics, read_metrics

EXAMPLE_HELP = "a script whose build() returns an Engine, or module:function"
COMPILE_HELP = "backend for every step (EngineConfig.compile; default: the example's)"


def load_engine(target: str, **overrides: Any) -> Any:
    """Build the Engine that ``target`` (``path.py`` or ``module:function``) returns.

    ``overrides`` (``iters``, ``compile``, ``progress``; None: not given) are passed to the
    builder when its signature accepts them, then set on the engine's config, so they win
    over what the builder chose (the examples' ``build()`` turns ``progress`` off).
    """
    if ":" in target and not target.endswith(".py"):
        mod_name, func_name = target.split(":", 1)
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise CliError(f"cannot import module {mod_name!r} from {target!r}: {exc}") from exc
    else:
        if not os.path.isfile(target):
            raise CliError(f"no such file {target!r}; pass a script path (with a build() function) or module:function")
        func_name = "build"
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise CliError(f"{target!r} has no callable {func_name}(); it should build and return an mlocompile Engine")
    accepted = inspect.signature(builder).parameters
    engine = builder(**{k: v for k, v in overrides.items() if v is not None and k in accepted})
    if not isinstance(engine, Engine):
        raise CliError(f"{target!r}: {func_name}() returned {type(engine).__name__}, expected an mlocompile Engine")
    if overrides.get("iters") is not None:
        engine.config.train_iters = overrides["iters"]
    if overrides.get("compile") is not None:
        engine.config.compile = overrides["compile"]
    if overrides.get("progress") is not None:
        engine.config.progress = overrides["progress"]
    return engine


def write_artifacts(compiled: Any, out_dir: str) -> list[str]:
    """Write ir.txt, code.py and the diagrams of a CompiledProgram into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, text in (("ir.txt", compiled.ir), ("code.py", compiled.code), ("cost.txt", str(compiled.cost()))):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        written.append(path)
    ext = ".svg" if shutil.which("dot") else ".dot"
    for kind in ("program", "step"):
        written.append(compiled.render(os.path.join(out_dir, f"{kind}{ext}"), kind=kind))
    return written


def _launch(args: argparse.Namespace) -> None:
    """Re-run this command under torchrun with ``--nproc`` processes on this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "mlocompile", "run", args.example]
    for flag, value in (("--compile", args.compile), ("--iters", args.iters), ("--out", args.out)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd.append("--progress" if _progress(args) else "--no-progress")  # the children's stdout is no terminal
    code = subprocess.call(cmd)
    if code:
        raise CliError(f"torchrun exited with status {code}")


def _cmd_run(args: argparse.Namespace) -> None:
    if args.nproc > 1 and "RANK" not in os.environ:
        _launch(args)
        return
    engine = load_engine(args.example, iters=args.iters, compile=args.compile, progress=_progress(args))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        engine.config.strategy = "distributed"
    out = args.out or os.path.join("out", os.path.splitext(os.path.basename(args.example.split(":")[0]))[0])
    engine.config.output_dir = out
    if engine.rank == 0 and _drop_previous_metrics(out):
        print(f"{out}: replacing the metrics of the previous run there")
    engine.run()
    if engine.rank == 0:
        _report(engine, out)
    if engine.world_size > 1:
        distributed.shutdown()  # the other ranks wait until rank 0 has written its files


def _drop_previous_metrics(out: str) -> bool:
    """``run`` owns its folder: remove a previous run's metric files there; return whether there were any."""
    found = False
    for name in ("metrics.jsonl", "metrics.csv", RUN_MARKER):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)
            found = True
    return found


def _progress(args: argparse.Namespace) -> bool:
    """``--progress``/``--no-progress`` if given, else whether stdout is a terminal."""
    return sys.stdout.isatty() if args.progress is None else args.progress


def _report(engine: Any, out: str) -> None:
    for path in write_artifacts(mlo.compile(engine), out):
        print(f"wrote {path}")
    last = {}
    for record in engine.history:
        last[record["tag"]] = record
    for tag, record in sorted(last.items()):
        values = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        print(f"[{tag}] step {record['step']}: {values}")


def _cmd_show(args: argparse.Namespace) -> None:
    compiled = mlo.compile(load_engine(args.example, compile=args.compile))
    if args.command == "ir":
        print(compiled.ir, end="")
    elif args.command == "code":
        print(compiled.code)
    elif args.command == "cost":
        print(compiled.cost())
    else:
        print(compiled.render(args.output, kind=args.kind, detail=args.detail))


def _cmd_plot(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError("plot needs matplotlib: pip install matplotlib")
    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    panels = metric_panels(records)
    if not panels:
        raise CliError(f"{args.run_dir!r} has no loss or validation records to plot")
    plot_metrics(panels, args.output, title=os.path.basename(os.path.abspath(args.run_dir)), smooth=args.smooth)
    print(args.output)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mlocompile`` command."""
    parser = argparse.ArgumentParser(
        prog="mlocompile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train an example and write its IR, code, diagrams and metrics")
    run.add_argument("example", help=EXAMPLE_HELP)
    run.add_argument("--compile", choices=["eager", "fx", "inductor"], help=COMPILE_HELP)
    run.add_argument(
        "--iters", type=int, help="global steps to train (EngineConfig.train_iters; default: the example's)"
    )
    run.add_argument("--out", help="output folder (default out/<example>)")
    run.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (wraps torchrun)")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="show the progress bar on stderr: ETA, rate, losses, validation metrics (default: on when stdout is a "
        "terminal; overrides the example's EngineConfig.progress)",
    )
    run.set_defaults(func=_cmd_run)
    for name, text in (
        ("ir", "print the IR"),
        ("code", "print the generated code"),
        ("cost", "print cost estimates"),
        ("graph", "draw a diagram"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("example", help=EXAMPLE_HELP)
        p.add_argument("--compile", choices=["fx", "inductor"], help=COMPILE_HELP)
        if name == "graph":
            p.add_argument(
                "-o",
                "--output",
                required=True,
                help="file to write; its extension picks the format: .svg, .png, .pdf, .dot",
            )
            p.add_argument(
                "--kind",
                default="program",
                help="program (default: problems and edges), step (every step graph) or step:<title> (one, e.g. "
                "step:step_inner)",
            )
            p.add_argument(
                "--detail",
                default="blocks",
                choices=["blocks", "ops"],
                help="a step diagram's boxes: blocks (default: one per problem, role and module) or ops (every aten op)",
            )
        p.set_defaults(func=_cmd_show)
    plot = sub.add_parser("plot", help="plot per-problem losses and validation metrics of a run folder")
    plot.add_argument("run_dir", help="a run folder with metrics.jsonl (EngineConfig.output_dir, run's --out)")
    plot.add_argument("-o", "--output", required=True, help="image to write (.png, .svg, .pdf): one panel per metric")
    plot.add_argument(
        "--smooth",
        type=_positive_int,
        default=1,
        metavar="N",
        help="draw an N-record moving average too (default 1: off)",
    )
    plot.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MLOError as exc:
        print(f"mlocompile: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
