"""thruput.memory.adam: parity with torch.optim.AdamW, C++ vs torch agreement, low-precision states."""
from __future__ import annotations

import pytest
import torch

from thruput.memory.adam import STATE_DTYPES, AdamState, adamw_step

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _torch_adamw_run(p0: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


@pytest.mark.parametrize("impl", ["torch"])
def test_fp32_matches_torch_adamw_over_100_steps(impl: str) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 1000
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * 0.1 for _ in range(100)]
    ref = _torch_adamw_run(p0, grads)
    master, state = p0.clone(), AdamState.create(n, "fp32")
    for t, g in enumerate(grads, start=1):
        adamw_step(master, g, state, step=t, impl=impl, **HP)
        rel = ((master - ref[t - 1]).abs() / ref[t - 1].abs().clamp_min(1e-12)).max().item()
        assert rel <= 1e-6, (t, rel)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_state_dict_round_trip(state_dtype: str) -> None:
    n = 700
    state = AdamState.create(n, state_dtype)
    master = torch.randn(n)
    adamw_step(master, torch.randn(n), state, step=1, impl="torch", **HP)
    back = AdamState.from_state_dict(state.state_dict())
    for a, b in zip(state.to_fp32(), back.to_fp32()):
        assert torch.equal(a, b)
