"""``ThruputCallback``: thruput's step profiler inside a transformers ``Trainer`` (or TRL's)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from thruput.run import ExitInfo, RunOptions, Session


class ThruputCallback(TrainerCallback):
    """Profile ``Trainer.train()``: phases, tokens/s, MFU, clocks, verdict, reports.

    ``Trainer(..., callbacks=[ThruputCallback()])``. From ``on_train_begin`` to ``on_train_end``
    the hooks of ``thruput run`` are installed (``thruput.run.hooks``): a step ends at the
    optimizer's ``step()`` (one per update, whatever ``gradient_accumulation_steps``), its
    phases are ``data_wait`` (the train dataloader's ``next``), ``forward`` (the model's
    outermost forward), ``backward``, ``optimizer`` (clipping is ``other``), ``comm``, ``h2d``;
    tokens are counted from the batches the loader yields. At the end the run document goes to
    ``OUT/NAME.json`` and the HTML report to ``OUT/NAME.html`` (``html=True``), the Perfetto
    trace to ``OUT/NAME.trace.json`` (``trace=True``); ``OUT`` is ``out`` or
    ``args.output_dir``, ``NAME`` is ``name`` (plus ``-rank{N}`` when more than one process
    trains). :attr:`document` holds the run document afterwards.

    ``flops_per_token`` (training FLOPs per token) defaults to transformers' own estimate,
    ``6 * model.num_parameters(exclude_embeddings=True)``; MFU needs ``peak_flops`` (FLOP/s of
    one device). A ``train()`` that raises never reaches ``on_train_end``: call :meth:`close`
    then, or the global hooks stay installed. Do not combine with ``thruput run`` (it installs
    the same hooks; a second install raises ``RuntimeError``).
    """

    def __init__(self, name: str = "trainer", *, out: str | Path | None = None, html: bool = True,
                 trace: bool = False, flops_per_token: float | None = None, peak_flops: float | None = None,
                 warmup_steps: int = 1, clock_hz: float = 20.0) -> None:
        self.name, self.out, self.html, self.trace = name, out, html, trace
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.warmup_steps, self.clock_hz = warmup_steps, clock_hz
        self.document: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}
        self._session: Session | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.close()
        flops = self.flops_per_token
        if flops is None and hasattr(model, "num_parameters"):
            flops = 6.0 * model.num_parameters(exclude_embeddings=True)
        options = RunOptions(out=str(self.out if self.out is not None else args.output_dir), name=self.name,
                             html=self.html, trace=self.trace, status=False, warmup_steps=self.warmup_steps,
                             clock_hz=self.clock_hz)
        rank = args.process_index if args.world_size > 1 else None
        self._session = Session(options, ["transformers.Trainer.train"], rank, tool="thruput.hf.ThruputCallback",
                                flops_per_token=flops, peak_flops=self.peak_flops)
        self._session.start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and write the reports of the steps so far (no-op when not profiling)."""
        session, self._session = self._session, None
        if session is not None:
            written = session.finish(ExitInfo(code=None))
            self.document, self.paths = written.document, written.paths
