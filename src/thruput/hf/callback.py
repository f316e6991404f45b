"""``ThruputCallback``: thruput's step profiler inside a transformers ``Trainer`` (or TRL's)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from thruput.run.callback import SessionCallback


class ThruputCallback(SessionCallback, TrainerCallback):
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
    trains). :attr:`document` holds the run document afterwards; the options are
    ``thruput.run.callback.SessionCallback``'s.

    ``flops_per_token`` (training FLOPs per token) defaults to transformers' own estimate,
    ``6 * model.num_parameters(exclude_embeddings=True)``; MFU needs ``peak_flops`` (FLOP/s of
    one device). A ``train()`` that raises never reaches ``on_train_end``: call :meth:`close`
    then, or the global hooks stay installed. Not meant for a script run by ``thruput run``,
    which installs the same global hooks for its own report.
    """

    def __init__(self, name: str = "trainer", *, out: str | Path | None = None, **options: Any) -> None:
        super().__init__(name, out=out, **options)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        flops = 6.0 * model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else None
        self._start(args.output_dir, args.process_index if args.world_size > 1 else None,
                    "transformers.Trainer.train", "thruput.hf.ThruputCallback", flops)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish()

    def close(self) -> None:
        """Remove the hooks and write the reports of the steps so far (no-op when not profiling)."""
        self._finish()
