from pathlib import Path

import pytest

from thruput.config import ConfigError, RunConfig, from_dict, load_config, to_dict


def test_defaults_and_int_to_float() -> None:
    cfg = from_dict({"optimizer": {"lr": 1}})
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
        ({"data": {"sources": [{"name": "a", "weight": 0.0}]}}, "weights sum to zero"),
        ({"data": {"seq_len": 0}}, "data.seq_len: must be positive"),
        ({"data": {"seq_len": 2, "sources": [{"name": "a", "kind": "stdlib_sections"}]}},
         r"data.seq_len: kind 'stdlib_sections' \(data.sources\[0\]\)"),
        ({"checkpoint": {"every": 5}}, "checkpoint.dir: required"),
        ({"model": {"d_model": 30, "n_heads": 4}}, "model.d_model"),
        ({"model": 3}, "model: expected a table"),
    ],
)
def test_bad_values_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_load_from_toml_with_overrides(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('name = "x"\nsteps = 7\n[optimizer]\nlr = 0.01\n[[data.sources]]\nname = "code"\n')
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
