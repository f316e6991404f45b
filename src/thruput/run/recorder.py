"""Steps and phases of an unmodified script, from the calls the hooks observe.

The hooks (``thruput.run.hooks``) say when a phase begins and ends; the recorder turns that
into ``StepProfiler`` steps:

* **Step boundary.** A step ends when the outermost ``step()`` of the *clock optimizer* (the
  first optimizer that stepped) returns. ``optimizer.step`` is the one call that a plain loop,
  HF Trainer (one step per optimizer update, whatever the gradient accumulation) and Lightning
  (whose closure runs forward and backward inside ``step()``) have in common. The next step
  starts at that instant, so step times add up to wall-clock time. The first step starts at
  the first outermost module forward; what runs after the last optimizer step (saving, a final
  evaluation, a crash) is an unfinished step and is dropped.
* **Exclusive phases.** A phase that begins inside another pauses it: a collective inside the
  forward is ``comm`` only, and Lightning's ``optimizer`` keeps only its own time, not the
  closure's forward and backward. Time that no phase covers is ``other``.
* **Tokens.** Each batch a loader yields is counted by ``batch_counts`` and queued. The module
  whose outermost forward first runs while a batch is queued is *the model*; each later
  outermost forward of the model takes the oldest queued batch, and adds it to the step when
  autograd is enabled (training) or drops it when not (evaluation). So a loader that fetches
  ahead (Trainer's gradient accumulation, Lightning's prefetch) still gives each step its own
  batches, and a loss module or a no-grad reference model is not a second batch. When no
  loader batch has been seen in the run, each training forward whose first positional
  argument is an integer tensor counts that tensor instead (a loop that slices its own data).
"""
from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import torch

from thruput.profile import StepProfiler

_INTEGER_DTYPES = frozenset({torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8})
_SEARCH_DEPTH = 3  # how deep batch_counts looks into nested tuples, lists and mappings
_QUEUE_LIMIT = 1024  # batches held for the model at most (a loop over a loader without a model)


class UnfinishedStep(Exception):
    """Passed to a step's ``__exit__`` so the profiler drops it (work after the last update)."""


def batch_counts(batch: Any) -> tuple[int, int, int] | None:
    """``(tokens, samples, useful_tokens)`` of one batch, or None if it holds no integer tensor.

    The counted tensor is ``batch["input_ids"]`` when the batch is a mapping with that key, else
    the first integer tensor found depth-first (tuple and list items, mapping values, three
    levels deep). tokens = its number of elements, samples = its first dimension. Useful tokens
    are ``attention_mask``'s sum when the mapping has one on the CPU (HF batches), else
    ``tokens * (1 - padding_ratio)`` when it has a float ``padding_ratio`` (thruput's Loader),
    else all tokens.
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    tensor = ids if isinstance(ids, torch.Tensor) else _first_integer_tensor(batch, _SEARCH_DEPTH)
    if tensor is None:
        return None
    tokens = tensor.numel()
    samples = tensor.shape[0] if tensor.dim() else 1
    useful = tokens
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        ratio = batch.get("padding_ratio")
        if isinstance(mask, torch.Tensor) and mask.device.type == "cpu":
            useful = int(mask.sum())
        elif isinstance(ratio, float):
            useful = round(tokens * (1.0 - ratio))
    return tokens, samples, useful


def _first_integer_tensor(value: Any, depth: int) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.dtype in _INTEGER_DTYPES else None
    if depth == 0:
        return None
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_integer_tensor(item, depth - 1)
        if found is not None:
            return found
    return None


class Recorder:
    """Drives a ``StepProfiler`` from phase events (see the module docstring for the rules).

    Args:
        make_profiler: called once, at the first outermost forward, with the device of that
            module's first parameter (or first tensor argument); returns the profiler to fill.
        on_step: called with the profiler after every finished step (the live status line).

    Single-threaded: the hooks only report calls made on the thread that installed them.
    """

    def __init__(self, make_profiler: Callable[[torch.device], StepProfiler],
                 on_step: Callable[[StepProfiler], None] | None = None) -> None:
        self._make_profiler = make_profiler
        self._on_step = on_step
        self.profiler: StepProfiler | None = None
        self.loader_seen = False
        self._step: Any = None           # the open StepProfiler step context
        self._stack: list[str] = []      # open phases, innermost last
        self._timer: Any = None          # timing context of the innermost phase
        self._queued: deque[tuple[int, int, int]] = deque(maxlen=_QUEUE_LIMIT)
        self._model: weakref.ref | None = None  # the module whose forwards take queued batches
        self._clock: weakref.ref | None = None
        self._optimizer_depth = 0

    # --- phases ---------------------------------------------------------------------------

    def enter(self, phase: str) -> None:
        """``phase`` begins; the phase it interrupts is paused until it ends."""
        if self._timer is not None:
            self._timer.__exit__(None, None, None)
            self._timer = None
        self._stack.append(phase)
        if self._step is not None:
            self._timer = self.profiler.phase(phase)
            self._timer.__enter__()

    def exit(self) -> None:
        """The innermost phase ends; the one it interrupted resumes."""
        if self._timer is not None:
            self._timer.__exit__(None, None, None)
            self._timer = None
        if self._stack:
            self._stack.pop()
        if self._step is not None and self._stack:
            self._timer = self.profiler.phase(self._stack[-1])
            self._timer.__enter__()

    # --- events with meaning beyond their phase -------------------------------------------------

    def forward_begins(self, module: torch.nn.Module, args: tuple) -> None:
        """An outermost module forward begins (it ends with ``exit()``)."""
        if self._step is None and self.profiler is None:
            self.profiler = self._make_profiler(_device_of(module, args))
            self._open_step()
        self.enter("forward")
        if self._queued and (self._model is None or self._model() is None):
            self._model = weakref.ref(module)
        if self._model is not None and self._model() is module:
            if self._queued:
                counts = self._queued.popleft()
                if torch.is_grad_enabled():
                    self.profiler.add_batch(*counts)
        elif not self.loader_seen and args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():
            counts = batch_counts(args[0])
            if counts is not None:
                self.profiler.add_batch(*counts)

    def batch(self, batch: Any) -> None:
        """A loader yielded ``batch``: queue its counts for the model's next forward."""
        counts = batch_counts(batch)
        if counts is not None:
            self.loader_seen = True
            self._queued.append(counts)

    def optimizer_begins(self, optimizer: torch.optim.Optimizer) -> None:
        if self._clock is None or self._clock() is None:
            self._clock = weakref.ref(optimizer)
        self._optimizer_depth += 1
        self.enter("optimizer")

    def optimizer_ends(self, optimizer: torch.optim.Optimizer) -> None:
        self.exit()
        self._optimizer_depth = max(0, self._optimizer_depth - 1)
        # Nested steps (a subclass calling super().step(), a wrapper optimizer) end the step once.
        if self._optimizer_depth == 0 and self._step is not None and self._clock is not None \
                and self._clock() is optimizer:
            self._end_step()

    # --- steps ----------------------------------------------------------------------------

    def _open_step(self) -> None:
        self._step = self.profiler.step(tokens=0, samples=0)
        self._step.__enter__()
        if self._stack:
            self._timer = self.profiler.phase(self._stack[-1])
            self._timer.__enter__()

    def _end_step(self) -> None:
        if self._timer is not None:
            self._timer.__exit__(None, None, None)
            self._timer = None
        self._step.__exit__(None, None, None)
        self._open_step()
        if self._on_step is not None:
            self._on_step(self.profiler)

    def close(self) -> StepProfiler | None:
        """Drop the unfinished step and return the profiler (None if no forward ever ran)."""
        if self._timer is not None:
            self._timer.__exit__(None, None, None)
            self._timer = None
        if self._step is not None:
            self._step.__exit__(UnfinishedStep, UnfinishedStep(), None)
            self._step = None
        self._stack.clear()
        return self.profiler


def _device_of(module: torch.nn.Module, args: tuple) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return torch.device("cpu")
