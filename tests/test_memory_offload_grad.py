"""OffloadAdamW as a drop-in for torch.optim.AdamW in loops that use ``p.grad``: zeroing through
the model, accumulation, torch's clip_grad_norm_, GradScaler, any op on p.grad, the delayed
update, parameters without a gradient, torch.compile.

The reference is torch.optim.AdamW(fused=True), which the fp32 kernel matches bit for bit; on
CPU both models compute the same gradients from the same weights, so whole runs must agree bit
for bit (tolerances are stated where an operation is computed differently)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from test_memory_offload import IMPL, _batch, _gpt, _loss
from thruput.memory import HostGrad, OffloadAdamW

STEPS = 20


def _pair(lr: float = 1e-2, **kwargs):
    ref, model = _gpt(), _gpt()
    return (ref, torch.optim.AdamW(ref.parameters(), lr=lr, fused=True),
            model, OffloadAdamW(model.parameters(), lr=lr, impl=IMPL, **kwargs))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def _grads_equal(a: nn.Module, b: nn.Module) -> bool:
    return all((x.grad is None) == (y.grad is None) and (x.grad is None or torch.equal(x.grad.clone(), y.grad))
               for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("zeroing", ["model", "model_keep", "opt_keep", "never"])
def test_accumulation_windows_and_every_way_of_zeroing_match_torch_bitwise(zeroing):
    """nanoGPT's loop (two micro-steps per step) with the gradients zeroed by
    ``model.zero_grad()`` (what HF Trainer calls), ``model.zero_grad(set_to_none=False)``,
    ``opt.zero_grad(set_to_none=False)``, or never (they keep adding up, as torch's do)."""
    ref, ref_opt, model, opt = _pair(lr=1e-3 if zeroing == "never" else 1e-2)
    for step in range(STEPS):
        for m, o in ((ref, ref_opt), (model, opt)):
            for micro in range(2):
                (_loss(m, _batch(2 * step + micro)) / 2).backward()
            o.step()
            if zeroing == "model":
                m.zero_grad()
            elif zeroing == "model_keep":
                m.zero_grad(set_to_none=False)
            elif zeroing == "opt_keep":
                o.zero_grad(set_to_none=False)
        assert _grads_equal(model, ref), step
    assert _same(model, ref)


@pytest.mark.parametrize("max_norm", [0.3, 1e3], ids=["clipping", "not_clipping"])
def test_torch_clip_grad_norm_returns_the_true_norm_and_clips(max_norm):
    ref, ref_opt, model, opt = _pair()
    for step in range(STEPS):
        norms = []
        for m, o in ((ref, ref_opt), (model, opt)):
            for micro in range(2):
                (_loss(m, _batch(2 * step + micro)) / 2).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm))
            o.step()
            m.zero_grad()
        assert torch.equal(norms[0], norms[1]), step
        assert (norms[0] > max_norm) == (max_norm < 1)
    assert _same(model, ref)


def test_accelerate_clip_grad_norm_works_on_host_gradients():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    ref, ref_opt, model, opt = _pair()
    for step in range(3):
        for m, o in ((ref, ref_opt), (model, opt)):
            _loss(m, _batch(step)).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
        norm = accelerator.clip_grad_norm_(model.parameters(), 0.3)
        assert torch.equal(norm, ref_norm) and norm > 0.3
        for m, o in ((ref, ref_opt), (model, opt)):
            o.step()
            m.zero_grad()
    assert _same(model, ref)


def test_grad_scaler_unscales_clips_and_skips_the_inf_step_like_torch():
    ref, ref_opt, model, opt = _pair()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3) for _ in range(2)]
    for step in range(10):
        for (m, o), scaler in zip(((ref, ref_opt), (model, opt)), scalers):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = _loss(m, _batch(step))
            if step == 4:
                loss = loss * float("inf")  # every gradient non-finite: the step must be skipped
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            assert torch.isfinite(norm) != (step == 4)
            scaler.step(o)
            scaler.update()
            m.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert _same(model, ref), step
    assert scalers[1].get_scale() == 2.0**11  # doubled after steps 2 and 7, halved at the inf step
    steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
    assert steps == {float(s["step"]) for s in ref_opt.state_dict()["state"].values()} == {9.0}


def test_any_op_on_p_grad_gives_torch_values_and_writes_reach_the_update():
    ref, ref_opt, model, opt = _pair()
    for m in (ref, model):
        _loss(m, _batch(0)).backward()
    pairs = list(zip(model.parameters(), ref.parameters()))
    p, q = pairs[0]
    assert isinstance(p.grad, HostGrad) and p.grad.shape == q.grad.shape and p.grad.dtype == q.grad.dtype
    for fn in (lambda g: g.clone(), lambda g: g * 2, lambda g: g.abs().max(), lambda g: g.view(-1)[:5] + 1,
               lambda g: g.t().contiguous(), lambda g: g.sum(0), lambda g: torch.stack([g, g]).mean(0)):
        assert torch.equal(fn(p.grad), fn(q.grad))
    assert p.grad.abs().max().item() == q.grad.abs().max().item()
    # writes, through views and aliases, land in the host value the update reads
    for g in (p.grad, q.grad):
        g[0].zero_()
        g.data.mul_(3)
        g.view(-1)[-4:].fill_(0.5)
        g[g.abs() < 1e-3] = 0
    p2, q2 = pairs[1]
    p2.grad.copy_(torch.ones_like(q2.grad))
    q2.grad.copy_(torch.ones_like(q2.grad))
    assert _grads_equal(model, ref)
    # a reference held across zero_grad and the next backward keeps its value, as with torch
    held, ref_held = p.grad, q.grad
    for m in (ref, model):
        m.zero_grad()
        _loss(m, _batch(1)).backward()
    assert torch.equal(held.clone(), ref_held) and not torch.equal(held.clone(), p.grad.clone())
    assert _grads_equal(model, ref)
    assert "HostGrad(tensor(" in repr(p.grad)
    assert torch.equal(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3, foreach=True),
                       torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3, foreach=True))
    ref_opt.step()
    opt.step()
    assert _same(model, ref)


def test_own_clip_is_what_p_grad_holds_afterwards_and_later_backwards_add_to_it():
    ref, ref_opt, model, opt = _pair()
    for m in (ref, model):
        _loss(m, _batch(0)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)
    torch.testing.assert_close(opt.clip_grad_norm_(0.3), ref_norm, rtol=1e-6, atol=0)
    for m in (ref, model):
        _loss(m, _batch(1)).backward()  # adds to the clipped gradients
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.clone(), q.grad, rtol=1e-6, atol=1e-9)  # coefficient rounded apart


def test_parameters_without_a_gradient_are_skipped_like_torch():
    """A layer used only on even steps: on odd steps its p.grad is None after zero_grad, and
    torch leaves it, its moments and its step count alone (no decay, no momentum)."""
    def build():
        torch.manual_seed(0)
        return nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})

    ref, model = build(), build()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = OffloadAdamW(model.parameters(), lr=1e-2, impl=IMPL, bucket_mb=1.0)
    assert len(opt.segments) == 1  # skipped and stepped pieces share one bucket
    x = torch.randn(4, 8)
    for step in range(6):
        for m, o in ((ref, ref_opt), (model, opt)):
            h = m["a"](x)
            (m["b"](h) if step % 2 == 0 else h).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert _same(model, ref)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert [float(s["step"]) for s in sd["state"].values()] == [6.0, 6.0, 3.0, 3.0]
    for k, entry in ref_sd["state"].items():
        assert torch.equal(sd["state"][k]["exp_avg_sq"], entry["exp_avg_sq"])


def test_delayed_update_with_model_zero_grad_and_torch_clip_equals_the_lagged_reference():
    """The model's forward at step k sees update k-1 once the delayed update runs: the reference
    is torch AdamW on master weights, fed the gradients computed at the stale weights."""
    n_sync, steps = 2, 8
    model = _gpt()
    opt = OffloadAdamW(model.parameters(), lr=1e-2, delayed_update_after=n_sync, impl=IMPL)
    master = _gpt()
    ref_opt = torch.optim.AdamW(master.parameters(), lr=1e-2, fused=True)
    probe = _gpt()
    masters = [copy.deepcopy(master.state_dict())]
    for k in range(steps):
        probe.load_state_dict(masters[k] if k <= n_sync else masters[k - 1])
        assert _same(model, probe), k
        for m in (model, probe):
            for micro in range(2):
                (_loss(m, _batch(2 * k + micro)) / 2).backward()
        assert torch.equal(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3),
                           torch.nn.utils.clip_grad_norm_(probe.parameters(), 0.3))
        for p, q in zip(master.parameters(), probe.parameters()):
            p.grad = q.grad
        ref_opt.step()
        masters.append(copy.deepcopy(master.state_dict()))
        opt.step()
        for m in (model, probe, master):
            m.zero_grad()
    opt.flush()
    assert _same(model, master)


def test_compiled_model_trains_like_the_compiled_reference():
    ref, ref_opt, model, opt = _pair()
    compiled = [torch.compile(m, backend="aot_eager") for m in (ref, model)]
    for step in range(4):
        for m, c, o in ((ref, compiled[0], ref_opt), (model, compiled[1], opt)):
            for micro in range(2):
                _loss(c, _batch(2 * step + micro)).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3)
            o.step()
            m.zero_grad()
    assert _same(model, ref)


def test_bf16_parameters_get_bf16_gradients_from_the_fp32_accumulator():
    model = _gpt(dtype=torch.bfloat16)
    incoming: dict[int, list[torch.Tensor]] = {}
    for p in model.parameters():  # each backward's gradient, before it is accumulated
        p.register_hook(lambda g, p=p: incoming.setdefault(id(p), []).append(g.clone()))
    opt = OffloadAdamW(model.parameters(), lr=1e-2, impl=IMPL)
    _loss(model, _batch(0)).backward()
    _loss(model, _batch(1)).backward()  # the second arrives through p.grad.add_
    for p in model.parameters():
        g = p.grad.clone()
        first, second = incoming[id(p)]
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, first + second)  # torch's bf16 sum: computed in fp32, rounded once
    opt.step()
