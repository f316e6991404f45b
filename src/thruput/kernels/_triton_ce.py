"""The cross-entropy row operation as a Triton kernel (CUDA; CPU under ``TRITON_INTERPRET=1``).

Same contract as :func:`thruput.kernels._ce_rows.ce_rows_torch`. One program handles one row:
a first sweep over the vocabulary keeps an online max and sum of exponentials (and the row
sum for label smoothing), a second sweep writes the scaled gradient over the logits in place,
in the logits' dtype. The matmuls around it stay in cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(
    x_ptr, x_stride, labels_ptr, scale_ptr, scale_stride, loss_ptr,
    n_cols, ignore_index, smoothing, z_loss,
    BLOCK: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for off in range(0, n_cols, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                zero = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(x_row + cols, zero.to(x_ptr.dtype.element_ty), mask=cols < n_cols)
        return

    m = float("-inf")
    s = 0.0
    row_sum = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        if HAS_SMOOTHING:
            row_sum += tl.sum(tl.where(mask, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)

    z_y = tl.load(x_row + label).to(tl.float32)
    loss = lse - (1.0 - smoothing) * z_y
    if HAS_SMOOTHING:
        loss -= smoothing * row_sum / n_cols
    if HAS_Z:
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        p_coeff = 1.0
        if HAS_Z:
            p_coeff = 1.0 + 2.0 * z_loss * lse
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * p_coeff - smoothing / n_cols
            g = tl.where(cols == label, g - (1.0 - smoothing), g)
            tl.store(x_row + cols, (g * scale).to(x_ptr.dtype.element_ty), mask=mask)


def ce_rows_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | None,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    work: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch one program per row; the gradient (if ``scale``) overwrites ``logits``.

    ``work`` is accepted for the shared contract and unused: the kernel needs no scratch.
    """
    n, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("the Triton cross-entropy kernel needs logits rows contiguous in memory")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, (logits if scale is not None else None)
    block = min(triton.next_power_of_2(vocab), 8192 if logits.element_size() <= 2 else 4096)
    write_grad = scale is not None
    scale_arg = scale if write_grad else loss  # an unread placeholder pointer
    _ce_rows_kernel[(n,)](
        logits, logits.stride(0), labels, scale_arg, scale_arg.stride(0) if write_grad else 0, loss,
        vocab, ignore_index, float(smoothing), float(z_loss),
        BLOCK=block, HAS_SMOOTHING=bool(smoothing), HAS_Z=bool(z_loss), WRITE_GRAD=write_grad,
        num_warps=8 if block >= 4096 else 4,
    )
    return loss, (logits if write_grad else None)
