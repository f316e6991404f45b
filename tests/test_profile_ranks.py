"""The profiler across ranks: the per-rank collective record, the job merge, the straggler verdict."""
from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.distributed as dist

from thruput.benchmarks import stragglers as bench
from thruput.errors import InputError
from thruput.profile import StepProfiler, run_document, save_json
from thruput.profile import collectives
from thruput.profile.collectives import collective
from thruput.profile.job import load_job, merge_job, step_work

EXTRA = 0.2  # planted seconds: large against the 20 ms step, so a loaded machine keeps the ratio


# --- the recorder, on a clock the test moves ------------------------------------------------------


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(collectives.time, "perf_counter", lambda: now[0])

    def advance(seconds: float) -> None:
        now[0] += seconds

    return advance


def test_compute_before_comm_excludes_data_wait_and_earlier_waits(clock):
    prof = StepProfiler(warmup_steps=0)
    with prof.step(tokens=1, samples=1):
        with prof.phase("data_wait"):
            clock(1.0)
        clock(2.0)                    # own work
        with collective():            # the loss all-reduce: waits 3 s for another rank
            with collective():        # a nested wrapper (thruput run's hook) counts once
                clock(3.0)
        clock(1.0)                    # backward
        with collective():            # the gradient bucket's wait
            clock(4.0)
        clock(0.5)                    # optimizer
    record = prof.records[0]
    assert record.compute_before_comm == pytest.approx(3.0)
    assert record.comm_wait == pytest.approx(7.0)
    assert record.time_s == pytest.approx(11.5)
    assert prof.summary()["collectives"] == {"steps": 1, "compute_before_comm_median_s": pytest.approx(3.0),
                                             "comm_wait_median_s": pytest.approx(7.0)}


def test_no_collective_or_recorder_off_is_absent_not_zero(clock):
    for prof in (StepProfiler(warmup_steps=0), StepProfiler(warmup_steps=0, collectives=False)):
        with prof.step(tokens=1, samples=1):
            clock(1.0)
            if not prof.collectives:
                with collective():
                    clock(1.0)
        assert (prof.records[0].compute_before_comm, prof.records[0].comm_wait) == (None, None)
        assert "collectives" not in prof.summary()
    with collective():  # outside a step: a no-op
        pass


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_thruput_collectives_and_thruput_run_hooks_feed_the_record(world_of_one):
    from thruput.comm import GradientBuckets
    from thruput.run import Recorder, TorchHooks

    model = torch.nn.Linear(4, 1)
    comm = GradientBuckets(model.parameters())
    prof = StepProfiler(warmup_steps=0)
    with prof.step(tokens=1, samples=1):
        model(torch.ones(2, 4)).sum().backward()
        comm.finish()
    assert prof.records[0].comm_wait is not None
    document = run_document(prof)
    assert (document["meta"]["rank"], document["meta"]["world_size"]) == (0, 1)
    assert document["steps"][0]["comm_wait"] == prof.records[0].comm_wait

    comm.remove()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(lambda device: StepProfiler(device, warmup_steps=0))
    with TorchHooks(recorder):
        for _ in range(2):
            model(torch.ones(2, 4)).sum().backward()
            dist.all_reduce(model.weight.grad)
            opt.step()
    records = recorder.close().records
    assert len(records) == 2 and all(r.comm_wait is not None for r in records)


# --- two gloo ranks under torchrun, rank 1 slowed ---------------------------------------------------


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """``thruput bench stragglers --quick``, keeping the rank documents."""
    import argparse

    keep = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    bench.add_arguments(parser)
    figures = bench.run(parser.parse_args(["--quick", "--keep", str(keep), "--extra", str(EXTRA)]))
    return figures, keep


@pytest.fixture(scope="module")
def two_ranks(quick_bench):
    return quick_bench[1] / "world2"


@pytest.mark.slow
def test_quick_bench_finds_every_planted_rank_and_nothing_on_clean_runs(quick_bench):
    figures, _ = quick_bench
    assert set(figures["cases"]) == {"2 ranks: clean", "2 ranks: sleep", "2 ranks: clock", "2 ranks: data",
                                     "4 ranks: clean", "4 ranks: sleep"}
    assert figures["found"] is True and figures["false_positives"] == 0
    assert figures["cases"]["4 ranks: sleep"]["named_ranks"] == [2]
    assert figures["cases"]["2 ranks: data"]["phase"] == "data_wait"
    assert figures["overhead_ratio"] > 0 and figures["recorder_us_per_step"] >= 0


@pytest.mark.slow
def test_slowed_rank_is_named_with_phase_ratio_and_rank0_waits(two_ranks):
    job = load_job(two_ranks / "sleep")
    assert job["verdict"]["bottleneck"] == "straggler"
    [finding] = job["verdict"]["findings"]
    e = finding["evidence"]
    assert (e["rank"], e["phase"], e["cause"]) == (1, "forward", "slow device")
    assert finding["levers"] == ["slow_device"]
    rank0 = {s["step"]: s for s in job["documents"][0]["steps"]}
    fast = statistics.median(step_work(rank0[s]) for s in e["slow_steps"])
    planted_ratio = (fast + EXTRA) / fast
    assert e["ratio"] == pytest.approx(planted_ratio, rel=0.10)
    assert e["excess_s"] == pytest.approx(EXTRA, rel=0.10)
    # Rank 0's extra time is waiting inside the collectives, not its own compute.
    rank1 = {s["step"]: s for s in job["documents"][1]["steps"]}
    slow = e["slow_steps"]
    assert e["others_comm_wait_s"] == pytest.approx(EXTRA, rel=0.10, abs=0.01)
    assert statistics.median(rank0[s]["comm_wait"] for s in slow) == pytest.approx(EXTRA, rel=0.10, abs=0.01)
    assert statistics.median(rank1[s]["compute_before_comm"] - rank0[s]["compute_before_comm"]
                             for s in slow) == pytest.approx(EXTRA, rel=0.10)


@pytest.mark.slow
def test_fake_clock_drop_is_named_as_the_cause(two_ranks):
    job = load_job(two_ranks / "clock")
    [finding] = job["verdict"]["findings"]
    e = finding["evidence"]
    assert (e["rank"], e["phase"], e["cause"]) == (1, "forward", "clock")
    assert finding["levers"] == ["cooling"]
    assert e["clock_dropped"] and e["throttled_share"] > e["others_throttled_share"]


@pytest.mark.slow
def test_report_folder_renders_table_html_and_a_trace_track_per_rank(two_ranks, tmp_path, capsys):
    from thruput.cli import main

    html, trace = tmp_path / "job.html", tmp_path / "job.trace.json"
    assert main(["report", str(two_ranks / "sleep"), "--html", str(html), "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "straggler: rank 1" in out and "in forward" in out
    assert "straggler: rank 1" in html.read_text() and html.read_text().count("<svg") >= 2
    names = {e["pid"]: e["args"]["name"] for e in json.loads(trace.read_text())["traceEvents"]
             if e.get("name") == "process_name"}
    assert names == {1: "rank 0", 2: "rank 1"}


# --- merging: synthetic documents -----------------------------------------------------------------


def document(rank: int, world: int, works: list[float], *, tokens: int = 8, data: float = 0.0,
             throttled: float = 0.0, wait: float = 0.01) -> dict:
    """A rank's run document: one warm-up step, then a step per entry of ``works`` (seconds of
    own compute before the last collective)."""
    steps = []
    for i, work in enumerate([works[0], *works]):
        phases = {"data_wait": data, "forward": work, "backward": 0.0, "comm": 0.0, "other": 0.0}
        steps.append({"step": i, "start_s": i * 1.0, "time_s": 1.0, "phases": phases, "tokens": tokens,
                      "compute_before_comm": work, "comm_wait": wait,
                      "clock": {"cpu": {"samples": 4, "mean_cpu_mhz": 3000.0 * (1 - throttled / 2),
                                        "throttled_share": throttled, "reasons": []}}})
    return {"schema": "thruput.run/1", "name": f"job-rank{rank}", "origin_unix_s": 1e9,
            "meta": {"rank": rank, "world_size": world}, "steps": steps, "summary": {"warmup_steps": 1}}


def test_missing_ranks_are_named_and_the_present_ones_compared():
    job = merge_job([("a.json", document(0, 3, [0.1] * 4)), ("c.json", document(2, 3, [0.1] * 4))])
    assert job["missing_ranks"] == [1] and job["ranks"] == [0, 2]
    assert "missing ranks [1] of world size 3" in job["notes"][0]
    assert job["verdict"]["bottleneck"] == "balanced"


def test_runs_of_different_lengths_compare_the_common_steps():
    job = merge_job([("a.json", document(0, 2, [0.1] * 6)), ("b.json", document(1, 2, [0.1] * 4))])
    assert job["steps"] == [1, 2, 3, 4]
    assert "different lengths" in job["notes"][0] and "{0: 6, 1: 4}" in job["notes"][0]


@pytest.mark.parametrize("docs, message", [
    ([("a.json", document(0, 2, [0.1])), ("b.json", document(0, 2, [0.1]))], r"b.json: rank 0 again \(also in a.json\)"),
    ([("a.json", document(0, 2, [0.1])), ("b.json", document(1, 4, [0.1]))], "disagree on world_size"),
    ([("a.json", {**document(0, 2, [0.1]), "meta": {}})], r"a.json: meta.rank / meta.world_size missing"),
])
def test_documents_that_do_not_form_one_job_are_refused(docs, message):
    with pytest.raises(InputError, match=message):
        merge_job(docs)


def test_no_common_step_is_refused(tmp_path):
    late = document(1, 2, [0.1] * 3)
    for s in late["steps"]:
        s["step"] += 10
    save_json(document(0, 2, [0.1] * 3), tmp_path / "job-rank0.json")
    save_json(late, tmp_path / "job-rank1.json")
    with pytest.raises(InputError, match="no measured step that every rank recorded"):
        load_job(tmp_path)


def test_more_tokens_on_the_slow_rank_is_imbalanced_work():
    job = merge_job([("a", document(0, 4, [0.1] * 4)), ("b", document(1, 4, [0.1] * 4)),
                     ("c", document(2, 4, [0.3] * 4, tokens=16)), ("d", document(3, 4, [0.1] * 4))])
    [finding] = job["verdict"]["findings"]
    assert (finding["evidence"]["rank"], finding["evidence"]["cause"]) == (2, "imbalanced work")
    assert finding["evidence"]["ratio"] == pytest.approx(3.0)
    assert finding["levers"] == ["balance"]


def test_a_slow_loader_on_a_throttled_rank_is_conflicting():
    job = merge_job([("a", document(0, 2, [0.1] * 4)),
                     ("b", document(1, 2, [0.1] * 4, data=0.3, throttled=0.5))])
    assert job["verdict"]["bottleneck"] == "conflicting"
    [finding] = job["verdict"]["findings"]
    assert finding["evidence"]["phase"] == "data_wait"
    assert finding["evidence"]["cause"] == "conflicting: clock vs data wait"
    assert finding["levers"] == ["cooling", "data_workers"]


def test_one_noisy_step_is_not_a_straggler():
    job = merge_job([("a", document(0, 2, [0.1] * 8)), ("b", document(1, 2, [0.1] * 7 + [0.5]))])
    assert job["verdict"]["bottleneck"] == "balanced"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_cuda_record_comes_from_events_resolved_late(tmp_path):
    from thruput.comm import GradientBuckets

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(256, 256, device="cuda")
        comm = GradientBuckets(model.parameters())
        prof = StepProfiler("cuda", warmup_steps=0)
        x = torch.ones(64, 256, device="cuda")
        for _ in range(3):
            with prof.step(tokens=1, samples=1):
                with prof.phase("forward"):
                    loss = (model(x) @ model.weight).sum()
                with prof.phase("backward"):
                    loss.backward()
                prof.add_time("comm", comm.finish())
        prof.finish()
        for record in prof.records:
            assert record.comm_wait is not None and record.comm_wait >= 0
            assert 0 < record.compute_before_comm <= record.time_s
    finally:
        dist.destroy_process_group()


def test_a_collective_on_another_thread_is_not_the_steps(clock):
    import threading

    prof = StepProfiler(warmup_steps=0)
    with prof.step(tokens=1, samples=1):
        def background() -> None:
            with collective():
                clock(1.0)

        thread = threading.Thread(target=background)
        thread.start()
        thread.join()
    assert prof.records[0].comm_wait is None


def test_ranks_without_a_collective_record_are_noted():
    bare = document(1, 2, [0.1] * 3)
    for s in bare["steps"]:
        s["compute_before_comm"] = s["comm_wait"] = None
    job = merge_job([("a", document(0, 2, [0.1] * 3)), ("b", bare)])
    assert any(n.startswith("ranks [1] have no per-rank collective record") for n in job["notes"])


def test_a_single_present_rank_is_no_verdict():
    job = merge_job([("b", document(1, 2, [0.1] * 3))])
    assert job["missing_ranks"] == [0] and job["verdict"]["bottleneck"] == "unknown"
