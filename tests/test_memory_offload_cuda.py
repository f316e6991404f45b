"""OffloadAdamW under CUDA: side-stream gradient copies into pinned memory and the copies back,
against the CPU path and torch AdamW. Skipped without a GPU (the CPU tests are in
test_memory_offload.py, whose helpers these share)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_memory_offload import IMPL, _batch, _gpt, _loss
from thruput.memory import OffloadAdamW


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_offload_matches_torch_adamw_on_an_fp32_master():
    device = torch.device("cuda")
    model = _gpt(dtype=torch.bfloat16).to(device)
    captured: dict[int, torch.Tensor] = {}
    for p in model.parameters():  # registered first, so it sees the gradient before the offload hook
        p.register_post_accumulate_grad_hook(lambda p: captured.__setitem__(id(p), p.grad.float().cpu()))
    opt = OffloadAdamW(model.parameters(), lr=1e-2, bucket_mb=0.02, impl=IMPL)
    masters = [p.detach().float().cpu().clone().requires_grad_() for p in model.parameters()]
    ref_opt = torch.optim.AdamW(masters, lr=1e-2)
    # bf16 copies cross the bus, the fp32 master stays on the host
    assert opt.segments[0].param_out.is_pinned() and not opt.segments[0].master.is_pinned()
    for step in range(5):
        _loss(model, _batch(step).to(device)).backward()
        assert all(p.grad is None for p in model.parameters())
        for m, p in zip(masters, model.parameters()):
            m.grad = captured[id(p)]
        ref_opt.step()
        opt.step()
        opt.zero_grad()
        for m, p in zip(masters, model.parameters()):
            assert torch.equal(p.detach().cpu(), m.detach().bfloat16())


def _exact_gradient_run(device: str, dtype: torch.dtype, loss_scale: float | None,
                        delayed: int | None) -> list[list[torch.Tensor]]:
    """Parameters after each step of a run whose gradients are small integers that do not depend
    on the weights (independent linear layers, integer inputs): every device computes them
    exactly, so the host updates must agree bit for bit. Two micro-steps per step, clipping,
    copies back as train.py does them."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(256, 256) for _ in range(4)).to(device, dtype)
    opt = OffloadAdamW(layers.parameters(), lr=1e-2, bucket_mb=0.1, loss_scale=loss_scale,
                       delayed_update_after=delayed, impl=IMPL)
    assert len(opt.segments) >= 3
    history = []
    for step in range(5):
        for micro in range(2):
            g = torch.Generator().manual_seed(10 * step + micro)
            x, c = (torch.randint(-2, 3, (8, 256), generator=g).to(device, dtype) for _ in range(2))
            opt.scale_loss(sum((layer(x) * c).sum() for layer in layers)).backward()
        opt.clip_grad_norm_(100.0)
        opt.step(copy_back=False)
        opt.copy_back()
        opt.zero_grad()
        history.append([p.detach().cpu().clone() for p in layers.parameters()])
    opt.flush()
    history.append([p.detach().cpu().clone() for p in layers.parameters()])
    return history


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("delayed", [None, 1])
@pytest.mark.parametrize("dtype,loss_scale", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, 4.0)])
def test_cuda_gradient_stream_and_copies_equal_the_cpu_path(dtype, loss_scale, delayed):
    """Gradients through the side stream into pinned staging, accumulation over micro-steps,
    clipping and loss scaling on them, parameter copies back (with the delayed update too):
    under CUDA exactly what the synchronous CPU path computes."""
    cpu = _exact_gradient_run("cpu", dtype, loss_scale, delayed)
    cuda = _exact_gradient_run("cuda", dtype, loss_scale, delayed)
    for k, (a, b) in enumerate(zip(cuda, cpu)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), k
