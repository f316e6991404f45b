"""ZeRO-2 over torch.distributed: each rank owns a shard of the host master weights and states.

During backward, ``thruput.comm.GradientBuckets`` reduce-scatters the gradients bucket by bucket
(asynchronously, as the buckets fill); at the end of each backward every rank folds the mean of
its shard into its fp32 host accumulator. ``step()`` runs the CPU AdamW on the shard only and
all-gathers the updated parameters, bucket by bucket, into every rank's model.

Stochastic rounding draws its noise by an element's index in the buckets laid end to end, which
does not depend on the world size: bf16 states round to the same bits on any number of ranks.
With 8-bit states, buckets start and shards are cut at multiples of the 256-element block in that
index, so the blocks, and the bits, are the same on any number of ranks too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from thruput.comm import GradientBuckets
from thruput.memory.adam import BLOCK
from thruput.memory.offload import HostSegment, OffloadAdamW
from thruput.memory.shard_stream import ShardStream
from thruput.profile.collectives import collective


class Zero2OffloadAdamW(OffloadAdamW):
    """:class:`OffloadAdamW` with master weights, gradients and states sharded over ranks.

    Same arguments as :class:`OffloadAdamW` plus ``process_group`` (default: the world). Every
    rank must build it with the same parameters in the same order. Gradients are averaged over
    ranks, so a per-rank mean loss on equal shares of the batch equals one rank on the whole
    batch. Gradient accumulation works either way: each backward's reduced shard is added to the
    host accumulator, or, inside :meth:`no_sync`, gradients add up on the device and are reduced
    once by the last backward. ``model.zero_grad()`` and ``zero_grad(set_to_none=False)`` work
    as with torch; ``p.grad`` then holds a handle that refuses to be read (each rank has only a
    shard; :mod:`thruput.memory.shard_stream`): clip with :meth:`clip_grad_norm_`, scale with
    ``loss_scale``, not with ``torch.nn.utils.clip_grad_norm_`` or ``GradScaler``, which raise at
    their first use. After a synced backward every parameter has a gradient (zeros where no rank
    produced one, as the reduce-scatter sends them), so every parameter is stepped.

    ``state_dict()`` is collective (every rank must call it) and returns the full, unsharded
    torch.optim.AdamW-format state on every rank; ``load_state_dict`` takes that full state.
    With the delayed update, a backward's reduced gradients wait for the running CPU update
    before they are folded in, so the update overlaps the forward and most of the backward.

    Raises ``RuntimeError`` when torch.distributed is not initialised; otherwise like
    :class:`OffloadAdamW` (the host-memory check is per rank).
    """

    def __init__(self, params: Iterable[Any], *args: Any, process_group: dist.ProcessGroup | None = None,
                 **kwargs: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Zero2OffloadAdamW needs torch.distributed.init_process_group() first")
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._nccl = dist.get_backend(process_group) == "nccl"
        self._bucket_segments: dict[int, list[tuple[HostSegment, int]]] = {}
        self._queued = False
        super().__init__(params, *args, **kwargs)

    # --- layout ----------------------------------------------------------------------------

    def _build_segments(self) -> list[HostSegment]:
        """This rank's shard of each comm bucket, split where the param group changes."""
        group_of: dict[int, int] = {}
        trainable: list[nn.Parameter] = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.requires_grad and id(p) not in group_of:
                    group_of[id(p)] = gi
                    trainable.append(p)
        align = BLOCK if self.state_dtype == "int8" else 1
        # Before the buckets' hooks: it decides whether the reduced shard replaces or adds.
        self._first_hooks = [p.register_post_accumulate_grad_hook(self._before_reduce) for p in trainable]
        self.comm = GradientBuckets(trainable, bucket_mb=self.bucket_bytes / 2**20, op="reduce_scatter",
                                    on_shard=self._on_shard, group=self.process_group, shard_align=align)
        segments: list[HostSegment] = []
        bucket_base = 0  # global index of the bucket's first element: the same on any world size
        for bucket in self.comm.buckets:
            runs: list[tuple[int, list[tuple[nn.Parameter, int, int, int]]]] = []
            for param, ps, pe, at in bucket.shard_pieces(self.rank):
                gi = group_of[id(param)]
                if not runs or runs[-1][0] != gi:
                    runs.append((gi, []))
                runs[-1][1].append((param, ps, pe, at))
            for gi, pieces in runs:
                start = pieces[0][3]
                local = [(p, ps, pe, at - start) for p, ps, pe, at in pieces]
                seg = HostSegment(gi, bucket.dtype, local, pieces[-1][3] + pieces[-1][2] - pieces[-1][1] - start,
                              index_offset=bucket_base + self.rank * bucket.shard_numel + start)
                segments.append(seg)
                self._bucket_segments.setdefault(bucket.index, []).append((seg, start))
            bucket_base += -(-bucket.numel // align) * align
        return segments

    def _needs_grad_stage(self) -> bool:
        return False  # reduced shards are folded on the main thread, after any running update

    # --- gradients -------------------------------------------------------------------------

    def _grad_stream(self) -> ShardStream:
        return ShardStream(self.segments, self.device, self._side, self._join_background, self._on_grad_change)

    def _before_reduce(self, p: Tensor) -> None:
        self._grads.before_reduce(p)

    def _install_grad_path(self) -> list[Any]:
        """A marker hook that queues the end-of-backward fold once per backward pass."""
        params = {id(p): p for b in self.comm.buckets for p in b.params}
        return [p.register_post_accumulate_grad_hook(self._mark_backward) for p in params.values()]

    def _mark_backward(self, _: Tensor) -> None:
        if not self._queued and self.comm._sync:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self._finish_backward()

    def _finish_backward(self) -> None:
        """Deliver the buckets not yet reduced; every ``p.grad`` becomes its handle."""
        params = [p for b in self.comm.buckets for p in b.params]
        self._grads.park(params)
        self._timings.setdefault("comm", 0.0)
        self._timings["comm"] += self.comm.finish()
        self._grads.end_backward(params)

    def _on_shard(self, bucket: Any, shard: Tensor) -> None:
        # One device-to-host copy of the shard (NCCL: a GPU tensor; a CPU accumulator cannot add_
        # a CUDA tensor), before waiting for the update so that the copy overlaps it.
        shard = shard.cpu()
        self._join_background()  # the running update reads the accumulators
        self._on_grad_change()  # a pending clip of what is there applies first
        for seg, start in self._bucket_segments.get(bucket.index, []):
            src = shard[start:start + seg.numel]
            self._grads.mark_unseen_fresh(seg)
            if all(seg.fresh):
                seg.grad.copy_(src)
            elif not any(seg.fresh):
                seg.grad.add_(src)
            else:
                for i, fresh in enumerate(seg.fresh):
                    dst, part = seg.grad[seg.span(i)], src[seg.span(i)]
                    if fresh:
                        dst.copy_(part)
                    else:
                        dst.add_(part)
            seg.fresh = [False] * len(seg.pieces)

    def _gather_grads(self) -> None:
        self._finish_backward()  # buckets of a backward not yet finished
        for seg in self.segments:
            for i, (p, *_rest) in enumerate(seg.pieces):
                seg.skip[i] = p.grad is None  # no backward since zero_grad: torch skips it
                if seg.fresh[i]:  # zeroed, and no backward since
                    seg.grad[seg.span(i)].zero_()
                    seg.fresh[i] = False

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate on the device without communication (all but the last micro-step)."""
        with self.comm.no_sync():
            yield

    # --- collectives -----------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp) -> Tensor:
        # NCCL reduces GPU tensors only: the parameters' GPU, not whichever device is current.
        work = t.to(self.device if self._cuda else "cuda") if self._nccl else t
        with collective():  # the per-rank record of the wait (thruput.profile.collectives)
            dist.all_reduce(work, op=op, group=self.process_group)
        return work.to(t.device)

    def _reduce_sum(self, value: float) -> float:
        return float(self._all_reduce(torch.tensor([value], dtype=torch.float64), dist.ReduceOp.SUM))

    def _combine(self, t: Tensor, op: str = "sum") -> Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    # --- parameters: all-gather ------------------------------------------------------------

    def _update_all(self, grad_scale: float, copy_back: bool) -> None:
        super()._update_all(grad_scale, copy_back)
        # Nothing was issued per segment, also under CUDA: without copy_back the all-gather is
        # still to do (copy_back(), flush() or the next step run it).
        self._copy_pending = not copy_back

    def _copy_segment(self, seg: HostSegment) -> None:
        """Nothing per segment: parameters come back by bucket in ``_finish_copies``."""

    def _finish_copies(self) -> None:
        for bucket in self.comm.buckets:
            local = torch.zeros(bucket.shard_numel, dtype=bucket.dtype, device=bucket.device)
            for seg, start in self._bucket_segments.get(bucket.index, []):
                src = seg.master if seg.param_out is None else seg.param_out
                local[start:start + seg.numel].copy_(src, non_blocking=self._cuda)
            full = torch.empty(bucket.padded_numel, dtype=bucket.dtype, device=bucket.device)
            with collective():
                try:
                    dist.all_gather_single(full, local, group=self.process_group)
                except (RuntimeError, NotImplementedError):  # backends without the flat variant
                    if self._nccl:  # NCCL has it: this is a communicator failure, not a missing op
                        raise
                    dist.all_gather(list(full.chunk(self.world_size)), local, group=self.process_group)
            with torch.no_grad():
                for p, off in zip(bucket.params, bucket.offsets):
                    p.data.view(-1).copy_(full[off:off + p.numel()])
        if self._cuda:  # the next update must not overwrite param_out while it is being copied
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            for seg in self.segments:
                seg.copy_event = event

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for handle in self._first_hooks:
            handle.remove()
        self.comm.remove()
