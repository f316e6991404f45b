"""OffloadAdamW: fp32 master weights, gradients and Adam states in host memory (ZeRO-Offload).

The model keeps only its parameters, in the training dtype, on the device. During backward each
gradient moves to a host bucket as soon as autograd has accumulated it and the device gradient
is freed (:mod:`thruput.memory.offload_buckets`). ``step()`` runs the one-pass CPU AdamW of
:mod:`thruput.memory.adam` bucket by bucket and copies each bucket's updated parameters back as
soon as it is done (under CUDA overlapping the next bucket's CPU step). State dicts are
torch.optim.AdamW's format (:mod:`thruput.memory.offload_state`).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from thruput.memory.adam import STATE_DTYPES, adamw_step, kernel_available
from thruput.memory.offload_buckets import (HostSegment, allocate, allocated_bytes, build_segments, check_host_memory,
                                            check_params, copy_to_params, grad_sq_sum)
from thruput.memory.offload_scale import LossScale
from thruput.memory.offload_state import export_state, import_state
from thruput.memory.offload_stream import GradientStream

__all__ = ["HostSegment", "OffloadAdamW"]  # HostSegment: for ZeRO-2 (shard.py)


def _available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW with master weights, gradients and states on the host; a ``torch.optim.Optimizer``.

    Args match ``torch.optim.AdamW`` (per-group ``lr``, ``betas``, ``eps``, ``weight_decay`` are
    read at every step, so LR schedulers work), plus:

    * ``state_dtype``: ``"fp32"``, ``"bf16"`` (stochastic rounding) or ``"int8"`` (blockwise).
    * ``delayed_update_after``: after this many steps the CPU update runs in a background thread
      while the next forward/backward runs, so the parameters that step uses are one update
      stale (ZeRO-Offload's delayed parameter update). ``None`` disables it.
    * ``loss_scale``: ``None`` (bf16/fp32), a fixed float, or ``"dynamic"`` (starts at 2**16,
      halves on overflow, doubles after ``growth_interval`` good steps). Multiply the loss by
      :attr:`loss_scale` (or use :meth:`scale_loss`) before backward; a step whose gradients
      hold inf/NaN is skipped (:attr:`last_step_skipped`).
    * ``bucket_mb``: host bucket size; ``impl``: the CPU kernel (see ``adamw_step``).

    ``p.grad`` is what torch.optim.AdamW would see: after backward it holds a
    :class:`~thruput.memory.offload_grad.HostGrad` standing for the fp32 host gradient (no
    device memory), so ``model.zero_grad()`` (with or without ``set_to_none``), accumulation
    over backwards (until anyone zeroes), ``torch.nn.utils.clip_grad_norm_``,
    ``torch.amp.GradScaler`` and any other use of ``p.grad`` work as with torch. The one-pass
    :meth:`clip_grad_norm_` and ``loss_scale`` below save a pass each. A parameter whose
    ``p.grad`` is None at ``step()`` is skipped like torch does (with ``state_dtype="int8"``,
    whose blocks span parameters, it is stepped with a zero gradient). Frozen parameters are
    left alone.

    ``state_dict()`` is torch.optim.AdamW's format (plus the fp32 ``master``; see
    :mod:`thruput.memory.offload_state`): it loads into a run with torch AdamW, and back.

    Raises ``TypeError`` for a parameter dtype other than fp32/bf16/fp16, ``ValueError`` for
    parameters on more than one device, non-contiguous parameters or bad arguments, and
    ``MemoryError`` (before allocating) when the host has too little available memory.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, state_dtype: str = "fp32",
                 delayed_update_after: int | None = None, loss_scale: float | str | None = None,
                 growth_interval: int = 2000, bucket_mb: float = 32.0, impl: str = "auto") -> None:
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
        if delayed_update_after is not None and delayed_update_after < 0:
            raise ValueError(f"delayed_update_after must be >= 0 or None, got {delayed_update_after}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self._scaler = LossScale(loss_scale, growth_interval)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.delayed_update_after = delayed_update_after
        self.impl = impl
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.last_timings: dict[str, float] = {}
        self._timings = {"d2h": 0.0, "cpu_step": 0.0, "h2d": 0.0}
        self._clip_coef: float | None = None
        self._sq_sum: float | None = None
        self._steps_done = 0
        self._bg: threading.Thread | None = None
        self._bg_error: BaseException | None = None
        self._copy_pending = False  # a finished delayed update whose parameters are not on the device yet
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self.device = check_params(trainable)
        self._cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self.segments = self._build_segments()
        check_host_memory(self.segments, self.state_dtype, self._needs_grad_stage(), _available_host_bytes())
        for seg in self.segments:
            self._allocate(seg)
        self._grads = self._grad_stream()
        self._handles = self._install_grad_path()

    # --- construction ----------------------------------------------------------------------

    def _build_segments(self) -> list[HostSegment]:
        """The host buckets (ZeRO-2 overrides: this rank's shards of the comm buckets)."""
        return build_segments(self.param_groups, self.bucket_bytes)

    def _needs_grad_stage(self) -> bool:
        return self._cuda or self.delayed_update_after is not None

    def _allocate(self, seg: HostSegment) -> None:
        allocate(seg, self.state_dtype, pin=self._cuda, grad_stage=self._needs_grad_stage())

    @property
    def kernel(self) -> str:
        """The CPU kernel the update runs: ``"cpp"`` or ``"torch"``. With ``impl="auto"`` this is
        ``"torch"`` when the C++ extension cannot be built: two orders of magnitude slower for bf16
        and int8 states, so benchmarks record it."""
        if self.impl != "auto":
            return self.impl
        return "cpp" if kernel_available() else "torch"

    def host_bytes(self) -> int:
        """Bytes of host memory this optimizer holds (masters, gradients, states, staging)."""
        return sum(allocated_bytes(s) for s in self.segments)

    # --- gradients: device -> host ---------------------------------------------------------

    def _grad_stream(self) -> GradientStream:
        """Where gradients go and what ``p.grad`` holds (ZeRO-2 overrides)."""
        return GradientStream(self.segments, self.device, self._side, self._join_background, self._on_grad_change)

    def _install_grad_path(self) -> list[Any]:
        """Hooks that stream gradients to the host (ZeRO-2 overrides: reduce-scatter instead)."""
        return self._grads.install()

    def _gather_grads(self) -> None:
        """Bring every gradient of this step into the fp32 host buffers; mark the missing ones."""
        self._grads.gather()

    def _on_grad_change(self) -> None:
        """A gradient is about to change or be read: a pending clip coefficient of
        :meth:`clip_grad_norm_` is applied to the buffers first (the clipped gradients are what
        ``p.grad`` holds from then on, and a later backward adds to them, as with torch)."""
        coef, self._clip_coef, self._sq_sum = self._clip_coef, None, None
        if coef is not None and coef != 1.0:
            for seg in self.segments:
                seg.grad.mul_(coef)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``: ``p.grad = None`` (the next backward's gradient
        overwrites the host buffer, no memset) or, with ``set_to_none=False``, zero."""
        self._clip_coef = self._sq_sum = None
        super().zero_grad(set_to_none)

    # --- clipping and loss scaling ---------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        """The factor the loss must be multiplied by before backward (1.0 without scaling)."""
        return self._scaler.factor

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for inf/NaN gradients under loss scaling."""
        return self._scaler.skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        return self._scaler.last_step_skipped

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` times :attr:`loss_scale`, to call ``backward()`` on."""
        return loss * self.loss_scale

    def _reduce_sum(self, value: float) -> float:
        """Sum of ``value`` over data-parallel ranks (identity here; ZeRO-2 overrides)."""
        return value

    def _grad_sq_sum(self) -> float:
        return self._reduce_sum(grad_sq_sum(self.segments))

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the accumulated gradients to global L2 norm ``max_norm``, in one pass: the
        coefficient is folded into the next update (or into the buffers, should ``p.grad`` be
        used or added to first). ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``
        gives the same result with a pass more.

        Returns the total norm of the unscaled gradients (before clipping), as a tensor, like
        ``torch.nn.utils.clip_grad_norm_``. Inf/NaN norms are returned as they are; with loss
        scaling that step is skipped, without it the update propagates them like torch does.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self._prepare_grads()
        self._on_grad_change()  # an earlier call's coefficient applies first
        self._sq_sum = self._grad_sq_sum()
        norm = self._sq_sum**0.5 / self.loss_scale
        coef = max_norm / (norm + 1e-6)
        self._clip_coef = min(coef, 1.0) if coef == coef and norm != float("inf") else None
        return torch.tensor(norm)

    # --- the step --------------------------------------------------------------------------

    def _prepare_grads(self) -> None:
        """Wait for a running delayed update, then gather this step's gradients (timed)."""
        t0 = time.perf_counter()
        self._join_background()
        t1 = time.perf_counter()
        self._gather_grads()
        self._timings["cpu_step"] += t1 - t0
        self._timings["d2h"] += time.perf_counter() - t1

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, copy_back: bool = True) -> Any:
        """Update the host master weights and copy the parameters back to the device.

        ``copy_back=False`` leaves the final part to :meth:`copy_back` so a trainer can time it
        as its own phase: under CUDA the copies are issued here per bucket and ``copy_back()``
        makes the compute stream wait for them; on CPU the copies run in ``copy_back()``. With
        the delayed update active the copies always run here. Returns ``closure()``'s value.

        Afterwards :attr:`last_timings` holds this step's host seconds: ``d2h`` (gathering the
        gradients), ``cpu_step`` (the CPU update, or with the delayed update the time spent
        waiting for it) and ``h2d`` (parameter copies), plus ``comm`` under ZeRO-2.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        timings = self._timings
        self._prepare_grads()
        if self._copy_pending:
            t0 = time.perf_counter()
            self._copy_all()
            timings["h2d"] += time.perf_counter() - t0
        grad_scale = self._grad_scale()
        self._clip_coef = self._sq_sum = None
        if grad_scale is not None:
            delayed = self.delayed_update_after is not None and self._steps_done >= self.delayed_update_after
            self._steps_done += 1
            if delayed:
                # This step's hyperparameters: a scheduler changes the groups while the update runs.
                groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
                self._bg = threading.Thread(target=self._background_update, args=(grad_scale, groups),
                                            name="OffloadAdamW-update", daemon=True)
                self._bg.start()
            else:
                self._update_all(grad_scale, copy_back)
        self.last_timings = dict(timings)
        self._timings = {k: 0.0 for k in timings}
        return loss

    def _update_all(self, grad_scale: float, copy_back: bool) -> None:
        timings = self._timings
        issue = self._cuda or copy_back
        for seg in self.segments:
            t0 = time.perf_counter()
            self._update(seg, grad_scale)
            t1 = time.perf_counter()
            timings["cpu_step"] += t1 - t0
            if issue:
                self._copy_segment(seg)
                timings["h2d"] += time.perf_counter() - t1
        self._copy_pending = not issue
        if copy_back:
            t2 = time.perf_counter()
            self._finish_copies()
            timings["h2d"] += time.perf_counter() - t2

    def _grad_scale(self) -> float | None:
        """The divisor for this step's gradients (loss scale / clip coefficient), or None to skip."""
        scale = self.loss_scale
        if not self._scaler.step_ok(lambda: self._grad_sq_sum() if self._sq_sum is None else self._sq_sum):
            return None
        if self._clip_coef is not None and self._clip_coef > 0:
            scale /= self._clip_coef
        return scale

    def _update(self, seg: HostSegment, grad_scale: float, groups: list[dict[str, Any]] | None = None) -> None:
        group = (self.param_groups if groups is None else groups)[seg.group]
        seg.wait_copy_out()
        beta1, beta2 = group["betas"]
        if self.state_dtype == "int8":  # blocks share scales across pieces: the segment steps whole
            seg.skip = [False] * len(seg.pieces)
            seg.steps = [max(seg.steps)] * len(seg.pieces)
        for start, end, steps in seg.runs():
            out = None if seg.param_out is None else seg.param_out[start:end]
            adamw_step(seg.master[start:end], seg.grad[start:end], seg.state.slice(start, end), out,
                       step=steps + 1, lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                       eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                       grad_scale=grad_scale, impl=self.impl, index_offset=seg.index_offset + start)
        for i, skipped in enumerate(seg.skip):
            if not skipped:
                seg.steps[i] += 1
            elif seg.param_out is not None:  # the kernel did not write it; the copy back reads it
                seg.param_out[seg.span(i)].copy_(seg.master[seg.span(i)])

    def _background_update(self, grad_scale: float, groups: list[dict[str, Any]]) -> None:
        # A new thread's current CUDA device is 0: its event waits and frees must not create a
        # context on GPU 0 when this rank trains on another GPU.
        on_device = torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext()
        try:
            with on_device:
                for seg in self.segments:
                    self._update(seg, grad_scale, groups)
        except BaseException as exc:  # surfaced on the main thread by _join_background
            self._bg_error = exc
            return  # a partly updated master must not reach the model
        self._copy_pending = True

    def _join_background(self) -> None:
        if self._bg is None:
            return
        self._bg.join()
        self._bg = None
        if self._bg_error is not None:
            error, self._bg_error = self._bg_error, None
            raise RuntimeError("OffloadAdamW: the delayed CPU update failed") from error

    # --- parameters: host -> device --------------------------------------------------------

    def _copy_segment(self, seg: HostSegment) -> None:
        """Issue ``seg``'s parameter copies (ZeRO-2 overrides: all-gathers in ``_finish_copies``)."""
        copy_to_params(seg, self.device, self._side)

    def _copy_all(self) -> None:
        for seg in self.segments:
            self._copy_segment(seg)
        self._finish_copies()
        self._copy_pending = False

    def _finish_copies(self) -> None:
        """Complete the issued copies (ZeRO-2 overrides: the all-gathers)."""
        self._await_copies()

    def _await_copies(self) -> None:
        """Make the compute stream wait for the copies issued on the side stream."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def copy_back(self) -> float:
        """Finish the parameter copies of ``step(copy_back=False)``; returns host seconds spent.
        While a delayed update runs it only orders the copies issued by ``step()``: that update's
        parameters go out at the next step (ZeRO-2: no all-gather of masters being written)."""
        t0 = time.perf_counter()
        if self._copy_pending and self._bg is None:
            self._copy_all()
        else:
            self._await_copies()
        return time.perf_counter() - t0

    def flush(self) -> None:
        """Wait for a delayed update and put its parameters on the device (before evaluation or
        a checkpoint: afterwards the model holds the newest weights)."""
        self._join_background()
        if self._copy_pending:
            self._copy_all()
        else:  # copies issued by step(copy_back=False) without copy_back()
            self._await_copies()

    # --- state -----------------------------------------------------------------------------

    def _combine(self, t: Tensor, op: str = "sum") -> Tensor:
        """Combine per-rank pieces of a full tensor (identity here; ZeRO-2 all-reduces)."""
        return t

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format (see the class docstring); finishes a delayed update first."""
        self.flush()
        state, groups = export_state(self.param_groups, self.segments, self._grads.pieces, self._combine)
        return {"state": state, "param_groups": groups,
                "offload": {**self._scaler.state_dict(), "steps_done": self._steps_done}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output or a torch.optim.AdamW state dict.

        The fp32 master comes from the saved ``master`` when present, else from the current
        parameters (load the model's weights first). Raises ``ValueError`` when the groups or
        parameter sizes differ.
        """
        self.flush()
        for seg in self.segments:  # the host writes the masters a copy to the device may still read
            seg.wait_copy_out()
        import_state(self.param_groups, self.segments, self.state_dtype, state_dict)
        extra = state_dict.get("offload")
        if extra is not None:
            self._scaler.load_state_dict(extra)
            self._steps_done = int(extra["steps_done"])
        else:
            self._steps_done = max((max(s.steps) for s in self.segments), default=0)
        self.zero_grad()

    def remove_hooks(self) -> None:
        """Detach from the model's parameters (the optimizer is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """For API parity with ZeRO-2: single-process accumulation needs no special context."""
        yield
