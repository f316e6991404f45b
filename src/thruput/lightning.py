"""Lightning: thruput's profiler as a callback, and its Loader as a train dataloader resumed exactly.

* :class:`ThruputCallback` -- ``L.Trainer(callbacks=[ThruputCallback()])``: the hooks of
  ``thruput run`` from ``on_train_start`` to ``on_train_end`` (or ``on_exception``), reports in
  ``trainer.default_root_dir``.
* :func:`prepare_loader` -- ``return prepare_loader(self.trainer, plan)`` from
  ``train_dataloader()``: a Loader for this rank whose position Lightning saves in its
  checkpoints and restores on ``fit(ckpt_path=...)``, mid-epoch.
* OffloadAdamW needs nothing: return it from ``configure_optimizers``; Lightning's
  ``gradient_clip_val`` clips its gradients through ``p.grad`` and ``accumulate_grad_batches``
  accumulates into its host buffers.

Needs the ``lightning`` extra: ``pip install 'thruput[lightning]'``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("thruput.lightning needs lightning >= 2.2: pip install 'thruput[lightning]'") from exc

from thruput.data import Loader, Plan
from thruput.run.callback import SessionCallback

_KEPT_STATES = 64  # states of batches fetched ahead of training kept; Lightning prefetches one


class ThruputCallback(SessionCallback, pl.Callback):
    """Profile ``trainer.fit``: phases, tokens/s, MFU, clocks, verdict, reports.

    A step ends at the optimizer's ``step()`` (Lightning runs forward and backward inside it, in
    the closure: they are their own phases, ``optimizer`` keeps only its own time); batches
    are counted from the train dataloader. The run document goes to ``OUT/NAME.json``, the
    HTML report to ``OUT/NAME.html`` (``html=True``), the Perfetto trace to
    ``OUT/NAME.trace.json`` (``trace=True``); ``OUT`` is ``out`` or
    ``trainer.default_root_dir``, ``NAME`` is ``name`` (plus ``-rank{N}`` with more than one
    process); the options are ``thruput.run.callback.SessionCallback``'s. MFU needs
    ``flops_per_token`` (training FLOPs per token) and ``peak_flops`` (FLOP/s of one device).
    Not meant for a script run by ``thruput run``, which installs the same global hooks for its
    own report.
    """

    def __init__(self, name: str = "lightning", *, out: str | Path | None = None, **options: Any) -> None:
        super().__init__(name, out=out, **options)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer.default_root_dir, trainer.global_rank if trainer.world_size > 1 else None,
                    "lightning.Trainer.fit", "thruput.lightning.ThruputCallback")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(f"{type(exception).__name__}: {exception}")


class TrainLoader:
    """A Loader as Lightning's train dataloader (made by :func:`prepare_loader`).

    Lightning fetches a batch ahead of the one it trains on, and saves a stateful dataloader's
    ``state_dict()`` in its checkpoints: the Loader's own state would be one batch past what was
    trained, and a resumed run would lose that batch. ``state_dict()`` here is the Loader's state
    after the last batch whose ``on_train_batch_end`` ran (a callback that :func:`prepare_loader`
    adds reports it, from the batch's ``step``).
    """

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self._after: OrderedDict[int, dict[str, Any]] = OrderedDict()  # batch step -> Loader state after it
        self._trained = loader.state_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self._after[batch["step"]] = self.loader.state_dict()
            while len(self._after) > _KEPT_STATES:
                self._after.popitem(last=False)
            yield batch

    def trained(self, batch: Any) -> None:
        """Training on ``batch`` (a batch this loader yielded) is done."""
        step = batch.get("step") if isinstance(batch, Mapping) else None
        if step not in self._after:
            raise RuntimeError(f"thruput.lightning: the trained batch has no 'step' of a batch this loader yielded "
                               f"(got {step!r}); keep the Loader's 'step' key in the batch")
        self._trained = self._after[step]

    def state_dict(self) -> dict[str, Any]:
        """The Loader's state after the last batch trained (plain data, Lightning saves it)."""
        return {**self._trained, "sources": {n: dict(c) for n, c in self._trained["sources"].items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the batch ``state`` was saved at (``DataError`` if it is another plan's)."""
        self.loader.load_state_dict(state)
        self._after.clear()
        self._trained = self.loader.state_dict()


class _TrainedBatches(pl.Callback):
    """Tells a TrainLoader which batch training finished on."""

    def __init__(self, loader: TrainLoader) -> None:
        self.loader = loader

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.loader.trained(batch)


def prepare_loader(trainer: pl.Trainer, plan: Plan, **kwargs: Any) -> TrainLoader:
    """A :class:`TrainLoader` of ``plan`` for this process (rank and world size from ``trainer``),
    to return from ``train_dataloader()`` (where the rank is known, also under DDP spawn).
    ``kwargs`` go to ``Loader`` (``backend``, ``workers``, ``prefetch``, ``device``, ``steps``).
    A Loader has no length: set ``max_steps`` (or ``steps=``)."""
    for key in ("rank", "world_size"):
        if key in kwargs:
            raise TypeError(f"prepare_loader: {key} comes from the trainer; do not pass it")
    train_loader = TrainLoader(Loader(plan, trainer.global_rank, trainer.world_size, **kwargs))
    # One tracker per trainer (a reloaded dataloader replaces the previous one), first in the
    # list: a ModelCheckpoint saving at the same on_train_batch_end must see this batch trained.
    trainer.callbacks[:] = [_TrainedBatches(train_loader),
                            *(c for c in trainer.callbacks if not isinstance(c, _TrainedBatches))]
    return train_loader
