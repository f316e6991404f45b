"""OffloadAdamW under CUDA: side-stream gradient copies into pinned memory and the copies back,
against the CPU path and torch AdamW. Skipped without a GPU (the CPU tests are in
test_memory_offload.py, whose helpers these share)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_memory_offload import IMPL, _batch, _gpt, _loss
from thruput.memory import HostGrad, OffloadAdamW


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
        assert all(isinstance(p.grad, HostGrad) for p in model.parameters())  # no device memory
        for m, p in zip(masters, model.parameters()):
            m.grad = captured[id(p)]
        ref_opt.step()
        opt.step()
        opt.zero_grad()
        for m, p in zip(masters, model.parameters()):
            assert torch.equal(p.detach().cpu(), m.detach().bfloat16())


def _exact_gradient_run(device: str, dtype: torch.dtype, loss_scale: float | None,
                        delayed: int | None, torch_loop: bool = False) -> list[list[torch.Tensor]]:
    """Parameters after each step of a run whose gradients are small integers that do not depend
    on the weights (independent linear layers, integer inputs): every device computes them
    exactly, so the host updates must agree bit for bit. Two micro-steps per step, clipping,
    copies back as train.py does them; with ``torch_loop`` the loop of a torch user instead:
    ``torch.nn.utils.clip_grad_norm_`` (through the p.grad handles, the coefficient clamped to
    1 on every device), a read of p.grad, ``model.zero_grad()``."""
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
        if torch_loop:
            norm = torch.nn.utils.clip_grad_norm_(layers.parameters(), 1e9)
            assert norm.device.type == device and torch.isfinite(norm)
            history.append([p.grad.clone().cpu() for p in layers.parameters()])
            opt.step()
            layers.zero_grad()
        else:
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
    """Gradients through the side stream into pinned staging, accumulation over micro-steps
    (the second through the p.grad handle's add_), clipping and loss scaling on them, parameter
    copies back (with the delayed update too), torch's clip and zero_grad on the handles:
    under CUDA exactly what the synchronous CPU path computes."""
    for torch_loop in (False, True) if loss_scale is None else (False,):  # a torch loop has no fp16 scale
        cpu = _exact_gradient_run("cpu", dtype, loss_scale, delayed, torch_loop)
        cuda = _exact_gradient_run("cuda", dtype, loss_scale, delayed, torch_loop)
        for k, (a, b) in enumerate(zip(cuda, cpu)):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (torch_loop, k)
