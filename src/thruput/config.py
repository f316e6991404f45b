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
from typing import Any, ClassVar, Literal

from thruput.models.gpt_config import GPTConfig
from thruput.models.kinds import model_kinds


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass
class ScheduleConfig:
    """A weight that changes with the step: one of ``thruput.data.mixture``'s schedules.

    ``schedule`` picks the kind, and each kind takes its own keys: ``constant``: ``value``;
    ``linear`` and ``cosine``: ``start``, ``end``, ``steps`` (> 0) and ``begin`` (default 0);
    ``piecewise``: ``points``, ``[[first_step, weight], ...]`` with strictly increasing steps.
    In TOML: ``weight = { schedule = "linear", start = 1.0, end = 0.2, steps = 1000 }``.
    """

    schedule: Literal["constant", "linear", "cosine", "piecewise"]
    value: float | None = None
    start: float | None = None
    end: float | None = None
    steps: int | None = None
    begin: int | None = None
    points: list[tuple[int, float]] | None = None

    KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "constant": ("value",), "linear": ("start", "end", "steps", "begin"),
        "cosine": ("start", "end", "steps", "begin"), "piecewise": ("points",)}
    OPTIONAL: ClassVar[tuple[str, ...]] = ("begin",)

    def check(self, key: str) -> None:
        """``ConfigError`` naming ``key.<field>`` for a key the kind does not take, lacks or
        has out of range."""
        keys = self.KEYS[self.schedule]
        for name in ("value", "start", "end", "steps", "begin", "points"):
            given = getattr(self, name) is not None
            if given and name not in keys:
                raise ConfigError(f"{key}.{name}: not a key of schedule '{self.schedule}' "
                                  f"(its keys: {', '.join(keys)})")
            if not given and name in keys and name not in self.OPTIONAL:
                raise ConfigError(f"{key}.{name}: required for schedule '{self.schedule}'")
        for name in ("value", "start", "end"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"{key}.steps: must be positive, got {self.steps}")
        if self.begin is not None and self.begin < 0:
            raise ConfigError(f"{key}.begin: must be >= 0, got {self.begin}")
        if self.points is not None:
            if not self.points:
                raise ConfigError(f"{key}.points: needs at least one [step, weight] pair")
            for i, (step, weight) in enumerate(self.points):
                if step < 0 or weight < 0:
                    raise ConfigError(f"{key}.points[{i}]: step and weight must be >= 0, got [{step}, {weight}]")
                if i and step <= self.points[i - 1][0]:
                    raise ConfigError(f"{key}.points[{i}]: steps must be strictly increasing, got {step} "
                                      f"after {self.points[i - 1][0]}")

    def at_start(self) -> float:
        """The weight at step 0."""
        if self.schedule == "constant":
            return float(self.value or 0.0)
        if self.schedule == "piecewise":
            return float(self.points[0][1]) if self.points else 0.0
        return float(self.start or 0.0)

    def build(self) -> Any:
        """The ``thruput.data.mixture`` schedule (a ``step -> weight`` callable)."""
        from thruput.data import mixture

        if self.schedule == "constant":
            return mixture.constant(self.value)
        if self.schedule == "piecewise":
            return mixture.piecewise(self.points)
        make = mixture.linear if self.schedule == "linear" else mixture.cosine
        return make(self.start, self.end, self.steps, self.begin or 0)


@dataclass
class SourceConfig:
    """One data source. ``kind`` names a registered reader (``thruput.data_config``: ``jsonl``,
    ``parquet``, ``text`` and ``memory``, and kinds that packages register, such as the demo's
    ``stdlib_*``); ``path`` is a file, a glob or a folder (jsonl: its ``*.jsonl`` files, parquet:
    ``*.parquet``, text: ``*.txt`` and ``*.md``; searched recursively, sorted, hidden names left
    out). ``weight`` is a number or a ``ScheduleConfig``. ``options``: the keys of the kind itself
    (``memory``: ``texts``; the demo's kinds: ``max_files``), each checked by the kind."""

    name: str
    kind: str
    path: str | None = None
    text_field: str = "text"
    weight: float | ScheduleConfig = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    seq_len: int = 256
    batch_size: int = 8  # rows per rank per step
    pack: bool = True
    workers: int = 0  # CPU budget of source-loader workers; 0: preprocess in the training process
    # "auto" (thruput.data.resolve_backend, with cpu_budget = workers): Ray actors shared by all
    # ranks for several or with a ray_address, else inline (workers = 0) or local processes;
    # "ray" also for one rank. ray_address: an existing cluster (default: a local one).
    backend: Literal["auto", "inline", "process", "ray"] = "auto"
    ray_address: str | None = None
    on_error: Literal["raise", "skip"] = "raise"
    # A tokenizer.json or a folder holding one (Hugging Face tokenizers); default: UTF-8 bytes.
    tokenizer: str | None = None
    # Append the tokenizer's EOS to every document: default when it has one (bytes have none).
    eos: bool | None = None
    sources: list[SourceConfig] = field(default_factory=list)


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
    # Also write the model in its kind's own format (hf: save_pretrained, safetensors) to
    # DIR/step_XXXXXXXX.model/ with each checkpoint, the last one included.
    save_model: bool = False


@dataclass
class ProfileConfig:
    enabled: bool = True
    clock_hz: float = 20.0
    peak_flops: float | None = None  # None: measured on CPU, looked up on known GPUs
    report_dir: str | None = None


@dataclass
class RunConfig:
    """Everything one training run needs, loaded from TOML by ``load_config``.

    ``model`` is the ``[model]`` table of the registered kind its ``kind`` key names
    (``thruput.models.kinds``; default ``"gpt"``, a ``GPTConfig``). ``cache_dir``: where generated
    corpora are cached (default ``~/.cache/thruput``; ``thruput train`` takes ``$THRUPUT_CACHE``).
    """

    name: str = "run"
    seed: int = 0
    steps: int = 100
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = 10
    cache_dir: str | None = None
    model: Any = field(default_factory=GPTConfig, metadata={"kinds": model_kinds})
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
        if self.checkpoint.save_model and not self.checkpoint.dir:
            raise ConfigError("checkpoint.dir: required when checkpoint.save_model is true")
        if self.optimizer.zero2 and self.optimizer.kind != "offload_adamw":
            raise ConfigError("optimizer.zero2: needs optimizer.kind = 'offload_adamw'")
        if not self.data.sources:
            raise ConfigError("data.sources: at least one source is required")
        names = [s.name for s in self.data.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: source names must be unique, got {names}")
        from thruput.data_config import check_source  # the registry of kinds imports thruput.data

        for i, s in enumerate(self.data.sources):
            check_source(self, i)
            if isinstance(s.weight, ScheduleConfig):
                s.weight.check(f"data.sources[{i}].weight")
            elif s.weight < 0:
                raise ConfigError(f"data.sources[{i}].weight: must be >= 0, got {s.weight}")
        if sum(s.weight.at_start() if isinstance(s.weight, ScheduleConfig) else s.weight
               for s in self.data.sources) <= 0:
            raise ConfigError("data.sources: weights sum to zero (at step 0)")
        self.model.check(self)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file into a validated RunConfig. ``overrides`` maps dotted keys to values."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return from_dict(raw, overrides)


def from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate a RunConfig from plain data (as parsed from TOML); ``overrides`` maps
    dotted keys to values set in ``raw`` first."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = _build(RunConfig, raw, "")
    if isinstance(config.model, GPTConfig) and "max_seq_len" not in raw.get("model", {}):
        config.model.max_seq_len = config.data.seq_len  # as long as the rows it trains on
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
        if name in raw and "kinds" in f.metadata:
            kwargs[name] = _build_kind(f.metadata["kinds"](), f.default_factory().kind, raw[name], key)
        elif name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own checks: their messages start with the field's name
        raise ConfigError(f"{prefix}{exc}") from None


def _build_kind(kinds: dict[str, Any], default: str, raw: Any, key: str) -> Any:
    """A table whose ``kind`` key picks its dataclass from a registry (``{name: entry.config}``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table, got {type(raw).__name__}")
    kind = raw.get("kind", default)
    if kind not in kinds:
        raise ConfigError(f"{key}.kind: expected one of {', '.join(map(repr, kinds))}, got {kind!r}")
    return _build(kinds[kind].config, raw, f"{key}.")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tables = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(tables) == 1:  # a table: its own errors name its keys
            return _coerce(tables[0], value, key)
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return dict(value)
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
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
