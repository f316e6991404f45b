"""``patch(model)``: thruput's fused loss and per-document attention on one transformers causal LM."""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils.generic import TransformersKwargs

from thruput.hf import attention as _attention
from thruput.hf.batch import LOADER_KEYS, hf_batch, is_loader_batch
from thruput.hf.families import family_of, refusals
from thruput.hf.loss import causal_lm_loss, shifted_targets

# Taken by every patched forward besides its own parameters: transformers' forward kwargs, the
# targets already shifted, the deprecated name of the cache, and thruput's logits switch.
_EXTRA_KEYS = frozenset(TransformersKwargs.__optional_keys__ | TransformersKwargs.__required_keys__) | {
    "shift_labels", "return_dict", "past_key_values", "return_logits"}


@dataclass(frozen=True)
class Options:
    loss: bool
    attention: bool
    label_smoothing: float


class PatchedForward:
    """The forward of a patched model: an object, so ``copy.deepcopy(model)`` patches the copy.

    ``inspect.signature`` gives the model's own forward signature (transformers' generation and
    Trainer read it).
    """

    def __init__(self, model: nn.Module, options: Options) -> None:
        self.model, self.options = model, options
        params = list(self.__signature__.parameters.values())
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.accepted = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)) \
            | _EXTRA_KEYS

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def _original(self, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, **kwargs)

    def _keywords(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional arguments named, a Loader batch turned into transformers' keys, keys checked."""
        if len(args) > len(self.positional):
            raise TypeError(f"{type(self.model).__name__}.forward() takes {len(self.positional)} positional arguments")
        for name, value in zip(self.positional, args):
            if name in kwargs:
                raise TypeError(f"{type(self.model).__name__}.forward() got multiple values for {name!r}")
            kwargs[name] = value
        if is_loader_batch(kwargs):
            converted = hf_batch({k: kwargs.pop(k) for k in list(kwargs) if k in LOADER_KEYS})
            clash = sorted(set(converted) & set(kwargs))
            if clash:
                raise TypeError(f"{type(self.model).__name__}.forward(): {clash} given both by the thruput "
                                "batch and separately")
            kwargs.update(converted)
        unknown = sorted(set(kwargs) - self.accepted)
        if unknown:
            raise TypeError(f"{type(self.model).__name__}.forward() got keys it does not take: {unknown} "
                            "(a patched model refuses them instead of ignoring them)")
        return kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._keywords(args, kwargs)
        return_logits = kwargs.pop("return_logits", None)
        if self.options.attention:
            kwargs["thruput_documents"] = _attention.Documents(kwargs.get("position_ids"),
                                                               kwargs.get("cu_seq_lens_q"))
        if not self.options.loss:
            return self._original(**kwargs)
        targets = shifted_targets(kwargs.pop("labels", None), kwargs.pop("shift_labels", None))
        num_items = kwargs.pop("num_items_in_batch", None)
        if targets is None:
            return self._original(**kwargs)
        want_logits = not self.model.training if return_logits is None else bool(return_logits)
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(self.model.config, "return_dict", True) if return_dict is None else return_dict
        if not want_logits:  # the LM head runs on no position: the fused loss does its work
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=targets.device)
        out, hidden = self._run_keeping_hidden(kwargs)
        loss = causal_lm_loss(hidden, self._head_weight(), targets, num_items_in_batch=num_items,
                              label_smoothing=self.options.label_smoothing)
        out = type(out)(**{**out, "loss": loss, "logits": out.logits if want_logits else None})
        return out if return_dict else out.to_tuple()

    def _run_keeping_hidden(self, kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """The model's forward output, and the decoder's last hidden state (the LM head's input)."""
        seen: list[torch.Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            seen.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = self.model.base_model.register_forward_hook(keep)
        try:
            out = self._original(**kwargs, return_dict=True)
        finally:
            handle.remove()
        return out, seen[-1]

    def _head_weight(self) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            raise TypeError(f"{type(self.model).__name__}'s LM head became {type(head).__name__} after "
                            "thruput.hf.patch; the fused loss needs a plain nn.Linear without bias "
                            "(patch a fresh model with loss=False)")
        return head.weight


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (LoRA layers and all), else ``model``."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _own_config(model: nn.Module) -> None:
    """Give ``model`` a config of its own: models built from one config object share it, and the
    attention implementation is set on it."""
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own


def patch(model: nn.Module, *, loss: bool = True, attention: bool = True,
          label_smoothing: float = 0.0) -> nn.Module:
    """Put thruput's levers on a transformers causal LM (this instance only); returns ``model``.

    ``loss``: in training mode with ``labels`` (or ``shift_labels``), the loss is thruput's fused
    linear cross-entropy, the ``[tokens x vocab]`` logits never exist in full and the output's
    ``logits`` is None. Same semantics as the model's ``ForCausalLMLoss``: ``labels`` are shifted
    (``shift_labels`` are not), -100 is ignored, ``num_items_in_batch`` turns the mean into a
    sum divided by it. ``label_smoothing`` as in ``F.cross_entropy``; transformers' Trainer with
    ``label_smoothing_factor`` pops the labels and smooths the logits itself, which stays correct
    but unfused: use this argument instead. Logits are returned in eval mode, without labels, or
    with ``return_logits=True`` in the call (with labels, the loss is then still the fused one).

    ``attention``: attention implementation ``"thruput"`` (:mod:`thruput.hf.attention`): each
    document of a packed row attends only to itself, at a cost that follows sum(L^2), on any
    device, with or without a cache (transformers' own packed-sequence handling is off when
    ``use_cache`` is on, the default).

    The patched model also takes a thruput Loader batch as it comes, ``model(**batch)`` (its
    shifted ``labels``, boundaries and metadata are understood), and refuses keys its forward
    does not take with a ``TypeError`` naming them. A peft ``PeftModel`` is patched through its
    base model. The model gets its own copy of its config.

    Raises ``TypeError`` for an unsupported class (the message lists the supported ones),
    ``ValueError`` for a config or head the levers cannot serve (with what to do instead), or for
    patching again with other options (patching again with the same ones does nothing). Nothing
    is changed when it raises.
    """
    options = Options(bool(loss), bool(attention), float(label_smoothing))
    target = _unwrap(model)
    family = family_of(target)
    current = target.__dict__.get("forward")
    if isinstance(current, PatchedForward):
        if current.options != options:
            raise ValueError(f"{type(target).__name__} is already patched with {current.options}; "
                             f"patch a fresh model for {options}")
        return model
    if not 0.0 <= options.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    problems = refusals(target, family, loss=options.loss, attention=options.attention)
    if problems:
        raise ValueError("thruput.hf.patch: " + "; ".join(problems))
    if options.attention:
        _own_config(target)
        target.set_attn_implementation(_attention.register())
    target.forward = PatchedForward(target, options)
    return model
