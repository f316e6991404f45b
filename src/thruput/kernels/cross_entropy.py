"""Fused LM head + cross-entropy that never materialises the [tokens x vocab] logits.

The public entry point: argument checks, the chunk size, and the dispatch to one of the
implementations (thruput's chunked kernel in ``_ce_chunked`` with a torch or Triton row
operation, or torch's native chunked op), chosen for ``impl="auto"`` by the measured rule in
``_ce_auto``.
"""
from __future__ import annotations

from typing import Literal

import torch

from thruput.kernels._ce_auto import native_linear_cross_entropy, resolve
from thruput.kernels._ce_chunked import ChunkedLinearCrossEntropy

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["auto", "torch", "triton", "native"]

_CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MiB in fp32
# Below ~256 rows the three matmuls per chunk (logits, d hidden, and d weight, whose inner
# dimension is the chunk) lose efficiency: at vocab 128k, 64-row chunks cost ~12% more CPU time
# than the naive loss, 256-row chunks ~3%; memory stays a small fraction of the full logits.
_MIN_ROWS, _MAX_ROWS = 256, 4096


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk used when ``chunk_size`` is None: about 8 Mi logits, clamped to [256, 4096]."""
    return max(_MIN_ROWS, min(_MAX_ROWS, _CHUNK_ELEMENTS // max(vocab, 1)))


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
            at least 256 rows). One [chunk, vocab] logits block (plus an fp32 scratch block of
            the same shape, except for fp32 on CPU) is the loss's working memory, besides the
            gradients and the fp32 ``d weight`` accumulator.
        impl: ``"torch"`` (thruput's kernel with torch rows: any device, traceable by
            torch.compile), ``"triton"`` (thruput's kernel with Triton rows: CUDA tensors, or CPU
            tensors under ``TRITON_INTERPRET=1``), ``"native"`` (torch's chunked
            ``F.linear_cross_entropy`` at the same chunk rows: fp32, int64 labels, no smoothing
            or z-loss), or ``"auto"``: the fastest of these for the shape and device by the
            measured rule in ``thruput.kernels._ce_auto``, the native op only where it returns
            exactly the same. On CUDA without triton, ``"auto"`` runs the torch rows, warns once
            and records it in :func:`thruput.kernels.fallbacks`.

    Returns the loss in fp32 (the softmax math is fp32 for every input dtype). Gradients are
    returned in the inputs' dtypes; ``d weight`` is accumulated in fp32 across chunks. With
    ``reduction="mean"|"sum"`` the gradients are computed in forward and handed to ``.grad``
    without a copy, so a second backward through the same loss (``retain_graph=True``) raises
    ``RuntimeError``; ``"none"`` recomputes in backward and allows it.

    Raises ``ValueError`` for mismatched shapes or dtypes, a bad option, a label outside
    ``[0, vocab)`` that is not ``ignore_index`` (the label check costs one host sync on CUDA and
    is skipped while torch.compile traces) or ``impl="native"`` where torch's op differs;
    ``ImportError`` for ``impl="triton"`` without triton.
    """
    _validate(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    choice, rows = resolve(impl, flat_hidden, weight, flat_labels, ignore_index=ignore_index,
                           smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if choice == "native":
        out = native_linear_cross_entropy(flat_hidden, weight, flat_labels, ignore_index=ignore_index,
                                          reduction=reduction, chunk=chunk)
    else:
        grad_on = torch.is_grad_enabled()
        out = ChunkedLinearCrossEntropy.apply(
            flat_hidden, weight, flat_labels, ignore_index, float(label_smoothing), float(z_loss), reduction, chunk,
            rows, grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        )
    return out.reshape(labels.shape) if reduction == "none" else out
