"""The reference training loop: exact resumption, checkpoints, profiler wiring."""
import dataclasses
import math
import os

import pytest
import torch

from thruput.checkpoint import (CheckpointError, CheckpointWarning, latest_checkpoint, list_checkpoints,
                                load_checkpoint, save_checkpoint)
from thruput.config import ConfigError, from_dict
from thruput.train import train


def _cfg(tmp_path, **overrides) -> object:
    raw = {
        "name": "t", "steps": 6, "seed": 3,
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2},
        "data": {"seq_len": 32, "batch_size": 2,
                 "sources": [{"name": "code", "kind": "stdlib_code", "options": {"max_files": 20}, "weight": 2.0},
                             {"name": "prose", "kind": "stdlib_prose", "options": {"max_files": 20}}]},
        "optimizer": {"warmup_steps": 2},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 3, "keep": 5},
        "profile": {"peak_flops": 1e11, "clock_hz": 20},
    }
    return from_dict(raw, overrides)


def test_loss_decreases_and_profile_is_filled(tmp_path) -> None:
    result = train(_cfg(tmp_path, steps=12, **{"checkpoint.every": 0}))
    assert len(result.losses) == 12
    assert result.losses[-1] < result.losses[0]
    summary = result.document["summary"]
    assert summary["steps"] == 11
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1
    assert summary["phase_share"]["forward"] > 0 and summary["phase_share"]["optimizer"] > 0
    assert result.document["verdict"]["bottleneck"]


def test_interrupted_run_resumes_bitwise(tmp_path) -> None:
    full = train(_cfg(tmp_path / "a"))
    first = train(_cfg(tmp_path / "b"), stop_after=3)
    assert len(first.losses) == 3
    resumed = train(_cfg(tmp_path / "b"), resume=True)
    assert resumed.start_step == 3
    assert resumed.losses == full.losses  # bitwise: same floats
    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "ckpt"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "ckpt"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_without_checkpoint_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train(_cfg(tmp_path), resume=True)


def test_checkpoints_are_atomic_and_pruned(tmp_path) -> None:
    for step in range(1, 5):
        save_checkpoint({"step": step, "w": torch.ones(2) * step}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 4
    (tmp_path / "step_00000009.pt").write_bytes(b"torn")
    with pytest.raises(ValueError, match="corrupt or not a checkpoint: 4 bytes that are not a zip archive"):
        load_checkpoint(tmp_path / "step_00000009.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bfloat16_runs_mixed_precision_with_the_fused_loss(tmp_path) -> None:
    cfg = _cfg(tmp_path, steps=3, dtype="bfloat16", **{"checkpoint.every": 0, "kernels.fused_cross_entropy": True})
    result = train(cfg)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # master weights stay fp32


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    save_checkpoint({"step": 1}, tmp_path, 1)

    def full(*args):
        raise OSError("disk full")

    monkeypatch.setattr("thruput.atomic.os.replace", full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]  # no temporary left behind
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 1


def _global_mean_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from thruput.comm import GradientBuckets
    from thruput.train import backward_global_mean

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 5)
        x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(1))
        labels = torch.randint(0, 5, (2, 12), generator=torch.Generator().manual_seed(2))
        labels[0, 3:] = -100  # rank 0 holds 3 labelled tokens, rank 1 all 12
        comm = GradientBuckets(model.parameters(), op="all_reduce")
        loss = F.cross_entropy(model(x[rank]), labels[rank], ignore_index=-100)
        assert backward_global_mean(loss, int((labels[rank] != -100).sum()), 2, torch.device("cpu")) == 15
        comm.finish()
        reference = torch.nn.Linear(8, 5)
        reference.load_state_dict(model.state_dict())
        F.cross_entropy(reference(x.flatten(0, 1)), labels.flatten(), ignore_index=-100).backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_data_parallel_gradients_are_those_of_the_global_token_mean(tmp_path) -> None:
    """Two ranks with 3 and 12 labelled tokens step like one rank on the mean over all 15 (a mean
    of the two per-rank means would weight rank 0's tokens 4x)."""
    import torch.multiprocessing as mp

    mp.spawn(_global_mean_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_loss_and_lr_of_every_step_reach_the_run_document_and_the_hook(tmp_path) -> None:
    seen = []
    result = train(_cfg(tmp_path, **{"checkpoint.every": 0}), on_step=seen.append)
    scalars = [s["scalars"] for s in result.document["steps"]]
    assert [s["loss"] for s in scalars] == result.losses  # the same floats
    # Linear warm-up over 2 steps to 1e-3, then cosine to 10% at step 6: the rate each step used.
    lrs = [1e-3 * (i + 1) / 2 if i < 2 else 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * (i - 2) / 4)))
           for i in range(6)]
    assert [s["lr"] for s in scalars] == pytest.approx(lrs, rel=1e-12)
    expected = [(n + 1, 6, loss, 0) for n, loss in enumerate(result.losses)]
    assert [(i.step, i.steps, i.loss, i.rank) for i in seen] == expected
    assert [i.lr for i in seen] == [s["lr"] for s in scalars]
    assert all(i.tokens == 2 * 32 and i.seconds > 0 for i in seen)


def test_unloadable_newest_checkpoint_resumes_from_the_previous_one_bitwise(tmp_path) -> None:
    """The final checkpoint of a run gets torn, emptied or overwritten with noise: --resume
    continues from step 3 to the same floats, and keeps the bad file rather than writing over it."""
    full = train(_cfg(tmp_path / "full"))  # checkpoints at steps 3 and 6
    good3, good6 = (tmp_path / "full" / "ckpt" / f"step_0000000{n}.pt" for n in (3, 6))
    for kind, data in {"truncated": good6.read_bytes()[: good6.stat().st_size * 2 // 3], "empty": b"",
                       "random": os.urandom(good6.stat().st_size)}.items():
        ckpt = tmp_path / kind / "ckpt"
        ckpt.mkdir(parents=True)
        (ckpt / good3.name).write_bytes(good3.read_bytes())
        (ckpt / good6.name).write_bytes(data)
        with pytest.warns(CheckpointWarning, match=r"step_00000006.pt does not load \((truncated|empty|corrupt).*\); "
                                                   r"resuming from step_00000003.pt, the newest that does \(the file "
                                                   r"is kept as step_00000006.pt.unloadable\)"):
            resumed = train(_cfg(tmp_path / kind, **{"checkpoint.keep": 1}), resume=True)
        assert resumed.start_step == 3 and resumed.skipped_checkpoints == [ckpt / good6.name], kind
        assert resumed.losses == full.losses, kind  # bitwise: steps 4-6 replayed to the same floats
        assert [s["scalars"]["loss"] for s in resumed.document["steps"]] == full.losses
        ours, theirs = resumed.model.state_dict(), full.model.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), kind
        assert (ckpt / "step_00000006.pt.unloadable").read_bytes() == data  # kept, byte for byte
        assert [p.name for p in list_checkpoints(ckpt)] == ["step_00000006.pt"]  # the new one; keep = 1
        assert load_checkpoint(ckpt / "step_00000006.pt")["losses"] == full.losses


def test_checkpoint_of_another_run_is_refused_naming_the_key(tmp_path) -> None:
    train(_cfg(tmp_path, steps=3))
    with pytest.raises(CheckpointError, match=r"step_00000003.pt does not fit this run: model.d_model is 32 in the "
                                              r"checkpoint, 64 in this run$"):
        train(_cfg(tmp_path, steps=6, **{"model.d_model": 64}), resume=True)
    code = {"name": "code", "kind": "stdlib_code", "options": {"max_files": 20}}
    with pytest.raises(CheckpointError, match=r"data.sources is \['code', 'prose'\] in the checkpoint, \['code'\]"):
        train(_cfg(tmp_path, steps=6, **{"data.sources": [code]}), resume=True)
    # A checkpoint without the config (written elsewhere, or before it was saved) is checked tensor by tensor.
    path = latest_checkpoint(tmp_path / "ckpt")
    state = load_checkpoint(path)
    del state["config"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"model.embed.weight has shape \(256, 32\) in the checkpoint, "
                                              r"\(256, 64\) in this run$"):
        train(_cfg(tmp_path, steps=6, **{"model.d_model": 64}), resume=True)
    with pytest.raises(ConfigError, match="checkpoint.dir: --resume needs"):
        train(_cfg(tmp_path, **{"checkpoint.dir": None, "checkpoint.every": 0}), resume=True)


def test_fused_loss_fallback_is_in_the_run_document(tmp_path, monkeypatch) -> None:
    import sys

    from thruput.kernels import _ce_auto

    # A CUDA-like device without triton: the fused loss falls back to its torch rows.
    monkeypatch.setattr(_ce_auto, "_fallbacks", {})
    monkeypatch.setattr(_ce_auto, "_device_type", lambda tensor: "cuda")
    monkeypatch.setitem(sys.modules, "thruput.kernels._triton_ce", None)
    cfg = _cfg(tmp_path, steps=2, **{"checkpoint.every": 0, "kernels.fused_cross_entropy": True})
    with pytest.warns(RuntimeWarning, match="triton"):
        result = train(cfg)
    reason = result.document["meta"]["kernel_fallbacks"]["linear_cross_entropy"]
    assert "pip install 'thruput[triton]'" in reason
    plain = train(_cfg(tmp_path / "plain", steps=2, **{"checkpoint.every": 0}))
    assert plain.document["meta"]["kernel_fallbacks"] == {}


@dataclasses.dataclass
class BigramConfig:
    """The [model] table of a model kind registered by this test: a bigram table."""

    vocab_size: int = 256
    kind: str = "bigram"

    def check(self, run) -> None:
        pass


class Bigram:
    """A TrainModel the loop has never heard of."""

    def __init__(self, vocab: int) -> None:
        self.module = torch.nn.Embedding(vocab, vocab)

    def loss(self, batch):
        logits = self.module(batch["input_ids"]).flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, batch["shift_labels"].flatten(), ignore_index=-100)

    def flops(self, batch):
        return 0.0

    def num_params(self):
        return self.module.weight.numel()

    def counters(self):
        return {}

    def fallbacks(self):
        return {}

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), directory / "bigram.pt")


def build(cfg, device):
    return Bigram(cfg.model.vocab_size)


def vocab_size(model_cfg):
    return "model.vocab_size", model_cfg.vocab_size


def transformer_shape(model_cfg):
    return {"d_model": model_cfg.vocab_size, "n_layers": 0, "vocab_size": model_cfg.vocab_size}  # a head only


def tokenizer(model_cfg):
    return None


def test_a_registered_model_kind_trains_resumes_and_exports_through_the_same_loop(tmp_path, monkeypatch) -> None:
    import sys

    from thruput.models import kinds

    monkeypatch.setattr(kinds, "_KINDS", dict(kinds._KINDS))
    kinds.register_model_kind("bigram", BigramConfig, __name__)
    assert sys.modules[__name__].build is build

    def cfg(path):
        return _cfg(path, **{"model": {"kind": "bigram", "vocab_size": 256}, "checkpoint.save_model": True,
                             "checkpoint.keep": 1})

    full = train(cfg(tmp_path / "a"))
    first = train(cfg(tmp_path / "b"), stop_after=4)
    resumed = train(cfg(tmp_path / "b"), resume=True)
    assert resumed.start_step == 4 and resumed.losses == full.losses and full.losses[-1] < full.losses[0]
    assert isinstance(first.model, torch.nn.Embedding)
    # The kind's own format beside each checkpoint; rotation (keep = 1) removes the older ones.
    ckpt = tmp_path / "b" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000006.model", "step_00000006.pt"]
    exported = torch.load(ckpt / "step_00000006.model" / "bigram.pt")
    assert torch.equal(exported["weight"], full.model.weight)


def test_cache_dir_is_where_generated_corpora_go(tmp_path) -> None:
    sources = [{"name": "docs", "kind": "stdlib_docstrings", "options": {"max_files": 5}}]
    train(_cfg(tmp_path, steps=1, cache_dir=str(tmp_path / "cache"), **{"data.sources": sources,
                                                                        "checkpoint.every": 0}))
    assert list((tmp_path / "cache" / "corpus").glob("stdlib-*/docstrings.jsonl"))


def test_gpt_model_export_loads_into_a_gpt(tmp_path) -> None:
    import json

    from thruput.models import GPT, GPTConfig

    result = train(_cfg(tmp_path, steps=3, **{"checkpoint.save_model": True}))
    folder = tmp_path / "ckpt" / "step_00000003.model"
    model = GPT(GPTConfig(**json.loads((folder / "config.json").read_text())))
    model.load_state_dict(torch.load(folder / "model.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))
