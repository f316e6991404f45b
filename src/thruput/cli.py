"""The ``thruput`` command: parse, call the library, print."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from thruput.demo import run_demo

    run_demo(out_dir=Path(args.out), steps=args.steps, tiny=args.tiny)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from thruput.config import ConfigError, load_config
    from thruput.train import train

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"thruput train: bad config: {exc}", file=sys.stderr)
        return 2
    train(config, resume=args.resume, show_progress=True, print_report=True)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from thruput.profile import load_json, render_terminal, save_html, save_trace

    try:
        document = load_json(args.run)
    except ValueError as exc:
        print(f"thruput report: {exc}", file=sys.stderr)
        return 2
    render_terminal(document)
    if args.html:
        print(f"HTML report: {save_html(document, args.html)}")
    if args.trace:
        print(f"Perfetto trace: {save_trace(document, args.trace)}")
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

    known = benchmarks.names()
    if args.name not in known:
        print(f"thruput bench: unknown benchmark {args.name!r}; known: {', '.join(known) or 'none'}",
              file=sys.stderr)
        return 2
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
    from thruput.memory.plan import parse_bytes, plan, render_plan

    try:
        result = plan(
            parse_bytes(args.params),
            device_memory=parse_bytes(args.device_memory),
            host_memory=parse_bytes(args.host_memory) if args.host_memory else None,
            world_size=args.world_size,
            dtype=args.dtype,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            d_model=args.d_model,
            n_layers=args.n_layers,
        )
    except ValueError as exc:
        print(f"thruput estimate: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console

    Console().print(render_plan(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from thruput import benchmarks

    parser = argparse.ArgumentParser(prog="thruput", description="Faster PyTorch training, measured.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train the small GPT, baseline against thruput, and report")
    p.add_argument("--out", default="runs/demo", help="folder for the reports (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--tiny", action="store_true", help="a seconds-long version (for tests)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train from a TOML config (see examples/)")
    p.add_argument("config", help="path to the TOML run configuration")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("report", help="render a saved run (RUN.json) as a table, HTML or trace")
    p.add_argument("run", help="run document written by the profiler")
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

    p = sub.add_parser("bench", help=f"run a benchmark: {', '.join(benchmarks.names())}",
                       description="thruput bench NAME --json OUT [--quick] [options of NAME]")
    p.add_argument("name", help="benchmark name")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("estimate", help="predict device and host memory per strategy (what fits)")
    p.add_argument("--params", required=True, help="parameter count, e.g. 7e9")
    p.add_argument("--device-memory", required=True, help="per-device memory, e.g. 24GiB")
    p.add_argument("--host-memory", help="host memory, e.g. 256GiB (default: this machine's)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per device")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=None, help="hidden size (default: from params)")
    p.add_argument("--n-layers", type=int, default=None, help="layers (default: from params)")
    p.set_defaults(func=_cmd_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
