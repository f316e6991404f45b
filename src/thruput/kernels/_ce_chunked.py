"""thruput's own chunked LM head + cross-entropy (the autograd function behind ``impl="torch"|"triton"``).

The tokens are processed in chunks of ``chunk`` rows: for each chunk the logits are computed,
turned into per-token losses and (when gradients are needed) into the logit gradient, which is
immediately contracted into ``d hidden`` and accumulated into ``d weight`` (fp32). Only one
chunk of logits exists at a time. For ``reduction="mean"|"sum"`` the gradients are computed
during the forward pass and backward scales them by ``grad_output`` in place and hands them
over, so no second gradient-sized copy exists (a second backward through the same graph raises,
as torch's own chunked op does); for ``"none"`` the per-token ``grad_output`` is only known in
backward, so backward recomputes the chunks once more.
"""
from __future__ import annotations

from typing import Callable

import torch

from thruput.kernels._ce_rows import ce_rows_torch

RowsFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]

_BACKWARD_TWICE = ("linear_cross_entropy: backward ran twice through the same loss (retain_graph=True). "
                   "With reduction 'mean' or 'sum' the gradients are computed in forward and handed over "
                   "by the first backward; compute the loss again, or use reduction='none' and reduce it "
                   "yourself (that backward recomputes the chunks and may run any number of times)")


def _chunks(hidden, weight, labels, rows, scale, chunk, ignore_index, smoothing, z_loss,
            dhidden, dweight, losses):
    """One sweep over the token chunks; fills ``losses`` and, with ``scale``, the gradients."""
    n = hidden.shape[0]
    if n == 0:
        return
    # [chunk, V] buffers reused by every chunk: a fresh block per chunk would be mmap'ed and
    # page-faulted anew each time (tens of MiB), which costs as much as a pass over it.
    logits_buf = hidden.new_empty(min(chunk, n), weight.shape[0])
    # The torch rows need fp32 scratch, except for fp32 on CPU, where the softmax runs in place.
    in_place = rows is ce_rows_torch and hidden.dtype == torch.float32 and hidden.device.type == "cpu"
    work = torch.empty(logits_buf.shape, dtype=torch.float32, device=hidden.device) \
        if rows is ce_rows_torch and not in_place else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end]
        logits = torch.mm(h, weight.t(), out=logits_buf[: end - start])
        chunk_scale = None if scale is None else scale[start:end]
        scratch = logits if in_place else (None if work is None else work[: end - start])
        loss, grad = rows(logits, labels[start:end], chunk_scale, ignore_index, smoothing, z_loss, scratch)
        if losses is not None:
            losses[start:end] = loss
        if grad is None:
            continue
        if dhidden is not None:
            torch.mm(grad.to(weight.dtype), weight, out=dhidden[start:end])
        if dweight is not None:
            dweight.addmm_(grad.t().float(), h.float())


def _scaled(grad: torch.Tensor | None, grad_out: torch.Tensor) -> torch.Tensor | None:
    if grad is None:
        return None
    if torch.compiler.is_compiling():  # a traced backward must not mutate its saved inputs
        return grad * grad_out.to(grad.dtype)
    return grad.mul_(grad_out.to(grad.dtype))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``apply(hidden [n, d], weight [V, d], labels [n], ignore_index, smoothing, z_loss, reduction,
    chunk, rows, need_dh, need_dw)``; see :func:`thruput.kernels.linear_cross_entropy`."""

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
        ctx.consumed = False
        total = losses.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        need_dh, need_dw = ctx.need
        none = (None,) * 9
        if ctx.reduction != "none":
            if ctx.consumed:
                raise RuntimeError(_BACKWARD_TWICE)
            ctx.consumed = True
            dhidden, dweight = ctx.saved_tensors
            # In place: once autograd has released the saved tensors, these become .grad as they are.
            return (_scaled(dhidden, grad_out) if need_dh else None,
                    _scaled(dweight, grad_out) if need_dw else None, *none)
        hidden, weight, labels = ctx.saved_tensors
        ignore_index, smoothing, z_loss, chunk, rows = ctx.args
        dhidden = torch.empty_like(hidden) if need_dh else None
        dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        _chunks(hidden, weight, labels, rows, grad_out.float().contiguous(), chunk, ignore_index,
                smoothing, z_loss, dhidden, dweight, None)
        dw = dweight.to(weight.dtype) if dweight is not None else None
        return dhidden, dw, *none
