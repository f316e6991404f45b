"""Model kinds: what ``thruput train`` can train, chosen by ``[model] kind`` (default ``"gpt"``).

A kind is a torch-free dataclass, the ``[model]`` table of its runs (its ``kind`` field's
default is the kind's name), and an implementation module, imported only when a run uses the
kind, that defines:

* ``build(cfg: RunConfig, device: torch.device) -> TrainModel``: the model on ``device``, with
  the run's kernels (fused loss, compile) applied;
* ``vocab_size(model_cfg) -> (key, size)``: the vocabulary the tokenizer must fit in, and the
  dotted config key that sets it (checked before anything is built);
* ``tokenizer(model_cfg) -> str | None``: the tokenizer the model comes with, used when
  ``data.tokenizer`` is not set.

``thruput.config`` reads the ``[model]`` table into the class registered for its ``kind``;
:func:`register_model_kind` adds a kind.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from thruput.models.gpt_config import GPTConfig
from thruput.models.hf_config import HFModelConfig

if TYPE_CHECKING:
    import torch


class TrainModel(Protocol):
    """What the training loop needs of a model, whatever its kind."""

    module: torch.nn.Module  # the trained module: its state_dict() is a checkpoint's "model"

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over the batch's labelled positions (``shift_labels`` != -100)."""

    def flops(self, batch: Mapping[str, Any]) -> float:
        """Training FLOPs (forward and backward) of one batch, attention over each document's length."""

    def num_params(self) -> int:
        """Every parameter, trainable or not."""

    def counters(self) -> dict[str, float]:
        """Numbers for the profiler's per-step counters (e.g. compile's recompiles); may be empty."""

    def fallbacks(self) -> dict[str, str]:
        """The model's own pieces that run a slower path than configured, and why."""

    def save(self, directory: Path) -> None:
        """Write the weights in the kind's own format (for use outside thruput)."""


@dataclass(frozen=True)
class ModelKind:
    """A registered kind: its ``[model]`` table and the module that implements it."""

    config: type
    implementation: str

    def module(self) -> Any:
        return importlib.import_module(self.implementation)


_KINDS: dict[str, ModelKind] = {
    "gpt": ModelKind(GPTConfig, "thruput.models.gpt_kind"),
    "hf": ModelKind(HFModelConfig, "thruput.hf.model_kind"),
}


def register_model_kind(name: str, config: type, implementation: str) -> None:
    """Add a kind: ``config`` is its ``[model]`` dataclass (with ``kind: Literal[name] = name``),
    ``implementation`` the module path defining ``build``, ``vocab_size``, ``tokenizer`` and
    ``transformer_shape``."""
    _KINDS[name] = ModelKind(config, implementation)


def model_kinds() -> dict[str, ModelKind]:
    """The registered kinds by name."""
    return dict(_KINDS)


def kind_of(model_cfg: Any) -> ModelKind:
    return _KINDS[model_cfg.kind]


def build_model(cfg: Any, device: torch.device) -> TrainModel:
    """The model of run ``cfg`` (a ``RunConfig``) on ``device``, built by its kind."""
    return kind_of(cfg.model).module().build(cfg, device)


def vocab_size(model_cfg: Any) -> tuple[str, int]:
    """(dotted config key, vocabulary size) of the configured model."""
    return kind_of(model_cfg).module().vocab_size(model_cfg)


def bundled_tokenizer(model_cfg: Any) -> str | None:
    """The tokenizer the configured model comes with, or None."""
    return kind_of(model_cfg).module().tokenizer(model_cfg)


def transformer_shape(model_cfg: Any) -> dict[str, float]:
    """The configured model as ``CostModel.for_transformer`` takes it (``d_model``, ``n_layers``,
    ``vocab_size``, ``mlp_ratio``): what the data plane balances ranks by."""
    return kind_of(model_cfg).module().transformer_shape(model_cfg)
