"""OffloadAdamW against torch.optim.AdamW on the small GPT: parity, accumulation, clipping,
state dicts both ways, delayed update, loss scaling, frozen parameters, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thruput.memory import HostGrad, OffloadAdamW
from thruput.memory import offload as offload_mod
from thruput.models import GPT, GPTConfig

VOCAB, SEQ = 64, 16
# The pure-torch kernel: these tests check the offload machinery bit for bit; the C++ kernel's
# own parity with torch is tested in test_memory_adam.py.
IMPL = "torch"


def _gpt(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ)).to(dtype)


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def _batch(step: int, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)


def _pattern_batch(step: int, rows: int = 8) -> torch.Tensor:
    """Learnable rows: each is an arithmetic sequence mod VOCAB with a random start and stride."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    stride = torch.randint(1, 4, (rows, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def _max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
               for x, y in zip(a.parameters(), b.parameters()))


def _schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / 200))


def test_fp32_parity_with_torch_adamw_over_100_steps_with_groups_and_scheduler():
    """Both optimizers get the reference model's gradients every step, so the comparison is of
    the optimizers alone: fed back through their own models, last-bit differences in the
    update grow chaotically on this noise-fitting task (about 10x per 25 steps)."""
    ref, model = _gpt(), _gpt()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = OffloadAdamW(_groups(model), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, bucket_mb=0.02, impl=IMPL)
    assert len(opt.segments) > 2  # several buckets per group
    scheds = [_schedule(ref_opt), _schedule(opt)]
    for step in range(100):
        _loss(ref, _batch(step)).backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            p.grad = q.grad.clone()  # picked up by step() like a hook-delivered gradient
        for o, s in zip((ref_opt, opt), scheds):
            o.step()
            o.zero_grad()
            s.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] != 3e-3
    assert _max_rel_diff(model, ref) <= 1e-5
    assert set(opt.last_timings) == {"d2h", "cpu_step", "h2d"}
    assert all(v >= 0 for v in opt.last_timings.values())


def test_gradients_stream_through_hooks_and_training_tracks_torch():
    ref, model = _gpt(), _gpt()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=3e-3)
    opt = OffloadAdamW(_groups(model), lr=3e-3, bucket_mb=0.02, impl=IMPL)
    for step in range(20):
        for m, o in ((ref, ref_opt), (model, opt)):
            _loss(m, _batch(step)).backward()
            if o is opt:
                # gradients left the device: p.grad stands for the host buffer
                assert all(isinstance(p.grad, HostGrad) for p in model.parameters())
            o.step()
            o.zero_grad()
    assert _max_rel_diff(model, ref) <= 1e-5


def _final_loss(state_dtype: str, _cache: dict[str, float] = {}) -> float:  # noqa: B006 - a memo
    """Mean loss of the last 10 of 100 steps on learnable rows; asserts that it learned."""
    if state_dtype not in _cache:
        model = _gpt(seed=1)
        opt = OffloadAdamW(_groups(model), lr=1e-2, betas=(0.9, 0.95), state_dtype=state_dtype, impl=IMPL)
        losses = []
        for step in range(100):
            loss = _loss(model, _pattern_batch(step))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
        _cache[state_dtype] = sum(losses[-10:]) / 10
    return _cache[state_dtype]


@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_low_precision_states_converge_within_2_percent_of_fp32(state_dtype):
    fp32, low = _final_loss("fp32"), _final_loss(state_dtype)
    assert abs(low - fp32) <= 0.02 * fp32


def test_gradient_accumulation_and_clipping_equal_reference():
    ref, model = _gpt(), _gpt()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    opt = OffloadAdamW(_groups(model), lr=1e-2, bucket_mb=0.05, impl=IMPL)
    for step in range(8):
        for micro in range(3):
            batch = _batch(10 * step + micro)
            (_loss(ref, batch) / 3).backward()
            (_loss(model, batch) / 3).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        norm = opt.clip_grad_norm_(0.5)
        assert ref_norm > 0.5  # clipping is active
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
    assert _max_rel_diff(model, ref) <= 1e-5


def test_accumulation_across_steps_without_zero_grad_matches_torch():
    """torch keeps adding into .grad when zero_grad is not called; so does the host buffer."""
    ref, model = _gpt(), _gpt()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, impl=IMPL)
    for step in range(3):
        for m, o in ((ref, ref_opt), (model, opt)):
            _loss(m, _batch(step)).backward()
            o.step()
    assert _max_rel_diff(model, ref) <= 1e-5


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        _loss(model, _batch(step)).backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_offload_to_torch_and_back():
    a = _gpt()
    opt_a = OffloadAdamW(_groups(a), lr=1e-2, impl=IMPL)
    _train(a, opt_a, range(5))
    sd = opt_a.state_dict()
    assert sd["state"][0]["exp_avg"].shape == next(a.parameters()).shape
    assert float(sd["state"][0]["step"]) == 5.0

    # offload -> torch AdamW (a run without offload)
    b = copy.deepcopy(a)
    opt_b = torch.optim.AdamW(_groups(b), lr=1e-2)
    opt_b.load_state_dict(sd)
    _train(a, opt_a, range(5, 10))
    _train(b, opt_b, range(5, 10))
    assert _max_rel_diff(a, b) <= 1e-5

    # torch AdamW -> offload
    c = copy.deepcopy(b)
    opt_c = OffloadAdamW(_groups(c), lr=1.0, impl=IMPL)
    opt_c.load_state_dict(opt_b.state_dict())
    assert opt_c.param_groups[0]["lr"] == 1e-2
    _train(b, opt_b, range(10, 15))
    _train(c, opt_c, range(10, 15))
    assert _max_rel_diff(c, b) <= 1e-5


def test_bf16_state_dict_carries_the_fp32_master():
    model = _gpt(dtype=torch.bfloat16)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, impl=IMPL)
    _train(model, opt, range(3))
    sd = opt.state_dict()
    master = sd["state"][0]["master"]
    assert master.dtype == torch.float32 and not torch.equal(master, master.bfloat16().float())
    clone = copy.deepcopy(model)
    opt2 = OffloadAdamW(clone.parameters(), lr=1e-2, impl=IMPL)
    opt2.load_state_dict(sd)
    _train(model, opt, range(3, 6))
    _train(clone, opt2, range(3, 6))
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), clone.parameters()))


def test_delayed_update_equals_reference_lagged_one_step():
    n_sync, steps = 3, 10
    model = _gpt()
    opt = OffloadAdamW(model.parameters(), lr=1e-2, delayed_update_after=n_sync, impl=IMPL)
    master = _gpt()  # the reference: the synchronous update (same kernel) on the master weights
    ref_opt = OffloadAdamW(master.parameters(), lr=1e-2, impl=IMPL)
    probe = _gpt()   # where the reference computes gradients
    masters = [copy.deepcopy(master.state_dict())]  # masters[j]: after j updates
    for k in range(steps):
        # forward at step k sees update k (synchronous) or k-1 (one step stale)
        probe.load_state_dict(masters[k] if k <= n_sync else masters[k - 1])
        assert all(torch.equal(x, y) for x, y in zip(model.parameters(), probe.parameters())), k
        batch = _batch(k)
        loss, ref_loss = _loss(model, batch), _loss(probe, batch)
        assert loss.item() == ref_loss.item()
        loss.backward()
        ref_loss.backward()
        for p, q in zip(master.parameters(), probe.parameters()):
            p.grad = q.grad
        probe.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
        masters.append(copy.deepcopy(master.state_dict()))
        opt.step()
        opt.zero_grad()
    opt.flush()
    assert _max_rel_diff(model, master) == 0.0


def test_delayed_update_uses_the_hyperparameters_of_its_step(monkeypatch):
    """train.py runs scheduler.step() right after step(): the background update must not pick
    up the next step's learning rate (for some segments or all)."""
    import threading

    seen, go = [], threading.Event()
    step_fn = offload_mod.adamw_step

    def slow_step(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            assert go.wait(10)
        seen.append(kwargs["lr"])
        return step_fn(*args, **kwargs)

    monkeypatch.setattr(offload_mod, "adamw_step", slow_step)
    model = _gpt()
    opt = OffloadAdamW(model.parameters(), lr=1e-2, bucket_mb=0.01, delayed_update_after=0, impl=IMPL)
    assert len(opt.segments) >= 2
    _loss(model, _batch(0)).backward()
    opt.step()
    opt.zero_grad()
    opt.param_groups[0]["lr"] = 5e-3  # what a scheduler does now
    go.set()
    opt.flush()
    assert seen == [1e-2] * len(opt.segments)


def test_step_without_copy_back_then_copy_back_equals_step():
    ref, model = _gpt(), _gpt()
    ref_opt = OffloadAdamW(ref.parameters(), lr=1e-2, impl=IMPL)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, impl=IMPL)
    for step in range(3):
        _train(ref, ref_opt, range(step, step + 1))
        _loss(model, _batch(step)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(copy_back=False)
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert opt.copy_back() >= 0
        opt.zero_grad()
    assert _max_rel_diff(model, ref) == 0.0


def test_frozen_parameters_are_left_alone():
    ref, model = _gpt(), _gpt()
    for m in (ref, model):
        m.embed.weight.requires_grad_(False)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    opt = OffloadAdamW(_groups(model), lr=1e-2, impl=IMPL)
    frozen = model.embed.weight.detach().clone()
    _train(ref, ref_opt, range(4))
    _train(model, opt, range(4))
    assert torch.equal(model.embed.weight, frozen)
    assert _max_rel_diff(model, ref) <= 1e-5
    assert opt.host_bytes() == 16 * (sum(p.numel() for p in model.parameters()) - frozen.numel())


def test_fp16_dynamic_loss_scale_skips_overflow_and_unscales():
    torch.manual_seed(0)
    model = nn.Linear(8, 4).half()
    ref = nn.Linear(8, 4)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    opt = OffloadAdamW(model.parameters(), lr=1e-2, loss_scale="dynamic", growth_interval=2, impl=IMPL)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    assert opt.loss_scale == 2.0**16
    x = torch.randn(16, 8)
    # fp16 gradients overflow at this scale: the step is skipped and the scale halves
    before = [p.detach().clone() for p in model.parameters()]
    (model(x.half()).float().pow(2).sum() * 1e6 * opt.loss_scale).backward()
    opt.step()
    opt.zero_grad()
    assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.loss_scale == 2.0**15
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # a good step divides the scaled gradients by the scale before the update
    scale = 2.0**6
    opt._scaler.value = scale
    opt.scale_loss(model(x.half()).float().pow(2).mean()).backward()
    ref.bias.grad = opt.segments[0].grad[:4].clone() / scale
    ref.weight.grad = opt.segments[0].grad[4:].view(4, 8).clone() / scale
    opt.step()
    ref_opt.step()
    assert not opt.last_step_skipped
    torch.testing.assert_close(model.weight.float(), ref.weight.half().float(), rtol=0, atol=0)
    opt.zero_grad()
    (model(x.half()).float().pow(2).mean() * opt.loss_scale).backward()
    opt.step()  # the second good step in a row doubles the scale (growth_interval=2)
    assert opt.loss_scale == 2 * scale


def test_bad_inputs_give_clear_errors(monkeypatch):
    with pytest.raises(TypeError, match="float64"):
        OffloadAdamW(nn.Linear(2, 2).double().parameters())
    mixed = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))]
    with pytest.raises(ValueError, match="several devices"):
        OffloadAdamW(mixed)
    with pytest.raises(ValueError, match="state_dtype"):
        OffloadAdamW(nn.Linear(2, 2).parameters(), state_dtype="fp8")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        OffloadAdamW(frozen.parameters())
    monkeypatch.setattr(offload_mod, "_available_host_bytes", lambda: 1000)
    allocated = []
    monkeypatch.setattr(offload_mod.OffloadAdamW, "_allocate", lambda self, seg: allocated.append(seg))
    with pytest.raises(MemoryError, match=r"needs 0\.00 GiB of host memory .* only 0\.00 GiB"):
        OffloadAdamW(nn.Linear(64, 64).parameters())
    assert not allocated  # checked before allocating


def test_kernel_names_the_implementation_that_runs(monkeypatch):
    params = nn.Linear(4, 4).parameters
    assert OffloadAdamW(params(), impl="torch").kernel == "torch"
    monkeypatch.setattr(offload_mod, "kernel_available", lambda: False)  # no compiler: the fallback
    assert OffloadAdamW(params()).kernel == "torch"
    monkeypatch.setattr(offload_mod, "kernel_available", lambda: True)
    assert OffloadAdamW(params()).kernel == "cpp"
