"""The ``thruput`` command: parse, call the library, print.

Errors are handled in one place, :func:`main`: an exception of a kind listed in ``KNOWN_ERRORS``
(bad input the user must fix, or a failure of the machine such as a full disk) is printed as
one line, ``thruput COMMAND: message``, on stderr, and the command exits with that kind's code;
``--debug`` raises it instead, with its traceback. Any other exception is a bug in thruput or
below it: it is never reduced to one line, so its traceback always shows. Ctrl-C exits 130.
Warnings are printed as one line each (``thruput COMMAND: warning: ...``) unless ``--debug``.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

EXIT_FAILED = 1  # the run failed for a reason outside its input: disk full, out of memory
EXIT_BAD_INPUT = 2  # what the user gave is wrong: config, data, checkpoint, file, value (as argparse)
EXIT_INTERRUPTED = 130  # 128 + SIGINT

# (module, type, exit code), most specific first. Looked up in sys.modules: an exception type
# whose module was never imported cannot have been raised, so nothing is imported to check.
KNOWN_ERRORS: tuple[tuple[str, str, int], ...] = (
    ("thruput.errors", "InputError", EXIT_BAD_INPUT),  # checkpoints, planner values, run files
    ("thruput.config", "ConfigError", EXIT_BAD_INPUT),
    ("thruput.data.errors", "DataError", EXIT_BAD_INPUT),  # a source, file and line where known
    ("builtins", "FileNotFoundError", EXIT_BAD_INPUT),
    ("builtins", "IsADirectoryError", EXIT_BAD_INPUT),
    ("builtins", "NotADirectoryError", EXIT_BAD_INPUT),
    ("builtins", "PermissionError", EXIT_BAD_INPUT),
    ("torch", "OutOfMemoryError", EXIT_FAILED),
    ("builtins", "MemoryError", EXIT_FAILED),
    ("builtins", "OSError", EXIT_FAILED),
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a known error type (``KNOWN_ERRORS``), or None for a bug."""
    for module, name, code in KNOWN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return code
    return None


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (its lines joined with " / ")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " / ".join(lines) or type(exc).__name__


def _cmd_demo(args: argparse.Namespace) -> int:
    from thruput.demo.present import run_demo

    run_demo(out_dir=Path(args.out), steps=args.steps, tiny=args.tiny)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from thruput.config import load_config

    config = load_config(args.config)  # before importing torch: a bad config is reported at once
    if config.cache_dir is None and os.environ.get("THRUPUT_CACHE"):
        config.cache_dir = os.environ["THRUPUT_CACHE"]
    from thruput.profile import render_terminal
    from thruput.train import train

    log = StepLog(config.log_every)
    with ProgressBar(config.name) as bar:
        def on_step(info: Any) -> None:
            bar(info)
            log(info)

        result = train(config, resume=args.resume, on_step=on_step)
    if result.rank == 0:
        render_terminal(result.document)
    return 0


class ProgressBar:
    """``on_step`` hook showing rank 0's step and loss as a rich progress bar; a context manager
    (the bar is stopped however the run ends). It starts at the first step it is told of, so a
    resumed run's bar starts where the run does."""

    def __init__(self, name: str) -> None:
        self.name, self.bar, self.task = name, None, None

    def __call__(self, info: Any) -> None:  # info: thruput.train.StepInfo
        if info.rank != 0:
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=info.steps, completed=info.step - 1, loss="-")
            self.bar.start()
        self.bar.update(self.task, completed=info.step, loss=f"{info.loss:.3f}")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


class StepLog:
    """``on_step`` hook of ``thruput train``: every ``every`` steps (and at the last one) rank 0
    prints ``step N/TOTAL  loss L  lr R  tokens/s T``, T over the steps since the last line."""

    def __init__(self, every: int, out: Callable[[str], Any] = print) -> None:
        self.every, self.out = every, out
        self.tokens, self.seconds = 0, 0.0

    def __call__(self, info: Any) -> None:  # info: thruput.train.StepInfo
        if info.rank != 0:
            return
        self.tokens += info.tokens
        self.seconds += info.seconds
        if info.step % self.every and info.step != info.steps:
            return
        rate = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        self.out(f"step {info.step}/{info.steps}  loss {info.loss:.4f}  lr {info.lr:.3e}  tokens/s {rate:,.0f}")
        self.tokens, self.seconds = 0, 0.0


def _cmd_report(args: argparse.Namespace) -> int:
    from thruput.profile import (load_job, load_json, render_job_terminal, render_terminal, save_html,
                                 save_job_html, save_job_trace, save_trace)

    if Path(args.run).is_dir():  # the ranks' documents of one job, merged
        document, render, html, trace = load_job(args.run), render_job_terminal, save_job_html, save_job_trace
    else:
        document, render, html, trace = load_json(args.run), render_terminal, save_html, save_trace
    render(document)
    if args.html:
        print(f"HTML report: {html(document, args.html)}")
    if args.trace:
        print(f"Perfetto trace: {trace(document, args.trace)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from thruput.run import CommandError, RunOptions, parse_command, run_command

    try:
        command = parse_command(args.cmd)
    except CommandError as exc:
        print(f"thruput run: {exc}", file=sys.stderr)
        return 2
    options = RunOptions(out=args.out, name=args.name or command.default_name(), html=args.html,
                         trace=args.trace, status=not args.no_status, warmup_steps=args.warmup_steps,
                         clock_hz=args.clock_hz)
    return run_command(command, options)


def _cmd_bench(args: argparse.Namespace) -> int:
    from thruput import benchmarks
    from thruput.errors import InputError

    known = benchmarks.names()
    if args.name not in known:
        raise InputError(f"unknown benchmark {args.name!r}; known: {', '.join(known) or 'none'}")
    module = benchmarks.available()[args.name]
    parser = argparse.ArgumentParser(prog=f"thruput bench {args.name}", description=module.DESCRIPTION)
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT")
    parser.add_argument("--quick", action="store_true", help="a small, fast version (smoke test)")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    bench_args = parser.parse_args(args.rest)
    figures = module.run(bench_args)
    if bench_args.json:
        out = Path(bench_args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2, default=float))
        print(f"wrote {out}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from thruput.console import make_console
    from thruput.errors import InputError
    from thruput.memory.plan import parse_bytes, parse_count, plan, render_plan

    model: Any = parse_count(args.params) if args.params is not None else None
    if args.hf is not None:
        given = [flag for flag, value in (("--d-model", args.d_model), ("--n-layers", args.n_layers)) if value]
        if given:
            raise InputError(f"with --hf the shape comes from the config: leave out {' and '.join(given)}")
        from thruput.memory.hf_config import read_hf_config

        model = read_hf_config(args.hf)
        print(model.describe())
    result = plan(
        model,
        device_memory=parse_bytes(args.device_memory),
        host_memory=parse_bytes(args.host_memory) if args.host_memory else None,
        world_size=args.world_size,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        n_layers=args.n_layers,
    )
    make_console().print(render_plan(result))
    return 0


class _BenchHelp(argparse.Action):
    """``thruput bench --help``: the usage, then one line per benchmark (read only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from thruput import benchmarks

        rows = benchmarks.descriptions()
        width = max(map(len, rows), default=0)
        parser.epilog = "benchmarks:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows.items())
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from thruput import benchmarks

    debug_help = "show the traceback of an error instead of its one-line message"
    parser = argparse.ArgumentParser(prog="thruput", description="Faster PyTorch training, measured.")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the sub-command; SUPPRESS keeps the sub-parser from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="train the small GPT, baseline against thruput, and report")
    p.add_argument("--out", default="runs/demo", help="folder for the reports (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--tiny", action="store_true", help="a seconds-long version (for tests)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", parents=[common], help="train from a TOML config (see examples/)")
    p.add_argument("config", help="path to the TOML run configuration")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint that loads (newer ones that do not are named)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("report", parents=[common], help="render a saved run (RUN.json), or merge a job's ranks (DIR/), as a table, HTML or trace")
    p.add_argument("run", help="run document written by the profiler, or a folder of one job's rank documents")
    p.add_argument("--html", metavar="OUT", help="also write a self-contained HTML report")
    p.add_argument("--trace", metavar="OUT", help="also write a Chrome/Perfetto trace")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("run", help="profile an unmodified training script: thruput run -- python train.py ARGS",
                       description="thruput run [OPTIONS] -- CMD, where CMD is `python script.py ARGS`, "
                                   "`script.py ARGS`, `-m module ARGS` (run in this process) or a launcher "
                                   "such as `torchrun --nproc_per_node 2 train.py` (each rank reports)")
    p.add_argument("--out", default="runs", help="folder for the reports (default runs)")
    p.add_argument("--name", help="report file stem (default: the script's name; ranks add -rankR)")
    p.add_argument("--html", action="store_true", help="also write NAME.html")
    p.add_argument("--trace", action="store_true", help="also write NAME.trace.json (Perfetto)")
    p.add_argument("--no-status", action="store_true", help="no live status line on stderr")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the summary (default 1)")
    p.add_argument("--clock-hz", type=float, default=20.0, help="clock sampling rate (default 20)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command to profile")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", parents=[common], add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                       help=f"run a benchmark: {', '.join(benchmarks.names())}",
                       description="thruput bench NAME [--json OUT] [--quick] [options of NAME]; "
                                   "thruput bench NAME --help lists the options of NAME")
    p.add_argument("-h", "--help", action=_BenchHelp, help="show this help and the benchmarks, and exit")
    p.add_argument("name", help="benchmark name")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("estimate", parents=[common], help="predict device and host memory per strategy (what fits)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--params", help="parameter count, e.g. 7B, 350M or 7e9")
    model.add_argument("--hf", metavar="CONFIG", help="a Hugging Face config.json, or a model folder holding one "
                                                      "(parameters, layers and hidden size from it; no download)")
    p.add_argument("--device-memory", required=True, help="per-device memory with its unit, e.g. 24GiB or 80GB")
    p.add_argument("--host-memory", help="host memory with its unit, e.g. 256GiB (default: this machine's)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per device")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=None, help="hidden size (default: from params)")
    p.add_argument("--n-layers", type=int, default=None, help="layers (default: from params)")
    p.set_defaults(func=_cmd_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``thruput`` command; returns its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    command = f"thruput {args.command}"
    with warnings.catch_warnings():  # restores the warning printer when the command returns
        if not args.debug:
            def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
                print(f"{command}: warning: {one_line(Exception(str(message)))}", file=sys.stderr)

            warnings.showwarning = show
        try:
            return args.func(args)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"{command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:
            code = exit_code(exc)
            if code is None or args.debug:
                raise
            print(f"{command}: {one_line(exc)}", file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
