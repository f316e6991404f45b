"""The transformers causal LMs :func:`thruput.hf.patch` supports, and what each must not use.

A family is supported once its forward in transformers has been read for anything that changes
the logits or the attention (logit scaling, soft-capping, bidirectional attention) and tested
for parity with the unpatched model. Adding one: read its ``modeling_*.py``, add a row, add it
to the parity tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss


@dataclass(frozen=True)
class Family:
    """Config attributes that must be unset (None, False or 0) for each lever, and why."""

    loss_blockers: tuple[tuple[str, str], ...] = ()
    attention_blockers: tuple[tuple[str, str], ...] = ()


_SOFTCAP = ("final_logit_softcapping", "the fused loss has no soft-capping of the final logits")
_BIDIRECTIONAL = ("use_bidirectional_attention", "thruput attention is causal only")

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(),
    "Qwen2ForCausalLM": Family(),
    "Qwen3ForCausalLM": Family(),
    "GemmaForCausalLM": Family(),
    "Gemma2ForCausalLM": Family(loss_blockers=(_SOFTCAP,), attention_blockers=(_BIDIRECTIONAL,)),
    "Gemma3ForCausalLM": Family(loss_blockers=(_SOFTCAP,), attention_blockers=(_BIDIRECTIONAL,)),
    "GPT2LMHeadModel": Family(attention_blockers=(("add_cross_attention", "cross-attention is not supported"),)),
}


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model; ``TypeError`` naming the class and the supported ones."""
    cls = type(model)
    family = FAMILIES.get(cls.__name__) if cls.__module__.startswith("transformers.") else None
    if family is None:
        raise TypeError(f"thruput.hf.patch does not support {cls.__module__}.{cls.__qualname__}; "
                        f"supported: {', '.join(sorted(FAMILIES))}")
    return family


def refusals(model: nn.Module, family: Family, *, loss: bool, attention: bool) -> list[str]:
    """Why the asked-for levers cannot be applied to ``model`` (empty: they can)."""
    config, name = model.config, type(model).__name__
    problems = []
    checks = (family.loss_blockers if loss else ()) + (family.attention_blockers if attention else ())
    for key, why in checks:
        value = getattr(config, key, None)
        if value:
            lever = "loss" if (key, why) in family.loss_blockers else "attention"
            problems.append(f"{name} config.{key}={value!r}: {why} (patch(model, {lever}=False) keeps the model's own)")
    if loss:
        head = model.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            problems.append(f"{name}'s LM head is {type(head).__name__}"
                            f"{' with a bias' if getattr(head, 'bias', None) is not None else ''}: "
                            "the fused loss needs a plain nn.Linear without bias (patch(model, loss=False))")
        if model.loss_function is not ForCausalLMLoss:
            problems.append(f"{name} has a custom loss_function: the fused loss would replace it "
                            "(patch(model, loss=False))")
    if attention and not model._can_set_attn_implementation():
        problems.append(f"{name} does not use transformers' AttentionInterface")
    return problems
