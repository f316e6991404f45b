"""Planted bottlenecks must get the right verdict."""
import time

import pytest
import torch

from thruput.profile import ClockSampler, StepProfiler, verdict


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _run(prof: StepProfiler, steps: int, *, load: float = 0.0, fwd: float = 0.01, bwd: float = 0.02,
         opt: float = 0.0, slow_steps: frozenset = frozenset(), on_step=None) -> dict:
    def loader():
        while True:
            time.sleep(load)
            yield torch.zeros(4, 8)

    batches = prof.wrap_loader(loader())
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        factor = 1.6 if i in slow_steps else 1.0
        with prof.step(tokens=32, samples=4):
            next(batches)
            with prof.phase("forward"):
                _busy(fwd * factor)
            with prof.phase("backward"):
                _busy(bwd * factor)
            with prof.phase("optimizer"):
                time.sleep(opt)
    return prof.summary()


def test_sleeping_loader_is_data_bound() -> None:
    s = _run(StepProfiler(), 8, load=0.03)
    v = verdict(s)
    assert v.bottleneck == "data-bound"
    assert v.findings[0].evidence["data_wait_share"] > 0.3


def test_sleeping_optimizer_is_optimizer_bound() -> None:
    v = verdict(_run(StepProfiler(), 8, opt=0.04))
    assert v.bottleneck == "optimizer-bound"
    assert "thruput.memory" in v.findings[0].lever


def test_steady_compute_is_compute_bound() -> None:
    s = _run(StepProfiler(), 8)
    v = verdict(s)
    assert v.bottleneck == "compute-bound"
    assert s["phase_share"]["forward"] + s["phase_share"]["backward"] > 0.9


def test_data_and_optimizer_together_are_conflicting() -> None:
    v = verdict(_run(StepProfiler(), 8, load=0.03, opt=0.04))
    assert v.bottleneck == "conflicting"
    assert {f.bottleneck for f in v.findings} == {"data-bound", "optimizer-bound"}


class FakeClock:
    """A clock source whose frequency the test sets per step."""

    name = "fakecpu"
    clock_metric = "cpu_mhz"
    available = True
    reason = "test fake"

    def __init__(self) -> None:
        self.mhz = 3000.0

    def read(self) -> dict[str, float]:
        return {"cpu_mhz": self.mhz}

    def throttle_reasons(self, sample: dict[str, float]) -> list[str]:
        return ["thermal"] if sample["cpu_mhz"] < 2700 else []


def test_fake_clock_drop_names_the_throttled_steps() -> None:
    fake = FakeClock()
    dropped = frozenset({4, 5, 9})

    def on_step(i: int) -> None:
        fake.mhz = 1500.0 if i in dropped else 3000.0

    prof = StepProfiler(clocks=ClockSampler([fake], hz=100), warmup_steps=1)
    s = _run(prof, 12, fwd=0.03, bwd=0.03, slow_steps=dropped, on_step=on_step)
    c = s["clocks"]["fakecpu"]
    assert c["dropped_steps"] == sorted(dropped)
    assert c["reasons"] == ["thermal"]
    assert c["corr_step_time_inv_clock"] > 0.8
    v = verdict(s)
    throttle = [f for f in v.findings if f.bottleneck == "clock/throttle-bound"]
    assert throttle and throttle[0].evidence["dropped_steps"] == sorted(dropped)


def test_absent_clock_source_is_reported_absent_not_zero() -> None:
    class Absent(FakeClock):
        available = False
        reason = "no such device"

    prof = StepProfiler(clocks=ClockSampler([Absent()], hz=50))
    s = _run(prof, 3)
    assert s["clocks"]["fakecpu"] == {"available": False, "detail": "no such device"}


def test_memory_near_capacity_is_memory_bound() -> None:
    s = _run(StepProfiler(), 3)
    s["memory_capacity_bytes"] = int(s["peak_memory_bytes"] / 0.95)
    assert "memory-bound" in {f.bottleneck for f in verdict(s).findings}


def test_unknown_phase_is_rejected() -> None:
    prof = StepProfiler()
    with pytest.raises(ValueError, match="unknown phase 'fwd'"):
        prof.phase("fwd")


def _padded_run(useful: int, tokens: int = 100) -> StepProfiler:
    prof = StepProfiler()
    for _ in range(4):
        with prof.step(tokens=tokens, samples=4, useful_tokens=useful):
            with prof.phase("forward"):
                _busy(0.01)
            with prof.phase("backward"):
                _busy(0.02)
    return prof


def test_padding_of_ten_percent_or_more_names_packing() -> None:
    v = verdict(_padded_run(useful=45).summary())  # 55% of the positions are padding
    assert v.bottleneck == "padding-bound"
    (f,) = v.findings
    assert f.levers == ["packing"] and f.evidence["padding_ratio"] == pytest.approx(0.55)
    assert f.lever.startswith("thruput.data packing (data.pack = true)")
    assert verdict(_padded_run(useful=91).summary()).bottleneck == "compute-bound"  # 9%: below the rule
    assert verdict(_padded_run(useful=90).summary()).bottleneck == "padding-bound"  # 10%: at it


def test_levers_already_on_are_not_recommended() -> None:
    padded = _padded_run(useful=45).summary()
    f = verdict(padded, levers_on=["packing"]).findings[0]
    assert (f.levers, f.already_on) == ([], ["packing"])
    assert f.lever == "no further thruput lever: packing already on"
    compute = _padded_run(useful=100).summary()
    plain = verdict(compute).findings[0]
    assert plain.levers == ["fused_cross_entropy", "compile", "larger_batch"]
    tuned = verdict(compute, levers_on=["fused_cross_entropy", "compile", "offload"]).findings[0]
    assert tuned.levers == ["larger_batch"] and tuned.already_on == ["fused_cross_entropy", "compile"]
    assert "linear_cross_entropy" not in tuned.lever and "compile" not in tuned.lever
    slow_opt = verdict(_run(StepProfiler(), 6, opt=0.04), levers_on=["offload"]).findings[0]
    assert slow_opt.levers == ["low_precision_states", "delayed_update"] and "OffloadAdamW" not in slow_opt.lever


def test_run_document_takes_the_levers_from_meta() -> None:
    from thruput.profile import run_document

    prof = _padded_run(useful=45)
    prof.meta["levers"] = ["packing"]
    finding = run_document(prof)["verdict"]["findings"][0]
    assert finding["already_on"] == ["packing"] and finding["levers"] == []
