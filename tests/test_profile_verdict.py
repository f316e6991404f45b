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
