"""thruput.comm: bucket planning, and parity with an unbucketed all-reduce on two gloo ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from thruput.comm import GradientBuckets, plan_buckets

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _loss(model: nn.Module, rank: int, step: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(5, 8, generator=g)
    return model(x).pow(2).mean()


def _reference_grads(rank: int, steps: int = 1) -> list[torch.Tensor]:
    """Unbucketed: backward every micro-step, then one synchronous all-reduce per tensor."""
    model = _model()
    for step in range(steps):
        _loss(model, rank, step).backward()
    grads = []
    for p in model.parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads.append(g / WORLD)
    return grads


def _check_all_reduce(rank: int) -> None:
    ref = _reference_grads(rank)
    model = _model()
    buckets = GradientBuckets(model.parameters(), bucket_mb=60 * 4 / 2**20)
    assert len(buckets.buckets) >= 3
    _loss(model, rank).backward()
    # every bucket was launched inside backward, i.e. overlapped with it
    assert len(buckets._pending) == len(buckets.buckets)
    exposed = buckets.finish()
    assert exposed >= 0.0
    for p, r in zip(model.parameters(), ref):
        assert torch.equal(p.grad, r)


def _check_no_sync(rank: int) -> None:
    ref = _reference_grads(rank, steps=2)
    model = _model()
    buckets = GradientBuckets(model.parameters(), bucket_mb=1e-3)
    with buckets.no_sync():
        _loss(model, rank, 0).backward()
        assert buckets.finish() == 0.0
    assert not buckets._pending
    _loss(model, rank, 1).backward()
    buckets.finish()
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=0, atol=1e-7)


def _check_reduce_scatter(rank: int, emulate: bool) -> None:
    ref = _reference_grads(rank)
    model = _model()
    got: dict[int, torch.Tensor] = {}
    buckets = GradientBuckets(model.parameters(), bucket_mb=60 * 4 / 2**20, op="reduce_scatter",
                              on_shard=lambda b, shard: got.__setitem__(b.index, shard.clone()),
                              emulate_reduce_scatter=emulate)
    _loss(model, rank).backward()
    assert all(p.grad is None for p in model.parameters())  # released once flattened
    buckets.finish()
    assert buckets.emulated_reduce_scatter == emulate
    ref_by_param = {id(p): r.reshape(-1) for p, r in zip(model.parameters(), ref)}
    covered = 0
    for bucket in buckets.buckets:
        shard = got[bucket.index]
        assert shard.numel() == bucket.shard_numel
        for param, start, end, at in bucket.shard_pieces(rank):
            assert torch.equal(shard[at:at + end - start], ref_by_param[id(param)][start:end])
            covered += end - start
    # the two ranks' shards together cover every gradient element exactly once
    total = torch.tensor([covered])
    dist.all_reduce(total)
    assert total.item() == sum(p.numel() for p in model.parameters())


def _check_unused_param(rank: int) -> None:
    model = _model()
    extra = nn.Parameter(torch.ones(4))
    buckets = GradientBuckets([extra, *model.parameters()], bucket_mb=1e-3)
    _loss(model, rank).backward()
    buckets.finish()
    assert torch.equal(extra.grad, torch.zeros(4))


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _check_all_reduce(rank)
        _check_no_sync(rank)
        _check_reduce_scatter(rank, emulate=False)
        _check_reduce_scatter(rank, emulate=True)
        _check_unused_param(rank)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_unbucketed_all_reduce(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


def test_plan_buckets_reverse_order_and_padding():
    params = [nn.Parameter(torch.zeros(n)) for n in (3, 5, 7, 2)]
    frozen = nn.Parameter(torch.zeros(9), requires_grad=False)
    buckets = plan_buckets([*params, params[0], frozen], bucket_bytes=8 * 4, world_size=4)
    assert [[p.numel() for p in b.params] for b in buckets] == [[2, 7], [5, 3]]
    b0 = buckets[0]
    assert (b0.offsets, b0.numel, b0.padded_numel, b0.shard_numel) == ((0, 2), 9, 12, 3)
    # shard 1 covers buffer elements [3, 6): elements [1, 4) of the 7-element parameter
    assert [(p.numel(), s, e, at) for p, s, e, at in b0.shard_pieces(1)] == [(7, 1, 4, 0)]
    assert [(p.numel(), s, e, at) for p, s, e, at in b0.shard_pieces(0)] == [(2, 0, 2, 0), (7, 0, 1, 2)]
    assert b0.shard_pieces(3) == []  # only padding there


def test_plan_buckets_splits_on_dtype():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4, dtype=torch.float64))
    buckets = plan_buckets([a, b], bucket_bytes=2**20, world_size=1)
    assert [bk.dtype for bk in buckets] == [torch.float64, torch.float32]


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        GradientBuckets(_model().parameters())
