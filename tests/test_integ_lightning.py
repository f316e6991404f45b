"""thruput in Lightning: OffloadAdamW from configure_optimizers with gradient_clip_val and
accumulate_grad_batches, the Loader as a train dataloader resumed mid-epoch from a Lightning
checkpoint, and ThruputCallback."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from _integ import ROWS, SEQ, max_abs_diff, plan  # noqa: E402
from thruput.lightning import ThruputCallback, prepare_loader  # noqa: E402
from thruput.memory import OffloadAdamW  # noqa: E402

GA = 2
CLIP = 0.05  # the tiny model's gradient norms are ~1: every update clips


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class TinyLM(L.LightningModule):
    """Embedding and head over the Loader's batches; records the sample ids it trains on."""

    def __init__(self, optimizer: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(256, 16)
        self.head = torch.nn.Linear(16, 256)
        self.optimizer = optimizer
        self.seen: list[tuple] = []
        self.norms: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["documents"]))
        logits = self.head(torch.tanh(self.embed(batch["input_ids"])))
        return F.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten(), ignore_index=-100)

    def on_before_optimizer_step(self, optimizer):  # before Lightning clips: the true norm
        self.norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])))

    def configure_optimizers(self):
        if self.optimizer == "offload":
            opt = OffloadAdamW(self.parameters(), lr=1e-2, impl="torch")
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))}

    def train_dataloader(self):
        return prepare_loader(self.trainer, plan(), backend="inline")


def _trainer(root, max_steps: int, callbacks=(), clip: float | None = CLIP) -> L.Trainer:
    return L.Trainer(default_root_dir=str(root), max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     gradient_clip_val=clip, accumulate_grad_batches=GA, callbacks=list(callbacks),
                     enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks))


def test_offload_adamw_with_gradient_clip_val_and_accumulate_grad_batches_matches_torch_adamw(tmp_path):
    """Bitwise the weights of torch's fused AdamW (the torch-kernel CPU Adam computes its fp32
    math in its order); the gradient norms within 1e-5."""
    ref, ours = TinyLM("torch"), TinyLM("offload")
    base = copy.deepcopy(ref)
    _trainer(tmp_path / "ref", 4).fit(ref)
    _trainer(tmp_path / "ours", 4).fit(ours)
    assert len(ours.seen) == 4 * GA and ours.seen == ref.seen
    assert len(ours.norms) == 4 and min(ours.norms) > 10 * CLIP  # clipping really happened
    assert ours.norms == pytest.approx(ref.norms, rel=1e-5)
    assert max_abs_diff(ours, ref) == 0.0 and max_abs_diff(ours, base) > 1e-3
    unclipped = TinyLM("offload")
    _trainer(tmp_path / "unclipped", 4, clip=None).fit(unclipped)
    assert max_abs_diff(unclipped, ref) > 1e-4  # the comparison above sees clipping


class _Interrupt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("optimizer", ["torch", "offload"])
def test_lightning_run_interrupted_mid_epoch_resumes_from_its_checkpoint_exactly(tmp_path, optimizer):
    """Interrupted after update 3 of 6 (checkpoint at 3), resumed with ``fit(ckpt_path=...)``:
    the batches trained equal an uninterrupted run's, none repeated or lost (Lightning fetches a
    batch ahead: the Loader's own state at the checkpoint is one batch further), and the weights
    end bitwise equal."""
    full = TinyLM(optimizer)
    _trainer(tmp_path / "full", 6).fit(full)
    first = TinyLM(optimizer)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3,
                                                     save_top_k=-1)
    with pytest.raises(RuntimeError, match="interrupted"):
        _trainer(tmp_path / "run", 6, [checkpoint, _Interrupt()]).fit(first)
    assert len(first.seen) == 3 * GA
    resumed = TinyLM(optimizer, seed=1)
    _trainer(tmp_path / "run", 6).fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert first.seen + resumed.seen == full.seen
    assert len(set(full.seen)) == 6 * GA
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), full.parameters()))


def test_thruput_callback_reports_each_update_with_phases_and_tokens(tmp_path):
    callback = ThruputCallback(flops_per_token=6 * (256 * 16 + 16 * 256 + 256), peak_flops=1e12)
    _trainer(tmp_path, 4, [callback]).fit(TinyLM("torch"))
    doc = json.loads((tmp_path / "lightning.json").read_text())
    assert (tmp_path / "lightning.html").is_file() and callback.document["name"] == "lightning"
    steps = doc["steps"]
    assert len(steps) == 4
    for step in steps:
        assert step["tokens"] == GA * ROWS * SEQ
        assert abs(sum(step["phases"].values()) - step["time_s"]) < 1e-9
        assert min(step["phases"][p] for p in ("data_wait", "forward", "backward", "optimizer")) > 0
    assert doc["summary"]["mfu"] is not None


def test_prepare_loader_takes_rank_from_the_trainer(tmp_path):
    trainer = _trainer(tmp_path, 1)
    with pytest.raises(TypeError, match="rank comes from the trainer"):
        prepare_loader(trainer, plan(), rank=0, backend="inline")
    first, second = prepare_loader(trainer, plan(), backend="inline"), prepare_loader(trainer, plan(), backend="inline")
    trackers = [c for c in trainer.callbacks if type(c).__name__ == "_TrainedBatches"]
    assert len(trackers) == 1 and trackers[0].loader is second and trainer.callbacks[0] is trackers[0]
    assert first.loader.rank == 0 and first.loader.world_size == 1
