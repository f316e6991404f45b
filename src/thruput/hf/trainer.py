"""thruput's Loader as the training data of a transformers ``Trainer``, resumed exactly.

Trainer resumes an iterable by replaying it and dropping the batches already trained
(``skip_first_batches``): slow, and wrong for any loader whose order is not a pure function of
its start. A thruput Loader knows its position (``state_dict()``), so :class:`LoaderMixin`
saves that position in each checkpoint and loads it on ``resume_from_checkpoint``, with
Trainer's own skip turned off (``ignore_data_skip=True``): the resumed run sees the batches an
uninterrupted run would have seen, none repeated, none lost.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from thruput.atomic import write_atomic
from thruput.hf.batch import hf_batch

LOADER_STATE_NAME = "thruput_loader.json"
# Trainer's options for the DataLoader it would build, with their defaults; the Loader has its own.
_DATALOADER_ARGS = {"dataloader_num_workers": 0, "dataloader_prefetch_factor": None,
                    "dataloader_persistent_workers": False}


class TrainerBatches:
    """The iterable Trainer trains on: the Loader's batches in transformers' keys (``hf_batch``),
    so patched and unpatched models alike take them as ``model(**batch)``."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield hf_batch(batch)


class LoaderMixin:
    """Trainer with ``train_loader=Loader(...)`` instead of ``train_dataset``; see the module docstring.

    Mix into any ``Trainer`` subclass (``class SFT(LoaderMixin, SFTTrainer)``), or use
    :class:`ThruputTrainer`. The Loader's rank and world size must be the Trainer's
    (``Loader(plan, rank=args.process_index, world_size=args.world_size)``); a Loader has no
    length, so ``args.max_steps`` must be set (Trainer says so). Checkpoints hold
    ``thruput_loader.json`` (written by the main process before Trainer's own files, so a
    checkpoint with Trainer's state has it); resuming from a checkpoint without it raises
    ``FileNotFoundError``. ``train_dataset`` together with ``train_loader`` is a ``ValueError``,
    and so are Trainer's options for the DataLoader it would build (``dataloader_num_workers``,
    ``dataloader_prefetch_factor``, ``dataloader_persistent_workers``): the Loader's own
    ``backend``, ``workers`` and ``prefetch`` do that job. The rows per batch are the Plan's
    (``per_device_train_batch_size`` only enters Trainer's logged totals).
    """

    def __init__(self, *args: Any, train_loader: Any, **kwargs: Any) -> None:
        if kwargs.get("train_dataset") is not None:
            raise ValueError("ThruputTrainer: give train_loader or train_dataset, not both")
        super().__init__(*args, **kwargs)
        for name, ours, theirs in (("rank", train_loader.rank, self.args.process_index),
                                   ("world_size", train_loader.world_size, self.args.world_size)):
            if ours != theirs:
                raise ValueError(f"ThruputTrainer: the Loader's {name} is {ours} but the Trainer's is {theirs}; "
                                 "build it as Loader(plan, rank=args.process_index, world_size=args.world_size)")
        for name, default in _DATALOADER_ARGS.items():
            if getattr(self.args, name) != default:
                raise ValueError(f"ThruputTrainer: {name}={getattr(self.args, name)!r} does not apply to a thruput "
                                 "Loader; give the Loader its backend, workers and prefetch instead")
        self.train_loader = train_loader
        # The Loader resumes from its own state; Trainer's skip would drop batches a second time.
        # A copy: the caller's TrainingArguments object is left as it was.
        self.args = copy.copy(self.args)
        self.args.ignore_data_skip = True

    def get_train_dataloader(self) -> TrainerBatches:
        return TrainerBatches(self.train_loader)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            path = Path(resume_from_checkpoint) / LOADER_STATE_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no thruput Loader state in this checkpoint (was it saved by "
                                        "ThruputTrainer?); resuming would not know where the data stopped")
            self.train_loader.load_state_dict(json.loads(path.read_text()))
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Before Trainer's files, so that a checkpoint Trainer can resume from has the Loader's
        # state too; every batch fetched so far has been trained (Trainer saves after a step).
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            os.makedirs(folder, exist_ok=True)
            text = json.dumps(self.train_loader.state_dict()).encode()
            write_atomic(folder / LOADER_STATE_NAME, lambda f: f.write(text))
        super()._save_checkpoint(model, trial)


class ThruputTrainer(LoaderMixin, Trainer):
    """``transformers.Trainer`` trained from a thruput Loader: ``ThruputTrainer(model, args,
    train_loader=Loader(plan, rank=args.process_index, world_size=args.world_size))``; see
    :class:`LoaderMixin`."""
