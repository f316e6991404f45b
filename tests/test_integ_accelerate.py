"""thruput in an accelerate loop: OffloadAdamW through accelerator.prepare with accelerate's
accumulation and clip_grad_norm_, and the Loader resumed exactly through save_state/load_state."""
from __future__ import annotations

import copy

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from _integ import max_abs_diff, plan, tiny_llama  # noqa: E402
from thruput.accelerate import prepare_loader  # noqa: E402
from thruput.hf import hf_batch  # noqa: E402
from thruput.memory import OffloadAdamW  # noqa: E402

GA = 2
MAX_NORM = 0.1  # the tiny model's gradient norms are ~2: every update clips
STEPS = 4


def _make(model, offload: bool):
    if offload:
        opt = OffloadAdamW(model.parameters(), lr=1e-2, impl="torch")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=GA)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched


def _train(accelerator, model, opt, sched, loader, updates):
    """accelerate's documented loop: accumulate, backward, clip when syncing, step, zero.
    Returns the gradient norms and the sample ids (``documents``) of the batches trained."""
    norms, seen = [], []
    batches = iter(loader)
    for _ in range(updates * GA):
        batch = next(batches)
        seen.append(tuple(batch["documents"]))
        with accelerator.accumulate(model):
            loss = model(**hf_batch(batch)).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)))
            opt.step()
            sched.step()
            opt.zero_grad()
    return norms, seen


def test_offload_adamw_prepared_by_accelerate_clips_and_accumulates_like_torch_adamw():
    """Bitwise the weights of torch's fused AdamW (the torch-kernel CPU Adam computes its fp32
    math in its order); the norms accelerate returns within 1e-5 (summed per tensor)."""
    base = tiny_llama()
    results = {}
    for offload in (False, True):
        model = copy.deepcopy(base)
        accelerator, prepared, opt, sched = _make(model, offload)
        assert prepared is model  # one CPU process: the model is not wrapped
        loader = prepare_loader(accelerator, plan(), backend="inline")
        norms, _ = _train(accelerator, prepared, opt, sched, loader, STEPS)
        results[offload] = (model, norms)
        accelerator.free_memory()
    (ref, ref_norms), (ours, norms) = results[False], results[True]
    assert len(norms) == STEPS and min(norms) > 10 * MAX_NORM
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert max_abs_diff(ours, ref) == 0.0 and max_abs_diff(ours, base) > 1e-3


@pytest.mark.parametrize("offload", [False, True], ids=["torch", "offload"])
def test_accelerate_run_resumed_from_save_state_sees_the_uninterrupted_batches(tmp_path, offload):
    base = tiny_llama()
    full = copy.deepcopy(base)
    run = _make(full, offload)
    _, full_seen = _train(*run, prepare_loader(run[0], plan(), backend="inline"), 6)
    run[0].free_memory()

    first = copy.deepcopy(base)
    accelerator, *rest = _make(first, offload)
    _, first_seen = _train(accelerator, *rest, prepare_loader(accelerator, plan(), backend="inline"), 3)
    accelerator.save_state(str(tmp_path / "state"))
    accelerator.free_memory()

    resumed = tiny_llama(seed=1)  # other weights: load_state must bring the saved ones
    accelerator, *rest = _make(resumed, offload)
    second_loader = prepare_loader(accelerator, plan(), backend="inline")
    accelerator.load_state(str(tmp_path / "state"))
    assert second_loader.state_dict()["step"] == 3 * GA
    _, second_seen = _train(accelerator, *rest, second_loader, 3)
    assert first_seen + second_seen == full_seen  # none repeated, none lost
    assert len(set(full_seen)) == 6 * GA
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), full.parameters()))


def test_prepare_loader_takes_rank_and_device_from_the_accelerator():
    accelerator = accelerate.Accelerator(cpu=True)
    with pytest.raises(TypeError, match="rank comes from the accelerator"):
        prepare_loader(accelerator, plan(), rank=1, backend="inline")
    loader = prepare_loader(accelerator, plan(), backend="inline")
    assert (loader.rank, loader.world_size, loader.device) == (0, 1, accelerator.device)
    assert accelerator.prepare(loader) is loader  # accelerate passes an unknown iterable through
    assert loader in accelerator._custom_objects
