"""ZeRO-2 offload on two gloo ranks equals one rank on the same total batch, bit for bit.

Bitwise because the one-rank reference accumulates the two halves' gradients in the order the
reduce-scatter sums them, and both run the same elementwise CPU kernel. (Against a reference
that is merely close, Adam amplifies last-bit gradient noise wherever a gradient is ~eps.) With
bf16 states it is bitwise too: stochastic rounding draws by global element index, so the shards
round as the whole does; with 8-bit states, whose blocks lie on a grid of that index and whose
shards are cut on it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from thruput.memory import HostGrad, OffloadAdamW, Zero2OffloadAdamW
from thruput.models import GPT, GPTConfig

WORLD, VOCAB, SEQ, ROWS = 2, 64, 16, 8
IMPL = "torch"  # see test_memory_offload.py


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=SEQ))


def _groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    return [{"params": decay, "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())


def _worker(rank: int, init_file: str, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ref, model = _gpt(), _gpt()
        ref_opt = OffloadAdamW(_groups(ref), lr=1e-2, impl=IMPL)  # one rank, the same CPU kernel
        # small buckets: shards cut through parameters and through both param groups
        opt = Zero2OffloadAdamW(_groups(model), lr=1e-2, bucket_mb=0.03, impl=IMPL)
        assert len(opt.comm.buckets) >= 3
        owned = sum(s.numel for s in opt.segments)
        total = sum(p.numel() for p in model.parameters())
        assert abs(owned - total / WORLD) <= len(opt.comm.buckets)  # half of it, up to padding
        halves = [slice(r * ROWS // WORLD, (r + 1) * ROWS // WORLD) for r in range(WORLD)]
        for step in range(steps):
            rows = _batch(step)
            # One rank on the whole batch, accumulated per half so that its gradient is the
            # same sum, in the same order, as the two ranks' averaged reduce-scatter: bitwise.
            for half in halves:
                (_loss(ref, rows[half]) / WORLD).backward()
            _loss(model, rows[halves[rank]]).backward()
            ref_norm = ref_opt.clip_grad_norm_(0.5)
            norm = opt.clip_grad_norm_(0.5)
            assert norm > 0.5  # clipping is active
            torch.testing.assert_close(norm, ref_norm, rtol=1e-12, atol=0)
            ref_opt.step()
            ref_opt.zero_grad()
            opt.step()
            opt.zero_grad()
            assert opt.last_timings["comm"] >= 0
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)
        sd = opt.state_dict()  # collective: the full, unsharded state on every rank
        ref_sd = ref_opt.state_dict()
        assert sd["state"].keys() == ref_sd["state"].keys()
        for idx, entry in ref_sd["state"].items():
            assert float(sd["state"][idx]["step"]) == float(entry["step"])
            assert torch.equal(sd["state"][idx]["exp_avg"], entry["exp_avg"])
            assert torch.equal(sd["state"][idx]["exp_avg_sq"], entry["exp_avg_sq"])
        # it loads back into a sharded optimizer of a fresh model
        fresh = _gpt()
        fresh.load_state_dict(model.state_dict())
        opt2 = Zero2OffloadAdamW(_groups(fresh), lr=1.0, bucket_mb=0.03, impl=IMPL)
        opt2.load_state_dict(sd)
        # accumulation over two backwards (the first inside no_sync) equals one backward of the sum
        rows = _batch(99)[halves[rank]]
        with opt.no_sync():
            (_loss(model, rows[:2]) / 2).backward()
        (_loss(model, rows[2:]) / 2).backward()
        opt.step()
        (_loss(fresh, rows[:2]) / 2).backward()
        (_loss(fresh, rows[2:]) / 2).backward()
        opt2.step()
        for p, q in zip(model.parameters(), fresh.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # summed in another order
        for state_dtype in ("bf16", "int8"):
            _low_precision_states_match_one_rank(rank, steps, halves, state_dtype)
    finally:
        dist.destroy_process_group()


def _low_precision_states_match_one_rank(rank: int, steps: int, halves: list[slice], state_dtype: str) -> None:
    """Two ranks with bf16 or 8-bit states against ZeRO-2 on a one-rank group (every rank runs its own)."""
    alone = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    ref, model = _gpt(), _gpt()
    kw = dict(lr=1e-2, bucket_mb=0.03, impl=IMPL, state_dtype=state_dtype)
    ref_opt = Zero2OffloadAdamW(_groups(ref), process_group=alone[rank], **kw)
    opt = Zero2OffloadAdamW(_groups(model), **kw)
    if state_dtype == "bf16":
        assert opt.comm.buckets[0].shard_numel % 256  # shards are not block-aligned: only the offset helps
    else:  # shards are cut on blocks; param groups still split blocks inside a shard
        assert all(b.shard_numel % 256 == 0 for b in opt.comm.buckets)
        assert any(s.index_offset % 256 for s in ref_opt.segments)
    for step in range(steps):
        rows = _batch(100 + step)
        for half in halves:
            (_loss(ref, rows[half]) / WORLD).backward()
        _loss(model, rows[halves[rank]]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    for idx, entry in ref_sd["state"].items():
        assert torch.equal(sd["state"][idx]["exp_avg"], entry["exp_avg"])
        assert torch.equal(sd["state"][idx]["exp_avg_sq"], entry["exp_avg_sq"])


def _delayed_copy_back_worker(rank: int, init_file: str, backend: str, world: int) -> None:
    """ZeRO-2 with the delayed update, driven like train.py (``step(copy_back=False)`` then
    ``copy_back()``) and with two backwards per step outside ``no_sync`` (each reduced shard is
    added to the host accumulator), equals the same optimizer driven by plain ``step()``."""
    if backend == "nccl":  # two models in lockstep: deterministic kernels, the math attention
        torch.cuda.set_device(rank)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)

    def same(a: torch.Tensor, b: torch.Tensor) -> None:  # a stale or torn gather is off by ~lr
        if backend == "gloo":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, ref = _gpt().to(device), _gpt().to(device)
        kw = dict(lr=1e-2, bucket_mb=0.03, impl=IMPL, delayed_update_after=1)
        opt, ref_opt = Zero2OffloadAdamW(_groups(model), **kw), Zero2OffloadAdamW(_groups(ref), **kw)
        gather = opt._finish_copies

        def checked_gather() -> None:  # the all-gather reads the masters the update writes
            assert opt._bg is None, "all-gather while the delayed update runs"
            gather()

        opt._finish_copies = checked_gather
        rows_per_rank = ROWS // world
        for step in range(4):
            rows = _batch(200 + step)[rank * rows_per_rank:(rank + 1) * rows_per_rank].to(device)
            for m in (model, ref):
                for half in (rows[:rows_per_rank // 2], rows[rows_per_rank // 2:]):
                    (_loss(m, half) / 2).backward()
            same(opt.clip_grad_norm_(0.5), ref_opt.clip_grad_norm_(0.5))
            opt.step(copy_back=False)
            opt.copy_back()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            for p, q in zip(model.parameters(), ref.parameters()):
                same(p, q)
        opt.flush()
        ref_opt.flush()
        for p, q in zip(model.parameters(), ref.parameters()):
            same(p, q)
    finally:
        dist.destroy_process_group()


def test_delayed_update_with_separate_copy_back_equals_plain_step(tmp_path):
    mp.spawn(_delayed_copy_back_worker, args=(str(tmp_path / "init"), "gloo", WORLD), nprocs=WORLD, join=True)


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_nccl_delayed_update_accumulation_and_copy_back_on_cuda(tmp_path):
    """The CUDA paths of ZeRO-2: reduced shards on the GPU added to host accumulators, scalar
    all-reduces on the parameters' GPU, all-gathers into the model, copy events."""
    world = min(WORLD, torch.cuda.device_count())
    mp.spawn(_delayed_copy_back_worker, args=(str(tmp_path / "init"), "nccl", world), nprocs=world, join=True)


def _grad_handles_worker(rank: int, init_file: str) -> None:
    """ZeRO-2's p.grad: torch's clip, GradScaler and reads refuse with the call to use instead;
    model.zero_grad(), zero_grad(set_to_none=False), no zeroing (gradients add up across steps,
    also through a no_sync micro-step), and a layer unused in a step keeping its old gradient,
    all equal the one-rank optimizer (equal to torch AdamW: test_memory_offload_grad.py) up to
    the order in which the ranks' halves are summed."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ref, model = _gpt(), _gpt()
        ref_opt = OffloadAdamW(_groups(ref), lr=1e-2, impl=IMPL)
        opt = Zero2OffloadAdamW(_groups(model), lr=1e-2, bucket_mb=0.03, impl=IMPL)
        halves = [slice(r * ROWS // WORLD, (r + 1) * ROWS // WORLD) for r in range(WORLD)]
        for step, zeroing in enumerate(["model", "model_keep", "none", "opt", "none", "model"]):
            rows = _batch(300 + step)
            for half in halves:
                (_loss(ref, rows[half]) / WORLD).backward()
            mine = rows[halves[rank]]
            if step == 3:  # on top of step 2's handles: a no_sync micro-step, then a synced one
                with opt.no_sync():
                    (_loss(model, mine[:2]) / 2).backward()
                (_loss(model, mine[2:]) / 2).backward()
            else:
                _loss(model, mine).backward()
            p = next(model.parameters())
            assert isinstance(p.grad, HostGrad)
            scaler = torch.amp.GradScaler("cpu")
            scaler.scale(torch.ones(()))
            for use in (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), lambda: p.grad.clone(),
                        lambda: scaler.unscale_(opt)):
                with pytest.raises(RuntimeError, match=r"optimizer\.clip_grad_norm_\(max_norm\)"):
                    use()
            ref_opt.step()
            opt.step()
            for m, o in ((ref, ref_opt), (model, opt)):
                if zeroing == "model":
                    m.zero_grad()
                elif zeroing == "model_keep":
                    m.zero_grad(set_to_none=False)
                elif zeroing == "opt":
                    o.zero_grad()
            for q, r in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(q, r, rtol=1e-5, atol=1e-6)  # halves summed in another order
        # a layer unused in the second step keeps its handle (not zeroed): stepped again with it
        torch.manual_seed(0)
        layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        ref_layers = copy.deepcopy(layers)
        opt = Zero2OffloadAdamW(layers.parameters(), lr=1e-2, impl=IMPL)
        ref_opt = OffloadAdamW(ref_layers.parameters(), lr=1e-2, impl=IMPL)
        xs = [torch.randn(4, 4, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)]

        def loss(m: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
            return (m[0](x) if step else m[1](m[0](x))).pow(2).mean()

        for step in range(2):
            loss(layers, xs[rank], step).backward()
            (sum(loss(ref_layers, x, step) for x in xs) / WORLD).backward()
            opt.step()
            ref_opt.step()
        for q, r in zip(layers.parameters(), ref_layers.parameters()):
            torch.testing.assert_close(q, r, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_zero2_p_grad_refuses_reads_and_accumulates_and_zeroes_like_one_rank(tmp_path):
    mp.spawn(_grad_handles_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


def test_two_gloo_ranks_equal_one_rank_on_the_same_total_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), 6), nprocs=WORLD, join=True)


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        Zero2OffloadAdamW(nn.Linear(2, 2).parameters())
