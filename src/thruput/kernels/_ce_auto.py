"""Which implementation ``linear_cross_entropy(impl="auto")`` runs, and the fallbacks it took.

Three implementations keep the same memory bound (one ``[chunk, vocab]`` block of logits at a
time, ``chunk = default_chunk_size(vocab)`` rows): thruput's chunked kernel with the torch row
operation, the same kernel with the Triton row operation (CUDA), and torch's native
``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions(batch_chunk_size=chunk)``.
:func:`auto_impl` picks one from the rule measured below; the native op only where its results
equal thruput's exactly (see :func:`native_matches`).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from thruput.kernels._ce_chunked import RowsFn
from thruput.kernels._ce_rows import ce_rows_torch

Choice = Literal["torch", "triton", "native"]

_TRITON_MISSING = ("thruput.kernels.linear_cross_entropy(impl='auto') on CUDA: triton cannot be imported, so "
                   "the pure-torch row kernel runs instead (more memory traffic per chunk); "
                   "install it with: pip install 'thruput[triton]'")
_fallbacks: dict[str, str] = {}


def fallbacks() -> dict[str, str]:
    """What ran instead of what was asked, and why: ``{lever: reason}``; empty when nothing fell back.

    Plain data, so the trainer can put it in its run document (``thruput.profile`` is not
    imported here). Each fallback also warns once (``RuntimeWarning``) when it first happens.
    """
    return dict(_fallbacks)


def _record_fallback(lever: str, reason: str) -> None:
    if lever not in _fallbacks:
        _fallbacks[lever] = reason
        warnings.warn(reason, RuntimeWarning, stacklevel=4)


def triton_rows() -> RowsFn:
    """The Triton row operation; ``ImportError`` (saying how to install it) without triton."""
    try:
        from thruput.kernels._triton_ce import ce_rows_triton
    except ImportError as exc:
        raise ImportError(f"impl='triton' needs the triton package ({exc}): pip install 'thruput[triton]'") from exc
    return ce_rows_triton


def _device_type(tensor: torch.Tensor) -> str:
    return tensor.device.type


def native_mismatch(*, dtype: torch.dtype, labels_dtype: torch.dtype, smoothing: float, z_loss: float,
                    compiling: bool) -> str | None:
    """Why torch's chunked ``F.linear_cross_entropy`` would not return what thruput's kernel does, or None.

    It has no z-loss; with label smoothing or non-int64 labels it silently computes the full
    logits (with a warning); it returns the loss in the input dtype (thruput: fp32 for every
    dtype); under torch.compile it breaks the graph. ``ignore_index``, the three reductions,
    frozen weights and no-grad agree, except a ``"mean"`` over no kept token (nan gradients
    there; zeros in thruput and ``F.cross_entropy``), which :func:`resolve` routes to thruput.
    """
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13 or later)"
    if z_loss:
        return "it has no z_loss"
    if smoothing:
        return "with label_smoothing it computes the full logits"
    if labels_dtype != torch.int64:
        return f"with {labels_dtype} labels it computes the full logits (int64 only)"
    if dtype != torch.float32:
        return f"its loss is {dtype}, not fp32"
    if compiling:
        return "torch.compile cannot trace it"
    return None


# The CPU rule comes from `thruput bench kernels` (fp32, forward + backward, 4096 tokens, every
# variant in a fresh process, 2 ABBA rounds), run 1 of 2026-12-01 on Machine A (2 vCPU AMD EPYC,
# torch 2.13.0+cpu) under load average 3-17 from other jobs, so wall times spread widely and the
# CPU times (process time) are the steadier figure. thruput's kernel against torch's native op
# chunked at the same rows (256), as (wall time, CPU time, peak memory), kernel / native:
_CPU_MEASURED: dict[tuple[int, int], tuple[float, float, float]] = {  # (vocab, hidden) -> ratios
    (32768, 1024): (1.083, 1.016, 0.622),
    (32768, 2048): (0.338, 0.959, 0.561),
    (131072, 1024): (0.260, 0.977, 0.622),
    (131072, 2048): (0.353, 0.939, 0.562),
}
# The native op's peak is 1.6-1.8x the kernel's at every shape, so it never meets the kernel's
# memory bound; its CPU time is within the spread of the kernel's (0.94-1.02).


def _nearest_measured(vocab: int, hidden_size: int) -> tuple[float, float, float]:
    def distance(shape: tuple[int, int]) -> float:
        return abs(math.log(shape[0] / max(vocab, 1))) + abs(math.log(shape[1] / max(hidden_size, 1)))

    return _CPU_MEASURED[min(_CPU_MEASURED, key=distance)]


def auto_impl(*, device_type: str, vocab: int, hidden_size: int, native_ok: bool, has_triton: bool) -> Choice:
    """The rule: the fastest implementation within the memory bound, for this shape and device.

    * CUDA: the Triton row kernel (one pass over each logits row for the loss, one for the
      gradient); the pure-torch rows when triton is missing (a recorded fallback). torch's
      native op has not been timed on a GPU here, so it is not chosen there.
    * CPU: torch's native op where it agrees exactly (``native_ok``) and the nearest measured
      shape in ``_CPU_MEASURED`` says it is faster (CPU time) with no more peak memory than
      thruput's kernel; thruput's kernel (torch rows) otherwise, which is every shape measured.
    """
    if device_type == "cuda":
        return "triton" if has_triton else "torch"
    if native_ok:
        _, cpu_time, peak = _nearest_measured(vocab, hidden_size)
        if cpu_time > 1.0 and peak >= 1.0:
            return "native"
    return "torch"


def resolve(impl: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int,
            smoothing: float, z_loss: float, reduction: str) -> tuple[Choice, RowsFn | None]:
    """What ``impl`` runs on these tensors: the choice and, unless it is native, the row operation.

    ``"auto"`` applies :func:`auto_impl`; on CUDA without triton it records the fallback and warns
    once. ``impl="triton"`` without triton raises ``ImportError``.
    """
    if impl not in ("auto", "torch", "triton", "native"):
        raise ValueError(f"impl must be 'auto', 'torch', 'triton' or 'native', got {impl!r}")
    if impl == "torch":
        return "torch", ce_rows_torch
    if impl == "triton":
        return "triton", triton_rows()
    device = _device_type(hidden)
    compiling = torch.compiler.is_compiling()
    mismatch = native_mismatch(dtype=hidden.dtype, labels_dtype=labels.dtype, smoothing=smoothing, z_loss=z_loss,
                               compiling=compiling)

    def all_ignored() -> bool:
        # A mean over no kept token: torch's op gives nan gradients, thruput's kernel zeros (like
        # F.cross_entropy). One host read, asked only where the native op could run.
        return reduction == "mean" and not bool((labels != ignore_index).any())

    if impl == "native":
        if mismatch is not None:
            raise ValueError(f"linear_cross_entropy(impl='native'): torch's chunked F.linear_cross_entropy differs "
                             f"here ({mismatch}); use impl='auto' or 'torch'")
        return ("torch", ce_rows_torch) if all_ignored() else ("native", None)
    rows: RowsFn | None = None
    if device == "cuda":
        try:
            rows = triton_rows()
        except ImportError as exc:
            _record_fallback("linear_cross_entropy", f"{_TRITON_MISSING} [{exc.__cause__ or exc}]")
    choice = auto_impl(device_type=device, vocab=weight.shape[0], hidden_size=weight.shape[1],
                       native_ok=device == "cpu" and mismatch is None and not all_ignored(),
                       has_triton=rows is not None)
    if choice == "native":
        return choice, None
    return choice, (rows if choice == "triton" else ce_rows_torch)


def native_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                ignore_index: int, reduction: str, chunk: int) -> torch.Tensor:
    """torch's chunked op on 2-D ``hidden`` / 1-D ``labels``, at ``chunk`` rows per block."""
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
    return torch.nn.functional.linear_cross_entropy(hidden, weight, labels, reduction=reduction,
                                                    ignore_index=ignore_index, options=options)
