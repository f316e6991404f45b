"""Cross-entropy over one chunk of logit rows, in pure torch (the reference row operation).

Both row operations (this one and the Triton kernel in ``_triton_ce``) share one contract:

    rows(logits [n, V], labels [n], scale [n] fp32 | None, ignore_index, smoothing, z_loss,
         work [n, V] fp32 | None) -> (loss [n] fp32, grad [n, V] | None)

``loss[i] = lse_i - (1 - s) * z[i, y_i] - s * mean_j z[i, j] + z_loss * lse_i**2`` for a kept
row, 0 for a row whose label is ``ignore_index``. With ``scale`` given, ``grad`` is
``scale[i] * d loss[i] / d z[i, :]`` (zero rows for ignored labels). ``work`` is scratch space
the caller may pass so that no [n, V] tensor is allocated per chunk; it may be fp32 ``logits``
itself on CPU (the softmax then runs in place). ``grad`` may live in the storage of ``logits``
or ``work``, which the caller must not read afterwards.
"""
from __future__ import annotations

import torch


def ce_rows_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | None,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    work: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row operation in torch ops; the softmax math runs in fp32 whatever the input dtype.

    Every pass over the [n, V] block costs memory bandwidth comparable to a matmul on CPU, so
    the block is touched a minimal number of times: one fused log-softmax, one ``exp_``, one
    scaling pass (a second only with label smoothing); the rest works on [n] vectors.
    """
    x = logits.float()  # a no-op for fp32 logits
    vocab = x.shape[1]
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))[:, None]
    z_y = x.gather(1, safe).squeeze(1) if z_loss else None  # read before an in-place softmax
    # log p straight from the fused kernel: more accurate than lse - z_y when p_y is near 1
    logp = torch.log_softmax(x, dim=1) if work is None else torch.log_softmax(x, dim=1, out=work)
    logp_y = logp.gather(1, safe).squeeze(1)
    loss = (smoothing - 1.0) * logp_y
    if smoothing:
        loss = loss - smoothing * logp.mean(dim=1)
    if z_loss:
        lse = z_y - logp_y
        loss = loss + z_loss * lse * lse
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if scale is None:
        return loss, None
    row_scale = scale * keep
    p_coeff = row_scale * (1.0 + 2.0 * z_loss * lse) if z_loss else row_scale
    grad = logp.exp_()  # softmax, in place
    if smoothing:
        torch.addcmul((-smoothing / vocab * row_scale)[:, None], grad, p_coeff[:, None], out=grad)
    else:
        grad.mul_(p_coeff[:, None])
    grad.scatter_add_(1, safe, ((smoothing - 1.0) * row_scale)[:, None])
    return loss, grad
