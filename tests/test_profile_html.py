"""The HTML report's plots: warm-up and compile steps out of the scale, readable ticks, rounded
numbers, a note for a flat clock, the loss curve; record_scalar feeds it."""
from __future__ import annotations

import re

import pytest
import torch

from thruput.profile import StepProfiler, render_html, run_document
from thruput.profile.html import excluded_steps, plot_clock_vs_time, plot_step_times
from thruput.profile.svg import format_tick, nice_ticks

Y_TICK = re.compile(r'text-anchor="end">([^<]+)</text>')


def _step(i: int, time_s: float, counters: dict | None = None, mhz: float = 2600.0, loss: float | None = None) -> dict:
    return {"step": i, "start_s": float(i), "time_s": time_s,
            "phases": {"forward": time_s * 0.4, "backward": time_s * 0.5, "other": time_s * 0.1},
            "tokens": 64, "samples": 2, "useful_tokens": 64, "flops": None, "memory_bytes": 0,
            "counters": counters or {}, "clock": {"cpu": {"samples": 3, "mean_cpu_mhz": mhz}},
            "scalars": {} if loss is None else {"loss": loss, "lr": 1e-3}}


def _document(steps: list[dict], warmup: int = 1) -> dict:
    prof = StepProfiler()
    for _ in range(3):
        with prof.step(tokens=64, samples=2):
            pass
    document = run_document(prof, name="r")
    document["steps"] = steps
    document["summary"]["warmup_steps"] = warmup
    document["clocks"] = {"sources": {"cpu": {"available": True, "detail": "test", "clock_metric": "cpu_mhz"}},
                          "series": {}}
    return document


def test_ticks_are_round_and_labels_short() -> None:
    assert nice_ticks(0, 33) == ([0, 10, 20, 30], 10)
    assert nice_ticks(0, 0.0023)[0] == [0, 0.0005, 0.001, 0.0015, 0.002]
    assert nice_ticks(-0.5, 5.5, count=8, integer=True)[0] == [0, 1, 2, 3, 4, 5]
    assert nice_ticks(-0.5, 199.5, count=8, integer=True)[0] == [0, 25, 50, 75, 100, 125, 150, 175]
    assert [format_tick(v, 0.0005) for v in (0, 0.0005, 0.0015)] == ["0", "0.0005", "0.0015"]
    assert format_tick(12000, 5000) == "12,000" and format_tick(2.5, 0.5) == "2.5"


def test_warm_up_and_compile_steps_are_marked_and_left_out_of_the_scale() -> None:
    # Step 0 compiled for a minute; step 5 is a new process (calls restart) that compiled again.
    counters = [{"calls": 1, "compiles": 1}, {"calls": 2, "compiles": 1}, {"calls": 3, "compiles": 1},
                {"calls": 4, "compiles": 1}, {"calls": 5, "compiles": 1}, {"calls": 1, "compiles": 1},
                {"calls": 2, "compiles": 1}]
    times = [61.0, 0.012, 0.010, 0.011, 0.013, 40.0, 0.012]
    steps = [_step(i, t, c) for i, (t, c) in enumerate(zip(times, counters))]
    document = _document(steps)
    assert excluded_steps(document) == {0: "warm-up + compile", 5: "compile"}
    svg = plot_step_times(steps, excluded_steps(document))
    ticks = [float(t.replace(",", "")) for t in Y_TICK.findall(svg)]
    assert ticks == [0, 5, 10]  # milliseconds: the kept steps (max 13 ms) set the scale, not 61 s
    assert ">61 s</text>" in svg and ">40 s</text>" in svg  # the slow ones marked with their time
    assert ">warm-up + compile</text>" in svg and ">compile</text>" in svg
    page = render_html(document)
    assert "left out of the time axes' scale" in page


def test_flat_clock_is_a_note_and_a_moving_clock_a_plot() -> None:
    flat = [_step(i, 0.01 + i * 1e-3) for i in range(5)]
    note = plot_clock_vs_time(flat, "cpu", "cpu_mhz")
    assert "<svg" not in note and "2,600 (cpu_mhz) in every step" in note
    moving = [_step(i, 0.01 + i * 1e-3, mhz=2000.0 + 100 * i) for i in range(5)]
    assert plot_clock_vs_time(moving, "cpu", "cpu_mhz").startswith("<svg")


def test_numbers_are_rounded_and_the_loss_curve_is_drawn() -> None:
    steps = [_step(i, 0.01, loss=5.0 - 0.123456789 * i) for i in range(6)]
    document = _document(steps)
    document["meta"] = {"config": {"data": {"sources": [{"name": "code", "weight": 0.16695488453999177}]}}}
    document["verdict"]["findings"][0]["evidence"] = {"forward_backward_share": 0.8469442107829626,
                                                      "mfu": 0.020387142316753763}
    page = render_html(document)
    assert "0.16695488453999177" not in page and "data.sources[0].weight = 0.167" in page
    assert "forward_backward_share=84.7%, mfu=2.0%" in page
    assert "training loss" in page and "learning rate" in page
    no_loss = render_html(_document([_step(i, 0.01) for i in range(3)]))
    assert "training loss" not in no_loss


def test_record_scalar_attaches_to_the_step_just_finished() -> None:
    prof = StepProfiler()
    prof.record_scalar("loss", 9.0)  # before any step: nowhere to go
    for i in range(3):
        with prof.step(tokens=1, samples=1):
            pass
        prof.record_scalar("loss", 2.0 - i)
    assert [s["scalars"] for s in run_document(prof)["steps"]] == [{"loss": 2.0}, {"loss": 1.0}, {"loss": 0.0}]
    restored = StepProfiler()
    restored.load_state_dict(prof.state_dict())
    assert [r.scalars["loss"] for r in restored.records] == [2.0, 1.0, 0.0]
    assert StepProfiler(enabled=False).record_scalar("loss", 1.0) is None


def test_terminal_report_rounds_the_evidence(capsys) -> None:
    from thruput.profile import render_terminal

    document = _document([_step(i, 0.01) for i in range(3)])
    document["verdict"]["findings"][0]["evidence"] = {"forward_backward_share": 0.8469442107829626}
    render_terminal(document)
    assert "forward_backward_share=84.7%" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_record_scalar_on_cuda_reaches_steps_resolved_one_step_late() -> None:
    prof = StepProfiler("cuda")
    x = torch.ones(256, 256, device="cuda")
    for i in range(4):
        with prof.step(tokens=1, samples=1):
            with prof.phase("forward"):
                loss = (x @ x).sum() * i
        prof.record_scalar("loss", loss.item())  # the newest step is still pending here
    assert [s["scalars"]["loss"] for s in run_document(prof)["steps"]] == [0.0, 256.0**3, 2 * 256.0**3, 3 * 256.0**3]
