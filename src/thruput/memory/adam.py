"""CPU Adam/AdamW for flat fp32 master weights: one pass per element, fp32 / bf16 / 8-bit states.

``adamw_step`` reads the gradient in its training dtype (bf16, fp16 or fp32), the fp32 master and
the two moments, and writes the master, the moments and (optionally) the training-dtype copy of
the parameter, all in one pass. Two implementations compute the same thing:

* ``"cpp"``: a C++ extension (``csrc/adam.cpp``), JIT-built on first use and cached in the torch
  extensions directory in a folder keyed by the source, torch build, flags and CPU, so every
  virtual environment on a machine shares one build (:mod:`thruput.memory.ext_build`);
  vectorised and multi-threaded.
* ``"torch"``: a pure-torch fallback (``_adam_torch.py``), used when there is no compiler (with a
  warning).

Both do, for fp32 states, the fp32 arithmetic of torch.optim.AdamW's single-tensor step operation
by operation (its lerp and addcmul are fused multiply-adds; the C++ is built with
``-ffp-contract=off`` and calls ``fma`` exactly there), with every operation correctly rounded;
the low-precision formats, which have no torch result to match, divide once instead of twice
(``step_size * sqrt(bc2) * m / (sqrt(v) + eps * sqrt(bc2))``). The two implementations therefore
agree bit for bit, including stochastic-rounding decisions, which come from a counter-based hash
of (step, global element index: see ``index_offset``). With fp32 states they match
torch.optim.AdamW(fused=True) on parameters bit for bit; the default single-tensor AdamW
differs by an ulp here and there, because its vectorised fp32 sqrt is not correctly rounded on
every CPU. Steps with non-finite gradients, or gradients whose square
overflows fp32 (above 1.8e19), are the caller's to skip (as a loss scaler does): they leave
non-finite moments, 8-bit blocks do not encode NaN, and the two implementations may differ there.

State formats (``AdamState``):

* ``fp32``: 8 bytes/param.
* ``bf16``: 4 bytes/param, written with stochastic rounding so small updates survive in
  expectation.
* ``int8``: 2 bytes/param + 8 bytes per 256-element block. The first moment is signed,
  ``m = s_m * q * |q|`` with ``q`` in [-127, 127]; the second moment is kept in the sqrt domain,
  ``sqrt(v) = s_v * q**2`` with ``q`` in [0, 255]. The square map gives fine steps near zero;
  rounding is stochastic and unbiased in value, and a nonzero ``v`` never rounds to zero, so the
  denominator cannot collapse to ``eps``. Blocks lie on a grid of 256 in the global element index
  (``index_offset``), so a shard's blocks are the whole tensor's wherever its cuts fall on that
  grid; ``AdamState.block_phase`` records where the shard starts in its first block.
"""
from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from thruput.memory._adam_torch import (BLOCK, decode_m, decode_v, encode_m, encode_v, fmix32, n_blocks,
                                        sqrt_exact, torch_step)
from thruput.memory.ext_build import load_extension

__all__ = ["STATE_DTYPES", "AdamState", "adamw_step", "kernel_available", "kernel_build_error"]

STATE_DTYPES = ("fp32", "bf16", "int8")
_GRAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclass
class AdamState:
    """Adam moments for one flat fp32 master of ``numel`` elements, stored as fp32, bf16 or 8-bit blockwise.

    ``exp_avg`` / ``exp_avg_sq`` hold fp32 or bf16 moments, or the int8 / uint8 codes of the
    8-bit format, whose per-block scales are ``exp_avg_scale`` / ``exp_avg_sq_scale`` (fp32,
    ``n_blocks(numel, block_phase)`` each; ``None`` for the other formats). ``block_phase``
    (8-bit only, else 0): the position of element 0 in its 256-element block, which is the
    global ``index_offset`` of the updates modulo 256.
    """

    state_dtype: str
    numel: int
    exp_avg: Tensor
    exp_avg_sq: Tensor
    exp_avg_scale: Tensor | None = None
    exp_avg_sq_scale: Tensor | None = None
    block_phase: int = 0

    @classmethod
    def create(cls, numel: int, state_dtype: str = "fp32", pin: bool = False, index_offset: int = 0) -> AdamState:
        """Zero moments for ``numel`` elements. ``pin`` puts them in page-locked memory (needs CUDA);
        ``index_offset`` is the one the updates will pass (it places the 8-bit blocks).

        Raises ValueError for an unknown ``state_dtype``, a negative ``numel``, or ``pin`` without CUDA.
        """
        _check_state_dtype(state_dtype)
        if numel < 0:
            raise ValueError(f"AdamState.create: numel must be >= 0, got {numel}")
        if pin and not torch.cuda.is_available():
            raise ValueError("AdamState.create: pin=True needs CUDA (page-locked memory is for device copies)")

        def zeros(n: int, dtype: torch.dtype) -> Tensor:
            return torch.zeros(n, dtype=dtype, pin_memory=pin)

        if state_dtype == "int8":
            phase = index_offset % BLOCK
            nb = n_blocks(numel, phase)
            return cls(state_dtype, numel, zeros(numel, torch.int8), zeros(numel, torch.uint8),
                       zeros(nb, torch.float32), zeros(nb, torch.float32), phase)
        dtype = torch.float32 if state_dtype == "fp32" else torch.bfloat16
        return cls(state_dtype, numel, zeros(numel, dtype), zeros(numel, dtype))

    def to_fp32(self) -> tuple[Tensor, Tensor]:
        """(exp_avg, exp_avg_sq) decoded as new fp32 1-D tensors."""
        if self.state_dtype != "int8":
            return self.exp_avg.float().clone(), self.exp_avg_sq.float().clone()
        return (decode_m(self.exp_avg, self.exp_avg_scale, self.block_phase),
                decode_v(self.exp_avg_sq, self.exp_avg_sq_scale, self.block_phase))

    @classmethod
    def from_fp32(cls, exp_avg: Tensor, exp_avg_sq: Tensor, state_dtype: str, index_offset: int = 0) -> AdamState:
        """Encode fp32 moments (e.g. from torch.optim.AdamW) with round-to-nearest; ``index_offset``
        as in :meth:`create`.

        Raises ValueError for an unknown ``state_dtype`` or moments that are not 1-D of equal length.
        """
        _check_state_dtype(state_dtype)
        if exp_avg.dim() != 1 or exp_avg.shape != exp_avg_sq.shape:
            raise ValueError(f"AdamState.from_fp32: moments must be 1-D and equal in length, got "
                             f"{tuple(exp_avg.shape)} and {tuple(exp_avg_sq.shape)}")
        m = exp_avg.detach().to("cpu", torch.float32)
        v = exp_avg_sq.detach().to("cpu", torch.float32)
        if state_dtype == "fp32":
            return cls("fp32", m.numel(), m.clone(), v.clone())
        if state_dtype == "bf16":
            return cls("bf16", m.numel(), m.to(torch.bfloat16), v.to(torch.bfloat16))
        half = torch.full((m.numel(),), 1 << 15, dtype=torch.int64)  # r = 0.5: round to nearest
        phase = index_offset % BLOCK
        qm, sm = encode_m(m, half, phase)
        qv, sv = encode_v(sqrt_exact(v), half, phase)
        return cls("int8", m.numel(), qm, qv, sm, sv, phase)

    def slice(self, start: int, end: int) -> AdamState:
        """The moments of elements ``[start, end)``, sharing memory (updates to it land here).

        Raises ValueError for an 8-bit state unless the range is all of it: its blocks share
        scales across the cut."""
        if (start, end) == (0, self.numel):
            return self
        if self.state_dtype == "int8":
            raise ValueError("AdamState.slice: 8-bit states cannot be cut (blocks share scales)")
        return AdamState(self.state_dtype, end - start, self.exp_avg[start:end], self.exp_avg_sq[start:end])

    def state_dict(self) -> dict[str, Tensor | str | int]:
        """Plain data: ``state_dtype``, ``numel`` and the tensors (scales only for int8)."""
        sd: dict[str, Tensor | str | int] = {"state_dtype": self.state_dtype, "numel": self.numel,
                                             "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.state_dtype == "int8":
            sd["exp_avg_scale"] = self.exp_avg_scale
            sd["exp_avg_sq_scale"] = self.exp_avg_sq_scale
            sd["block_size"] = BLOCK
            sd["block_phase"] = self.block_phase
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict) -> AdamState:
        """Inverse of ``state_dict``; raises ValueError on missing keys or inconsistent shapes."""
        try:
            state = cls(str(sd["state_dtype"]), int(sd["numel"]), sd["exp_avg"], sd["exp_avg_sq"],
                        sd.get("exp_avg_scale"), sd.get("exp_avg_sq_scale"), int(sd.get("block_phase", 0)))
        except KeyError as e:
            raise ValueError(f"AdamState.from_state_dict: missing key {e.args[0]!r}") from None
        _check_state_dtype(state.state_dtype)
        if state.state_dtype == "int8" and int(sd.get("block_size", BLOCK)) != BLOCK:
            raise ValueError(f"AdamState.from_state_dict: block_size {sd['block_size']} != {BLOCK}")
        state.validate()
        return state

    def nbytes(self) -> int:
        """Bytes held by the moment tensors (and scales)."""
        ts = [self.exp_avg, self.exp_avg_sq, self.exp_avg_scale, self.exp_avg_sq_scale]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def validate(self) -> None:
        """Raise ValueError unless dtypes, lengths and layout match ``state_dtype`` and ``numel``."""
        if not 0 <= self.block_phase < (BLOCK if self.state_dtype == "int8" else 1):
            raise ValueError(f"AdamState({self.state_dtype}): block_phase {self.block_phase} out of range")
        if self.state_dtype == "int8":
            nb = n_blocks(self.numel, self.block_phase)
            want = [(self.exp_avg, torch.int8, self.numel), (self.exp_avg_sq, torch.uint8, self.numel),
                    (self.exp_avg_scale, torch.float32, nb), (self.exp_avg_sq_scale, torch.float32, nb)]
        else:
            dtype = torch.float32 if self.state_dtype == "fp32" else torch.bfloat16
            want = [(self.exp_avg, dtype, self.numel), (self.exp_avg_sq, dtype, self.numel)]
        for i, (t, dtype, n) in enumerate(want):
            if not isinstance(t, Tensor) or t.dtype != dtype or t.shape != (n,) or not t.is_contiguous() \
                    or t.device.type != "cpu":
                got = "missing" if not isinstance(t, Tensor) else f"{t.dtype} {tuple(t.shape)} on {t.device}"
                raise ValueError(f"AdamState({self.state_dtype}): tensor {i} must be a contiguous CPU "
                                 f"{dtype} of shape ({n},), got {got}")


def _check_state_dtype(state_dtype: str) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"unknown state_dtype {state_dtype!r}; expected one of {STATE_DTYPES}")


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def adamw_step(master: Tensor, grad: Tensor, state: AdamState, param_out: Tensor | None = None, *,
               step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               grad_scale: float = 1.0, impl: str = "auto", index_offset: int = 0) -> None:
    """One in-place AdamW update over flat contiguous CPU tensors.

    master: fp32 1-D; grad: bf16/fp16/fp32 1-D of the same numel, divided by ``grad_scale``
    before use (loss scale x clip coefficient); param_out: optional bf16/fp16/fp32 1-D that
    receives the updated master cast to its dtype (round to nearest). ``step`` is the 1-based
    step count used for bias correction; it also seeds stochastic rounding, so a run is
    reproducible. Decoupled weight decay exactly like torch.optim.AdamW.

    index_offset: where ``master[0]`` sits in a larger flat tensor that this call updates a
    shard of. Stochastic rounding draws its noise by this global index, so bf16 states of shards
    cut anywhere reproduce the unsharded bits exactly. 8-bit blocks lie on a grid of 256 in that
    index, so 8-bit shards do where they are cut at multiples of 256 (an 8-bit ``state`` must be
    created with the same ``index_offset``; ValueError otherwise).

    impl: "auto" (C++ if it builds, else torch with a warning), "cpp" (RuntimeError naming the
    build failure if it cannot be built), or "torch". Bad dtypes, lengths, devices or layouts
    raise ValueError naming the argument.
    """
    _check_args(master, grad, state, param_out, step, grad_scale, impl)
    if not isinstance(index_offset, int) or isinstance(index_offset, bool) \
            or not 0 <= index_offset < 2**63 - master.numel():
        raise ValueError(f"adamw_step: index_offset must be a non-negative int, got {index_offset!r}")
    if state.block_phase != (index_offset % BLOCK if state.state_dtype == "int8" else 0):
        raise ValueError(f"adamw_step: the 8-bit state was created for a block phase of {state.block_phase}, "
                         f"but index_offset {index_offset} puts it at {index_offset % BLOCK}; create it with "
                         "the index_offset the updates pass")
    hyper = _Hyper.make(step, lr, beta1, beta2, eps, weight_decay, grad_scale, index_offset)
    if impl == "auto":
        impl = "cpp" if kernel_available() else "torch"
        if impl == "torch":
            _warn_fallback_once()
    if impl == "cpp":
        ext = _load_extension()
        ext.adamw_step(master, grad, param_out, state.state_dtype, state.exp_avg, state.exp_avg_sq,
                       state.exp_avg_scale, state.exp_avg_sq_scale, *hyper.as_args(), state.block_phase)
    else:
        torch_step(master, grad, state, param_out, hyper)


@dataclass(frozen=True)
class _Hyper:
    """Per-step constants, computed in double like torch.optim.AdamW, used as fp32 by both impls."""

    decay: float          # 1 - lr * weight_decay
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    step_size: float      # lr / (1 - beta1 ** step)
    bc2_sqrt: float       # sqrt(1 - beta2 ** step)
    eps: float
    grad_scale: float
    seed: int             # 32-bit stochastic-rounding seed for this step
    index_offset: int     # global index of master[0], for the stochastic-rounding hash
    step_size_bc2: float  # step_size * bc2_sqrt and eps * bc2_sqrt, for the low-precision formats'
    eps_bc2: float        # one-division form (step_size * bc2_sqrt) * m / (sqrt(v) + eps * bc2_sqrt)

    @classmethod
    def make(cls, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
             grad_scale: float, index_offset: int = 0) -> _Hyper:
        for name, val, lo, hi in (("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0)):
            if not lo <= val < hi:
                raise ValueError(f"adamw_step: {name} must be in [0, 1), got {val}")
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"adamw_step: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        step_size, bc2_sqrt = lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step)
        return cls(1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, step_size, bc2_sqrt, eps,
                   float(grad_scale), fmix32((step * 0x9E3779B9) & 0xFFFFFFFF), index_offset,
                   step_size * bc2_sqrt, eps * bc2_sqrt)

    def as_args(self) -> tuple:
        return (self.decay, self.beta1, self.one_minus_beta1, self.beta2, self.one_minus_beta2,
                self.step_size, self.bc2_sqrt, self.eps, self.grad_scale, self.seed, self.index_offset,
                self.step_size_bc2, self.eps_bc2)


def _check_args(master: Tensor, grad: Tensor, state: AdamState, param_out: Tensor | None, step: int,
                grad_scale: float, impl: str) -> None:
    if impl not in ("auto", "cpp", "torch"):
        raise ValueError(f"adamw_step: impl must be 'auto', 'cpp' or 'torch', got {impl!r}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"adamw_step: step must be a 1-based int, got {step!r}")
    if not (grad_scale > 0 and math.isfinite(grad_scale)):
        raise ValueError(f"adamw_step: grad_scale must be finite and > 0, got {grad_scale}")
    _check_flat("master", master, (torch.float32,), None)
    _check_flat("grad", grad, _GRAD_DTYPES, master.numel())
    if param_out is not None:
        _check_flat("param_out", param_out, _GRAD_DTYPES, master.numel())
    if not isinstance(state, AdamState):
        raise ValueError(f"adamw_step: state must be an AdamState, got {type(state).__name__}")
    _check_state_dtype(state.state_dtype)
    if state.numel != master.numel():
        raise ValueError(f"adamw_step: state holds {state.numel} elements but master has {master.numel()}")
    state.validate()


def _check_flat(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...], numel: int | None) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"adamw_step: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"adamw_step: {name} dtype {t.dtype} not supported; expected one of {dtypes}")
    if t.device.type != "cpu":
        raise ValueError(f"adamw_step: {name} must be on the CPU, got {t.device}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"adamw_step: {name} must be 1-D and contiguous, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"adamw_step: {name} has {t.numel()} elements but master has {numel}")


# ---------------------------------------------------------------------------------------------
# The C++ extension: built on first use, never at import.
# ---------------------------------------------------------------------------------------------

_CSRC = Path(__file__).parent / "csrc" / "adam.cpp"
_lock = threading.Lock()
_ext = None
_build_error: str | None = None
_tried = False
_warned = False


def _load_extension():
    """The compiled module; RuntimeError with the compiler's complaint if it cannot be built."""
    if not kernel_available():
        raise RuntimeError(f"thruput CPU Adam extension unavailable (impl='cpp'): {_build_error}")
    return _ext


def kernel_available() -> bool:
    """Build (or load the cached build of) the C++ kernel once; False if that fails (no compiler, ...)."""
    global _ext, _build_error, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _ext = _build()
            except Exception as e:  # a missing compiler surfaces as many exception types
                _build_error = f"{type(e).__name__}: {e}".strip()
    return _ext is not None


def kernel_build_error() -> str | None:
    """Why the C++ kernel could not be built, or None if it built (or was not tried yet)."""
    return _build_error


_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _build():
    if not _CSRC.exists():
        raise FileNotFoundError(f"C++ source {_CSRC} is missing")
    return load_extension("thruput_cpu_adam", _CSRC, _CFLAGS, _LDFLAGS)


def _warn_fallback_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"thruput.memory.adamw_step: C++ kernel unavailable ({_build_error}); using the "
                      "slower pure-torch fallback", RuntimeWarning, stacklevel=3)
