"""thruput inside transformers' Trainer: OffloadAdamW with Trainer's clipping, accumulation and
scheduler; the Loader as training data resumed exactly from Trainer checkpoints; ThruputCallback."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
import transformers as tf  # noqa: E402

from _integ import ROWS, SEQ, RecordingLoader, max_abs_diff, plan, tiny_llama  # noqa: E402
from thruput.hf import ThruputCallback, ThruputTrainer  # noqa: E402
from thruput.memory import OffloadAdamW  # noqa: E402

MAX_NORM = 0.1  # the tiny model's gradient norms are ~2: every step clips
GA = 2


def _args(out, **overrides) -> tf.TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=ROWS, gradient_accumulation_steps=GA,
                  max_grad_norm=MAX_NORM, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1,
                  use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_steps=1,
                  seed=0)
    kwargs.update(overrides)
    return tf.TrainingArguments(**kwargs)


def _train(model, args, optimizer=(torch.optim.AdamW, {"lr": 1e-2, "fused": True}), callbacks=None,
           resume=None, loader=None):
    loader = RecordingLoader(plan()) if loader is None else loader
    trainer = ThruputTrainer(model=model, args=args, train_loader=loader, optimizer_cls_and_kwargs=optimizer,
                             callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, loader


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_offload_adamw_in_trainer_with_clipping_accumulation_and_scheduler_matches_torch_adamw(tmp_path, device):
    """Trainer's max_grad_norm (clipping every step), gradient accumulation and linear schedule:
    the same parameters as with torch's fused AdamW: bitwise on CPU (the torch-kernel CPU Adam
    computes fused AdamW's fp32 math in its order), within 1e-6 on CUDA (fused CUDA AdamW
    rounds apart). On CUDA the gradients go to host buckets during backward and the
    parameters come back after the CPU step."""
    tolerance = 0.0 if device == "cpu" else 1e-6
    base = tiny_llama()
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    use_cpu = device == "cpu"
    ref_trainer, _ = _train(ref, _args(tmp_path / "ref", use_cpu=use_cpu))
    trainer, _ = _train(ours, _args(tmp_path / "ours", use_cpu=use_cpu),
                        optimizer=(OffloadAdamW, {"lr": 1e-2, "impl": "torch"}))
    assert next(ours.parameters()).device.type == device
    assert isinstance(trainer.optimizer.optimizer, OffloadAdamW)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    ref_norms = [h["grad_norm"] for h in ref_trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 4 and min(norms) > 10 * MAX_NORM  # clipping really happened
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert max_abs_diff(ours, ref) <= tolerance
    assert max_abs_diff(ours, base) > 1e-3  # it trained
    # Built by the caller and passed as optimizers=(opt, None): the same (one group instead of
    # Trainer's two; weight decay 0 like Trainer's default).
    built = copy.deepcopy(base).to(device)  # OffloadAdamW binds to the device the parameters are on
    trainer = ThruputTrainer(model=built, args=_args(tmp_path / "built", use_cpu=use_cpu),
                             train_loader=RecordingLoader(plan()),
                             optimizers=(OffloadAdamW(built.parameters(), lr=1e-2, weight_decay=0.0, impl="torch"),
                                         None))
    trainer.train()
    assert max_abs_diff(built, ref) <= tolerance
    # Without clipping the result is another one: the comparison above sees clipping.
    unclipped = copy.deepcopy(base)
    _train(unclipped, _args(tmp_path / "unclipped", max_grad_norm=0.0, use_cpu=use_cpu),
           optimizer=(OffloadAdamW, {"lr": 1e-2, "impl": "torch"}))
    assert max_abs_diff(unclipped, ref) > 1e-4


@pytest.mark.parametrize("optimizer", ["torch", "offload"])
def test_trainer_resumed_mid_run_sees_the_uninterrupted_batches_and_ends_bitwise_equal(tmp_path, optimizer):
    """Stopped after update 3 of 6 (a checkpoint there), resumed from it in a new Trainer with a
    new Loader: the batches (documents) seen equal an uninterrupted run's, none repeated or lost
    (Trainer's own skip of the first batches would drop 6 more), and the weights end bitwise
    equal."""
    opt = (torch.optim.AdamW, {"lr": 1e-2, "fused": True}) if optimizer == "torch" else \
        (OffloadAdamW, {"lr": 1e-2, "impl": "torch"})
    base = tiny_llama()
    full = copy.deepcopy(base)
    _, full_loader = _train(full, _args(tmp_path / "full", max_steps=6), optimizer=opt)

    class StopAt3(tf.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    out = tmp_path / "run"
    first = copy.deepcopy(base)
    _, first_loader = _train(first, _args(out, max_steps=6, save_strategy="steps", save_steps=3), optimizer=opt,
                             callbacks=[StopAt3()])
    assert len(first_loader.seen) == 3 * GA
    assert json.loads((out / "checkpoint-3" / "thruput_loader.json").read_text())["step"] == 3 * GA
    resumed = tiny_llama(seed=1)  # other weights: the checkpoint's must be loaded
    _, second_loader = _train(resumed, _args(out, max_steps=6), optimizer=opt, resume=str(out / "checkpoint-3"))
    assert first_loader.seen + second_loader.seen == full_loader.seen
    assert len(set(full_loader.seen)) == len(full_loader.seen) == 6 * GA
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), full.parameters()))


def test_patched_and_unpatched_models_train_alike_on_the_loader(tmp_path):
    """ThruputTrainer hands the model transformers' keys (hf_batch): a patched model (fused loss,
    per-document attention) and the unpatched one log the same losses. Tolerance 1e-4 relative
    (the fused loss sums in another order; 4 steps of training amplify it)."""
    from thruput.hf import patch

    base = tiny_llama()
    losses = []
    for model in (copy.deepcopy(base), patch(copy.deepcopy(base))):
        trainer, _ = _train(model, _args(tmp_path / str(len(losses))))
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_resume_from_a_checkpoint_without_loader_state_is_refused(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match="no thruput Loader state"):
        _train(tiny_llama(), _args(tmp_path), resume=str(tmp_path / "checkpoint-2"))


def test_loader_of_another_rank_or_a_train_dataset_beside_it_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rank is 1 but the Trainer's is 0"):
        ThruputTrainer(model=tiny_llama(), args=_args(tmp_path), train_loader=RecordingLoader(plan(), 1, 2))
    with pytest.raises(ValueError, match="dataloader_num_workers=2 does not apply to a thruput Loader"):
        ThruputTrainer(model=tiny_llama(), args=_args(tmp_path, dataloader_num_workers=2),
                       train_loader=RecordingLoader(plan()))
    with pytest.raises(ValueError, match="not both"):
        ThruputTrainer(model=tiny_llama(), args=_args(tmp_path), train_loader=RecordingLoader(plan()),
                       train_dataset=[1, 2])


def test_thruput_callback_reports_every_update_with_its_tokens_and_phases(tmp_path):
    """One profiler step per optimizer update (4 updates of 2 micro-batches); tokens counted from
    the Loader's batches; phases (with ``other``, the uncovered rest) sum to the step time within
    1e-9 s; MFU from transformers' 6*N FLOPs per token; JSON and HTML in output_dir."""
    callback = ThruputCallback(peak_flops=1e12)
    model = tiny_llama()
    _train(model, _args(tmp_path), callbacks=[callback])
    doc = json.loads((tmp_path / "trainer.json").read_text())
    assert (tmp_path / "trainer.html").read_text().startswith("<!doctype html>")
    assert doc["meta"]["tool"] == "thruput.hf.ThruputCallback"
    steps = doc["steps"]
    assert len(steps) == 4
    for step in steps:
        assert step["tokens"] == GA * ROWS * SEQ
        assert abs(sum(step["phases"].values()) - step["time_s"]) < 1e-9
        assert min(step["phases"][p] for p in ("forward", "backward", "optimizer")) > 0
        assert step["flops"] == pytest.approx(6 * model.num_parameters(exclude_embeddings=True) * step["tokens"])
    # Trainer fetches an update's batches before its first forward, where step 0 begins.
    assert steps[0]["phases"]["data_wait"] == 0 and min(s["phases"]["data_wait"] for s in steps[1:]) > 0
    assert doc["summary"]["mfu"] is not None and doc["verdict"]
    # on_train_end removed the hooks.
    assert callback._session is None



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_adamw_refuses_parameters_moved_after_it_was_built():
    """Trainer moves the model of ``optimizers=(opt, None)`` to its device after ``opt`` was
    built; OffloadAdamW's host state belongs to the old device, so it refuses (torch's AdamW
    builds its state lazily and does not care)."""
    model = tiny_llama()
    opt = OffloadAdamW(model.parameters(), impl="torch")
    model.to("cuda")  # the same Parameter objects, their data moved
    with pytest.raises(RuntimeError, match="moved from cpu to cuda:0 after the optimizer was built"):
        opt.step()


def test_one_loader_state_serves_every_rank():
    """ThruputTrainer (and Lightning) save the main process's Loader state and every rank loads
    it: the state after a step is the same on each rank (it is the global stream's position)."""
    loaders = [RecordingLoader(plan(), rank, 2) for rank in (0, 1)]
    for loader in loaders:
        for _ in range(3):
            next(loader)
    assert loaders[0].state_dict() == loaders[1].state_dict()
    assert loaders[0].seen != loaders[1].seen  # each rank its own rows
