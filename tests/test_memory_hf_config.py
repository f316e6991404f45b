"""``thruput estimate --hf``: a Hugging Face config's exact size, and one-line errors for bad ones."""
from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from thruput.cli import main
from thruput.memory import plan
from thruput.memory.hf_config import read_hf_config


def _llama(**overrides) -> LlamaConfig:
    shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(**{**shape, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}])
def test_parameter_count_is_that_of_the_model_built_from_the_config(tmp_path, overrides):
    config = _llama(**overrides)
    config.save_pretrained(tmp_path)
    model = LlamaForCausalLM(config)
    expected = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for where in (tmp_path, tmp_path / "config.json"):  # a model folder, or the file itself
        shape = read_hf_config(where)
        assert shape.n_params == expected
        assert (shape.n_layers, shape.hidden_size, shape.vocab_size) == (3, 64, 1000)
        assert (shape.model_type, shape.architecture) == ("llama", "LlamaForCausalLM")
        assert shape.largest_param == 1000 * 64
    result = plan(read_hf_config(tmp_path), device_memory=2**30, host_memory=2**30, dtype="fp32")
    assert (result.n_params, result.n_trainable, result.d_model, result.n_layers) == (expected, expected, 64, 3)


def test_estimate_cli_prints_the_model_and_the_strategies(tmp_path, capsys):
    _llama().save_pretrained(tmp_path)
    assert main(["estimate", "--hf", str(tmp_path), "--device-memory", "1GiB", "--host-memory", "4GiB"]) == 0
    out = capsys.readouterr().out
    expected = sum(p.numel() for p in LlamaForCausalLM(_llama()).parameters())
    assert f"llama (LlamaForCausalLM) from {tmp_path / 'config.json'}: {expected:,} params, 3 layers" in out
    assert "offload+ckpt" in out and "fastest that fits: no_offload" in out


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.json", "does not exist"),
    (lambda d: d, "config.json' does not exist"),  # a folder without a config
    (lambda d: _write(d, "bad.json", '{"model_type": "llama",\n'), "is not JSON: line 2"),
    (lambda d: _write(d, "list.json", "[1, 2]"), "is not a JSON object"),
    (lambda d: _write(d, "untyped.json", '{"hidden_size": 64}'), 'has no "model_type" string'),
    (lambda d: _write(d, "unknown.json", '{"model_type": "no-such-model"}'), "unknown model_type 'no-such-model'"),
    (lambda d: _write(d, "vision.json", json.dumps({"model_type": "vit"})), "no causal LM built from it"),
])
def test_bad_configs_are_one_line_errors_naming_the_path(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["estimate", "--hf", str(path), "--device-memory", "24GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("thruput estimate: Hugging Face config '")
    assert str(path) in err and message in err


def test_shape_flags_are_refused_with_a_config(tmp_path, capsys):
    _llama().save_pretrained(tmp_path)
    assert main(["estimate", "--hf", str(tmp_path), "--device-memory", "24GiB", "--n-layers", "4"]) == 2
    assert "with --hf the shape comes from the config: leave out --n-layers" in capsys.readouterr().err
