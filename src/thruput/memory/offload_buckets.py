"""OffloadAdamW's host buckets: layout, allocation, the gradient stream in and the parameter copies out.

A bucket ("segment") is one flat run of host buffers for parameters of one param group and one
dtype, in backward order: fp32 master, fp32 gradient accumulator, Adam states (fp32/bf16/int8),
plus a training-dtype staging buffer for updated parameters when the training dtype is not
fp32, and one for incoming gradients under CUDA or the delayed update. Under CUDA the buffers
that cross the bus (staging, and the master of an fp32 model) are pinned; the states, the
accumulator and a master with a training-dtype copy never leave the host and are not.

:class:`GradientStream` moves each gradient into its bucket as soon as autograd has accumulated
it (a post-accumulate-grad hook; on CUDA a non-blocking copy on a side stream into pinned
memory) and frees the device gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from thruput.comm.buckets import group_in_backward_order
from thruput.memory.adam import BLOCK, AdamState, n_blocks

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Segment:
    """One flat run of host buffers. ``pieces[i] = (param, p_start, p_end, seg_start)``: elements
    ``[p_start, p_end)`` of ``param.view(-1)`` live at ``seg_start`` onwards. ``index_offset``:
    the global index of element 0, by which stochastic rounding draws (a ZeRO-2 shard's offset)."""

    group: int
    dtype: torch.dtype
    pieces: list[tuple[nn.Parameter, int, int, int]]
    numel: int
    index_offset: int = 0
    master: Tensor = field(init=False)
    grad: Tensor = field(init=False)
    state: AdamState = field(init=False)
    grad_stage: Tensor | None = None
    param_out: Tensor | None = None
    step: int = 0
    fresh: list[bool] = field(default_factory=list)  # next gradient of piece i overwrites
    staged: list[Any] = field(default_factory=list)  # piece i waits in grad_stage (True or a CUDA event)
    copy_event: Any = None  # CUDA: marks the end of the last copy out of param_out / master

    def wait_copy_out(self) -> None:
        """Block until the last device copy out of ``param_out`` / ``master`` has read them."""
        if self.copy_event is not None:
            self.copy_event.synchronize()
            self.copy_event = None


def check_params(trainable: list[Tensor]) -> torch.device:
    """The one device of the trainable parameters.

    Raises ``ValueError`` when there are none, when one is not contiguous or when they are on
    several devices, ``TypeError`` for a dtype other than fp32/bf16/fp16.
    """
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


def build_segments(param_groups: list[dict[str, Any]], bucket_bytes: int) -> list[Segment]:
    """Buckets per (param group, dtype) of about ``bucket_bytes`` (in the training dtype) each,
    last-registered parameter first (backward order). Frozen parameters get none."""
    segments: list[Segment] = []
    for gi, group in enumerate(param_groups):
        params = {id(p): p for p in group["params"] if p.requires_grad}.values()
        for run in group_in_backward_order(params, bucket_bytes):
            pieces, off = [], 0
            for p in run:
                pieces.append((p, 0, p.numel(), off))
                off += p.numel()
            segments.append(Segment(gi, run[0].dtype, pieces, off))
    return segments


def segment_bytes(seg: Segment, state_dtype: str, grad_stage: bool) -> int:
    """Host bytes :func:`allocate` will create for ``seg``: master and accumulator (8 B/param),
    states, and the staging buffers in the training dtype."""
    item = torch.empty(0, dtype=seg.dtype).element_size()
    stages = (item if grad_stage else 0) + (item if seg.dtype != torch.float32 else 0)
    states = {"fp32": 8 * seg.numel, "bf16": 4 * seg.numel,
              "int8": 2 * seg.numel + 8 * n_blocks(seg.numel, seg.index_offset % BLOCK)}[state_dtype]
    return seg.numel * (8 + stages) + states


def check_host_memory(segments: list[Segment], state_dtype: str, grad_stage: bool, available: int) -> None:
    """Raise ``MemoryError`` when allocating ``segments`` needs more than ``available`` bytes."""
    need = sum(segment_bytes(s, state_dtype, grad_stage) for s in segments)
    if need > available:
        n = sum(s.numel for s in segments)
        raise MemoryError(f"OffloadAdamW needs {need / 2**30:.2f} GiB of host memory for {n:,} parameters "
                          f"({state_dtype} states) but only {available / 2**30:.2f} GiB is available; "
                          "use state_dtype='bf16' or 'int8', ZeRO-2 over more ranks, or a bigger host")


def allocate(seg: Segment, state_dtype: str, *, pin: bool, grad_stage: bool) -> None:
    """Create ``seg``'s host buffers; the master starts as a copy of the parameters. ``pin``
    page-locks the buffers that cross the bus: the staging buffers, and the master only when the
    model trains in fp32 (otherwise its training-dtype copy ``param_out`` is what goes back)."""
    seg.master = torch.empty(seg.numel, dtype=torch.float32, pin_memory=pin and seg.dtype == torch.float32)
    with torch.no_grad():
        for p, ps, pe, ss in seg.pieces:
            seg.master[ss:ss + pe - ps].copy_(p.detach().reshape(-1)[ps:pe])
    seg.grad = torch.zeros(seg.numel, dtype=torch.float32)
    seg.state = AdamState.create(seg.numel, state_dtype, index_offset=seg.index_offset)
    if grad_stage:
        seg.grad_stage = torch.empty(seg.numel, dtype=seg.dtype, pin_memory=pin)
    if seg.dtype != torch.float32:
        seg.param_out = torch.empty(seg.numel, dtype=seg.dtype, pin_memory=pin)
    seg.fresh = [True] * len(seg.pieces)
    seg.staged = [None] * len(seg.pieces)


def allocated_bytes(seg: Segment) -> int:
    """Bytes of ``seg``'s allocated host buffers (masters, gradients, states, staging)."""
    total = seg.master.nbytes + seg.grad.nbytes + seg.state.nbytes()
    return total + sum(t.nbytes for t in (seg.grad_stage, seg.param_out) if t is not None)


def grad_sq_sum(segments: list[Segment]) -> float:
    """Sum of squares of the fp32 gradient accumulators, computed in fp64."""
    total = 0.0
    for seg in segments:
        for chunk in seg.grad.split(1 << 20):  # bounds the fp64 temporary
            total += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
    return total


def copy_to_params(seg: Segment, device: torch.device, side: Any) -> None:
    """Copy ``seg``'s updated parameters (``param_out``, or the fp32 master) into the model.

    Under CUDA (``side`` a stream) the copies are issued on ``side`` after the compute stream's
    work so far (backward has read the parameters) and ``seg.copy_event`` marks their end; the
    caller makes the compute stream wait for ``side`` before the next forward.
    """
    src = seg.master if seg.param_out is None else seg.param_out
    if side is None:
        for p, ps, pe, ss in seg.pieces:
            p.data.view(-1)[ps:pe].copy_(src[ss:ss + pe - ps])
        return
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for p, ps, pe, ss in seg.pieces:
            p.data.view(-1)[ps:pe].copy_(src[ss:ss + pe - ps], non_blocking=True)
        seg.copy_event = torch.cuda.Event()
        seg.copy_event.record()


class GradientStream:
    """Moves gradients from the model's parameters into the segments' fp32 host accumulators.

    Without a staging buffer a gradient is added to the accumulator in the hook. With one (CUDA,
    or the delayed update, whose background thread reads the accumulator) the hook only copies
    it into ``grad_stage``; it is folded into the accumulator later, after ``before_fold()``
    (which waits for a running update). ``side`` is the CUDA stream for the copies (None on CPU).
    """

    def __init__(self, segments: list[Segment], device: torch.device, side: Any,
                 before_fold: Callable[[], None]) -> None:
        self.segments = segments
        self.device = device
        self.side = side
        self.before_fold = before_fold
        self.pieces: dict[int, list[tuple[Segment, int]]] = {}  # id(param) -> its (segment, piece)
        for seg in segments:
            for i, (p, *_rest) in enumerate(seg.pieces):
                self.pieces.setdefault(id(p), []).append((seg, i))

    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, each once."""
        return list({id(p): p for s in self.segments for p, *_ in s.pieces}.values())

    def install(self) -> list[Any]:
        """Register the post-accumulate-grad hooks; returns their handles."""
        return [p.register_post_accumulate_grad_hook(self.on_grad) for p in self.params()]

    def on_grad(self, p: Tensor) -> None:
        """Move ``p.grad`` into its host bucket (staged or accumulated) and free it."""
        g = p.grad
        if g is None:
            return
        flat = g.detach().reshape(-1)
        for seg, i in self.pieces[id(p)]:
            _, ps, pe, ss = seg.pieces[i]
            if seg.grad_stage is None:
                self._accumulate(seg, i, flat[ps:pe])
                continue
            if seg.staged[i] is not None:  # an earlier micro-step's gradient still waits there
                self._fold_piece(seg, i)
            dst = seg.grad_stage[ss:ss + pe - ps]
            if self.side is not None:
                self.side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.side):
                    dst.copy_(flat[ps:pe], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                # The allocator may hand the gradient's memory (or that of flat, a copy when the
                # gradient was not contiguous) to the compute stream once it is freed below,
                # unless it knows the side stream's copy still reads it.
                flat.record_stream(self.side)
                seg.staged[i] = event
            else:
                dst.copy_(flat[ps:pe])
                seg.staged[i] = True
        p.grad = None

    @staticmethod
    def _accumulate(seg: Segment, i: int, src: Tensor) -> None:
        _, ps, pe, ss = seg.pieces[i]
        dst = seg.grad[ss:ss + pe - ps]
        if seg.fresh[i]:
            dst.copy_(src)
            seg.fresh[i] = False
        else:
            dst.add_(src)

    def _fold_piece(self, seg: Segment, i: int) -> None:
        self.before_fold()  # the update reads seg.grad
        if not isinstance(seg.staged[i], bool):
            seg.staged[i].synchronize()
        _, ps, pe, ss = seg.pieces[i]
        self._accumulate(seg, i, seg.grad_stage[ss:ss + pe - ps])
        seg.staged[i] = None

    def gather(self) -> None:
        """Bring every gradient of this step into the fp32 host buffers; zero the missing ones."""
        for p in self.params():
            if p.grad is not None:  # set by hand, or produced without the hook
                self.on_grad(p)
        for seg in self.segments:
            for i, (_, ps, pe, ss) in enumerate(seg.pieces):
                if seg.staged[i] is not None:
                    self._fold_piece(seg, i)
                elif seg.fresh[i]:
                    seg.grad[ss:ss + pe - ps].zero_()
                    seg.fresh[i] = False

    def restart(self) -> None:
        """Start a new accumulation: the next gradient of every piece overwrites (no memset);
        staged gradients of the abandoned one are dropped once their copies are done."""
        for seg in self.segments:
            seg.fresh = [True] * len(seg.pieces)
            for staged in seg.staged:
                if not isinstance(staged, (bool, type(None))):
                    staged.synchronize()
            seg.staged = [None] * len(seg.pieces)
