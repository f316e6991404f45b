"""Background sampling of CPU and GPU clocks, to catch DVFS and throttling.

A ``ClockSource`` reads a few named metrics at once; ``ClockSampler`` polls its sources from a
daemon thread at 10-50 Hz and keeps (time, value) series in ``time.perf_counter`` seconds, the
same clock the step profiler uses, so samples fall into steps by timestamp. A source that
cannot be read is reported as absent with the reason; it never contributes zeros.
"""
from __future__ import annotations

import bisect
import glob
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


class ClockSource(Protocol):
    """One hardware clock source. ``read`` returns metric -> value, or None when unreadable."""

    name: str
    clock_metric: str  # the metric that is a clock frequency (MHz), used for 1/clock
    available: bool
    reason: str  # why unavailable, or where it reads from

    def read(self) -> dict[str, float] | None: ...

    def throttle_reasons(self, sample: dict[str, float]) -> list[str]:
        """Names of throttling causes active in one sample (empty when not throttled)."""
        ...


class CpuFreqSource:
    """Mean CPU core frequency in MHz: sysfs cpufreq, else /proc/cpuinfo, else psutil."""

    name = "cpu"
    clock_metric = "cpu_mhz"

    def __init__(self, drop_threshold: float = 0.9) -> None:
        self.drop_threshold = drop_threshold
        self._sysfs = sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))
        self.max_mhz = self._max_mhz()
        self._read_impl = None
        for reader, where in (
            (self._read_sysfs, "sysfs cpufreq"),
            (self._read_cpuinfo, "/proc/cpuinfo"),
            (self._read_psutil, "psutil"),
        ):
            value = reader()
            if value is not None and value > 0:
                self._read_impl, self.reason = reader, where
                break
        self.available = self._read_impl is not None
        if not self.available:
            self.reason = "no cpufreq in sysfs, no 'cpu MHz' in /proc/cpuinfo, psutil has none"

    def _max_mhz(self) -> float | None:
        paths = glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq")
        values = [_read_float(p) for p in paths]
        values = [v / 1000 for v in values if v]
        if values:
            return max(values)
        try:
            import psutil

            freq = psutil.cpu_freq()
            return float(freq.max) if freq and freq.max else None
        except (ImportError, NotImplementedError, OSError):
            return None

    def _read_sysfs(self) -> float | None:
        values = [_read_float(p) for p in self._sysfs]
        values = [v for v in values if v]
        return sum(values) / len(values) / 1000 if values else None

    @staticmethod
    def _read_cpuinfo() -> float | None:
        try:
            with open("/proc/cpuinfo") as f:
                values = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        except (OSError, ValueError, IndexError):
            return None
        return sum(values) / len(values) if values else None

    @staticmethod
    def _read_psutil() -> float | None:
        try:
            import psutil

            freq = psutil.cpu_freq()
        except (ImportError, NotImplementedError, OSError):
            return None
        return float(freq.current) if freq and freq.current else None

    def read(self) -> dict[str, float] | None:
        value = self._read_impl() if self._read_impl else None
        return None if value is None else {"cpu_mhz": value}

    def throttle_reasons(self, sample: dict[str, float]) -> list[str]:
        if self.max_mhz and sample.get("cpu_mhz", self.max_mhz) < self.drop_threshold * self.max_mhz:
            return ["cpu_frequency_below_max"]
        return []


class NvmlSource:
    """One NVIDIA GPU through NVML: SM/memory clocks, power, temperature, clock-event reasons
    and the power/thermal violation counters."""

    clock_metric = "sm_mhz"

    # Clock-event reason bits that mean "slowed down"; idle and application-clock settings do not.
    _REASON_BITS = {
        0x4: "sw_power_cap",
        0x8: "hw_slowdown",
        0x20: "sw_thermal_slowdown",
        0x40: "hw_thermal_slowdown",
        0x80: "hw_power_brake_slowdown",
        0x10: "sync_boost",
    }

    def __init__(self, index: int = 0) -> None:
        self.name = f"gpu{index}"
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.reason = f"NVML: {pynvml.nvmlDeviceGetName(self._handle)}"
            self.available = self.read() is not None
        except Exception as exc:  # NVML raises its own error types, or the library is absent
            self.reason = f"NVML unavailable: {exc}"

    def read(self) -> dict[str, float] | None:
        nv, h = self._nvml, self._handle
        try:
            sample = {
                "sm_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                "mem_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
                "power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temp_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            }
            getter = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                nv, "nvmlDeviceGetCurrentClocksThrottleReasons"
            )
            sample["event_reasons"] = float(getter(h))
            for label, policy in (("power", nv.NVML_PERF_POLICY_POWER), ("thermal", nv.NVML_PERF_POLICY_THERMAL)):
                sample[f"violation_{label}_ns"] = float(nv.nvmlDeviceGetViolationStatus(h, policy).violationTime)
        except Exception:
            return None
        return sample

    def throttle_reasons(self, sample: dict[str, float]) -> list[str]:
        bits = int(sample.get("event_reasons", 0))
        return [name for bit, name in self._REASON_BITS.items() if bits & bit]


def default_sources() -> list[ClockSource]:
    """The CPU source, and one NVML source per visible NVIDIA GPU (none if NVML is absent)."""
    sources: list[ClockSource] = [CpuFreqSource()]
    try:
        import torch

        n_gpus = torch.cuda.device_count() if torch.version.cuda else 0
    except Exception:
        n_gpus = 0
    sources.extend(NvmlSource(i) for i in range(n_gpus))
    return sources


@dataclass
class Series:
    """Samples of one source: timestamps (perf_counter seconds) and metric -> values."""

    times: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    throttled: list[list[str]] = field(default_factory=list)

    def append(self, t: float, sample: dict[str, float], reasons: list[str]) -> None:
        self.times.append(t)
        for key, value in sample.items():
            self.values.setdefault(key, []).append(value)
        self.throttled.append(reasons)


class ClockSampler:
    """Polls clock sources from a daemon thread.

    Use as a context manager or call ``start()``/``stop()``. ``hz`` must be within 1..200
    (10-50 is the useful range: fast enough to see a throttle event within a step, slow
    enough to cost nothing measurable).
    """

    def __init__(self, sources: list[ClockSource] | None = None, hz: float = 20.0) -> None:
        if not 1 <= hz <= 200:
            raise ValueError(f"ClockSampler hz must be within 1..200, got {hz}")
        self.sources = default_sources() if sources is None else list(sources)
        self.interval = 1.0 / hz
        self.series: dict[str, Series] = {s.name: Series() for s in self.sources if s.available}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sources_info(self) -> dict[str, dict]:
        """Per source: whether it is available, and where it reads from or why it is absent."""
        return {s.name: {"available": s.available, "detail": s.reason, "clock_metric": s.clock_metric}
                for s in self.sources}

    def sample(self) -> None:
        """Take one sample from every available source now."""
        t = time.perf_counter()
        for source in self.sources:
            if not source.available:
                continue
            values = source.read()
            if values is not None:
                with self._lock:
                    self.series[source.name].append(t, values, source.throttle_reasons(values))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> "ClockSampler":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="thruput-clocks", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "ClockSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def window(self, start: float, end: float) -> dict[str, dict]:
        """Per available source, statistics of the samples with start <= t < end.

        Returns {source: {"samples": n, "mean_<metric>": ..., "throttled_share": ...,
        "reasons": [...]}}; a source with no sample in the window is left out.
        """
        out: dict[str, dict] = {}
        with self._lock:
            for source in self.sources:
                series = self.series.get(source.name)
                if series is None:
                    continue
                # Samples are appended in time order: bisect, so a long run's per-step windows
                # cost O(log n) each rather than a scan of the whole series.
                idx = range(bisect.bisect_left(series.times, start), bisect.bisect_left(series.times, end))
                if not idx:
                    continue
                stats: dict = {"samples": len(idx)}
                for metric, values in series.values.items():
                    stats[f"mean_{metric}"] = sum(values[i] for i in idx) / len(idx)
                throttled = [series.throttled[i] for i in idx]
                stats["throttled_share"] = sum(1 for r in throttled if r) / len(idx)
                stats["reasons"] = sorted({reason for r in throttled for reason in r})
                out[source.name] = stats
        return out

    def to_dict(self) -> dict:
        """Plain-data dump: source info and every series (for the JSON report and trace)."""
        with self._lock:
            return {
                "sources": self.sources_info(),
                "series": {
                    name: {"t": list(s.times), **{k: list(v) for k, v in s.values.items()},
                           "throttle_reasons": [list(r) for r in s.throttled]}
                    for name, s in self.series.items()
                },
            }


def _read_float(path: str) -> float | None:
    try:
        with open(path) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None
