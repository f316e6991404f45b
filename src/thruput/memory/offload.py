"""OffloadAdamW: fp32 master weights, gradients and Adam states in host memory (ZeRO-Offload).

The model keeps only its parameters, in the training dtype, on the device. During backward each
gradient is copied to a host bucket as soon as autograd has accumulated it (a
post-accumulate-grad hook; on CUDA a non-blocking copy on a side stream into pinned memory) and
the device gradient is freed. ``step()`` runs the one-pass CPU AdamW of
:mod:`thruput.memory.adam` bucket by bucket and copies each bucket's updated parameters back as
soon as it is done (under CUDA overlapping the next bucket's CPU step).

Host layout, per bucket ("segment": parameters of one param group and dtype, in backward order):
fp32 master, fp32 gradient accumulator, Adam states (fp32/bf16/int8), plus a training-dtype
staging buffer for updated parameters when the training dtype is not fp32, and one for incoming
gradients under CUDA or the delayed update. Under CUDA the buffers that cross the bus (master,
staging) are pinned; the states and the accumulator never leave the host and are not.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from thruput.memory.adam import STATE_DTYPES, AdamState, adamw_step

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay")


@dataclass(eq=False)
class Segment:
    """One flat run of host buffers. ``pieces[i] = (param, p_start, p_end, seg_start)``: elements
    ``[p_start, p_end)`` of ``param.view(-1)`` live at ``seg_start`` onwards."""

    group: int
    dtype: torch.dtype
    pieces: list[tuple[nn.Parameter, int, int, int]]
    numel: int
    master: Tensor = field(init=False)
    grad: Tensor = field(init=False)
    state: AdamState = field(init=False)
    grad_stage: Tensor | None = None
    param_out: Tensor | None = None
    step: int = 0
    fresh: list[bool] = field(default_factory=list)  # next gradient of piece i overwrites
    staged: list[Any] = field(default_factory=list)  # piece i waits in grad_stage (True or a CUDA event)
    copy_event: Any = None


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


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

    Gradient accumulation: gradients of several backwards add up (in fp32 on the host) until
    :meth:`zero_grad`. Clip with :meth:`clip_grad_norm_` (the model's ``p.grad`` are ``None``
    after backward, so ``torch.nn.utils.clip_grad_norm_`` sees nothing). A trainable parameter
    that got no gradient is stepped with a zero gradient (its moments still decay), unlike
    torch.optim.AdamW, which skips it. Frozen parameters are left alone.

    ``state_dict()`` is torch.optim.AdamW's format (per parameter ``step``, fp32 ``exp_avg`` and
    ``exp_avg_sq`` in the parameter's shape; plus the fp32 ``master`` when the training dtype is
    not fp32), so it loads into a run with torch AdamW, and torch AdamW's loads here.

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
        if not (loss_scale is None or loss_scale == "dynamic"
                or (isinstance(loss_scale, (int, float)) and loss_scale > 0)):
            raise ValueError(f"loss_scale must be None, 'dynamic' or a positive number, got {loss_scale!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.delayed_update_after = delayed_update_after
        self.impl = impl
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._dynamic = loss_scale == "dynamic"
        self._scale = 2.0**16 if self._dynamic else (None if loss_scale is None else float(loss_scale))
        self.growth_interval = growth_interval
        self._good_steps = 0
        self.skipped_steps = 0
        self.last_step_skipped = False
        self.last_timings: dict[str, float] = {}
        self._timings = {"d2h": 0.0, "cpu_step": 0.0, "h2d": 0.0}
        self._clip_coef: float | None = None
        self._sq_sum: float | None = None
        self._steps_done = 0
        self._bg: threading.Thread | None = None
        self._bg_error: BaseException | None = None
        self._bg_seconds = 0.0
        self._copy_pending = False  # a finished delayed update whose parameters are not on the device yet
        trainable = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self.device = self._check_params(trainable)
        self._cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self.segments = self._build_segments()
        self._check_host_memory()
        for seg in self.segments:
            self._allocate(seg)
        self._pieces: dict[int, list[tuple[Segment, int]]] = {}
        for seg in self.segments:
            for i, (p, *_rest) in enumerate(seg.pieces):
                self._pieces.setdefault(id(p), []).append((seg, i))
        self._handles = self._install_grad_path()

    # --- construction ----------------------------------------------------------------------

    @staticmethod
    def _check_params(trainable: list[Tensor]) -> torch.device:
        if not trainable:
            raise ValueError("OffloadAdamW got no trainable parameters (all have requires_grad=False)")
        for i, p in enumerate(trainable):
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"OffloadAdamW: trainable parameter {i} (shape {tuple(p.shape)}) has dtype "
                                f"{p.dtype}; supported are float32, bfloat16 and float16")
            if not p.is_contiguous():
                raise ValueError(f"OffloadAdamW: parameter {i} (shape {tuple(p.shape)}) is not contiguous")
        devices = sorted({str(p.device) for p in trainable})
        if len(devices) > 1:
            raise ValueError(f"OffloadAdamW: parameters are on several devices {devices}; "
                             "move the model to one device first")
        return trainable[0].device

    def _build_segments(self) -> list[Segment]:
        """Buckets per (param group, dtype), last-registered parameter first (backward order)."""
        segments: list[Segment] = []
        for gi, group in enumerate(self.param_groups):
            params = list({id(p): p for p in group["params"] if p.requires_grad}.values())
            current: list[nn.Parameter] = []

            def close() -> None:
                if current:
                    pieces, off = [], 0
                    for p in current:
                        pieces.append((p, 0, p.numel(), off))
                        off += p.numel()
                    segments.append(Segment(gi, current[0].dtype, pieces, off))
                    current.clear()

            size = 0
            for p in reversed(params):
                if current and p.dtype != current[0].dtype:
                    close()
                    size = 0
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= self.bucket_bytes:
                    close()
                    size = 0
            close()
        return segments

    def _needs_grad_stage(self) -> bool:
        return self._cuda or self.delayed_update_after is not None

    def _segment_bytes(self, seg: Segment) -> int:
        """Host bytes ``_allocate`` will create for ``seg``: master and accumulator (8 B), states,
        and the staging buffers in the training dtype."""
        item = torch.empty(0, dtype=seg.dtype).element_size()
        stages = (item if self._needs_grad_stage() else 0) + (item if seg.dtype != torch.float32 else 0)
        states = {"fp32": 8 * seg.numel, "bf16": 4 * seg.numel,
                  "int8": 2 * seg.numel + 8 * -(-seg.numel // 256)}[self.state_dtype]
        return seg.numel * (8 + stages) + states

    def _check_host_memory(self) -> None:
        need = sum(self._segment_bytes(s) for s in self.segments)
        available = _available_host_bytes()
        if need > available:
            n = sum(s.numel for s in self.segments)
            raise MemoryError(f"OffloadAdamW needs {_fmt(need)} of host memory for {n:,} parameters "
                              f"({self.state_dtype} states) but only {_fmt(available)} is available; "
                              "use state_dtype='bf16' or 'int8', ZeRO-2 over more ranks, or a bigger host")

    def _allocate(self, seg: Segment) -> None:
        pin = self._cuda
        seg.master = torch.empty(seg.numel, dtype=torch.float32, pin_memory=pin)
        with torch.no_grad():
            for p, ps, pe, ss in seg.pieces:
                seg.master[ss:ss + pe - ps].copy_(p.detach().reshape(-1)[ps:pe])
        seg.grad = torch.zeros(seg.numel, dtype=torch.float32)
        seg.state = AdamState.create(seg.numel, self.state_dtype)
        if self._needs_grad_stage():
            seg.grad_stage = torch.empty(seg.numel, dtype=seg.dtype, pin_memory=pin)
        if seg.dtype != torch.float32:
            seg.param_out = torch.empty(seg.numel, dtype=seg.dtype, pin_memory=pin)
        seg.fresh = [True] * len(seg.pieces)
        seg.staged = [None] * len(seg.pieces)

    def host_bytes(self) -> int:
        """Bytes of host memory this optimizer holds (masters, gradients, states, staging)."""
        total = 0
        for s in self.segments:
            total += s.master.nbytes + s.grad.nbytes + s.state.nbytes()
            total += sum(t.nbytes for t in (s.grad_stage, s.param_out) if t is not None)
        return total

    # --- gradients: device -> host ---------------------------------------------------------

    def _install_grad_path(self) -> list[Any]:
        params = {id(p): p for s in self.segments for p, *_ in s.pieces}
        return [p.register_post_accumulate_grad_hook(self._on_grad) for p in params.values()]

    def _on_grad(self, p: Tensor) -> None:
        """Move ``p.grad`` into its host bucket (staged or accumulated) and free it."""
        g = p.grad
        if g is None:
            return
        flat = g.detach().reshape(-1)
        for seg, i in self._pieces[id(p)]:
            _, ps, pe, ss = seg.pieces[i]
            if seg.grad_stage is None:
                self._accumulate(seg, i, flat[ps:pe])
                continue
            if seg.staged[i] is not None:  # an earlier micro-step's gradient still waits there
                self._fold_piece(seg, i)
            dst = seg.grad_stage[ss:ss + pe - ps]
            if self._cuda:
                self._side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._side):
                    dst.copy_(flat[ps:pe], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                g.record_stream(self._side)
                seg.staged[i] = event
            else:
                dst.copy_(flat[ps:pe])
                seg.staged[i] = True
        p.grad = None

    def _accumulate(self, seg: Segment, i: int, src: Tensor) -> None:
        _, ps, pe, ss = seg.pieces[i]
        dst = seg.grad[ss:ss + pe - ps]
        if seg.fresh[i]:
            dst.copy_(src)
            seg.fresh[i] = False
        else:
            dst.add_(src)

    def _fold_piece(self, seg: Segment, i: int) -> None:
        self._join_background()  # the update reads seg.grad
        if not isinstance(seg.staged[i], bool):
            seg.staged[i].synchronize()
        _, ps, pe, ss = seg.pieces[i]
        self._accumulate(seg, i, seg.grad_stage[ss:ss + pe - ps])
        seg.staged[i] = None

    def _gather_grads(self) -> None:
        """Bring every gradient of this step into the fp32 host buffers; zero the missing ones."""
        for p in {id(p): p for s in self.segments for p, *_ in s.pieces}.values():
            if p.grad is not None:  # set by hand, or produced without the hook
                self._on_grad(p)
        for seg in self.segments:
            for i, (_, ps, pe, ss) in enumerate(seg.pieces):
                if seg.staged[i] is not None:
                    self._fold_piece(seg, i)
                elif seg.fresh[i]:
                    seg.grad[ss:ss + pe - ps].zero_()
                    seg.fresh[i] = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new accumulation: the next gradient of every parameter overwrites the host
        buffer (no memset). Device gradients are already freed by the hooks."""
        for seg in self.segments:
            seg.fresh = [True] * len(seg.pieces)
            for i, staged in enumerate(seg.staged):
                if not isinstance(staged, (bool, type(None))):
                    staged.synchronize()
            seg.staged = [None] * len(seg.pieces)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # --- clipping and loss scaling ---------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        """The factor the loss must be multiplied by before backward (1.0 without scaling)."""
        return 1.0 if self._scale is None else self._scale

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self.loss_scale

    def _reduce_sum(self, value: float) -> float:
        """Sum of ``value`` over data-parallel ranks (identity here; ZeRO-2 overrides)."""
        return value

    def _grad_sq_sum(self) -> float:
        total = 0.0
        for seg in self.segments:
            for chunk in seg.grad.split(1 << 20):  # fp64 sums, through a bounded temporary
                total += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
        return self._reduce_sum(total)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the accumulated gradients to global L2 norm ``max_norm`` at the next step.

        Returns the total norm of the unscaled gradients (before clipping), as a tensor, like
        ``torch.nn.utils.clip_grad_norm_``. Inf/NaN norms are returned as they are; with loss
        scaling that step is skipped, without it the update propagates them like torch does.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self._prepare_grads()
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
                self._bg = threading.Thread(target=self._background_update, args=(grad_scale,),
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
        self.last_step_skipped = False
        if self._scale is not None:
            sq = self._grad_sq_sum() if self._sq_sum is None else self._sq_sum
            overflow = not (sq == sq and sq != float("inf"))
            if self._dynamic:
                self._good_steps = 0 if overflow else self._good_steps + 1
                if overflow:
                    self._scale *= 0.5
                elif self._good_steps >= self.growth_interval:
                    self._scale *= 2.0
                    self._good_steps = 0
            if overflow:
                self.skipped_steps += 1
                self.last_step_skipped = True
                return None
        if self._clip_coef is not None and self._clip_coef > 0:
            scale /= self._clip_coef
        return scale

    def _update(self, seg: Segment, grad_scale: float) -> None:
        group = self.param_groups[seg.group]
        if seg.copy_event is not None:  # the previous copy out of param_out/master must be done
            seg.copy_event.synchronize()
            seg.copy_event = None
        seg.step += 1
        beta1, beta2 = group["betas"]
        adamw_step(seg.master, seg.grad, seg.state, seg.param_out, step=seg.step, lr=float(group["lr"]),
                   beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                   weight_decay=float(group["weight_decay"]), grad_scale=grad_scale, impl=self.impl)

    def _background_update(self, grad_scale: float) -> None:
        t0 = time.perf_counter()
        try:
            for seg in self.segments:
                self._update(seg, grad_scale)
        except BaseException as exc:  # surfaced on the main thread by _join_background
            self._bg_error = exc
        self._bg_seconds = time.perf_counter() - t0
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

    def _copy_segment(self, seg: Segment) -> None:
        src = seg.master if seg.param_out is None else seg.param_out
        if self._cuda:
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # backward has read the params
            with torch.cuda.stream(self._side):
                for p, ps, pe, ss in seg.pieces:
                    p.data.view(-1)[ps:pe].copy_(src[ss:ss + pe - ps], non_blocking=True)
                seg.copy_event = torch.cuda.Event()
                seg.copy_event.record()
        else:
            for p, ps, pe, ss in seg.pieces:
                p.data.view(-1)[ps:pe].copy_(src[ss:ss + pe - ps])

    def _copy_all(self) -> None:
        for seg in self.segments:
            self._copy_segment(seg)
        self._finish_copies()
        self._copy_pending = False

    def _finish_copies(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def copy_back(self) -> float:
        """Finish the parameter copies of ``step(copy_back=False)``; returns host seconds spent."""
        t0 = time.perf_counter()
        if self._copy_pending and self._bg is None:
            self._copy_all()
        else:
            self._finish_copies()
        return time.perf_counter() - t0

    def flush(self) -> None:
        """Wait for a delayed update and put its parameters on the device (before evaluation or
        a checkpoint: afterwards the model holds the newest weights)."""
        self._join_background()
        if self._copy_pending:
            self._copy_all()

    # --- state -----------------------------------------------------------------------------

    def _combine(self, t: Tensor, op: str = "sum") -> Tensor:
        """Combine per-rank pieces of a full tensor (identity here; ZeRO-2 all-reduces)."""
        return t

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format (see the class docstring); finishes a delayed update first."""
        self.flush()
        index: dict[int, int] = {}
        groups = []
        defaults = torch.optim.AdamW([torch.zeros(1)]).param_groups[0]
        for group in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in group["params"]]
            saved = {k: v for k, v in defaults.items() if k != "params"}
            saved.update({k: v for k, v in group.items() if k != "params"})
            groups.append({**saved, "params": ids})
        moments = {id(seg): seg.state.to_fp32() for seg in self.segments}
        state: dict[int, dict[str, Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                full = {k: torch.zeros(p.numel(), dtype=torch.float32) for k in ("exp_avg", "exp_avg_sq", "master")}
                step = 0
                for seg, i in self._pieces.get(id(p), []):  # ZeRO-2: only this rank's pieces
                    _, ps, pe, ss = seg.pieces[i]
                    m, v = moments[id(seg)]
                    full["exp_avg"][ps:pe] = m[ss:ss + pe - ps]
                    full["exp_avg_sq"][ps:pe] = v[ss:ss + pe - ps]
                    full["master"][ps:pe] = seg.master[ss:ss + pe - ps]
                    step = max(step, seg.step)
                step = int(self._combine(torch.tensor([step], dtype=torch.float64), "max").item())
                if step == 0:
                    continue
                entry = {"step": torch.tensor(float(step))}
                for k in ("exp_avg", "exp_avg_sq") + (("master",) if p.dtype != torch.float32 else ()):
                    entry[k] = self._combine(full[k]).view(p.shape)
                state[index[id(p)]] = entry
        scaler = {"scale": self._scale, "good_steps": self._good_steps, "skipped_steps": self.skipped_steps,
                  "steps_done": self._steps_done}
        return {"state": state, "param_groups": groups, "offload": scaler}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output or a torch.optim.AdamW state dict.

        The fp32 master comes from the saved ``master`` when present, else from the current
        parameters (load the model's weights first). Raises ``ValueError`` when the groups or
        parameter sizes differ.
        """
        self.flush()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        by_id: dict[int, dict[str, Tensor]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"param group {gi}: loaded state dict has {len(saved['params'])} "
                                 f"parameters, this optimizer has {len(group['params'])}")
            for key in ("amsgrad", "maximize"):
                if saved.get(key):
                    raise ValueError(f"param group {gi}: {key}=True is not supported by OffloadAdamW")
            for p, idx in zip(group["params"], saved["params"]):
                entry = state_dict["state"].get(idx, state_dict["state"].get(str(idx)))
                if entry is not None:
                    for key in ("exp_avg", "exp_avg_sq", "master"):
                        if key in entry and entry[key].numel() != p.numel():
                            raise ValueError(f"param group {gi}: state {key!r} of parameter {idx} has "
                                             f"{entry[key].numel()} elements, the parameter {p.numel()}")
                    by_id[id(p)] = entry
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        for seg in self.segments:
            m = torch.zeros(seg.numel, dtype=torch.float32)
            v = torch.zeros(seg.numel, dtype=torch.float32)
            step = 0
            for p, ps, pe, ss in seg.pieces:
                entry = by_id.get(id(p))
                n = pe - ps
                master = entry.get("master") if entry is not None else None
                source = p.detach() if master is None else master
                seg.master[ss:ss + n].copy_(source.reshape(-1)[ps:pe])
                if entry is None:
                    continue
                m[ss:ss + n] = entry["exp_avg"].detach().reshape(-1)[ps:pe].float().cpu()
                v[ss:ss + n] = entry["exp_avg_sq"].detach().reshape(-1)[ps:pe].float().cpu()
                step = max(step, int(float(entry["step"])))
            fresh = AdamState.from_fp32(m, v, self.state_dtype)
            for name in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
                dst = getattr(seg.state, name)
                if dst is not None:
                    dst.copy_(getattr(fresh, name))
            seg.step = step
        extra = state_dict.get("offload")
        if extra is not None:
            self._scale = extra["scale"] if self._scale is not None else None
            self._good_steps = int(extra["good_steps"])
            self.skipped_steps = int(extra["skipped_steps"])
            self._steps_done = int(extra["steps_done"])
        else:
            self._steps_done = max((s.step for s in self.segments), default=0)
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
