"""Attention confined to each document of a packed row, at a cost that follows the documents.

A packed row of length T holds documents of lengths L_i. A block-diagonal causal mask gives the
right answer, but a dense SDPA computes all T^2 scores of the row whichever the mask hides
(CPU SDPA has no variable-length kernel). ``segment_attention`` instead gathers the documents of
the whole batch into groups of similar padded length and runs SDPA's plain causal path on each
group: the work follows sum(L_i^2) instead of rows * T^2. Padding inside a group sits after each
document, so the causal path never lets a real token see it; its outputs are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Padded lengths of a group: powers of two and 1.5 times powers of two, so a document's padded
# square is at most (4/3)^2 = 1.78 times its own (16 is the floor: tinier groups cost calls).
_MIN_GROUP = 16


def document_starts(position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [B, T]: True where a document (or a piece of one) begins, and at every row's start.

    With ``segment_ids`` (the data plane's batches carry them): where the id changes. Without:
    where a position does not continue the previous one (the convention of padding-free packing,
    e.g. transformers' ``DataCollatorWithFlattening``; a row that begins mid-document, positions
    57, 58, ..., is one document). Positions cannot tell two pieces apart when the second
    continues a document at the position where the first ended, so a batch whose pieces continue
    their documents' positions needs ``segment_ids``.
    """
    ids = segment_ids if segment_ids is not None else position_ids
    if ids is None:
        raise ValueError("document_starts needs position_ids or segment_ids")
    starts = torch.ones_like(ids, dtype=torch.bool)
    if segment_ids is not None:
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    else:
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_mask(starts: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask from ``document_starts``: causal, and only within the same
    document (the reference that ``segment_attention`` equals)."""
    if starts.dtype != torch.bool:
        raise TypeError(f"document_mask takes the boolean document_starts(...), got a {starts.dtype} tensor")
    doc = starts.cumsum(dim=1)
    same_doc = doc[:, :, None] == doc[:, None, :]
    t = starts.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=starts.device).tril()
    return (same_doc & causal)[:, None]


def _padded_length(lengths: torch.Tensor) -> torch.Tensor:
    """Each length rounded up to the next of 16, 24, 32, 48, 64, 96, ..."""
    lengths = lengths.clamp(min=_MIN_GROUP)
    power = torch.exp2(torch.floor(torch.log2((lengths - 1).double()))).long()  # largest 2^k < L
    return torch.where(lengths <= power + power // 2, power + power // 2, 2 * power)


@dataclass(frozen=True)
class Segments:
    """Where the documents of a [B, T] batch sit, grouped by padded length.

    Each group is ``(index, valid)``: ``index`` [n, Lg] gathers a group's n documents from the
    flattened B*T positions (padding repeats a document's first position), ``valid`` [n, Lg]
    marks the real tokens. Every position of the batch is valid in exactly one group.
    """

    shape: tuple[int, int]
    groups: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    @torch.compiler.disable  # nonzero/unique: data-dependent shapes, computed eagerly
    def from_ids(cls, position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> Segments:
        """The documents that ``document_starts(position_ids, segment_ids)`` finds."""
        found = document_starts(position_ids, segment_ids)
        b, t = found.shape
        starts = found.flatten().nonzero().squeeze(1)
        lengths = torch.diff(starts, append=torch.tensor([b * t], device=starts.device))
        padded = _padded_length(lengths)
        groups = []
        for size in padded.unique().tolist():
            chosen = padded == size
            first, n = starts[chosen], lengths[chosen]
            offsets = torch.arange(size, device=starts.device)
            valid = offsets < n[:, None]
            index = torch.where(valid, first[:, None] + offsets, first[:, None])
            groups.append((index, valid))
        return cls((b, t), groups)


@torch.compiler.disable  # data-dependent group shapes: run eagerly between compiled regions
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Causal attention of q, k, v [B, H, T, D] within each document of ``segments``; [B, H, T, D].

    Equal to SDPA with ``document_mask`` up to floating-point summation order.
    """
    b, h, t, d = q.shape
    if (b, t) != segments.shape:
        raise ValueError(f"segments describe a {segments.shape} batch, attention got {(b, t)}")
    flat = [x.transpose(1, 2).reshape(b * t, h, d) for x in (q, k, v)]
    out = q.new_empty(b * t, h, d)
    for index, valid in segments.groups:
        qg, kg, vg = (x[index].transpose(1, 2) for x in flat)  # [n, H, Lg, D]
        y = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).transpose(1, 2)
        out[index[valid]] = y[valid]
    return out.view(b, t, h, d).transpose(1, 2)
