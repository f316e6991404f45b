"""A thruput Loader batch in Hugging Face's convention.

The Loader's targets are already shifted (``shift_labels[b, t]`` is the target of
``input_ids[b, t]``; see ``thruput.data.Loader``), under the name transformers' loss gives
shifted targets. A Loader batch has no ``labels``, so an unpatched model given it raw computes
no loss (it never shifts the targets twice). :func:`hf_batch` passes ``shift_labels``: unlike
unshifted ``labels`` they keep the target of each row's last token (the next token of a
document that continues in another row). The batch's document boundaries become
transformers' packed-sequence keys, and ``use_cache=False`` keeps an unpatched model's own
packed-sequence detection on (transformers turns it off when a cache is in use).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from thruput.hf.loss import IGNORE_INDEX

# The keys of a thruput Loader batch (no ``labels``: a call that adds them is refused as a clash).
TENSOR_KEYS = frozenset({"input_ids", "shift_labels", "position_ids", "segment_ids", "cu_seqlens",
                         "max_seqlen"})
METADATA_KEYS = frozenset({"tokens_per_source", "padding_ratio", "documents", "step"})
LOADER_KEYS = TENSOR_KEYS | METADATA_KEYS
# Present only in a Loader batch: a call carrying any of them is read as one.
MARKER_KEYS = frozenset({"cu_seqlens", "max_seqlen"}) | METADATA_KEYS


def is_loader_batch(keys: Any) -> bool:
    """Whether a call's keys are those of a thruput Loader batch."""
    return not MARKER_KEYS.isdisjoint(keys)


def unshifted_labels(shift_labels: torch.Tensor) -> torch.Tensor:
    """transformers' ``labels`` for the targets ``shift_labels``: one to the right, -100 first.

    Shifting them back gives ``shift_labels`` except at each row's last position (lost)."""
    return torch.cat([torch.full_like(shift_labels[..., :1], IGNORE_INDEX), shift_labels[..., :-1]], dim=-1)


def _visible_boundaries(position_ids: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """``position_ids`` with every piece boundary visible to transformers' packed-sequence rule.

    A piece of a split document continues its document's positions; where it follows, in the
    same row, a piece that ended just before that position, the positions alone would merge the
    two (an unpatched model finds documents by positions that do not continue). Such a piece is
    renumbered from 0; every other position is kept.
    """
    if segment_ids is None:
        return position_ids
    new_piece = torch.zeros_like(segment_ids, dtype=torch.bool)
    new_piece[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    hidden = new_piece.clone()
    hidden[:, 1:] &= position_ids[:, 1:] == position_ids[:, :-1] + 1
    if not bool(hidden.any()):
        return position_ids
    starts = new_piece.clone()
    starts[:, 0] = True
    index = torch.arange(position_ids.shape[1], device=position_ids.device).expand_as(position_ids)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values
    piece_hidden = torch.gather(hidden, 1, first)  # this position's piece starts invisibly
    return torch.where(piece_hidden, index - first, position_ids)


def hf_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``model(**hf_batch(batch))`` for any transformers causal LM, patched or not.

    ``batch``: a thruput Loader batch. Returns ``input_ids``, ``position_ids``, ``shift_labels``
    (the Loader's shifted labels: every target, including each row's last), ``labels`` (the same
    targets in transformers' unshifted convention, -100 at each row start; the model's loss uses
    ``shift_labels`` and needs ``labels`` only to be given), ``cu_seq_lens_q``/``cu_seq_lens_k``
    and ``max_length_q``/``max_length_k`` (from ``cu_seqlens``, ``max_seqlen``) and
    ``use_cache=False``. Metadata (``documents``, ``step``, ...) and ``segment_ids`` (the
    pieces are in ``cu_seqlens``) are left out; a piece that continues its document's positions
    right where the previous piece of its row ended is renumbered from 0, so that an unpatched
    model's packed-sequence rule sees the boundary.

    Raises ``ValueError`` naming keys that are not a Loader batch's (nothing is dropped silently;
    ``labels`` is one: a Loader's targets are ``shift_labels``).
    """
    unknown = sorted(set(batch) - LOADER_KEYS)
    if unknown:
        raise ValueError(f"hf_batch: {unknown} are not keys of a thruput Loader batch "
                         f"(known: {sorted(LOADER_KEYS)}); pass them to the model separately")
    out: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        out["position_ids"] = _visible_boundaries(batch["position_ids"], batch.get("segment_ids"))
    targets = batch.get("shift_labels")
    if targets is not None:
        out["shift_labels"] = targets
        out["labels"] = unshifted_labels(targets)
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
        longest = batch.get("max_seqlen")
        out["max_length_q"] = out["max_length_k"] = int(cu.diff().max()) if longest is None else int(longest)
    return out
