"""OffloadAdamW's gradient path: device gradients into the fp32 host accumulators, and ``p.grad``.

The first gradient of a parameter after ``zero_grad()`` reaches the post-accumulate-grad hook
as a real tensor: it replaces the parameter's host value (copied; no memset), the device
tensor is freed and ``p.grad`` becomes a :class:`~thruput.memory.offload_grad.HostGrad` on
the host value. Later backwards accumulate into it (autograd calls ``p.grad.add_``), which
this stream adds on the host. So ``p.grad`` means what it means with torch: ``None`` until a
backward, then the sum of the gradients since the last ``zero_grad`` by anyone.

Without a staging buffer a gradient is added to the accumulator at once. With one (CUDA, or
the delayed update, whose background thread reads the accumulator) it is only copied into
``grad_stage`` (on CUDA a non-blocking copy on the side stream into pinned memory) and folded
into the accumulator later, after ``before_fold()`` (which waits for a running update).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn

from thruput.memory.offload_buckets import HostSegment
from thruput.memory.offload_grad import HostGrad


class GradientStream:
    """Moves gradients into the segments' host accumulators; the ``GradSource`` of the
    parameters' :class:`HostGrad` handles.

    ``side``: the CUDA stream for the copies (None on CPU). ``before_fold()``: called before the
    accumulator is written (waits for a running delayed update). ``on_change()``: called before
    any gradient changes or is read (the optimizer folds a pending clip coefficient in).
    """

    def __init__(self, segments: list[HostSegment], device: torch.device, side: Any,
                 before_fold: Callable[[], None], on_change: Callable[[], None]) -> None:
        self.segments = segments
        self.device = device
        self.side = side
        self.before_fold = before_fold
        self.on_change = on_change
        self.pieces: dict[int, list[tuple[HostSegment, int]]] = {}  # id(param) -> its (segment, piece)
        for seg in segments:
            for i, (p, *_rest) in enumerate(seg.pieces):
                self.pieces.setdefault(id(p), []).append((seg, i))
        self._handles: dict[int, weakref.ref[HostGrad]] = {}  # id(param) -> its current root handle
        self._metas: dict[int, Tensor] = {}  # id(param) -> a meta tensor of its layout, made once

    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, each once."""
        return list({id(p): p for s in self.segments for p, *_ in s.pieces}.values())

    def install(self) -> list[Any]:
        """Register the post-accumulate-grad hooks; returns their handles."""
        return [p.register_post_accumulate_grad_hook(self.on_grad) for p in self.params()]

    # --- p.grad <-> host -------------------------------------------------------------------

    def is_current(self, p: Tensor, g: Any) -> bool:
        """``g`` is the handle this stream gave ``p`` last (it holds the host value)."""
        ref = self._handles.get(id(p))
        return ref is not None and ref() is g

    def on_grad(self, p: Tensor) -> None:
        """Hook: a real ``p.grad`` replaces the host value and is freed; ``p.grad`` becomes its
        handle. A handle in ``p.grad`` was accumulated into by :meth:`add` already."""
        g = p.grad
        if g is None or self.is_current(p, g):
            return
        self.on_change()
        self._release(p)
        flat = g.detach().reshape(-1)
        for seg, i in self.pieces[id(p)]:
            seg.fresh[i] = True
            seg.staged[i] = None  # an older gradient in grad_stage: overwritten by this one
            self._write(seg, i, flat)
        self.install_handle(p)

    def install_handle(self, p: Tensor) -> None:
        """``p.grad`` becomes a new handle on ``p``'s host value."""
        meta = self._metas.get(id(p))
        if meta is None:
            meta = self._metas[id(p)] = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta")
        handle = HostGrad(self, p, meta=meta)
        self._handles[id(p)] = weakref.ref(handle)
        p.grad = handle

    def _release(self, p: Tensor) -> None:
        """The host value is about to change identity: a handle still referenced somewhere
        keeps the old value (a snapshot), as a replaced torch gradient would."""
        ref = self._handles.pop(id(p), None)
        old = None if ref is None else ref()
        if old is not None:
            old._freeze()

    def add(self, p: Tensor, grad: Tensor) -> None:
        """``p.grad += grad`` (autograd's accumulation): streamed to the host like a first gradient."""
        self.on_change()
        flat = grad.detach().reshape(-1)
        for seg, i in self.pieces[id(p)]:
            self._write(seg, i, flat)

    def zero(self, p: Tensor) -> None:
        """``p.grad.zero_()``: the next gradient overwrites (no memset)."""
        self.on_change()
        for seg, i in self.pieces[id(p)]:
            seg.fresh[i] = True
            seg.staged[i] = None

    def host(self, p: Tensor) -> Tensor:
        """``p``'s fp32 host gradient, settled (staged copies folded, a zero written out), as a
        view of the accumulator shaped like ``p``."""
        self.on_change()
        self.before_fold()  # the caller may write it, which a running update must not see
        (seg, i), = self.pieces[id(p)]  # OffloadAdamW keeps every parameter whole in one segment
        self._settle(seg, i)
        return seg.grad[seg.span(i)].view(p.shape)

    def stored(self, p: Tensor) -> None:
        """The host value was written through :meth:`host`."""
        self.on_change()

    # --- the accumulators ------------------------------------------------------------------

    def _write(self, seg: HostSegment, i: int, flat: Tensor) -> None:
        _, ps, pe, ss = seg.pieces[i]
        src = flat[ps:pe]
        if seg.grad_stage is None:
            self._accumulate(seg, i, src)
            return
        if seg.staged[i] is not None:  # an earlier micro-step's gradient still waits there
            self._fold_piece(seg, i)
        dst = seg.grad_stage[seg.span(i)]
        if self.side is None:
            dst.copy_(src)
            seg.staged[i] = True
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        # The allocator may hand the gradient's memory (or that of flat, a copy when the
        # gradient was not contiguous) to the compute stream once it is freed, unless it knows
        # the side stream's copy still reads it.
        flat.record_stream(self.side)
        seg.staged[i] = event

    @staticmethod
    def _accumulate(seg: HostSegment, i: int, src: Tensor) -> None:
        dst = seg.grad[seg.span(i)]
        if seg.fresh[i]:
            dst.copy_(src)
            seg.fresh[i] = False
        else:
            dst.add_(src)

    def _fold_piece(self, seg: HostSegment, i: int) -> None:
        self.before_fold()  # the update reads seg.grad
        if not isinstance(seg.staged[i], bool):
            seg.staged[i].synchronize()
        self._accumulate(seg, i, seg.grad_stage[seg.span(i)])
        seg.staged[i] = None

    def _settle(self, seg: HostSegment, i: int) -> None:
        if seg.staged[i] is not None:
            self._fold_piece(seg, i)
        elif seg.fresh[i]:
            seg.grad[seg.span(i)].zero_()
            seg.fresh[i] = False

    def gather(self) -> None:
        """Bring every gradient of this step into the fp32 host buffers. A parameter whose
        ``p.grad`` is None is skipped by the update, as torch does (its buffer is zeroed, so
        norms and overflow checks see no gradient)."""
        for p in self.params():
            g = p.grad
            if g is None:
                self._release(p)
                for seg, i in self.pieces[id(p)]:
                    seg.fresh[i], seg.staged[i] = True, None
            elif not self.is_current(p, g):  # set by hand, or produced without the hook
                self.on_grad(p)
            for seg, i in self.pieces[id(p)]:
                seg.skip[i] = g is None
        for seg in self.segments:
            for i in range(len(seg.pieces)):
                self._settle(seg, i)
