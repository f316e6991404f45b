"""Fused LM head + cross-entropy that never materialises the [tokens x vocab] logits.

The tokens are processed in chunks of ``chunk_size`` rows: for each chunk the logits are
computed, turned into per-token losses and (when gradients are needed) into the logit
gradient, which is immediately contracted into ``d hidden`` and accumulated into ``d weight``
(fp32). Only one chunk of logits exists at a time. For ``reduction="mean"|"sum"`` the gradients
are computed during the forward pass and backward only scales them by ``grad_output``; for
``"none"`` the per-token ``grad_output`` is only known in backward, so backward recomputes the
chunks once more.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from thruput.kernels._ce_rows import ce_rows_torch

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "torch", "triton"]
RowsFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]

_CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MiB in fp32
# Below ~256 rows the three matmuls per chunk (logits, d hidden, and d weight, whose inner
# dimension is the chunk) lose efficiency: at vocab 128k, 64-row chunks cost ~12% more CPU time
# than the naive loss, 256-row chunks ~3%; memory stays a small fraction of the full logits.
_MIN_ROWS, _MAX_ROWS = 256, 4096


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk used when ``chunk_size`` is None: about 8 Mi logits, clamped to [256, 4096]."""
    return max(_MIN_ROWS, min(_MAX_ROWS, _CHUNK_ELEMENTS // max(vocab, 1)))


def _triton_rows() -> RowsFn:
    try:
        from thruput.kernels._triton_ce import ce_rows_triton
    except ImportError as exc:
        raise ImportError("impl='triton' needs the triton package: pip install 'thruput[triton]'") from exc
    return ce_rows_triton


def _select_rows(impl: str, device: torch.device) -> RowsFn:
    if impl == "torch":
        return ce_rows_torch
    if impl == "triton":
        return _triton_rows()
    if impl == "auto":
        if device.type == "cuda":
            try:
                return _triton_rows()
            except ImportError:
                return ce_rows_torch
        return ce_rows_torch
    raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")


def _chunks(hidden, weight, labels, rows, scale, chunk, ignore_index, smoothing, z_loss,
            dhidden, dweight, losses):
    """One sweep over the token chunks; fills ``losses`` and, with ``scale``, the gradients."""
    n = hidden.shape[0]
    if n == 0:
        return
    # Two [chunk, V] buffers reused by every chunk: a fresh block per chunk would be mmap'ed and
    # page-faulted anew each time (tens of MiB), which costs as much as a pass over it.
    logits_buf = hidden.new_empty(min(chunk, n), weight.shape[0])
    work = torch.empty(logits_buf.shape, dtype=torch.float32, device=hidden.device) \
        if rows is ce_rows_torch else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end]
        logits = torch.mm(h, weight.t(), out=logits_buf[: end - start])
        chunk_scale = None if scale is None else scale[start:end]
        loss, grad = rows(logits, labels[start:end], chunk_scale, ignore_index, smoothing, z_loss,
                          None if work is None else work[: end - start])
        if losses is not None:
            losses[start:end] = loss
        if grad is None:
            continue
        if dhidden is not None:
            torch.mm(grad.to(weight.dtype), weight, out=dhidden[start:end])
        if dweight is not None:
            dweight.addmm_(grad.t().float(), h.float())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, smoothing, z_loss, reduction, chunk, rows,
                need_dh, need_dw):
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        keep = labels != ignore_index
        count = keep.sum()
        eager_grads = reduction != "none" and (need_dh or need_dw)
        dhidden = torch.empty_like(hidden) if eager_grads and need_dh else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if eager_grads and need_dw else None
        scale = None
        if eager_grads:
            # with no kept token every row's gradient is zero anyway; clamping keeps it 0, not nan
            unit = 1.0 / count.clamp(min=1).float() if reduction == "mean" \
                else torch.ones((), device=hidden.device)
            scale = unit.expand(n)
        _chunks(hidden, weight, labels, rows, scale, chunk, ignore_index, smoothing, z_loss,
                dhidden, dweight, losses)
        ctx.reduction = reduction
        ctx.need = (need_dh, need_dw)
        if reduction == "none":
            ctx.args = (ignore_index, smoothing, z_loss, chunk, rows)
            ctx.save_for_backward(hidden, weight, labels)
            return losses
        dweight = dweight.to(weight.dtype) if dweight is not None else None
        ctx.save_for_backward(dhidden, dweight)
        total = losses.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        need_dh, need_dw = ctx.need
        if ctx.reduction != "none":
            dhidden, dweight = ctx.saved_tensors
            dh = dhidden * grad_out.to(dhidden.dtype) if need_dh else None
            dw = dweight * grad_out.to(dweight.dtype) if need_dw else None
            return dh, dw, None, None, None, None, None, None, None, None, None
        hidden, weight, labels = ctx.saved_tensors
        ignore_index, smoothing, z_loss, chunk, rows = ctx.args
        dhidden = torch.empty_like(hidden) if need_dh else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        _chunks(hidden, weight, labels, rows, grad_out.float().contiguous(), chunk, ignore_index,
                smoothing, z_loss, dhidden, dweight, None)
        dw = dweight.to(weight.dtype) if dweight is not None else None
        return dhidden, dw, None, None, None, None, None, None, None, None, None


def _validate(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size):
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} != weight's hidden dim {weight.shape[1]}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != hidden's leading shape {tuple(hidden.shape[:-1])}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a floating point tensor, got {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if not torch.compiler.is_compiling():
        vocab = weight.shape[0]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"labels{list(where)} = {int(labels[where])} is outside [0, {vocab}) "
                             f"and is not ignore_index={ignore_index}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels)`` without the [tokens x vocab] logits.

    Args:
        hidden: ``[..., d]`` final hidden states (fp32, bf16 or fp16), same dtype as ``weight``.
        weight: ``[vocab, d]`` LM-head weight (``nn.Linear(d, vocab, bias=False).weight``).
        labels: integer ``[...]`` target ids; ``ignore_index`` marks tokens left out of the loss.
        label_smoothing: as in ``F.cross_entropy``: ``(1 - s) * nll + s * mean_j(-log p_j)``.
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per kept token (PaLM's auxiliary loss).
        reduction: ``"mean"`` over kept tokens (if none is kept: nan loss and zero gradients,
            like ``F.cross_entropy``),
            ``"sum"``, or ``"none"`` (per-token losses shaped like ``labels``, 0 where ignored).
        chunk_size: tokens per chunk; None picks :func:`default_chunk_size` (about 8 Mi logits,
            at least 256 rows). Two [chunk, vocab] buffers (logits and fp32 scratch) are the
            loss's working memory, besides the fp32 ``d weight`` accumulator.
        impl: ``"torch"`` (any device, traceable by torch.compile), ``"triton"`` (CUDA tensors,
            or CPU tensors under ``TRITON_INTERPRET=1``), or ``"auto"``: Triton on CUDA when it
            is installed, torch otherwise.

    Returns the loss in fp32 (the softmax math is fp32 for every input dtype). Gradients are
    returned in the inputs' dtypes; ``d weight`` is accumulated in fp32 across chunks.

    Raises ``ValueError`` for mismatched shapes or dtypes, a bad option, or a label outside
    ``[0, vocab)`` that is not ``ignore_index`` (the label check costs one host sync on CUDA and
    is skipped while torch.compile traces), ``ImportError`` for ``impl="triton"`` without triton.
    """
    _validate(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    rows = _select_rows(impl, hidden.device)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    out_shape = labels.shape
    grad_on = torch.is_grad_enabled()
    out = _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index,
        float(label_smoothing), float(z_loss), reduction, chunk, rows,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
    )
    return out.reshape(out_shape) if reduction == "none" else out
