from pathlib import Path

import pytest

from thruput.config import ConfigError, RunConfig, from_dict, load_config, to_dict

# A source of the data layer's own that needs no files.
MEMORY = {"kind": "memory", "options": {"texts": ["some text"]}}
MEMORY_TOML = 'kind = "memory"\noptions = { texts = ["some text"] }\n'


def test_defaults_and_int_to_float() -> None:
    cfg = from_dict({"optimizer": {"lr": 1}, "data": {"sources": [{"name": "m", **MEMORY}]}})
    assert isinstance(cfg, RunConfig) and cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"stepz": 3}, "stepz: unknown key"),
        ({"optimizer": {"lrr": 1e-3}}, "optimizer.lrr: unknown key"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr: expected float, got str"),
        ({"steps": 1.5}, "steps: expected int, got float"),
        ({"kernels": {"compile": "yes"}}, "kernels.compile: expected bool"),
        ({"optimizer": {"kind": "sgd"}}, "optimizer.kind: expected one of 'adamw', 'offload_adamw'"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected a list of 2 values"),
        ({"data": {"sources": [{"kind": "jsonl"}]}}, r"data.sources\[0\].name: required key is missing"),
        ({"data": {"sources": [{"name": "a", "kind": "jsonl"}]}}, r"data.sources\[0\].path: required"),
        ({"data": {"sources": [{"name": "a", "weight": 0.0, **MEMORY}]}}, "weights sum to zero"),
        ({"data": {"sources": [{"name": "a"}]}}, r"data.sources\[0\].kind: required key is missing"),
        ({}, "data.sources: at least one source is required"),
        ({"data": {"seq_len": 0}}, "data.seq_len: must be positive"),
        ({"data": {"seq_len": 2, "sources": [{"name": "a", "kind": "stdlib_sections"}]}},
         r"data.seq_len: kind 'stdlib_sections' \(data.sources\[0\]\)"),
        ({"checkpoint": {"every": 5}}, "checkpoint.dir: required"),
        ({"model": {"d_model": 30, "n_heads": 4}, "data": {"sources": [{"name": "a", **MEMORY}]}}, "model.d_model"),
        ({"model": 3}, "model: expected a table"),
    ],
)
def test_bad_values_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_load_from_toml_with_overrides(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('name = "x"\nsteps = 7\n[optimizer]\nlr = 0.01\n[[data.sources]]\nname = "code"\n' + MEMORY_TOML)
    cfg = load_config(path, overrides={"optimizer.lr": 0.5})
    assert cfg.name == "x" and cfg.steps == 7 and cfg.optimizer.lr == 0.5
    assert [s.name for s in cfg.data.sources] == ["code"]
    assert from_dict(to_dict(cfg)) == cfg


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_config_is_valid(path) -> None:
    cfg = load_config(path)
    assert cfg.steps > 0 and cfg.data.sources


SCHEDULES = """
[[data.sources]]
name = "a"
weight = { schedule = "linear", start = 1.0, end = 0.2, steps = 1000 }
[[data.sources]]
name = "b"
weight = { schedule = "cosine", start = 0.5, end = 0.0, steps = 10, begin = 5 }
[[data.sources]]
name = "c"
weight = { schedule = "piecewise", points = [[0, 1.0], [100, 0.25]] }
[[data.sources]]
name = "d"
weight = { schedule = "constant", value = 2 }
[[data.sources]]
name = "e"
weight = 0.5
""".replace("weight =", MEMORY_TOML + "weight =")


def test_weight_schedules_in_toml_map_onto_mixture_schedules(tmp_path) -> None:
    from thruput.data import mixture

    path = tmp_path / "run.toml"
    path.write_text(SCHEDULES)
    cfg = load_config(path)
    built = [s.weight.build() if not isinstance(s.weight, float) else s.weight for s in cfg.data.sources]
    assert built == [mixture.linear(1.0, 0.2, 1000), mixture.cosine(0.5, 0.0, 10, begin=5),
                     mixture.piecewise({0: 1.0, 100: 0.25}), mixture.constant(2.0), 0.5]
    assert built[0](500) == pytest.approx(0.6) and built[1](10) == pytest.approx(0.25) and built[2](150) == 0.25
    assert from_dict(to_dict(cfg)) == cfg  # round trip through plain data (TOML has no null)


def _with_weight(weight: object) -> dict:
    return {"data": {"sources": [{"name": "a", **MEMORY}, {"name": "b", "weight": weight, **MEMORY}]}}


@pytest.mark.parametrize(
    "weight, message",
    [
        ({"schedule": "linear", "start": 1.0, "end": 0.2},
         r"^data.sources\[1\].weight.steps: required for schedule 'linear'$"),
        ({"schedule": "linear", "start": 1.0, "end": 0.2, "steps": 0}, r"^data.sources\[1\].weight.steps: must be positive"),
        ({"schedule": "cosine", "start": -1.0, "end": 0.2, "steps": 3}, r"^data.sources\[1\].weight.start: must be >= 0"),
        ({"schedule": "linear", "start": 1, "end": 0, "steps": 3, "begin": -2}, r"^data.sources\[1\].weight.begin: must be >= 0"),
        ({"schedule": "constant", "value": 1.0, "steps": 3},
         r"^data.sources\[1\].weight.steps: not a key of schedule 'constant' \(its keys: value\)$"),
        ({"schedule": "constant"}, r"^data.sources\[1\].weight.value: required"),
        ({"schedule": "piecewise", "points": []}, r"^data.sources\[1\].weight.points: needs at least one"),
        ({"schedule": "piecewise", "points": [[5, 1.0], [5, 2.0]]},
         r"^data.sources\[1\].weight.points\[1\]: steps must be strictly increasing"),
        ({"schedule": "piecewise", "points": [[0, "x"]]}, r"^data.sources\[1\].weight.points\[0\]\[1\]: expected float"),
        ({"schedule": "wave"}, r"^data.sources\[1\].weight.schedule: expected one of 'constant', 'linear'"),
        ({"start": 1.0}, r"^data.sources\[1\].weight.schedule: required key is missing$"),
        ({"schedule": "linear", "start": 1, "end": 0, "steps": 3, "stop": 1}, r"^data.sources\[1\].weight.stop: unknown key"),
        ("high", r"^data.sources\[1\].weight: expected float or a table, got 'high'$"),
    ],
)
def test_bad_weight_schedules_name_the_key(weight: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(_with_weight(weight))


def test_schedule_weights_sum_checked_at_step_zero() -> None:
    raw = {"data": {"sources": [{"name": "a", "weight": {"schedule": "linear", "start": 0.0, "end": 1.0, "steps": 5},
                                 **MEMORY}]}}
    with pytest.raises(ConfigError, match=r"weights sum to zero \(at step 0\)"):
        from_dict(raw)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"kind": "mamba"}, r"^model.kind: expected one of 'gpt', 'hf', got 'mamba'$"),
        ({"d_model": 30, "n_heads": 4}, r"^model.d_model \(30\) must be divisible by n_heads \(4\)$"),
        ({"max_seq_len": 16}, r"^model.max_seq_len: 16 is shorter than data.seq_len \(256\)"),
        ({"kind": "hf", "d_model": 8}, r"^model.d_model: unknown key \(known: activation_checkpointing, dtype, hf, "),
        ({"kind": "hf"}, r"^model.hf: give exactly one of model.hf .* and model.hf_config"),
        ({"kind": "hf", "hf": "x", "hf_config": {"model_type": "llama"}}, r"^model.hf: give exactly one"),
        ({"kind": "hf", "hf_config": {"hidden_size": 8}}, r"^model.hf_config.model_type: required"),
        ({"kind": "hf", "hf_config": 3}, r"^model.hf_config: expected a table, got int$"),
        ({"kind": "hf", "hf": "x", "dtype": "bfloat16"}, r"^model.dtype: 'bfloat16' weights need optimizer.kind"),
    ],
)
def test_model_table_is_read_by_its_kind(model: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": model, "data": {"sources": [{"name": "m", **MEMORY}]}})


def test_the_gpt_config_is_the_model_table() -> None:
    from thruput.models import GPTConfig
    from thruput.models.hf_config import HFModelConfig

    cfg = from_dict({"data": {"seq_len": 64, "sources": [{"name": "m", **MEMORY}]}, "model": {"d_model": 32, "n_heads": 2}})
    assert cfg.model == GPTConfig(d_model=32, n_heads=2, max_seq_len=64)  # as long as the rows by default
    assert from_dict(to_dict(cfg)) == cfg
    hf = from_dict({"model": {"kind": "hf", "hf_config": {"model_type": "llama", "hidden_size": 32}, "lora": {"r": 4}},
                    "optimizer": {"kind": "offload_adamw"}, "data": {"sources": [{"name": "m", **MEMORY}]}})
    assert isinstance(hf.model, HFModelConfig) and hf.model.hf_config["hidden_size"] == 32
    assert from_dict(to_dict(hf)) == hf
    with pytest.raises(ConfigError, match=r"^kernels.compile: not supported for model.kind = 'hf'"):
        from_dict({"model": {"kind": "hf", "hf": "x"}, "kernels": {"compile": True},
                   "data": {"sources": [{"name": "m", **MEMORY}]}})
