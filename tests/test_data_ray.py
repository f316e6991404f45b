"""The Ray backend: parity with the local backend, torchrun ranks, shadow takeover, failures, elastic resume.

All tests share one 127.0.0.1-only Ray instance (the ``ray_address`` fixture); each uses its own
run id, so its actors live in their own namespace.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from test_data_loader import jsonl_with_bad_lines, make_plan, same, take

from thruput.data import DataError, JsonlSource, Loader, MemorySource, Plan

ray = pytest.importorskip("ray")

TESTS = Path(__file__).parent


def ray_opts(address, **kw):
    """Options for a fresh run; no warm shadow unless asked (each actor is a process to start)."""
    return {"address": address, "run_id": uuid.uuid4().hex[:8], "chunk_docs": 4, "shadows": 0, **kw}


def ray_loaders(plan, world_size, opts, state=None):
    loaders = [Loader(plan, rank=r, world_size=world_size, backend="ray", workers=opts) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return loaders


def take_together(loaders, n):
    """``n`` batches per rank, ranks interleaved as they are in training."""
    out = [[] for _ in loaders]
    for _ in range(n):
        for r, loader in enumerate(loaders):
            out[r].append(next(loader))
    return out


def reference(plan, world_size, n, state=None):
    out = []
    for r in range(world_size):
        with Loader(plan, rank=r, world_size=world_size, backend="inline") as loader:
            if state is not None:
                loader.load_state_dict(state)
            out.append(take(loader, n))
    return out


def close_all(loaders):
    for loader in loaders:
        loader.close()


def test_auto_backend_choice():
    plan = make_plan(world_size=2)
    assert type(Loader(plan, rank=0, world_size=1).backend).__name__ == "ProcessBackend"
    one_rank = Loader(plan, rank=0, world_size=1, workers={"address": None, "run_id": "x", "min_workers": 2})
    assert type(one_rank.backend).__name__ == "ProcessBackend" and one_rank.backend.options.min_workers == 2
    assert type(Loader(plan, rank=0).backend).__name__ == "RayBackend"  # plan.world_size == 2
    assert type(Loader(plan, rank=0, world_size=1, workers={"address": "auto"}).backend).__name__ == "RayBackend"
    assert type(Loader(plan, rank=1, backend="inline").backend).__name__ == "InlineBackend"
    with pytest.raises(TypeError, match=r"Plan\(backend='inline'\): .* Loader\(plan, backend='inline'\)"):
        make_plan(backend="inline")


def test_torchrun_two_ranks_deliver_the_local_global_sample_set(ray_address, tmp_path):
    run_id = uuid.uuid4().hex[:8]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "_ray_rank.py"), ray_address, run_id, "6", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["backend"] == "ray" and r["same_state"] for r in ranks)
    expected = reference(make_plan(world_size=2), 2, 6)
    for r in range(2):
        assert ranks[r]["documents"] == [[list(d) for d in b["documents"]] for b in expected[r]]


def test_killed_loader_process_is_replaced_by_its_shadow_without_gap_or_repeat(ray_address):
    # Three sources on a 2-CPU budget: two loader processes, "a" and "c" share the first.
    plan = make_plan(world_size=2)
    expected = reference(plan, 2, 12)
    loaders = ray_loaders(plan, 2, ray_opts(ray_address, chunk_docs=2, prefetch_chunks=1, ahead=1, shadows=1))
    try:
        head = take_together(loaders, 3)
        stats = loaders[0].stats()
        assert stats["workers"] == {"a": 1, "b": 1, "c": 1} and stats["loader_processes"] == 2
        before = loaders[0].backend.pids()
        victim = before["loaders"]["a"][0]
        assert before["loaders"]["c"] == [victim] and before["loaders"]["b"] != [victim]
        os.kill(victim, signal.SIGKILL)
        tail = take_together(loaders, 9)
        after = loaders[0].backend.pids()
        stats = loaders[0].stats()
    finally:
        close_all(loaders)
    got = [head[r] + tail[r] for r in range(2)]
    assert all(same(a, b) for r in range(2) for a, b in zip(got[r], expected[r]))  # same sample ids, in order
    assert after["loaders"]["a"] == after["loaders"]["c"] == before["shadows"]  # the warm shadow took over both
    assert after["loaders"]["b"] == before["loaders"]["b"]
    assert stats["takeovers"] == {"a": 1, "b": 0, "c": 1} and stats["loader_failures"] == {"a": 1, "b": 0, "c": 1}
    assert stats["shadows"] == 1 and stats["loader_processes"] == 2  # a new shadow was started


def test_source_that_keeps_crashing_stops_the_run_with_a_clear_error(ray_address):
    # Record 5 kills whichever process reads it, as a native crash would (a lambda: Ray's workers
    # cannot import this test module, and cloudpickle sends lambdas by value).
    bad = MemorySource("bad", [[i] for i in range(12)], transform=lambda r: os._exit(3) if r == [5] else r)
    plan = Plan([bad, MemorySource("ok", [[1, 2, 3]] * 12)], seq_len=4, tokens_per_batch=8, seed=1)
    opts = ray_opts(ray_address, chunk_docs=2, max_failures=1)
    with Loader(plan, world_size=1, backend="ray", workers=opts) as loader:
        with pytest.raises(DataError, match=r"source 'bad': its loader actors died 2 times \(max_failures=1\)"):
            take(loader, 40)


def test_a_crashing_source_sharing_a_process_is_isolated_then_named(ray_address):
    # Two CPUs, three sources: "bad" shares a process with "ok2". Its first crash moves both to
    # the shadow; the second splits them; the third is "bad"'s alone and stops the run.
    bad = MemorySource("bad", [[i] for i in range(12)], transform=lambda r: os._exit(3) if r == [5] else r)
    ok = [MemorySource(f"ok{i}", [[1, 2, 3]] * 12) for i in (1, 2)]
    plan = Plan([bad, *ok], seq_len=4, tokens_per_batch=8, seed=1)
    opts = ray_opts(ray_address, chunk_docs=2, max_failures=2, shadows=1)
    with Loader(plan, world_size=1, backend="ray", workers=opts) as loader:
        with pytest.raises(DataError, match=r"^source 'bad': its loader actors died 3 times \(max_failures=2\)"):
            take(loader, 40)
        stats = loader.stats()
    assert stats["loader_failures"] == {"bad": 3, "ok1": 0, "ok2": 2}  # "ok2" died with "bad" twice, then apart


def test_source_error_names_file_and_line(ray_address, tmp_path):
    p = jsonl_with_bad_lines(tmp_path)
    plan = Plan([JsonlSource("web", p, cache_dir=tmp_path)], seq_len=16, tokens_per_batch=64)
    with Loader(plan, world_size=1, backend="ray", workers=ray_opts(ray_address)) as loader:
        with pytest.raises(DataError, match=rf"^source 'web': file '{p}' line (4|12): malformed JSON"):
            take(loader, 40)


@pytest.mark.parametrize("victim", ["planner", "constructor"])
def test_planner_or_constructor_death_resumes_from_the_last_checkpoint(ray_address, caplog, victim):
    plan = make_plan(world_size=1)
    expected = reference(plan, 1, 9)[0]
    opts = ray_opts(ray_address)
    caplog.set_level(logging.WARNING, logger="thruput.data.backends.ray.backend")
    with Loader(plan, world_size=1, backend="ray", workers=opts, prefetch=1) as loader:
        head = take(loader, 3)
        if victim == "planner":
            ray.kill(ray.get_actor("planner", namespace=f"thruput-{opts['run_id']}"))
        else:
            os.kill(loader.backend.pids()["constructors"][0], signal.SIGKILL)
        tail = take(loader, 6)
        assert loader.stats()["recoveries"] == 1
    assert all(same(a, b) for a, b in zip(head + tail, expected))
    who = "the data planner" if victim == "planner" else "its data constructor"
    assert f"{who} died at step" in caplog.text and "resumes from its last checkpoint" in caplog.text


def covered(per_rank):
    """Token positions delivered per (step, source, epoch, record), over all ranks."""
    cov = defaultdict(list)
    for batches in per_rank:
        for b in batches:
            for name, epoch, record, off, n in b["documents"]:
                cov[(b["step"], name, epoch, record)].extend(range(off, off + n))
    return {k: sorted(v) for k, v in cov.items()}


@pytest.mark.parametrize("backend", ["process", "ray"])
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_rebalances_without_loss_or_duplicates(ray_address, backend, before, after):
    plan = make_plan(world_size=2)
    opts = ray_opts(ray_address)  # one run id: the resumed session shares the first one's planner and loaders

    def start(world_size, state=None):
        if backend == "ray":
            return ray_loaders(plan, world_size, opts, state)
        # forkserver: forking the test process, whose Ray client runs gRPC threads, can deadlock a worker
        workers = {"start_method": "forkserver"}
        loaders = [Loader(plan, rank=r, world_size=world_size, backend="process", workers=workers)
                   for r in range(world_size)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        return loaders

    first = start(before)
    resumed = []
    try:
        head = take_together(first, 4)
        state = first[0].state_dict()
        assert all(loader.state_dict() == state for loader in first)
        resumed = start(after, state)
        tail = take_together(resumed, 5)
    finally:
        close_all(first + resumed)
    uninterrupted = reference(plan, before, 9)
    assert all(same(a, b) for r in range(before) for a, b in zip(head[r], uninterrupted[r]))  # parity with inline
    got, want = covered(tail), covered([b[4:] for b in uninterrupted])
    assert got == want  # every token of steps 4..8 exactly once (no duplicate positions), none missing
    assert all(len(v) == len(set(v)) for v in got.values())
    assert all(b["input_ids"].shape == (8 // after, 32) for b in tail[0])


def test_pool_sizes_follow_measured_cost_and_demand_within_the_budget():
    from thruput.data.backends.ray.roles import host_count
    from thruput.data.backends.scaling import pool_sizes

    assert pool_sizes([0.0, 0.0, 0.0], [0, 0, 0], 8, 1, 4) == [1, 1, 1]  # nothing measured yet
    assert pool_sizes([1e-6, 20e-6], [100, 100], 8, 1, 6) == [1, 6]  # 20x costlier source, capped at max
    assert pool_sizes([1e-6, 1e-6], [300, 100], 4, 1, 4) == [3, 1]  # same cost, 3x the demand
    assert sum(pool_sizes([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1], 6, 1, 8)) == 6
    # Loader processes: one per CPU of the budget, never more than loaders, a source's loaders apart.
    assert host_count([1] * 8, 2) == 2 and host_count([1, 1], 8) == 2 and host_count([4, 1], 2) == 4


def test_pools_grow_for_the_costly_source(ray_address):
    # "slow" burns ~20x the CPU per token of "fast"; after a few steps the planner's measured
    # cost gives it the second loader the budget allows.
    slow = MemorySource("slow", [f"doc {i} " * 8 for i in range(50)], transform=lambda r: (sum(range(40_000)), r)[1])
    fast = MemorySource("fast", [f"doc {i} " * 8 for i in range(50)])
    plan = Plan([slow, fast], seq_len=32, tokens_per_batch=64, seed=2)
    expected = reference(plan, 1, 8)[0]
    opts = ray_opts(ray_address, cpu_budget=3, max_workers=2, rescale_every=2)
    with Loader(plan, world_size=1, backend="ray", workers=opts) as loader:
        got = take(loader, 8)
        stats = loader.stats()
        pids = loader.backend.pids()["loaders"]
    assert stats["workers"] == {"slow": 2, "fast": 1} and stats["loader_processes"] == 3
    assert len(set(pids["slow"])) == 2  # the costly source's second loader runs in a process of its own
    assert not set(pids["slow"]) & set(pids["fast"])
    assert all(same(a, b) for a, b in zip(got, expected))  # resizing never changes the batches


def test_resizing_moves_loaders_between_shared_processes(ray_address):
    # Planner alone (no session): measured usage makes "a" grow to 3 loaders on a 5-CPU budget
    # (5 processes: b and c keep one each), then "c" take them over; every roster entry keeps
    # serving its own source.
    from thruput.data.backends.ray.roles import Planner
    from thruput.data.stream import StreamOrder, tokenize_chunk

    plan = make_plan(world_size=1)
    opts = {**ray_opts(ray_address), "min_workers": 1, "max_workers": 3, "cpu_budget": 5, "max_failures": 0}
    planner = Planner.remote(plan, "fp", opts)
    try:
        grown = ray.get(planner.report.remote({"a": (1.0, 100), "b": (1e-3, 100), "c": (1e-3, 100)}))
        assert [len(grown[n]) for n in "abc"] == [3, 1, 1]
        assert ray.get(planner.stats.remote())["loader_processes"] == 5
        moved = ray.get(planner.report.remote({"a": (0.0, 10**6), "c": (10**4, 100)}))
        assert [len(moved[n]) for n in "abc"] == [1, 1, 3]
        pids = ray.get(planner.pids.remote())["loaders"]
        assert len(set(pids["c"])) == 3 and len({p for ps in pids.values() for p in ps}) == 5
        for source in plan.sources:
            want = tokenize_chunk(source, plan.tokenizer, StreamOrder(source, plan.seed), 4, 3)
            for _, host in moved[source.name]:
                got = ray.get(host.load.remote(source.name, 4, 3))
                assert got.records.tolist() == want.records.tolist() and got.tokens.tolist() == want.tokens.tolist()
    finally:
        ray.kill(planner)


def test_local_instance_listens_on_loopback_only_with_token_auth_and_no_dashboard(ray_address):
    import ipaddress

    import psutil

    with Loader(make_plan(world_size=1), world_size=1, backend="ray", workers=ray_opts(ray_address)) as loader:
        next(loader)  # the planner, a loader host and a constructor are running
        me = psutil.Process()
        listening = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                name, sockets = p.name(), p.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            for c in sockets:
                if c.status == psutil.CONN_LISTEN:
                    listening.setdefault(name, []).append(c.laddr.ip)
    roles = {n.split(".")[0] for n in listening}  # an actor's process is "ray::Class.method" while it runs one
    assert {"gcs_server", "raylet", "ray::Planner", "ray::Constructor", "ray::LoaderHost"} <= roles, listening
    for name, ips in listening.items():
        for ip in ips:
            addr = ipaddress.ip_address(ip)
            assert (getattr(addr, "ipv4_mapped", None) or addr).is_loopback, (name, ip)
    assert not any("dashboard" in n.lower() for n in listening)  # its agent runs, but serves nothing
    auth = pytest.importorskip("ray._private.authentication.authentication_utils")
    assert auth.is_token_auth_enabled()


def test_a_rank_waiting_on_a_hung_source_raises_a_data_error_saying_so(ray_address):
    from test_data_faults import bounded

    hung = MemorySource("hung", [[1, 2, 3]] * 8, transform=lambda r: __import__("time").sleep(3600))
    plan = Plan([hung], seq_len=4, tokens_per_batch=8, seed=1)
    with Loader(plan, world_size=1, backend="ray", workers=ray_opts(ray_address, wait_s=2.0)) as loader:
        with pytest.raises(DataError, match=r"no batch for step 0 in [24] s from the data constructor.* alive.*hangs"):
            bounded(lambda: next(loader), 120)
