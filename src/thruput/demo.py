"""``thruput demo``: train the small GPT on the standard library's own source and report."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from thruput.config import RunConfig, from_dict


def demo_config(steps: int | None = None, tiny: bool = False, out_dir: Path = Path("runs/demo")) -> RunConfig:
    """The demo run: a 4-layer GPT, 8 rows of 256 bytes per step, sources of different shapes."""
    size = {"d_model": 64, "n_layers": 2, "n_heads": 2} if tiny else {"d_model": 128, "n_layers": 4, "n_heads": 4}
    return from_dict({
        "name": "demo",
        "steps": steps or (6 if tiny else 120),
        "model": size,
        "data": {
            "seq_len": 64 if tiny else 256,
            "batch_size": 4 if tiny else 8,
            "sources": [
                {"name": "code", "kind": "stdlib_code", "weight": 0.6, "max_files": 40 if tiny else None},
                {"name": "prose", "kind": "stdlib_prose", "weight": 0.3, "max_files": 40 if tiny else None},
                {"name": "long", "kind": "stdlib_long", "weight": 0.1, "max_files": 40 if tiny else None},
            ],
        },
        "optimizer": {"lr": 2e-3, "warmup_steps": 2 if tiny else 10},
        "profile": {"report_dir": str(out_dir)},
    })


def run_demo(out_dir: Path = Path("runs/demo"), steps: int | None = None, tiny: bool = False) -> dict:
    """Train once with the profiler on and write ``out_dir/demo.{json,html}``."""
    from thruput.train import train

    console = Console()
    cfg = demo_config(steps, tiny, out_dir)
    console.print(f"thruput demo: GPT {cfg.model.n_layers}x{cfg.model.d_model}, {cfg.steps} steps of "
                  f"{cfg.data.batch_size}x{cfg.data.seq_len} tokens from the Python standard library", markup=False)
    result = train(cfg, show_progress=True, print_report=True)
    console.print(f"reports: {out_dir / 'demo.json'}, {out_dir / 'demo.html'}  "
                  f"(re-render with `thruput report {out_dir / 'demo.json'} --html OUT`)", markup=False)
    return result.document
