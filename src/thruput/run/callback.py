"""The framework-independent half of the Trainer and Lightning ``ThruputCallback``: one
profiling ``Session`` from a train-begin event to a train-end event."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from thruput.run.session import ExitInfo, RunOptions, Session


class SessionCallback:
    """Holds the options of a profiling callback and runs its :class:`Session`.

    ``name``: the report files' stem; ``out``: their folder (None: the framework's output
    folder); ``html`` / ``trace``: also write ``NAME.html`` / ``NAME.trace.json``;
    ``flops_per_token`` (training FLOPs per token) and ``peak_flops`` (FLOP/s of one device):
    MFU; ``warmup_steps``: steps left out of the summary; ``clock_hz``: clock sampling rate.
    After the run :attr:`document` is the run document and :attr:`paths` the files written.
    """

    def __init__(self, name: str, *, out: str | Path | None = None, html: bool = True, trace: bool = False,
                 flops_per_token: float | None = None, peak_flops: float | None = None, warmup_steps: int = 1,
                 clock_hz: float = 20.0) -> None:
        self.name, self.out, self.html, self.trace = name, out, html, trace
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.warmup_steps, self.clock_hz = warmup_steps, clock_hz
        self.document: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}
        self._session: Session | None = None

    def _start(self, default_out: str | Path, rank: int | None, command: str, tool: str,
               flops_per_token: float | None = None) -> None:
        """Install the hooks (finishing a session still open); ``rank`` None in one process."""
        self._finish()
        options = RunOptions(out=str(self.out if self.out is not None else default_out), name=self.name,
                             html=self.html, trace=self.trace, status=False, warmup_steps=self.warmup_steps,
                             clock_hz=self.clock_hz)
        flops = self.flops_per_token if self.flops_per_token is not None else flops_per_token
        self._session = Session(options, [command], rank, tool=tool, flops_per_token=flops,
                                peak_flops=self.peak_flops)
        self._session.start()

    def _finish(self, error: str | None = None) -> None:
        """Remove the hooks and write the reports of the finished steps (no-op when idle)."""
        session, self._session = self._session, None
        if session is not None:
            written = session.finish(ExitInfo(code=None, error=error))
            self.document, self.paths = written.document, written.paths
