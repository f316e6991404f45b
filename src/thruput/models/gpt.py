"""A small decoder-only GPT: RMSNorm, rotary embeddings, SDPA attention, MLP.

It accepts packed rows: ``segment_ids`` (or, without them, ``position_ids`` that do not continue
the previous token's) mark where a document begins, and attention is then confined to each
document, at a cost that follows the documents' lengths (``thruput.models.segments``).
``position_ids`` only set the rotary positions; rotary attention depends on position differences
alone, so a piece that continues its document's positions attends as it would from 0 (up to
rounding). Without either a row is one causal sequence and SDPA's fused causal path is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from thruput.models.gpt_config import GPTConfig
from thruput.models.segments import Segments, document_mask, document_starts, segment_attention

__all__ = ["GPT", "GPTConfig"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary(position_ids: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, 1, T, head_dim/2] for the given integer positions."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    angles = position_ids.to(torch.float32)[:, None, :, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments | torch.Tensor | None
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if segments is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(segments, Segments):
            y = segment_attention(q, k, v, segments)
        else:  # a dense [B, 1, T, T] document mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=segments)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments | torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, segments)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer.

    ``model(input_ids, position_ids, segment_ids)`` returns logits [B, T, vocab] (``position_ids``
    and ``segment_ids``: int [B, T], optional, see ``thruput.models.segments.document_starts``;
    positions default to 0..T-1 per row); ``model.hidden(...)``
    returns the final normed hidden states [B, T, d_model] so a fused loss can apply
    ``model.lm_head`` itself without materialising the logits.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=0.02)

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, d_model]."""
        b, t = input_ids.shape
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len {self.cfg.max_seq_len}")
        for name, ids in (("position_ids", position_ids), ("segment_ids", segment_ids)):
            if ids is not None and ids.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        positions = torch.arange(t, device=input_ids.device).expand(b, t) if position_ids is None else position_ids
        segments: Segments | torch.Tensor | None = None
        if self.cfg.attention == "dense_mask" and (position_ids is not None or segment_ids is not None):
            segments = document_mask(document_starts(position_ids, segment_ids))
        elif position_ids is not None or segment_ids is not None:
            segments = Segments.from_ids(position_ids, segment_ids)
        cos, sin = rotary(positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, position_ids, segment_ids))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the token embedding (a lookup, not a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, context_len: float | None = None) -> float:
        """Training FLOPs per token: 6*N + 12*n_layers*d_model*context_len (PaLM, appendix B).

        6N counts forward (2N) and backward (4N) matmuls over the non-embedding parameters
        N (the LM head included). The attention term covers QK^T and AV, whose cost grows with
        the context a token attends to: ``context_len`` defaults to ``max_seq_len``; for packed
        rows pass the mean per-token context (for documents of length L_i in a row of length T,
        sum(L_i^2) / T is the exact mean of the full-square convention PaLM uses).
        """
        ctx = self.cfg.max_seq_len if context_len is None else context_len
        return 6 * self.num_params() + 12 * self.cfg.n_layers * self.cfg.d_model * ctx
