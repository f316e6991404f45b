"""Typed run configuration: a TOML file <-> dataclasses, validated at the edge.

Every key is checked: an unknown key, a missing required one, a value of the wrong type or
outside its allowed set is a ``ConfigError`` naming the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class SourceConfig:
    """One data source. ``kind`` picks the reader; ``path`` is a file, a glob or a folder."""

    name: str
    kind: Literal["stdlib_code", "stdlib_prose", "stdlib_long", "stdlib_sections", "stdlib_functions",
                  "stdlib_docstrings", "jsonl", "parquet", "text"] = "stdlib_code"
    path: str | None = None
    text_field: str = "text"
    weight: float = 1.0
    max_files: int | None = None


@dataclass
class DataConfig:
    seq_len: int = 256
    batch_size: int = 8  # rows per rank per step
    pack: bool = True
    workers: int = 0  # CPU budget of source-loader workers; 0: preprocess in the training process
    # "auto": inline (workers = 0) or local processes for one rank, Ray actors shared by all ranks
    # for several; "ray" also for one rank. ray_address: an existing cluster (default: a local one).
    backend: Literal["auto", "inline", "process", "ray"] = "auto"
    ray_address: str | None = None
    on_error: Literal["raise", "skip"] = "raise"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(name="code")])


@dataclass
class OptimizerConfig:
    kind: Literal["adamw", "offload_adamw"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float | None = 1.0
    state_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    delayed_update_after: int | None = None
    zero2: bool = False  # offload_adamw under torchrun: each rank owns a shard of master and states


@dataclass
class KernelsConfig:
    fused_cross_entropy: bool = False
    compile: bool = False


@dataclass
class CheckpointConfig:
    dir: str | None = None
    every: int = 0  # steps between checkpoints; 0 disables periodic checkpoints
    keep: int = 2


@dataclass
class ProfileConfig:
    enabled: bool = True
    clock_hz: float = 20.0
    peak_flops: float | None = None  # None: measured on CPU, looked up on known GPUs
    report_dir: str | None = None


@dataclass
class RunConfig:
    """Everything one training run needs, loaded from TOML by ``load_config``."""

    name: str = "run"
    seed: int = 0
    steps: int = 100
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self) -> None:
        """Cross-field checks that types alone cannot express."""
        positive = {"steps": self.steps, "data.seq_len": self.data.seq_len,
                    "data.batch_size": self.data.batch_size, "optimizer.lr": self.optimizer.lr,
                    "profile.clock_hz": self.profile.clock_hz, "log_every": self.log_every}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: must be positive, got {value}")
        for key, value in {"data.workers": self.data.workers, "checkpoint.every": self.checkpoint.every,
                           "optimizer.warmup_steps": self.optimizer.warmup_steps}.items():
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        if self.checkpoint.every and not self.checkpoint.dir:
            raise ConfigError("checkpoint.dir: required when checkpoint.every > 0")
        if self.optimizer.zero2 and self.optimizer.kind != "offload_adamw":
            raise ConfigError("optimizer.zero2: needs optimizer.kind = 'offload_adamw'")
        if not self.data.sources:
            raise ConfigError("data.sources: at least one source is required")
        names = [s.name for s in self.data.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: source names must be unique, got {names}")
        for i, s in enumerate(self.data.sources):
            if s.kind in ("jsonl", "parquet", "text") and not s.path:
                raise ConfigError(f"data.sources[{i}].path: required for kind {s.kind!r}")
            if s.weight < 0:
                raise ConfigError(f"data.sources[{i}].weight: must be >= 0, got {s.weight}")
            if s.kind == "stdlib_sections" and self.data.seq_len < 3:
                raise ConfigError(f"data.seq_len: kind 'stdlib_sections' (data.sources[{i}]) cuts modules into "
                                  f"rows of seq_len + 1 >= 4 bytes, got seq_len {self.data.seq_len}")
        if sum(s.weight for s in self.data.sources) <= 0:
            raise ConfigError("data.sources: weights sum to zero")
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(
                f"model.d_model: {self.model.d_model} is not divisible by model.n_heads={self.model.n_heads}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file into a validated RunConfig. ``overrides`` maps dotted keys to values."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from plain data (as parsed from TOML)."""
    config = _build(RunConfig, raw, "")
    config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data of a config, ``None`` values dropped (TOML has no null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
