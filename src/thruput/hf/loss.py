"""transformers' causal-LM loss (``ForCausalLMLoss``) computed by thruput's fused linear cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from thruput.kernels import linear_cross_entropy
from thruput.labels import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor | None:
    """The target of every position: ``shift_labels`` as given, else ``labels`` moved one to the
    left with ``IGNORE_INDEX`` at the end of each row (what ``ForCausalLMLoss`` does)."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        return None
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   num_items_in_batch: torch.Tensor | int | None = None, label_smoothing: float = 0.0,
                   chunk_size: int | None = None) -> torch.Tensor:
    """``ForCausalLMLoss(hidden @ weight.T, ...)`` without the [tokens x vocab] logits; fp32 scalar.

    ``hidden`` [B, T, d] (the last hidden state, before the LM head ``weight`` [vocab, d]),
    ``targets`` [B, T] from :func:`shifted_targets` (-100 ignored). The mean over kept targets,
    or, with ``num_items_in_batch``, their sum divided by it (gradient accumulation then equals one
    big batch). ``label_smoothing`` as in ``F.cross_entropy`` and transformers' ``LabelSmoother``.
    Under autocast both operands take the autocast dtype, as the LM head's matmul would.
    """
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(targets.shape)} != input shape {tuple(hidden.shape[:-1])}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, weight, targets.to(hidden.device), ignore_index=IGNORE_INDEX,
                                label_smoothing=label_smoothing, reduction=reduction, chunk_size=chunk_size)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
