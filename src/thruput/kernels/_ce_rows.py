"""Cross-entropy over one chunk of logit rows, in pure torch (the reference row operation).

Both row operations (this one and the Triton kernel in ``_triton_ce``) share one contract:

    rows(logits [n, V], labels [n], scale [n] fp32 | None, ignore_index, smoothing, z_loss)
        -> (loss [n] fp32, grad [n, V] | None)

``loss[i] = lse_i - (1 - s) * z[i, y_i] - s * mean_j z[i, j] + z_loss * lse_i**2`` for a kept
row, 0 for a row whose label is ``ignore_index``. With ``scale`` given, ``grad`` is
``scale[i] * d loss[i] / d z[i, :]`` (zero rows for ignored labels); it may reuse the storage of
``logits``, which the caller must not read afterwards.
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row operation in torch ops; the softmax math runs in fp32 whatever the input dtype."""
    x = logits.float()  # a no-op for fp32 logits, so the in-place ops below reuse their storage
    vocab = x.shape[1]
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(x, dim=1)
    loss = lse - (1.0 - smoothing) * x.gather(1, safe[:, None]).squeeze(1)
    if smoothing:
        loss = loss - smoothing * x.mean(dim=1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if scale is None:
        return loss, None
    grad = x.sub_(lse[:, None]).exp_()  # softmax, in place
    if z_loss:
        grad.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    if smoothing:
        grad.sub_(smoothing / vocab)
    grad.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], smoothing - 1.0))
    grad.mul_((scale * keep)[:, None])
    return loss, grad
