"""Memory readings for the profiler: process RSS and its peak window, device capacity."""
from __future__ import annotations

import os
import resource

import torch


def memory_capacity(device: torch.device | None) -> int:
    """Total memory of the CUDA ``device``, or of the host when None."""
    if device is not None:
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


_statm: tuple[int, int] | None = None  # (pid, open fd of that process's /proc/self/statm)


def rss_bytes() -> int:
    """Current resident set size of this process. The profiler reads it every step, so the
    statm file stays open and is re-read with pread (about 3 us, against 30 us for an open);
    a forked child opens its own."""
    global _statm
    try:
        pid = os.getpid()
        if _statm is None or _statm[0] != pid:
            if _statm is not None:
                os.close(_statm[1])  # the parent's, inherited through fork
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window, so a profiler reports its own run's peak rather than the
    process lifetime's (Linux: writing 5 to clear_refs resets VmHWM). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), else over the process lifetime (ru_maxrss, KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
