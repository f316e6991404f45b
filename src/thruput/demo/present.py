"""``thruput demo``'s presentation: the comparison table, the headline, the HTML and JSON reports."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from thruput.console import make_console
from thruput.demo.workload import LEVERS, DemoSetup, DemoWorkload, RunOutcome, compare, outcome_figures, setup_figures


def display_rows(runs: list[RunOutcome], references: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Row label -> run name -> formatted value. ``references``: a speedup row's label -> the run
    it divides by (default: ``{"speedup": <the first run>}``)."""
    figures = {r.name: outcome_figures(r) for r in runs}
    rates = {label: figures[name]["useful_tokens_per_s"]
             for label, name in (references or {"speedup": runs[0].name}).items()}
    formats: dict[str, Any] = {"useful tokens/s": lambda f: f"{f['useful_tokens_per_s']:,.0f}"}
    for label, rate in rates.items():
        formats[label] = lambda f, rate=rate: f"{f['useful_tokens_per_s'] / rate:.2f}x"
    formats |= {
        "step time (median)": lambda f: f"{f['step_time_s'] * 1e3:,.0f} ms",
        "steps": lambda f: str(f["steps"]),
        "labelled tokens": lambda f: f"{f['useful_tokens']:,}",
        "stall (data wait)": lambda f: f"{f['stall_fraction']:.1%}",
        "padding": lambda f: f"{f['padding_ratio']:.1%}",
        "peak RSS (trainer)": lambda f: f"{f['peak_memory_bytes'] / 2**20:,.0f} MiB",
        "final train loss": lambda f: f"{f['final_train_loss']:.3f}",
        "held-out loss": lambda f: f"{f['eval_loss']:.3f}",
        "wall time": lambda f: f"{f['wall_s']:.0f} s",
        "verdict": lambda f: f["verdict"],
    }
    return {label: {name: fmt(f) for name, f in figures.items()} for label, fmt in formats.items()}


def comparison_table(rows: dict[str, dict[str, str]], title: str) -> Table:
    """``display_rows`` as a rich table."""
    names = list(next(iter(rows.values())))
    table = Table(title=title)
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for label, row in rows.items():
        table.add_row(label, *(row[n] for n in names))
    return table


def run_demo(out_dir: Path = Path("runs/demo"), steps: int | None = None, tiny: bool = False) -> dict[str, Any]:
    """Train the baseline and thruput variants, print the comparison, write the HTML report."""
    from thruput.profile import save_json
    from thruput.profile.html import save_comparison_html

    console = make_console()
    setup = DemoSetup.tiny() if tiny else DemoSetup()
    if steps is not None:
        setup.steps = steps
    console.print("thruput demo: building the corpus from this Python's standard library ...", markup=False)
    workload = DemoWorkload(setup, out_dir)
    m = setup.model
    console.print(f"GPT {m['n_layers']}x{m['d_model']}, seq_len {setup.seq_len}; baseline {setup.steps} steps of "
                  f"{setup.baseline_rows} padded rows, thruput {workload.packed_steps} steps of "
                  f"{workload.packed_rows} packed rows; {workload.baseline_tokens:,} labelled tokens each",
                  markup=False)
    runs = [workload.run((), "baseline"), workload.run(LEVERS, "thruput")]
    rows = display_rows(runs)
    console.print(comparison_table(rows, "thruput demo: same model, same labelled tokens"))
    result = {**compare(runs[0], runs[1]), "runs": {r.name: outcome_figures(r) for r in runs},
              "setup": setup_figures(workload)}
    headline = (f"speedup {result['speedup']:.2f}x in useful tokens/s ({result['wall_speedup']:.2f}x in wall time "
                f"per labelled token, set-up and compilation included); held-out loss differs by "
                f"{result['loss_rel_diff']:.1%}")
    console.print(headline, markup=False)
    html = save_comparison_html([r.document for r in runs], rows, headline, out_dir / "demo.html")
    save_json(result, out_dir / "demo.json")
    console.print(f"HTML report: {html}; figures: {out_dir / 'demo.json'}; per-run reports: "
                  f"{out_dir}/baseline.json, {out_dir}/thruput.json (`thruput report RUN.json`)", markup=False)
    return result
