"""ZeRO-2's ``p.grad``: handles that accumulate and zero, and refuse to be read.

After a synced backward every rank holds only its reduced shard of each gradient, so
``p.grad`` becomes a :class:`~thruput.memory.offload_grad.HostGrad` whose reads (a norm, a
clip, ``GradScaler.unscale_``, any other op) raise at once, naming what to call instead; a
per-tensor norm would need a collective per parameter. What works is what a loop does to
gradients it leaves to the optimizer:

* ``model.zero_grad()`` / ``opt.zero_grad()`` (``p.grad = None``) or ``zero_grad(set_to_none=
  False)`` (``zero_``): the next reduced gradient overwrites this rank's host value;
* no zeroing: a later backward adds to it (autograd's ``p.grad.add_`` keeps the new device
  gradient aside; the first hook puts it in ``p.grad`` for the bucket's reduce-scatter, whose
  shard is then added on the host). Inside ``no_sync()`` it adds up on the device as usual.

The hook order matters: :meth:`ShardStream.before_reduce` must run before the comm buckets'
hooks (it decides whether the reduced shard replaces or adds to the host value).
"""
from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor

from thruput.memory.offload_buckets import HostSegment
from thruput.memory.offload_grad import GradUnavailable, HostGrad
from thruput.memory.offload_stream import GradientStream

REFUSAL = ("Zero2OffloadAdamW: p.grad holds only this rank's shard, so it cannot be read or scaled; "
           "clip with optimizer.clip_grad_norm_(max_norm) and scale losses with loss_scale= instead "
           "of GradScaler")


class _Replaced:
    """The source of a handle whose gradient a later backward replaced."""

    def _refuse(self, *_: Any) -> None:
        raise GradUnavailable("Zero2OffloadAdamW: this p.grad was replaced by a later backward "
                              "(after zero_grad); use the parameter's current p.grad")

    add = zero = host = stored = _refuse


class ShardStream(GradientStream):
    """The ``GradSource`` of ZeRO-2's handles and the bookkeeping of which shards are fresh.

    ``pending``: a gradient added to a handle, waiting for the hook to hand it to the comm
    buckets. ``_on_top``: the device tensor in ``p.grad`` that adds to the host value (not a
    new gradient). ``_seen``: parameters whose hook ran in this backward. ``_parked``: handles
    taken out of ``p.grad`` while the buckets flatten (they would read them).
    """

    def __init__(self, segments: list[HostSegment], *args: Any) -> None:
        super().__init__(segments, *args)
        self.pending: dict[int, Tensor] = {}
        self._on_top: dict[int, weakref.ref[Tensor]] = {}
        self._seen: set[int] = set()
        self._parked: dict[int, tuple[Tensor, HostGrad]] = {}

    def install(self) -> list[Any]:
        """The ZeRO-2 optimizer registers :meth:`before_reduce` itself, before the buckets."""
        return []

    # --- GradSource ------------------------------------------------------------------------

    def add(self, p: Tensor, grad: Tensor) -> None:
        held = self.pending.get(id(p))
        self.pending[id(p)] = grad.detach() if held is None else held + grad

    def zero(self, p: Tensor) -> None:
        self.on_change()
        self.pending.pop(id(p), None)
        for seg, i in self.pieces.get(id(p), []):
            seg.fresh[i] = True

    def host(self, p: Tensor) -> Tensor:
        raise GradUnavailable(REFUSAL)

    def stored(self, p: Tensor) -> None:
        raise GradUnavailable(REFUSAL)

    # --- the backward ----------------------------------------------------------------------

    def before_reduce(self, p: Tensor) -> None:
        """First post-accumulate hook: a handle's added gradient goes into ``p.grad`` for the
        buckets; a new device gradient marks this rank's pieces of ``p`` fresh."""
        g, pid = p.grad, id(p)
        self._seen.add(pid)
        if self.is_current(p, g):
            pending = self.pending.pop(pid, None)
            if pending is not None:
                p.grad = pending
                self._on_top[pid] = weakref.ref(pending)
            return
        ref = self._on_top.get(pid)
        if g is not None and (ref is None or ref() is not g):
            self._release(p)
            for seg, i in self.pieces.get(pid, []):
                seg.fresh[i] = True

    def _release(self, p: Tensor) -> None:
        ref = self._handles.pop(id(p), None)
        old = None if ref is None else ref()
        if old is not None:
            old._root._source = _Replaced()

    def park(self, params: list[Tensor]) -> None:
        """Before the buckets flatten the unused parameters: their handles step aside."""
        for p in params:
            if id(p) not in self._seen and self.is_current(p, p.grad):
                self._parked[id(p)] = (p, p.grad)
                p.grad = None

    def mark_unseen_fresh(self, seg: HostSegment) -> None:
        """Pieces of parameters no hook saw and that held no handle had no gradient: the
        reduced zeros overwrite their host value."""
        for i, (p, *_rest) in enumerate(seg.pieces):
            if id(p) not in self._seen and id(p) not in self._parked:
                seg.fresh[i] = True

    def end_backward(self, params: list[Tensor]) -> None:
        """After the shards of a backward are in: every parameter's ``p.grad`` is its handle
        (nothing changes when no hook ran since the last call)."""
        for p, handle in self._parked.values():
            p.grad = handle
        for p in params if self._seen else []:
            if p.grad is None:
                self.install_handle(p)
        self._parked.clear()
        self._on_top.clear()
        self._seen.clear()
