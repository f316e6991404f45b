"""Memory planner: predicted device and host bytes per training strategy, and what fits.

All figures are bytes. Notation: ``P`` parameters in the model, ``T`` of them trainable,
``p`` bytes per element of the training dtype (2 for bf16/fp16, 4 for fp32), ``S`` bytes of
Adam state per trainable parameter (fp32 states: 8; bf16: 4; int8: 2 plus two fp32 scales per
block), ``W`` data-parallel ranks, ``B`` the offload gradient bucket size.

Model states, per device (the ``no_offload`` rows are plain torch AdamW, fp32 states):

* ``no_offload``: ``P*p`` params + ``T*p`` grads + ``T*4`` fp32 master (only when ``p != 4``) +
  ``T*8`` states: 16 bytes/param in bf16 (2 + 2 + 4 + 8) and in fp32 (4 + 4 + 8).
* ``offload`` (:class:`~thruput.memory.OffloadAdamW`): ``P*p`` params + ``min(T*p, B)``
  gradients in flight (each gradient leaves the device as soon as it is accumulated), or, for
  a module, at least its largest trainable parameter's gradient, which exists whole first.
  Host: ``T * (4 + S + 4)`` (fp32 master, states, fp32 gradient accumulator) + ``T*p`` pinned
  gradient staging (CUDA only) + ``T*p`` updated-parameter staging (only when ``p != 4``):
  16 bytes/param on CPU with fp32 states, 20 in bf16 on CUDA, 16 with bf16 states.
* ``offload+zero2`` (:class:`~thruput.memory.Zero2OffloadAdamW`): device ``P*p`` params +
  ``T*p`` flat gradient buckets (``thruput.comm.GradientBuckets`` keeps every bucket's flat
  buffer until ``finish()``) + ``T*p / W`` reduced shards + ``B`` all-gather buffer. Host per
  rank: the offload host bytes divided by ``W``.

Activations, per device, for ``b`` sequences of ``s`` tokens, width ``d``, ``L`` layers:
``b*s*d*L * k`` with ``k = 17*p`` (34 bytes per token per layer per unit width in 16-bit:
Korthikanti et al. 2022, without the attention-score term that fused SDPA never stores).
With activation checkpointing only each layer's input is kept and one layer is recomputed at a
time: ``b*s*d*L*p + b*s*d*k``. Logits are not counted (use a fused cross-entropy).

These are ZeRO-Offload's (arXiv 2101.06840) figures: 16 B/param of model states without
offload, 2 with it, so the largest model that fits grows at most 8x (:func:`largest_model`);
activations and the gradient bucket, which both need, keep the ratio below 8.

Host memory is per machine: the per-rank host bytes times ``min(W, gpus_per_host)``.
A strategy fits when its device bytes <= ``device_memory`` and its host bytes <=
``host_memory``; no headroom is added for the allocator or the framework.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from thruput.errors import InputError
from thruput.memory.hf_config import HFModelShape

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ACTIVATION_K_PER_BYTE = 17  # k = 17 * p: 34 bytes/token/layer/width at 2-byte activations
INT8_BLOCK = 256  # elements per int8 state block (one fp32 scale per moment per block)

# Fastest first. Recomputation costs about a third more compute on every step; offload adds a
# CPU step and PCIe traffic that only hide behind large batches, so checkpointing is preferred
# over offload, and ZeRO-2 (CPU step on 1/W of the parameters) over plain offload.
STRATEGIES = ("no_offload", "no_offload+ckpt", "offload", "offload+ckpt", "offload+zero2", "offload+zero2+ckpt")
SPEED_ORDER = ("no_offload", "no_offload+ckpt", "offload+zero2", "offload", "offload+zero2+ckpt", "offload+ckpt")

_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory size with its unit, e.g. ``"24GiB"``, ``"512MB"``, ``"1.5 TiB"``, into bytes.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024, B is bytes; case is
    ignored. A number (``int``/``float``, not text) is taken as bytes. Raises ``InputError`` (a
    ValueError) for text without a unit (``"24"``), a bare prefix (``"24G"``: GiB or GB?),
    anything else, or a negative value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _finite(float(text), text)
    match = _NUMBER.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match and unit in _BYTE_UNITS:
        return _finite(float(match.group(1)) * _BYTE_UNITS[unit], text)
    if match and not unit:
        raise InputError(f"{text!r} has no unit: write e.g. {match.group(1)}GiB (2^30 bytes) or "
                         f"{match.group(1)}GB (10^9 bytes)")
    if match and unit in ("k", "m", "g", "t"):
        raise InputError(f"{text!r} is ambiguous: write {match.group(1)}{unit.upper()}iB (powers of 1024) or "
                         f"{match.group(1)}{unit.upper()}B (powers of 1000)")
    raise InputError(f"cannot parse {text!r} as a memory size: expected e.g. 24GiB, 512MB, 1.5TiB")


def parse_count(text: str | int | float) -> int:
    """Parse a count such as a number of parameters: ``"7B"``, ``"350M"``, ``"1.5k"``, ``"7e9"``.

    K, M, B (or G) and T are thousand, million, billion and trillion; case is ignored. Raises
    ``InputError`` (a ValueError) for anything else (a byte unit such as ``"7GB"`` too), or a
    negative value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _finite(float(text), text)
    match = _NUMBER.fullmatch(str(text))
    if not match or match.group(2).lower() not in _COUNT_SUFFIXES:
        raise InputError(f"cannot parse {text!r} as a count: expected e.g. 7B, 350M, 1.5k or 7e9")
    return _finite(float(match.group(1)) * _COUNT_SUFFIXES[match.group(2).lower()], text)


def _finite(value: float, text: object) -> int:
    if not math.isfinite(value) or value < 0:
        raise InputError(f"expected a finite number >= 0, got {text!r}")
    return int(round(value))


def state_bytes_per_param(state_dtype: str) -> float:
    """Adam state bytes per parameter (both moments): fp32 8, bf16 4, int8 2 + 8/INT8_BLOCK."""
    if state_dtype == "fp32":
        return 8.0
    if state_dtype == "bf16":
        return 4.0
    if state_dtype == "int8":
        return 2.0 + 8.0 / INT8_BLOCK
    raise InputError(f"state_dtype must be 'fp32', 'bf16' or 'int8', got {state_dtype!r}")


@dataclass(frozen=True)
class StrategyEstimate:
    """Predicted bytes of one strategy: device per rank, host per machine, with the parts."""

    name: str
    device_bytes: int
    host_bytes: int
    device_parts: dict[str, int]
    host_parts: dict[str, int]
    applicable: bool
    fits: bool
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan` returns: the inputs it used and one estimate per strategy."""

    n_params: int
    n_trainable: int
    dtype: str
    state_dtype: str
    world_size: int
    device_memory: int
    host_memory: int
    batch_size: int
    seq_len: int
    d_model: int
    n_layers: int
    strategies: tuple[StrategyEstimate, ...] = field(default_factory=tuple)
    best: str | None = None

    def __getitem__(self, name: str) -> StrategyEstimate:
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(f"no strategy {name!r}; have {[s.name for s in self.strategies]}")

    def over_limits(self, estimate: StrategyEstimate) -> list[str]:
        """The limits ``estimate`` exceeds, e.g. ``["device 30.1 GiB > 24.0 GiB (6.1 GiB over)"]``."""
        out = []
        for where, need, have in (("device", estimate.device_bytes, self.device_memory),
                                  ("host", estimate.host_bytes, self.host_memory)):
            if need > have:
                out.append(f"{where} {format_bytes(need)} > {format_bytes(have)} ({format_bytes(need - have)} over)")
        return out

    def headline(self) -> str:
        """``"fastest that fits: NAME"``, or, when nothing fits, the strategy that comes closest
        (the smallest overshoot of either limit, relative to it) and the limits it exceeds."""
        if self.best is not None:
            return f"fastest that fits: {self.best}"
        def overshoot(s: StrategyEstimate) -> tuple[float, float]:
            ratios = (s.device_bytes / self.device_memory, s.host_bytes / self.host_memory)
            return max(ratios), sum(ratios)

        closest = min((s for s in self.strategies if s.applicable), key=overshoot)
        return f"nothing fits; closest is {closest.name}: {' and '.join(self.over_limits(closest))}"


def infer_shape(n_params: int, d_model: int | None = None, n_layers: int | None = None) -> tuple[int, int]:
    """(d_model, n_layers) of a GPT with about ``n_params = 12 * L * d**2`` parameters.

    Missing values follow the common aspect ratio ``d = 128 * L`` (Llama-7B: 32 layers, 4096
    wide); ``d`` is rounded to a multiple of 64.
    """
    if d_model is not None and n_layers is not None:
        return d_model, n_layers
    if n_layers is None and d_model is not None:
        return d_model, max(1, round(n_params / (12 * d_model**2)))
    if n_layers is None:
        n_layers = max(1, round((n_params / (12 * 128**2)) ** (1 / 3)))
    d = math.sqrt(max(n_params, 1) / (12 * n_layers))
    return max(64, 64 * round(d / 64)), n_layers


def _model_counts(model: torch.nn.Module) -> tuple[int, int, int, int | None, int | None]:
    """(parameters, trainable, largest trainable, d_model, n_layers) of a module."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = [p.numel() for p in unique.values() if p.requires_grad]
    cfg = getattr(model, "cfg", None)
    return (total, sum(trainable), max(trainable, default=0), getattr(cfg, "d_model", None),
            getattr(cfg, "n_layers", None))


def _available_host_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def plan(
    model_or_params: torch.nn.Module | HFModelShape | int,
    *,
    device_memory: int,
    host_memory: int | None = None,
    world_size: int = 1,
    dtype: str = "bf16",
    state_dtype: str = "fp32",
    batch_size: int = 1,
    seq_len: int = 2048,
    d_model: int | None = None,
    n_layers: int | None = None,
    device_type: str = "cuda",
    bucket_mb: float = 32.0,
    gpus_per_host: int = 8,
) -> MemoryPlan:
    """Predict device and host bytes of each strategy (formulas in the module docstring).

    ``model_or_params``: a module (its unique parameters are counted, frozen ones get no
    gradient or optimizer state; ``d_model``/``n_layers`` are read from ``model.cfg`` when
    present), a Hugging Face model's shape (:func:`thruput.memory.hf_config.read_hf_config`: its
    parameters, hidden size and layers; all trainable) or a parameter count.
    ``host_memory=None`` means this machine's total RAM.
    ``device_type="cpu"`` drops the pinned gradient staging that only CUDA needs. The result's
    ``best`` is the first strategy of ``SPEED_ORDER`` that fits, or None.

    Raises ``InputError`` (a ValueError) for a non-positive size or count, an unknown dtype or state dtype.
    """
    if isinstance(model_or_params, torch.nn.Module):
        n_params, n_trainable, largest, cfg_d, cfg_l = _model_counts(model_or_params)
        d_model = d_model if d_model is not None else cfg_d
        n_layers = n_layers if n_layers is not None else cfg_l
    elif isinstance(model_or_params, HFModelShape):
        n_params = n_trainable = model_or_params.n_params
        largest = model_or_params.largest_param
        d_model = d_model if d_model is not None else model_or_params.hidden_size
        n_layers = n_layers if n_layers is not None else model_or_params.n_layers
    else:
        n_params = n_trainable = int(model_or_params)
        largest = 0  # unknown: the bucket bounds the gradients in flight
    if dtype not in DTYPE_BYTES:
        raise InputError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    checks = {"parameter count": n_params, "device_memory": device_memory, "world_size": world_size,
              "batch_size": batch_size, "seq_len": seq_len, "bucket_mb": bucket_mb,
              "gpus_per_host": gpus_per_host}
    checks.update({k: v for k, v in (("d_model", d_model), ("n_layers", n_layers)) if v is not None})
    for key, value in checks.items():
        if not value > 0:
            raise InputError(f"{key} must be positive, got {value}")
    if device_type not in ("cuda", "cpu"):
        raise InputError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    host_memory = _available_host_memory() if host_memory is None else host_memory
    if not host_memory > 0:
        raise InputError(f"host_memory must be positive, got {host_memory}")
    d_model, n_layers = infer_shape(n_params, d_model, n_layers)

    P, T, W, p = n_params, n_trainable, world_size, DTYPE_BYTES[dtype]
    S = state_bytes_per_param(state_dtype)
    bucket = int(bucket_mb * 2**20)
    tokens_width = batch_size * seq_len * d_model
    layer_acts = tokens_width * ACTIVATION_K_PER_BYTE * p
    acts = {False: layer_acts * n_layers, True: tokens_width * n_layers * p + layer_acts}
    offload_host = {"master": T * 4, "states": int(T * S), "grad_fp32": T * 4,
                    "grad_staging": T * p if device_type == "cuda" else 0,
                    "param_staging": T * p if p != 4 else 0}
    ranks_per_host = min(W, gpus_per_host)

    def states_parts(kind: str) -> tuple[dict[str, int], dict[str, int]]:
        if kind == "no_offload":
            return ({"params": P * p, "grads": T * p, "master": T * 4 if p != 4 else 0, "states": T * 8}, {})
        if kind == "offload":
            return {"params": P * p, "grads_in_flight": max(min(T * p, bucket), largest * p)}, offload_host
        return ({"params": P * p, "grad_buckets": T * p, "grad_shards": -(-T * p // W),
                 "all_gather": min(T * p, bucket)},
                {k: -(-v // W) for k, v in offload_host.items()})

    estimates = []
    for name in STRATEGIES:
        kind, ckpt = name.removesuffix("+ckpt"), name.endswith("+ckpt")
        dev, host = states_parts(kind)
        dev = {**dev, "activations": acts[ckpt]}
        host = {k: v * ranks_per_host for k, v in host.items()}
        device_bytes, host_bytes = sum(dev.values()), sum(host.values())
        applicable = kind != "offload+zero2" or W > 1
        fits = applicable and device_bytes <= device_memory and host_bytes <= host_memory
        note = "" if applicable else "needs world_size > 1"
        estimates.append(StrategyEstimate(name, device_bytes, host_bytes, dev, host, applicable, fits, note))
    by_name = {e.name: e for e in estimates}
    best = next((n for n in SPEED_ORDER if by_name[n].fits), None)
    return MemoryPlan(P, T, dtype, state_dtype, W, int(device_memory), int(host_memory), batch_size,
                      seq_len, d_model, n_layers, tuple(estimates), best)


def largest_model(strategy: str, *, device_memory: int, batch_size: int = 1, seq_len: int = 2048,
                  dtype: str = "bf16", host_memory: int = 2**50, **kwargs) -> int:
    """The largest parameter count (to 0.1%) whose ``strategy`` fits ``device_memory``, by
    bisection over :func:`plan` (the shape follows :func:`infer_shape`, so activations grow
    with the model); 0 when not even 1M parameters fit. ``kwargs`` go to :func:`plan`.

    Raises ``KeyError`` for an unknown strategy, else like :func:`plan`.
    """
    def fits(n: float) -> bool:
        return plan(int(n), device_memory=device_memory, host_memory=host_memory, dtype=dtype,
                    batch_size=batch_size, seq_len=seq_len, **kwargs)[strategy].fits

    lo, hi = 1e6, 1e14
    if not fits(lo):
        return 0
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return int(lo)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"24.0 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """``n`` with a K/M/B/T suffix and 3 significant digits, e.g. ``"7.00B"``, ``"350M"``."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def render_plan(result: MemoryPlan):  # -> rich.table.Table (rich imported lazily)
    """A rich Table: one row per strategy with device/host bytes, bytes per param and fit (the
    limit a strategy exceeds); the caption is :meth:`MemoryPlan.headline`. ``no_offload`` is
    plain torch AdamW."""
    from rich.table import Table

    title = (f"{format_count(result.n_params)} params ({format_count(result.n_trainable)} trainable), {result.dtype}, "
             f"{result.state_dtype} Adam states, world {result.world_size}, batch {result.batch_size}x"
             f"{result.seq_len}, d_model {result.d_model}, {result.n_layers} layers; device "
             f"{format_bytes(result.device_memory)}, host {format_bytes(result.host_memory)}")
    table = Table(title=title, caption=result.headline())
    table.add_column("strategy", no_wrap=True)
    for col in ("device", "states B/param", "host", "host B/param", "fits"):
        table.add_column(col, justify="right")
    for s in result.strategies:
        model_states = s.device_bytes - s.device_parts["activations"]
        over = [limit.split()[0] for limit in result.over_limits(s)]
        over_text = "both" if len(over) == 2 else "".join(over)
        fits = "[green]yes[/]" if s.fits else ("[dim]n/a[/]" if not s.applicable else f"[red]no ({over_text})[/]")
        name = f"[bold]{s.name}[/]" if s.name == result.best else s.name
        table.add_row(name, format_bytes(s.device_bytes), f"{model_states / result.n_params:.2f}",
                      format_bytes(s.host_bytes), f"{s.host_bytes / result.n_params:.2f}", fits)
    return table
