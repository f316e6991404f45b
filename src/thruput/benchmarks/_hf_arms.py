"""The three arms of ``thruput bench hf``: how each trains the same model on the same tokens.

* ``hf_default``: transformers ``Trainer`` as it comes: a padding collator
  (``DataCollatorForLanguageModeling(mlm=False)``, pad to the longest document of each batch of
  ``hf_batch`` documents), torch AdamW, the model's own loss on full logits, ``sdpa``.
* ``hf_best``: ``Trainer`` with ``DataCollatorWithFlattening`` (each batch one padding-free row,
  positions restarting per document: transformers masks attention block-diagonally), fused
  torch AdamW (``optim="adamw_torch_fused"``), and the loss from torch's native chunked
  ``F.linear_cross_entropy`` on the decoder's hidden states (no full logits), chunked at
  thruput's chunk rows (``thruput bench kernels``' ``native`` peer). Liger-Kernel and
  cut-cross-entropy need CUDA (Triton): not run on CPU.
* ``thruput``: ``thruput.hf.patch(model)`` (fused loss, per-document attention at sum(L^2)
  cost), thruput's ``Loader`` (packed rows, balancing, source workers) and a plain loop with
  what ``Trainer`` does by default: fused torch AdamW, linear decay without warm-up, gradient
  clipping at 1.0.

All take the same hyper-parameters (``Trainer``'s defaults, with ``lr``); each returns, per
step, the time it ended (``perf_counter``) and its labelled targets, plus its padding.
"""
from __future__ import annotations

import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from thruput.kernels import default_chunk_size
from thruput.labels import IGNORE_INDEX

MAX_GRAD_NORM = 1.0  # Trainer's default


class StepLog:
    """What each arm reports: step end times, labelled targets and token slots per step."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.targets: list[int] = []
        self.slots = 0  # token positions computed (padding included)
        self.tokens = 0  # real tokens among them
        self.data_wait_s: float | None = None  # time the loop waited for batches, where known

    def summary(self) -> dict[str, Any]:
        return {"step_ends_s": self.ends, "step_targets": self.targets,
                "padding_ratio": 1.0 - self.tokens / self.slots if self.slots else 0.0,
                "data_wait_s": self.data_wait_s}


def _count(log: StepLog, collator: Callable[[list], dict]) -> Callable[[list], dict]:
    """``collator``, counting each batch's targets (after the label shift), slots and real tokens."""
    def collate(features: list) -> dict:
        batch = collator(features)
        log.targets.append(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()))
        log.slots += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        log.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch
    return collate


def _hf_trainer(arm: str, model: torch.nn.Module, documents: list[np.ndarray], work: Any, tokenizer: Any,
                log: StepLog, output_dir: str) -> Any:
    from datasets import Dataset
    from transformers import (DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer,
                              TrainerCallback, TrainingArguments)

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.ends.append(time.perf_counter())

    class LinearCrossEntropyTrainer(Trainer):
        """The model's loss from torch's fused ``F.linear_cross_entropy``: hidden states, never logits."""

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs.pop("labels")
            hidden = model.model(**inputs, use_cache=False).last_hidden_state
            targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # ForCausalLMLoss's shift
            # Chunked at thruput's chunk rows (the same memory bound as the thruput arm's loss): torch's
            # LinearCrossEntropyOptions() as it comes took 65 s against 4 s unfused for 900 tokens x
            # 16k vocab on this CPU (a loaded 2-core machine, 2026-12-02).
            chunk = default_chunk_size(model.lm_head.weight.shape[0])
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
            loss = F.linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(),
                                          ignore_index=IGNORE_INDEX, reduction="sum", options=options)
            return loss / num_items_in_batch

    best = arm == "hf_best"
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=work.hf_batch,
        learning_rate=work.lr, num_train_epochs=1, seed=work.seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch_fused" if best else "adamw_torch")
    collator = DataCollatorWithFlattening() if best else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    dataset = Dataset.from_dict({"input_ids": [d.tolist() for d in documents]})
    cls = LinearCrossEntropyTrainer if best else Trainer
    return cls(model=model, args=args, train_dataset=dataset, data_collator=_count(log, collator),
               callbacks=[StepEnds()])


def train_hf(arm: str, model: torch.nn.Module, documents: list[np.ndarray], work: Any, tokenizer: Any) -> StepLog:
    """``hf_default`` or ``hf_best``: one epoch of ``documents`` through ``Trainer``."""
    log = StepLog()
    with tempfile.TemporaryDirectory(prefix="thruput-bench-hf-") as output_dir:  # Trainer wants one; saves nothing
        _hf_trainer(arm, model, documents, work, tokenizer, log, output_dir).train()
    return log


def train_thruput(model: torch.nn.Module, plan: Any, work: Any) -> StepLog:
    """``thruput``: the patched model in a plain loop over the Loader's ``work.steps`` batches."""
    from transformers import get_linear_schedule_with_warmup

    from thruput.data import Loader
    from thruput.hf import patch

    model = patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=work.lr, weight_decay=0.0, fused=True)
    schedule = get_linear_schedule_with_warmup(opt, 0, work.steps)
    log = StepLog()
    model.train()
    with Loader(plan, steps=work.steps, device=next(model.parameters()).device) as loader:
        for batch in loader:
            log.targets.append(int((batch["shift_labels"] != IGNORE_INDEX).sum()))
            log.slots += batch["input_ids"].numel()
            log.tokens += round(batch["input_ids"].numel() * (1.0 - batch["padding_ratio"]))
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            log.ends.append(time.perf_counter())
        log.data_wait_s = loader.wait_s
    return log


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, documents: list[np.ndarray], pad_id: int, batch: int = 8) -> float:
    """Mean cross-entropy (nats per target) over every target of ``documents``, each document alone
    in its row (right-padded, ``attention_mask``); the same code scores every arm."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(documents), batch):
        group = documents[i:i + batch]
        width = max(len(d) for d in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, d in enumerate(group):
            ids[r, :len(d)] = torch.from_numpy(np.asarray(d, dtype=np.int64))
            mask[r, :len(d)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        targets = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / count
