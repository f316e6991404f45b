"""Tiny random transformers causal LMs for the thruput.hf tests (no downloads)."""
from __future__ import annotations

import copy

import torch
import transformers as tf

VOCAB = 256
WINDOW = 6  # sliding window of the families that have one: shorter than the test documents

_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, attention_dropout=0.0)


def _config(name: str) -> tf.PretrainedConfig:
    if name == "llama":
        return tf.LlamaConfig(**_SHAPE)
    if name == "mistral":
        return tf.MistralConfig(**_SHAPE, sliding_window=WINDOW)
    if name == "qwen2":  # layer 0 full attention, layer 1 sliding
        return tf.Qwen2Config(**_SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if name == "qwen3":
        return tf.Qwen3Config(**_SHAPE, head_dim=16)
    if name == "gemma":
        return tf.GemmaConfig(**_SHAPE, head_dim=16)
    if name == "gemma2":  # soft-capping that bites on random weights; scaling 32^-0.5, not head_dim^-0.5
        return tf.Gemma2Config(**_SHAPE, head_dim=16, query_pre_attn_scalar=32, sliding_window=WINDOW,
                               attn_logit_softcapping=0.5, final_logit_softcapping=None)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**_SHAPE, head_dim=16, query_pre_attn_scalar=32, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])
    if name == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             scale_attn_by_inverse_layer_idx=True)
    raise KeyError(name)


_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
FAMILIES = sorted(_CLASSES)


def tiny(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of family ``name`` in eval mode, fp32."""
    config = _config(name)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return getattr(tf, _CLASSES[name])(config).eval()


def pair(name: str, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference, copy to patch): the same weights, separate objects."""
    ref = tiny(name, **overrides)
    return ref, copy.deepcopy(ref)


def left_padded(rows: int, length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [rows, length] and an ``attention_mask`` whose row 0 starts with ``pad`` zeros."""
    ids = torch.randint(1, VOCAB, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask
