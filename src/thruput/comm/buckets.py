"""Gradient buckets reduced asynchronously while backward is still running."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

import torch
import torch.distributed as dist

from thruput.profile.collectives import collective

Op = Literal["all_reduce", "reduce_scatter"]


@dataclass
class Bucket:
    """A group of parameters whose gradients travel in one flat buffer.

    ``offsets[i]`` is where ``params[i]``'s flattened gradient starts in the buffer. The buffer
    is ``padded_numel`` long (``numel`` rounded up to a multiple of the world size times the
    shard alignment, zeros in the tail) so that it splits into ``world_size`` equal shards of
    ``shard_numel`` elements; rank ``r`` owns buffer elements ``[r * shard_numel, (r + 1) * shard_numel)``.
    """

    index: int
    params: tuple[torch.nn.Parameter, ...]
    offsets: tuple[int, ...]
    numel: int
    padded_numel: int
    world_size: int
    dtype: torch.dtype
    device: torch.device
    _ready: set[int] = field(default_factory=set, repr=False)

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def shard_pieces(self, rank: int) -> list[tuple[torch.nn.Parameter, int, int, int]]:
        """The parameters that rank ``rank``'s shard covers.

        Returns ``(param, param_start, param_end, shard_start)`` tuples: elements
        ``[param_start, param_end)`` of ``param.view(-1)`` sit at ``shard_start`` onwards in the
        shard. Padding is not covered by any piece.
        """
        lo, hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        pieces = []
        for param, off in zip(self.params, self.offsets):
            start, end = max(lo, off), min(hi, off + param.numel())
            if start < end:
                pieces.append((param, start - off, end - off, start - lo))
        return pieces


def group_in_backward_order(params: Iterable[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Split ``params`` into runs of about ``bucket_bytes``, last-registered first.

    Backward produces the gradients of the last layers first, so reversing the registration
    order makes the first run fill earliest. A run is closed when it reaches ``bucket_bytes`` or
    when dtype/device changes, since one flat buffer holds one dtype on one device.
    """
    groups: list[list[torch.nn.Parameter]] = []
    current: list[torch.nn.Parameter] = []
    size = 0
    for p in reversed(list(params)):
        if current and (p.dtype != current[0].dtype or p.device != current[0].device):
            groups.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def plan_buckets(params: Iterable[torch.nn.Parameter], bucket_bytes: int, world_size: int,
                 shard_align: int = 1) -> list[Bucket]:
    """Group trainable ``params`` into buckets of about ``bucket_bytes`` in backward order
    (:func:`group_in_backward_order`); shared parameters are counted once. Shards are a multiple
    of ``shard_align`` elements long (e.g. a quantisation block, so that no block is split)."""
    unique: dict[int, torch.nn.Parameter] = {}
    for p in params:
        if p.requires_grad:
            unique.setdefault(id(p), p)
    buckets: list[Bucket] = []
    for current in group_in_backward_order(unique.values(), bucket_bytes):
        offsets, total = [], 0
        for p in current:
            offsets.append(total)
            total += p.numel()
        padded = -(-total // (world_size * shard_align)) * world_size * shard_align
        buckets.append(Bucket(len(buckets), tuple(current), tuple(offsets), total, padded,
                              world_size, current[0].dtype, current[0].device))
    return buckets


class GradientBuckets:
    """Reduce gradients across data-parallel ranks, bucket by bucket, during backward.

    Registers a post-accumulate-grad hook on every trainable parameter. When every gradient of
    a bucket has been accumulated, the bucket's gradients are flattened into one buffer and an
    asynchronous collective is launched on it, so communication overlaps the rest of backward.
    Buckets are launched in index order on every rank (a bucket that becomes ready early waits
    for its predecessors), so all ranks issue the same sequence of collectives.

    * ``op="all_reduce"`` (DDP): after :meth:`finish`, every ``param.grad`` holds the mean over
      ranks.
    * ``op="reduce_scatter"`` (ZeRO-2): each rank receives only its shard of each bucket,
      averaged over ranks, through ``on_shard(bucket, shard)`` (``shard`` is a 1-D tensor of
      ``bucket.shard_numel`` elements; map it to parameters with :meth:`Bucket.shard_pieces`).
      The full gradients are released (``param.grad = None``) once flattened, unless
      ``release_grads=False``. ``shard_align``: see :func:`plan_buckets`. Backends without
      reduce-scatter are served by an all-reduce of the whole buffer followed by taking the
      local slice (``emulated_reduce_scatter`` tells which path ran); ``emulate_reduce_scatter=True``
      forces it.

    Call :meth:`finish` after ``loss.backward()`` and before the optimizer step. It returns the
    exposed communication time in seconds: how long it blocked waiting for collectives still in
    flight (on CUDA including a stream synchronisation, so the figure is wall-clock true). Feed it
    to the profiler's ``comm`` phase. Use :meth:`no_sync` for gradient-accumulation micro-steps.

    Every rank must produce gradients for the same parameters. A parameter that gets no
    gradient in a step is reduced as zeros by :meth:`finish` (its ``grad`` becomes zeros), so a
    rank-dependent unused parameter cannot hang the job, but costs a late collective.

    Raises ``RuntimeError`` if ``torch.distributed`` is not initialised, ``ValueError`` for a
    bad ``op`` or ``bucket_mb``, or when ``op="reduce_scatter"`` has no ``on_shard``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        bucket_mb: float = 25.0,
        op: Op = "all_reduce",
        on_shard: Callable[[Bucket, torch.Tensor], None] | None = None,
        group: dist.ProcessGroup | None = None,
        release_grads: bool = True,
        emulate_reduce_scatter: bool = False,
        shard_align: int = 1,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GradientBuckets needs torch.distributed.init_process_group() first")
        if op not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"op must be 'all_reduce' or 'reduce_scatter', got {op!r}")
        if op == "reduce_scatter" and on_shard is None:
            raise ValueError("op='reduce_scatter' needs on_shard(bucket, shard) to receive the shard")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if not (isinstance(shard_align, int) and shard_align >= 1):
            raise ValueError(f"shard_align must be an int >= 1, got {shard_align!r}")
        self.op = op
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.on_shard = on_shard
        self.release_grads = release_grads
        self.emulated_reduce_scatter = emulate_reduce_scatter
        self.buckets = plan_buckets(params, int(bucket_mb * 2**20), self.world_size, shard_align)
        self.last_exposed_s = 0.0
        self._sync = True
        self._next = 0
        self._pending: list[tuple[Bucket, dist.Work, torch.Tensor]] = []
        self._handles = []
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(bucket, i)))

    def _hook(self, bucket: Bucket, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if not self._sync:
                return
            bucket._ready.add(i)
            self._launch_ready()

        return hook

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if len(bucket._ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next += 1

    def _flatten(self, bucket: Bucket) -> torch.Tensor:
        flat = torch.zeros(bucket.padded_numel, dtype=bucket.dtype, device=bucket.device)
        for p, off in zip(bucket.params, bucket.offsets):
            if p.grad is not None:
                flat[off:off + p.numel()].copy_(p.grad.reshape(-1))
                if self.op == "reduce_scatter" and self.release_grads:
                    p.grad = None
        return flat

    def _launch(self, bucket: Bucket) -> None:
        flat = self._flatten(bucket)
        if self.op == "all_reduce" or self.emulated_reduce_scatter:
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append((bucket, work, flat))
            return
        shard = torch.empty(bucket.shard_numel, dtype=flat.dtype, device=flat.device)
        try:
            work = dist.reduce_scatter_single(shard, flat, group=self.group, async_op=True)
        except (RuntimeError, NotImplementedError):
            # The backend lacks reduce-scatter (old gloo builds): every rank fails here on the
            # same bucket, so every rank switches to the all-reduce emulation together. NCCL has
            # it, so an error there is a real communicator failure and must not be retried.
            if dist.get_backend(self.group) == "nccl":
                raise
            self.emulated_reduce_scatter = True
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append((bucket, work, flat))
            return
        self._pending.append((bucket, work, shard))

    def _deliver(self, bucket: Bucket, out: torch.Tensor) -> None:
        out.div_(self.world_size)
        if self.op == "all_reduce":
            for p, off in zip(bucket.params, bucket.offsets):
                reduced = out[off:off + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
            return
        if out.numel() != bucket.shard_numel:  # emulated: the whole buffer came back
            lo = self.rank * bucket.shard_numel
            out = out[lo:lo + bucket.shard_numel]
        assert self.on_shard is not None
        self.on_shard(bucket, out)

    def finish(self) -> float:
        """Wait for this step's collectives and deliver the results; return exposed seconds.

        Buckets not yet launched (a parameter got no gradient) are launched now with zeros in
        place of the missing gradients. Does nothing (returns 0.0) inside :meth:`no_sync` or
        when no gradient arrived since the last call.
        """
        if not self._sync or (self._next == 0 and not any(b._ready for b in self.buckets)):
            self.last_exposed_s = 0.0
            return 0.0
        for bucket in self.buckets[self._next:]:
            self._launch(bucket)
        exposed = 0.0
        for bucket, work, out in self._pending:
            t0 = time.perf_counter()
            with collective():  # the per-rank record of the wait (thruput.profile.collectives)
                work.wait()
            if out.is_cuda:
                torch.cuda.current_stream(out.device).synchronize()
            exposed += time.perf_counter() - t0
            self._deliver(bucket, out)
        self._pending.clear()
        for bucket in self.buckets:
            bucket._ready.clear()
        self._next = 0
        self.last_exposed_s = exposed
        return exposed

    wait = finish

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this block."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def remove(self) -> None:
        """Remove the hooks; the object is unusable afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
