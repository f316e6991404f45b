"""thruput's per-document attention as the transformers attention implementation ``"thruput"``.

A packed row holds several documents; each must attend only to itself. Where the documents are
comes from ``cu_seq_lens_q`` (flash-attention style boundaries over the flattened batch) when
given, else from ``position_ids`` (a document starts where a position does not continue the
previous one), else every row is one causal sequence (:func:`document_segments`). The documents
of the whole batch are grouped by padded length and each group runs one attention call, so the
cost follows sum(L_i^2), not rows * T^2 (``thruput.models.segments``).

Two registrations make it work: the attention function (``AttentionInterface``) and a mask
function (``AttentionMaskInterface``). The mask function builds no mask at all where there is
none to build (no cache offset, no padding in ``attention_mask``): attention then follows the
documents. Where there is one (generation with a cache, a padded ``attention_mask``) it builds
transformers' own SDPA mask and attention applies it densely, as ``sdpa`` would.

Handled: grouped-query attention, the module's ``scaling``, attention dropout in training,
sliding windows (any document length: a banded mask per group), attention-logit soft-capping
(Gemma2: explicit softmax per group). Refused: bidirectional attention (``is_causal=False``).
Attention weights are not returned (``None``, like ``sdpa``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from thruput.models.segments import Segments, document_starts

ATTENTION = "thruput"


def document_segments(shape: tuple[int, int], position_ids: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None) -> Segments | None:
    """Where the documents of a ``[B, T]`` batch are; None when every row is one document.

    ``cu_seqlens`` (int ``[n + 1]``, boundaries over the flattened ``B*T`` tokens, 0 first and
    ``B*T`` last, every row start among them) wins over ``position_ids`` (``[B, T]`` or ``[1, T]``;
    a document starts where a position does not continue the previous one, so a row that begins
    mid-document at positions 57, 58, ... is one document). Raises ``ValueError`` for boundaries
    that do not describe the batch.
    """
    b, t = shape
    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.long).flatten()
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != b * t or bool((cu.diff() <= 0).any()):
            raise ValueError(f"cu_seqlens {cu.tolist()[:8]}... must rise strictly from 0 to B*T = {b * t}")
        starts = torch.zeros(b * t, dtype=torch.bool, device=cu.device)
        starts[cu[:-1]] = True
        if not bool(starts[::t].all()):
            raise ValueError(f"cu_seqlens: a sequence crosses a row boundary (rows of {t} tokens); "
                             "every multiple of T must be a boundary")
    elif position_ids is not None:
        if position_ids.shape[-1] != t or position_ids.shape[0] not in (1, b):
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not fit a {(b, t)} batch")
        starts = document_starts(position_ids.expand(b, t)).flatten()
    else:
        return None
    if int(starts.sum()) == b:
        return None
    return Segments.from_ids(segment_ids=starts.view(b, t).cumsum(1))


class Documents:
    """The documents of one forward pass, found once on first use and shared by every layer."""

    def __init__(self, position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> None:
        self.position_ids, self.cu_seqlens = position_ids, cu_seqlens
        self._found: dict[tuple[int, int], Segments | None] = {}

    def segments(self, shape: tuple[int, int]) -> Segments | None:
        if shape not in self._found:
            self._found[shape] = document_segments(shape, self.position_ids, self.cu_seqlens)
        return self._found[shape]


def _band(length: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal sliding-window mask [L, L]: query i sees keys j with 0 <= i - j < window (as HF)."""
    offset = torch.arange(length, device=device)
    diff = offset[:, None] - offset[None, :]
    return (diff >= 0) & (diff < window)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, causal: bool,
            window: int | None, scale: float, softcap: float | None, dropout: float) -> torch.Tensor:
    """Attention of q [N, H, Lq, D] over k, v [N, Hkv, Lk, D] (Hkv divides H); [N, H, Lq, D].

    ``mask``: bool (True attends) or additive, broadcast to [N, H, Lq, Lk]; ``causal`` with
    ``window`` adds the sliding window."""
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if causal and window is not None and q.shape[2] > window:
        mask, causal = _band(q.shape[2], window, q.device), False
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                              scale=scale)
    # Soft-capping acts on the scores before the softmax: no fused kernel has it, so do what
    # Gemma2's eager attention does, on this group only.
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    probs = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout)
    return torch.matmul(probs, v)


def _segment_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                    **options: Any) -> torch.Tensor:
    """Causal attention within each document of ``segments``: one call per group of documents."""
    b, h, t, d = q.shape
    flat_q = q.transpose(1, 2).reshape(b * t, h, d)
    flat_k, flat_v = (x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3]) for x in (k, v))
    out = q.new_empty(b * t, h, v.shape[3])
    for index, valid in segments.groups:
        qg, kg, vg = (x[index].transpose(1, 2) for x in (flat_q, flat_k, flat_v))  # [n, heads, Lg, D]
        y = _attend(qg, kg, vg, mask=None, causal=True, **options).transpose(1, 2)
        out[index[valid]] = y[valid]
    return out.view(b, t, h, v.shape[3]).transpose(1, 2)


def thruput_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``"thruput"`` attention: q [B, H, T, D], k, v [B, Hkv, S, D] -> ([B, T, H, D], None)."""
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise ValueError("thruput attention is causal only; bidirectional attention (is_causal=False) "
                         "needs attn_implementation='sdpa'")
    options = {"scale": query.shape[-1] ** -0.5 if scaling is None else scaling, "softcap": softcap,
               "dropout": dropout if module.training else 0.0}
    if attention_mask is not None:  # built by thruput_mask: cache offset or padding, as sdpa does
        out = _attend(query, key, value, mask=attention_mask, causal=False, window=None, **options)
    else:
        b, _, t, _ = query.shape
        if key.shape[2] != t:
            raise RuntimeError(f"thruput attention got {t} queries and {key.shape[2]} keys without a mask; "
                               f"the model must build its mask with create_causal_mask")
        documents = kwargs.get("thruput_documents")
        segments = documents.segments((b, t)) if isinstance(documents, Documents) else \
            document_segments((b, t), kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"))
        options["window"] = sliding_window
        out = _attend(query, key, value, mask=None, causal=True, **options) if segments is None \
            else _segment_attend(query, key, value, segments, **options)
    return out.transpose(1, 2).contiguous(), None


def thruput_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The ``"thruput"`` mask: None where queries and keys coincide and nothing is padded (attention
    then follows the documents); otherwise transformers' 4D SDPA mask (True attends)."""
    aligned = q_length == kv_length and int(q_offset) == 0 and int(kv_offset) == 0
    if aligned and (attention_mask is None or bool(attention_mask.all())):
        return None
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register ``"thruput"`` with transformers' attention and mask interfaces (idempotent); its name."""
    AttentionInterface.register(ATTENTION, thruput_attention)
    AttentionMaskInterface.register(ATTENTION, thruput_mask)
    return ATTENTION
