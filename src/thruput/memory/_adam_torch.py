"""Pure-torch AdamW step and the state codecs of thruput.memory.adam (the fallback, and the reference).

Every fp32 operation here is correctly rounded and in the order of csrc/adam.cpp, and the
stochastic-rounding hash is the same 32-bit function computed on int64 tensors, so the two
implementations produce the same bits. The operations are those of torch.optim.AdamW's
single-tensor step (lerp and addcmul are fused multiply-adds there too).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from thruput.memory.adam import AdamState, _Hyper

BLOCK = 256  # elements per 8-bit quantisation block
_M32 = 0xFFFFFFFF
_M_LEVELS, _V_LEVELS = 127, 255


def n_blocks(numel: int, phase: int = 0) -> int:
    """Number of 8-bit quantisation blocks over ``numel`` elements whose first sits at position
    ``phase`` of its block (the first and the last block may be short)."""
    return 0 if numel == 0 else (phase + numel + BLOCK - 1) // BLOCK


def torch_step(master: Tensor, grad: Tensor, state: AdamState, param_out: Tensor | None, h: _Hyper) -> None:
    """One AdamW step in place, as adamw_step documents it."""
    g = grad.float()
    if h.grad_scale != 1.0:
        g = g / h.grad_scale
    m, v = state.to_fp32()
    master.mul_(h.decay)
    m.lerp_(g, h.one_minus_beta1)  # fma(w, g - m, m), as torch.optim.AdamW does
    v.mul_(h.beta2).addcmul_(g, g, value=h.one_minus_beta2)  # fma(c * g, g, v * beta2)
    u = sqrt_exact(v)
    if state.state_dtype == "fp32":  # torch's order of operations
        master.add_((m * -h.step_size) / (u / h.bc2_sqrt + h.eps))
    else:  # one division: sqrt(bias_correction2) moved to the numerator (see adam_elem in adam.cpp)
        master.add_((m * -h.step_size_bc2) / (u + h.eps_bc2))
    if param_out is not None:
        param_out.copy_(master)
    if state.state_dtype == "fp32":
        state.exp_avg.copy_(m)
        state.exp_avg_sq.copy_(v)
        return
    rand = hash32(torch.arange(h.index_offset, h.index_offset + master.numel(), dtype=torch.int64), h.seed)
    r_m, r_v = rand & 0xFFFF, rand >> 16
    if state.state_dtype == "bf16":
        state.exp_avg.copy_(round_bf16_stochastic(m, r_m))
        state.exp_avg_sq.copy_(round_bf16_stochastic(v, r_v))
        return
    qm, sm = encode_m(m, r_m, state.block_phase)
    qv, sv = encode_v(u, r_v, state.block_phase)
    state.exp_avg.copy_(qm)
    state.exp_avg_scale.copy_(sm)
    state.exp_avg_sq.copy_(qv)
    state.exp_avg_sq_scale.copy_(sv)


def sqrt_exact(x: Tensor) -> Tensor:
    """Correctly rounded fp32 sqrt (torch's vectorised fp32 sqrt is not, on some CPUs)."""
    return x.double().sqrt_().float()


def fmix32(x: int) -> int:
    """murmur3's 32-bit finaliser on a Python int."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(idx: Tensor, seed: int) -> Tensor:
    """32 random bits per element index, as int64, as in adam.cpp: x = (lo32(i) ^ hi32(i) * k ^ seed)
    * golden mod 2**32, then x ^ (x >> 16)."""
    x = _mul32((idx & _M32) ^ _mul32(idx >> 32, 0x7FEB352D) ^ seed, 0x9E3779B1)
    return x ^ (x >> 16)


def round_bf16_stochastic(x: Tensor, r16: Tensor) -> Tensor:
    """fp32 -> bf16 rounding the magnitude up with probability (dropped bits) / 2**16."""
    bits = (x.view(torch.int32).to(torch.int64) & _M32) + r16
    hi = (bits >> 16) & 0xFFFF
    return ((hi ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def blocks(x: Tensor, phase: int = 0) -> Tensor:
    """View (or zero-padded copy) of a 1-D tensor as (n_blocks, BLOCK), ``x[0]`` at ``[0, phase]``."""
    tail = n_blocks(x.numel(), phase) * BLOCK - phase - x.numel()
    if phase or tail:
        return torch.nn.functional.pad(x, (phase, tail)).view(-1, BLOCK)
    return x.view(-1, BLOCK)


def _unblock(x: Tensor, numel: int, phase: int) -> Tensor:
    """The ``numel`` elements of a blocked tensor, inverse of :func:`blocks`."""
    return x.flatten()[phase:phase + numel]


def _stochastic_sq_code(y: Tensor, r16: Tensor, levels: int) -> Tensor:
    """Code q in [0, levels] with q**2 ~= y (y in units of the block scale), unbiased in value:
    t = floor(sqrt(y)) rounds up to t + 1 with probability (y - t**2) / (2t + 1)."""
    t = torch.clamp(torch.floor(sqrt_exact(y)), max=levels - 1)
    r = r16.to(torch.float32) * (1.0 / 65536.0)
    return t + (r * (t * 2.0 + 1.0) < y - t * t).to(torch.float32)


def _encode_blocks(x: Tensor, r16: Tensor, levels: int, phase: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-block scale = max|x| / levels**2 and codes of |x|."""
    xb, rb = blocks(x, phase).abs(), blocks(r16, phase)
    scale = xb.amax(dim=1) / float(levels * levels)
    # A zero or subnormal scale gives all-zero codes (inv = 0), and keeps |x| * inv finite.
    normal = scale >= torch.finfo(torch.float32).tiny
    inv = torch.where(normal, 1.0 / torch.where(normal, scale, 1.0), 0.0)
    return _stochastic_sq_code(xb * inv[:, None], rb, levels), xb, scale


def encode_m(m: Tensor, r16: Tensor, phase: int = 0) -> tuple[Tensor, Tensor]:
    """Signed 8-bit codes and per-block scales s with m ~= s * q * |q|."""
    q, _, scale = _encode_blocks(m, r16, _M_LEVELS, phase)
    q = torch.where(blocks(m, phase) < 0, -q, q)
    return _unblock(q.to(torch.int8), m.numel(), phase), scale


def encode_v(u: Tensor, r16: Tensor, phase: int = 0) -> tuple[Tensor, Tensor]:
    """Unsigned 8-bit codes and per-block scales s with sqrt(v) = u ~= s * q**2; q >= 1 where u > 0."""
    q, ub, scale = _encode_blocks(u, r16, _V_LEVELS, phase)
    q = torch.where((ub > 0) & (q == 0), torch.ones_like(q), q)
    return _unblock(q.to(torch.uint8), u.numel(), phase), scale


def _scale_per_element(scale: Tensor, numel: int, phase: int) -> Tensor:
    return scale.repeat_interleave(BLOCK)[phase:phase + numel]


def decode_m(codes: Tensor, scale: Tensor, phase: int = 0) -> Tensor:
    q = codes.to(torch.int32)
    return (q * q.abs()).to(torch.float32).view(-1) * _scale_per_element(scale, codes.numel(), phase)


def decode_v(codes: Tensor, scale: Tensor, phase: int = 0) -> Tensor:
    q = codes.to(torch.int32)
    u = (q * q).to(torch.float32) * _scale_per_element(scale, codes.numel(), phase)
    return u * u
