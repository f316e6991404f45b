"""Model kind ``"gpt"``: thruput's small GPT (``thruput.models.gpt``) as a run trains it.

The loss is naive (full logits) or thruput's fused chunked linear cross-entropy
(``kernels.fused_cross_entropy``); with ``kernels.compile`` the model (naive loss) or its
``hidden`` (fused loss: the chunked LM head stays outside the graph, so the logits never exist
in full) runs through shape-bucketed ``torch.compile``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from thruput.atomic import write_atomic
from thruput.labels import IGNORE_INDEX
from thruput.models.gpt import GPT
from thruput.models.gpt_config import GPTConfig


class GPTModel:
    """A :class:`~thruput.models.kinds.TrainModel` around a :class:`GPT`."""

    def __init__(self, module: GPT, fused_loss: bool, compile_buckets: list[int] | None) -> None:
        self.module = module
        self.fused_loss = fused_loss
        self.compiled = None
        if compile_buckets is not None:
            from thruput.kernels import compile as compile_model

            self.compiled = compile_model(module.hidden if fused_loss else module, compile_buckets)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        args = (batch["input_ids"], batch.get("position_ids"), batch.get("segment_ids"))
        labels = batch["shift_labels"].flatten()
        if self.fused_loss:
            from thruput.kernels import linear_cross_entropy

            hidden = (self.compiled or self.module.hidden)(*args)
            weight = self.module.lm_head.weight.to(hidden.dtype)  # bf16 under autocast; a no-op in fp32
            return linear_cross_entropy(hidden.flatten(0, 1), weight, labels, ignore_index=IGNORE_INDEX)
        logits = (self.compiled or self.module)(*args)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=IGNORE_INDEX)

    def flops(self, batch: Mapping[str, Any]) -> float:
        """6N per token plus attention over each document's length (``GPT.flops_per_token``)."""
        lengths = batch["cu_seqlens"].diff().to(torch.float64)
        tokens = batch["input_ids"].numel()
        return self.module.flops_per_token(float((lengths**2).sum()) / tokens) * tokens

    def num_params(self) -> int:
        return self.module.num_params(non_embedding=False)

    def counters(self) -> dict[str, float]:
        if self.compiled is None:
            return {}
        return {k: v for k, v in self.compiled.stats().items() if isinstance(v, (int, float))}

    def fallbacks(self) -> dict[str, str]:
        reason = None if self.compiled is None else self.compiled.stats()["fallback"]
        return {"compile": reason} if reason else {}

    def save(self, directory: Path) -> None:
        """``config.json`` (the ``GPTConfig``) and ``model.pt`` (the state dict) in ``directory``."""
        from dataclasses import asdict

        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        write_atomic(directory / "model.pt", lambda f: torch.save(state, f))
        write_atomic(directory / "config.json", lambda f: f.write(json.dumps(asdict(self.module.cfg)).encode()))


def build(cfg: Any, device: torch.device) -> GPTModel:
    """The run's GPT on ``device`` (initialised from the current torch seed)."""
    seq = cfg.data.seq_len
    # The data plane's rows are always seq_len long; shorter buckets serve padded loaders.
    buckets = sorted({max(1, seq // 4), max(1, seq // 2), seq}) if cfg.kernels.compile else None
    return GPTModel(GPT(cfg.model).to(device), cfg.kernels.fused_cross_entropy, buckets)


def vocab_size(model_cfg: GPTConfig) -> tuple[str, int]:
    return "model.vocab_size", model_cfg.vocab_size


def transformer_shape(model_cfg: GPTConfig) -> dict[str, float]:
    return {"d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers, "vocab_size": model_cfg.vocab_size,
            "mlp_ratio": model_cfg.mlp_ratio}


def tokenizer(model_cfg: GPTConfig) -> None:
    return None  # trained from scratch: the run's data.tokenizer (default bytes) sets the vocabulary
