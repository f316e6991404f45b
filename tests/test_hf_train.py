"""``thruput train`` on Hugging Face models (model kind "hf"): tiny random Llamas, no downloads."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

from thruput.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from thruput.config import ConfigError, from_dict  # noqa: E402
from thruput.train import train  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256}


def _cfg(tmp_path, model=None, **overrides):
    raw = {"name": "hf", "steps": 6, "seed": 2,
           "model": {"kind": "hf", "hf_config": LLAMA, **(model or {})},
           "data": {"seq_len": 32, "batch_size": 2,
                    "sources": [{"name": "code", "kind": "stdlib_code", "options": {"max_files": 12}},
                                {"name": "docs", "kind": "stdlib_prose", "options": {"max_files": 12}}]},
           "optimizer": {"warmup_steps": 2, "lr": 3e-3},
           "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 3, "keep": 5},
           "profile": {"peak_flops": 1e11}}
    return from_dict(raw, overrides)


def test_interrupted_run_resumes_bitwise_and_the_export_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    from thruput.hf.patch import PatchedForward

    overrides = {"kernels.fused_cross_entropy": True, "checkpoint.save_model": True}
    full = train(_cfg(tmp_path / "a", **overrides))
    assert isinstance(full.model.__dict__["forward"], PatchedForward)  # patched: fused loss, document attention
    first = train(_cfg(tmp_path / "b", **overrides), stop_after=4)
    assert len(first.losses) == 4
    resumed = train(_cfg(tmp_path / "b", **overrides), resume=True)
    assert resumed.start_step == 4 and resumed.losses == full.losses  # bitwise: the same floats
    assert full.losses[-1] < full.losses[0]
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / run / "ckpt")) for run in ("a", "b"))
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # The export of the last step loads where thruput's attention is not registered.
    folder = tmp_path / "b" / "ckpt" / "step_00000006.model"
    assert (folder / "model.safetensors").is_file() and "thruput" not in (folder / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = full.model.eval()(input_ids=ids).logits
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_saved_model_folder_trains_with_its_own_tokenizer(tmp_path, bpe):
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    bpe(tmp_path / "tok", texts, vocab_size=300)
    source = {"name": "code", "kind": "text", "path": str(tmp_path / "texts")}
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("".join(texts))
    first = train(_cfg(tmp_path / "first", model={"hf_config": {**LLAMA, "vocab_size": 300}}, steps=2,
                       **{"data.sources": [source], "data.tokenizer": str(tmp_path / "tok"),
                          "checkpoint.save_model": True}))
    folder = tmp_path / "first" / "ckpt" / "step_00000002.model"
    assert (folder / "tokenizer.json").is_file()
    cfg = _cfg(tmp_path / "second", model={"hf_config": None, "hf": str(folder)}, steps=1,
               **{"data.sources": [source], "checkpoint.every": 0})
    second = train(cfg)
    assert second.document["meta"]["config"]["data"]["tokenizer"] == str(folder)  # the model's own
    start = dict(first.model.named_parameters())
    # from_pretrained loaded the exported weights: one step of training moved them from there.
    moved = [n for n, p in second.model.named_parameters() if not torch.equal(p.detach(), start[n].detach())]
    assert moved and second.losses[0] == pytest.approx(first.losses[-1], rel=0.5)


def test_lora_trains_only_the_adapters_with_patch_and_activation_checkpointing(tmp_path):
    from thruput.hf.patch import PatchedForward

    cfg = _cfg(tmp_path, model={"lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                "activation_checkpointing": True}, steps=3, **{"checkpoint.every": 0})
    torch.manual_seed(cfg.seed)
    from thruput.models.kinds import build_model

    before = {n: p.detach().clone() for n, p in build_model(cfg, torch.device("cpu")).module.named_parameters()}
    result = train(cfg)
    after = dict(result.model.named_parameters())
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    adapters = {n for n in before if "lora_" in n}
    assert adapters and changed == {n for n in adapters if "lora_B" in n or "lora_A" in n}
    assert {n for n, p in after.items() if p.requires_grad} == adapters
    assert isinstance(result.model.get_base_model().__dict__["forward"], PatchedForward)
    assert result.model.get_base_model().is_activation_checkpointing
    state = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    assert len(state["optimizer"]["state"]) == len(adapters)  # only trainable parameters reached it


def test_bfloat16_weights_with_fp32_master_weights_in_offload_adamw(tmp_path):
    cfg = _cfg(tmp_path, model={"dtype": "bfloat16"}, steps=2, dtype="bfloat16",
               **{"optimizer.kind": "offload_adamw", "checkpoint.every": 0})
    result = train(cfg)
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    state = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    assert all(s["master"].dtype == torch.float32 for s in state["optimizer"]["state"].values())


def _broken(tmp_path, what: str) -> str:
    """A model folder: saved, then with one file missing or torn."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path / what
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})) \
        .save_pretrained(folder)
    weights = folder / "model.safetensors"
    if what == "torn":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif what == "no_weights":
        weights.unlink()
    elif what == "no_config":
        (folder / "config.json").unlink()
    return str(folder)


@pytest.mark.parametrize("model, message", [
    ({"hf": "{tmp}/nowhere"}, r"^model.hf: folder '.*nowhere' does not exist$"),
    ({"hf": "meta-llama/Llama-3.2-1B"}, r"^model.hf: folder 'meta-llama/Llama-3.2-1B' does not exist \(thruput loads "
                                        r"models from disk only, never the network: download it first"),
    ({"hf": "torn"}, r"^model.hf: '.*torn/model.safetensors' does not load: Error while deserializing header"),
    ({"hf": "no_weights"}, r"^model.hf: '.*no_weights' has no safetensors weights"),
    ({"hf": "no_config"}, r"^model.hf: '.*no_config' has no config.json$"),
    ({"hf_config": {"model_type": "llamaa"}}, r"^model.hf_config.model_type: unknown transformers model type 'llamaa'"),
    ({"hf_config": {**LLAMA, "vocab_size": 100}},
     r"^model.hf_config.vocab_size: 100 is smaller than the tokenizer's vocabulary \(256 tokens, bytes\)$"),
    ({"hf_config": {**LLAMA, "hidden_size": 30, "num_attention_heads": 4}}, r"^model.hf_config: .*hidden size \(30\) is not a multiple"),
    ({"lora": {"rank": 4}}, r"^model.lora: .*unexpected keyword argument 'rank'"),
])
def test_bad_models_are_one_line_errors_naming_the_key(tmp_path, model, message):
    if model.get("hf") in ("torn", "no_weights", "no_config"):
        model = {**model, "hf": _broken(tmp_path, model["hf"])}
    if "hf" in model:
        model = {"hf_config": None, **model, "hf": model["hf"].replace("{tmp}", str(tmp_path))}
    with pytest.raises(ConfigError, match=message) as caught:
        train(_cfg(tmp_path, model=model, steps=1, **{"checkpoint.every": 0}))
    assert "\n" not in str(caught.value)


def test_import_thruput_and_its_config_never_import_transformers():
    import subprocess

    code = ("import thruput, thruput.config, thruput.train, sys; "
            "from thruput.config import from_dict; from_dict({'model': {'kind': 'hf', 'hf': 'x'}, 'data': {'sources': [{'name': 'm', 'kind': 'memory', 'options': {'texts': ['a']}}]}}); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.slow
def test_two_rank_torchrun_on_the_ray_data_plane(tmp_path, ray_address):
    """LoRA on a tiny Llama, two gloo ranks sharing the Ray data plane (resumption under torchrun
    is tested with the GPT in test_train_cli.py: the loop is the same)."""
    import json
    import os
    import subprocess

    path = tmp_path / "run.toml"
    path.write_text(f"""name = "run"
steps = 3
seed = 5
[model]
kind = "hf"
hf_config = {{ model_type = "llama", hidden_size = 32, intermediate_size = 64, num_hidden_layers = 1, \
num_attention_heads = 2, num_key_value_heads = 1, vocab_size = 256 }}
lora = {{ r = 4, target_modules = ["q_proj", "v_proj"] }}
[data]
seq_len = 32
batch_size = 2
ray_address = "{ray_address}"
[[data.sources]]
name = "code"
kind = "stdlib_code"
options = {{ max_files = 20 }}
[kernels]
fused_cross_entropy = true
[checkpoint]
dir = "{tmp_path / 'ckpt'}"
[profile]
peak_flops = 1e11
report_dir = "{tmp_path}"
""")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "thruput.cli", "train", str(path)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(latest_checkpoint(tmp_path / "ckpt"))
    assert state["step"] == 3 and len(state["optimizer"]["state"]) == 4  # q and v adapters, A and B
    assert any(state["model"][k].abs().sum() > 0 for k in state["model"] if "lora_B" in k)  # B starts at zero
    meta = json.loads((tmp_path / "run-rank0.json").read_text())["meta"]  # each rank writes its own
    assert meta["world_size"] == 2 and meta["data_backend"] == "ray"


def test_a_model_with_dropout_resumes_bitwise(tmp_path):
    """Attention dropout draws from torch's generator: the checkpoint carries its state."""
    dropout = {**LLAMA, "num_hidden_layers": 1, "attention_dropout": 0.5}
    cfg = lambda path: _cfg(path, model={"hf_config": dropout}, steps=4, **{"checkpoint.every": 2})  # noqa: E731
    full = train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b"), stop_after=2)
    resumed = train(cfg(tmp_path / "b"), resume=True)
    assert resumed.start_step == 2 and resumed.losses == full.losses


def test_learned_positions_restart_in_every_piece(tmp_path):
    """GPT-2's 64 learned positions: pieces of long documents (positions far past 64 in the
    Loader) train, each counted from 0; rows longer than the table are refused."""
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 256, "n_positions": 64}
    result = train(_cfg(tmp_path, model={"hf_config": gpt2}, steps=2, **{"checkpoint.every": 0,
                                                                        "kernels.fused_cross_entropy": True}))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(ConfigError, match=r"^data.seq_len: 128 is longer than the model's 64 learned positions"):
        train(_cfg(tmp_path, model={"hf_config": gpt2}, steps=1, **{"data.seq_len": 128, "checkpoint.every": 0}))


def test_the_plan_balances_ranks_with_the_cost_of_the_hf_model(tmp_path):
    from thruput.data import CostModel
    from thruput.train import build_loader

    loader = build_loader(_cfg(tmp_path), 0, 1)
    loader.close()
    # 2 layers of hidden 32 with a 64-wide MLP (ratio 2) and the 256-token head, from the HF config.
    assert loader.plan.cost == CostModel.for_transformer(32, n_layers=2, vocab_size=256, mlp_ratio=2.0)
    assert loader.plan.cost == CostModel(a=2 * 2.0 * (4 + 2 * 2.0) * 32**2 + 2.0 * 32 * 256, b=2 * 2.0 * 32)
