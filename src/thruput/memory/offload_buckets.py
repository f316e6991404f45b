"""OffloadAdamW's host buckets: layout, allocation and the parameter copies out.

A bucket ("segment") is one flat run of host buffers for parameters of one param group and one
dtype, in backward order: fp32 master, fp32 gradient accumulator, Adam states (fp32/bf16/int8),
plus a training-dtype staging buffer for updated parameters when the training dtype is not
fp32, and one for incoming gradients under CUDA or the delayed update. Under CUDA the buffers
that cross the bus (staging, and the master of an fp32 model) are pinned; the states, the
accumulator and a master with a training-dtype copy never leave the host and are not.

Gradients come in through :mod:`thruput.memory.offload_stream`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from thruput.comm.buckets import group_in_backward_order
from thruput.memory.adam import BLOCK, AdamState, n_blocks

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(eq=False)
class HostSegment:
    """One flat run of host buffers. ``pieces[i] = (param, p_start, p_end, seg_start)``: elements
    ``[p_start, p_end)`` of ``param.view(-1)`` live at ``seg_start`` onwards. ``index_offset``:
    the global index of element 0, by which stochastic rounding draws (a ZeRO-2 shard's offset).
    Per piece: ``steps`` (AdamW steps taken, like torch's per-parameter ``step``), ``skip`` (no
    gradient at this step: not updated), ``fresh`` (the gradient is zero: the next one
    overwrites) and ``staged`` (it waits in ``grad_stage``: True or a CUDA event)."""

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
    steps: list[int] = field(default_factory=list)
    skip: list[bool] = field(default_factory=list)
    fresh: list[bool] = field(default_factory=list)
    staged: list[Any] = field(default_factory=list)
    copy_event: Any = None  # CUDA: marks the end of the last copy out of param_out / master

    def span(self, i: int) -> slice:
        """Where piece ``i`` lies in the segment's buffers."""
        _, ps, pe, ss = self.pieces[i]
        return slice(ss, ss + pe - ps)

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """``(start, end, steps)``: the element ranges to update, pieces not skipped whose step
        counts agree (one range, the whole segment, unless some are skipped or behind)."""
        run: list[int] | None = None  # [start, end, steps]
        for i, (_, ps, pe, ss) in enumerate(self.pieces):
            if self.skip[i]:
                continue
            if run is not None and run[1] == ss and run[2] == self.steps[i]:
                run[1] = ss + pe - ps
                continue
            if run is not None:
                yield run[0], run[1], run[2]
            run = [ss, ss + pe - ps, self.steps[i]]
        if run is not None:
            yield run[0], run[1], run[2]

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


def build_segments(param_groups: list[dict[str, Any]], bucket_bytes: int) -> list[HostSegment]:
    """Buckets per (param group, dtype) of about ``bucket_bytes`` (in the training dtype) each,
    last-registered parameter first (backward order). Frozen parameters get none."""
    segments: list[HostSegment] = []
    for gi, group in enumerate(param_groups):
        params = {id(p): p for p in group["params"] if p.requires_grad}.values()
        for run in group_in_backward_order(params, bucket_bytes):
            pieces, off = [], 0
            for p in run:
                pieces.append((p, 0, p.numel(), off))
                off += p.numel()
            segments.append(HostSegment(gi, run[0].dtype, pieces, off))
    return segments


def segment_bytes(seg: HostSegment, state_dtype: str, grad_stage: bool) -> int:
    """Host bytes :func:`allocate` will create for ``seg``: master and accumulator (8 B/param),
    states, and the staging buffers in the training dtype."""
    item = torch.empty(0, dtype=seg.dtype).element_size()
    stages = (item if grad_stage else 0) + (item if seg.dtype != torch.float32 else 0)
    states = {"fp32": 8 * seg.numel, "bf16": 4 * seg.numel,
              "int8": 2 * seg.numel + 8 * n_blocks(seg.numel, seg.index_offset % BLOCK)}[state_dtype]
    return seg.numel * (8 + stages) + states


def check_host_memory(segments: list[HostSegment], state_dtype: str, grad_stage: bool, available: int) -> None:
    """Raise ``MemoryError`` when allocating ``segments`` needs more than ``available`` bytes."""
    need = sum(segment_bytes(s, state_dtype, grad_stage) for s in segments)
    if need > available:
        n = sum(s.numel for s in segments)
        raise MemoryError(f"OffloadAdamW needs {need / 2**30:.2f} GiB of host memory for {n:,} parameters "
                          f"({state_dtype} states) but only {available / 2**30:.2f} GiB is available; "
                          "use state_dtype='bf16' or 'int8', ZeRO-2 over more ranks, or a bigger host")


def allocate(seg: HostSegment, state_dtype: str, *, pin: bool, grad_stage: bool) -> None:
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
    if seg.dtype != torch.float32:  # what a piece the update skips copies back: the parameter as it is
        seg.param_out = torch.empty(seg.numel, dtype=seg.dtype, pin_memory=pin)
        seg.param_out.copy_(seg.master)
    n = len(seg.pieces)
    seg.steps, seg.skip, seg.fresh, seg.staged = [0] * n, [False] * n, [True] * n, [None] * n


def allocated_bytes(seg: HostSegment) -> int:
    """Bytes of ``seg``'s allocated host buffers (masters, gradients, states, staging)."""
    total = seg.master.nbytes + seg.grad.nbytes + seg.state.nbytes()
    return total + sum(t.nbytes for t in (seg.grad_stage, seg.param_out) if t is not None)


def grad_sq_sum(segments: list[HostSegment]) -> float:
    """Sum of squares of the fp32 gradient accumulators, computed in fp64."""
    total = 0.0
    for seg in segments:
        for chunk in seg.grad.split(1 << 20):  # bounds the fp64 temporary
            total += float(torch.linalg.vector_norm(chunk, dtype=torch.float64)) ** 2
    return total


def copy_to_params(seg: HostSegment, device: torch.device, side: Any) -> None:
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
