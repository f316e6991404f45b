"""StepProfiler arithmetic, summary and reports."""
from pathlib import Path

import json
import time

import pytest
import torch

from thruput.profile import (PHASES, StepProfiler, chrome_trace, load_json, render_html, run_document,
                             save_json)
from thruput.profile.clocks import ClockSampler


def _profile(steps: int = 5, **kwargs) -> StepProfiler:
    prof = StepProfiler(**kwargs)
    for i in range(steps):
        with prof.step(tokens=100, samples=2, useful_tokens=80):
            with prof.phase("forward"):
                time.sleep(0.004)
            prof.add_time("comm", 0.001)
            prof.counter("recompiles", i)
            time.sleep(0.002)
    return prof


def test_phases_and_other_add_up_to_step_time() -> None:
    prof = _profile()
    prof.finish()
    for r in prof.records:
        assert set(r.phases) == set(PHASES)
        assert sum(r.phases.values()) == pytest.approx(r.time_s, rel=1e-9)
        assert r.phases["comm"] == 0.001
        assert r.phases["forward"] >= 0.004
        assert r.phases["other"] >= 0.001  # the sleep outside phases, minus the added comm


def test_summary_throughput_and_mfu() -> None:
    prof = _profile(flops_per_token=1e6, peak_flops=1e12, warmup_steps=2)
    s = prof.summary()
    records = prof.records[2:]
    total = sum(r.time_s for r in records)
    assert s["steps"] == 3 and s["warmup_steps"] == 2
    assert s["tokens_per_s"] == pytest.approx(300 / total)
    assert s["useful_tokens_per_s"] == pytest.approx(240 / total)
    assert s["samples_per_s"] == pytest.approx(6 / total)
    assert s["padding_ratio"] == pytest.approx(0.2)
    assert s["mfu"] == pytest.approx(300 * 1e6 / total / 1e12)
    assert s["step_time_s"]["median"] == sorted(r.time_s for r in records)[1]
    assert s["peak_memory_bytes"] > 0 and s["memory_kind"] == "process_rss"


def test_mfu_absent_without_peak() -> None:
    assert _profile(flops_per_token=1e6).summary()["mfu"] is None


def test_disabled_profiler_records_nothing() -> None:
    prof = _profile(enabled=False)
    assert prof.records == [] and prof.summary() == {"steps": 0}


def test_counters_are_kept_per_step() -> None:
    prof = _profile()
    prof.finish()
    assert [r.counters["recompiles"] for r in prof.records] == [0, 1, 2, 3, 4]


def test_json_round_trip_and_schema_errors(tmp_path) -> None:
    prof = _profile(clocks=ClockSampler(hz=50))
    doc = run_document(prof, name="r1", meta={"model": "gpt"})
    path = save_json(doc, tmp_path / "run.json")
    loaded = load_json(path)
    assert loaded["schema"] == "thruput.run/1"
    assert len(loaded["steps"]) == 5 and loaded["meta"]["model"] == "gpt"
    assert loaded["steps"][0]["start_s"] == 0.0
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="expected schema"):
        load_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_json(tmp_path / "broken.json")


def test_trace_has_phase_slices_and_clock_counters() -> None:
    prof = _profile(clocks=ClockSampler(hz=100))
    trace = chrome_trace(run_document(prof))
    events = trace["traceEvents"]
    forward = [e for e in events if e.get("name") == "forward"]
    assert len(forward) == 5 and all(e["ph"] == "X" and e["dur"] >= 4000 for e in forward)
    assert any(e["ph"] == "C" for e in events)


def test_html_escapes_user_names() -> None:
    prof = _profile()
    html = render_html(run_document(prof, name="<script>alert(1)</script>", meta={"src": "<b>"}))
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;" in html
    assert html.count("<svg") >= 2


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_is_the_profilers_own_window_not_the_process_lifetime() -> None:
    first = StepProfiler()
    with first.step(tokens=1, samples=1):
        big = torch.ones(2**27)  # 512 MiB, touched
    del big
    second = StepProfiler()
    with second.step(tokens=1, samples=1):
        pass
    assert first.summary()["peak_memory_bytes"] - second.summary()["peak_memory_bytes"] > 400 * 2**20
    assert second.summary()["memory_kind"] == "process_rss"
