"""One profiled process: hooks, recorder and status line in, run document and report files out."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from thruput.profile import ClockSampler, StepProfiler, run_document, save_html, save_json, save_trace
from thruput.run.hooks import TorchHooks
from thruput.run.recorder import Recorder
from thruput.run.status import StatusLine


@dataclass(frozen=True)
class RunOptions:
    """What ``thruput run`` writes and shows. ``name`` is the file stem; a rank started by a
    distributed launcher (``RANK`` set) appends ``-rank{RANK}``."""

    out: str = "runs"
    name: str = "run"
    html: bool = False
    trace: bool = False
    status: bool = True
    warmup_steps: int = 1
    clock_hz: float = 20.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunOptions":
        return cls(**json.loads(text))

    def paths(self, name: str) -> dict[str, Path]:
        """The files a run named ``name`` writes: the run document always, the others if asked."""
        out = Path(self.out)
        paths = {"json": out / f"{name}.json"}
        if self.html:
            paths["html"] = out / f"{name}.html"
        if self.trace:
            paths["trace"] = out / f"{name}.trace.json"
        return paths


@dataclass
class ExitInfo:
    """How the script ended: ``code`` (None where the process exit code is not visible, in a
    rank under a launcher) and the uncaught exception, as ``"Type: message"``."""

    code: int | None = 0
    error: str | None = None


@dataclass
class Written:
    """The finished run document and the files written from it."""

    document: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def rank_from_env() -> int | None:
    """The global rank a distributed launcher (torchrun) gave this process, else None."""
    rank = os.environ.get("RANK")
    return int(rank) if rank is not None and rank.isdigit() else None


class Session:
    """Profiles the calling process from ``start()`` to ``finish()``.

    ``tool`` names who profiled in the run document (the Trainer and Lightning callbacks use
    their own name); ``flops_per_token`` and ``peak_flops`` go to the ``StepProfiler`` (MFU)."""

    def __init__(self, options: RunOptions, command: list[str], rank: int | None = None, *,
                 tool: str = "thruput run", flops_per_token: float | None = None,
                 peak_flops: float | None = None) -> None:
        self.options = options
        self.command = command
        self.rank = rank
        self.tool = tool
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.status = StatusLine(enabled=options.status and rank in (None, 0))
        self.recorder = Recorder(self._make_profiler, on_step=self.status.update)
        self.hooks = TorchHooks(self.recorder)

    @property
    def name(self) -> str:
        return self.options.name if self.rank is None else f"{self.options.name}-rank{self.rank}"

    def _make_profiler(self, device: torch.device) -> StepProfiler:
        return StepProfiler(device, clocks=ClockSampler(hz=self.options.clock_hz),
                            warmup_steps=self.options.warmup_steps, flops_per_token=self.flops_per_token,
                            peak_flops=self.peak_flops)

    def start(self) -> None:
        self.hooks.install()

    def finish(self, exit_info: ExitInfo) -> Written:
        """Remove the hooks, drop the unfinished step, and write the run document (always) and
        the HTML report and Perfetto trace (when asked) under ``options.out``."""
        self.hooks.remove()
        self.status.clear()
        profiler = self.recorder.close() or StepProfiler(warmup_steps=self.options.warmup_steps)
        meta = {
            "tool": self.tool,
            "command": self.command,
            "rank": self.rank,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "exit": {"code": exit_info.code, "error": exit_info.error},
            "step_boundary": "optimizer.step",
            "loader_batches_seen": self.recorder.loader_seen,
        }
        document = run_document(profiler, name=self.name, meta=meta)
        paths = self.options.paths(self.name)
        save_json(document, paths["json"])
        if "html" in paths:
            save_html(document, paths["html"])
        if "trace" in paths:
            save_trace(document, paths["trace"])
        return Written(document, paths)
