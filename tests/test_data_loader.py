"""Loader: batch contract, determinism, exact resumption, exactly-once delivery, mixing, errors."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch

from thruput.data import DataError, JsonlSource, Loader, MemorySource, Plan, piecewise
from thruput.data.backend import InlineBackend

KEYS = ("input_ids", "shift_labels", "position_ids", "cu_seqlens")


def docs(name, n, seed, lo=1, hi=90):
    """Pre-tokenized documents with long-tailed lengths and distinct contents."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum((rng.pareto(1.3, n) * 12 + lo).astype(int), hi)
    return [rng.integers(0, 256, size=int(n_)).tolist() for n_ in lengths]


def make_plan(**kw):
    sources = kw.pop("sources", None) or [
        MemorySource("a", docs("a", 40, 1), weight=2.0),
        MemorySource("b", docs("b", 25, 2), weight=1.0),
        MemorySource("c", [f"text number {i} " * (i % 7 + 1) for i in range(30)], weight=1.0),
    ]
    args = dict(seq_len=32, tokens_per_batch=32 * 8, world_size=2, seed=3)
    args.update(kw)
    return Plan(sources, **args)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in KEYS) and a["documents"] == b["documents"]


def test_batch_contract():
    plan = make_plan()
    with Loader(plan, rank=1, backend="inline") as loader:
        batch = next(loader)
    B, T = 4, 32
    for k in ("input_ids", "shift_labels", "position_ids"):
        assert batch[k].shape == (B, T) and batch[k].dtype == torch.int64
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * T
    seg = batch["segment_ids"]
    assert seg.shape == (B, T) and seg.dtype == torch.int32
    # segment_ids number the pieces of cu_seqlens in order
    assert torch.equal(seg.flatten(), torch.repeat_interleave(torch.arange(cu.numel() - 1, dtype=torch.int32), cu.diff()))
    assert batch["max_seqlen"] == int(torch.diff(cu).max())
    assert sum(batch["tokens_per_source"].values()) == B * T and batch["padding_ratio"] == 0.0
    assert batch["step"] == 0
    # Labels are the next token of the same document, -100 at document ends.
    by_source = {s.name: s for s in plan.sources}
    flat_ids, flat_labels = batch["input_ids"].flatten().tolist(), batch["shift_labels"].flatten().tolist()
    t = 0
    for name, epoch, record, offset, n in batch["documents"]:
        doc = by_source[name].text(record)
        doc = plan.tokenizer.encode(doc).tolist() if isinstance(doc, str) else list(doc)
        assert flat_ids[t : t + n] == doc[offset : offset + n]
        # positions are the tokens' places in their document, continued across rows
        assert batch["position_ids"].flatten()[t : t + n].tolist() == list(range(offset, offset + n))
        expect = doc[offset + 1 : offset + n + 1] + [-100] * (offset + n + 1 - len(doc) if offset + n >= len(doc) else 0)
        assert flat_labels[t : t + n] == expect[:n]
        t += n


def test_no_packing_pads_rows_and_reports_padding():
    plan = make_plan(packing=False)
    with Loader(plan, rank=0, backend="inline") as loader:
        batches = take(loader, 4)
    for b in batches:
        real = (b["shift_labels"] != -100) | (b["position_ids"] > 0)
        pad = int((b["input_ids"].numel()) - sum(b["tokens_per_source"].values()))
        assert b["padding_ratio"] == pytest.approx(pad / b["input_ids"].numel())
        assert len(b["documents"]) == b["input_ids"].shape[0]  # one piece per row
        assert real.any()
    assert any(b["padding_ratio"] > 0 for b in batches)


@pytest.mark.parametrize("packing", [True, False])
def test_deterministic_and_resumes_bitwise_at_random_steps(packing):
    plan = make_plan(packing=packing)
    with Loader(plan, rank=0, backend="inline") as loader:
        reference = take(loader, 30)
    rng = random.Random(0)
    for cut in sorted(rng.sample(range(1, 29), 4)):
        with Loader(plan, rank=0, backend="inline") as first:
            head = take(first, cut)
            state = json.loads(json.dumps(first.state_dict()))  # plain data survives JSON
        assert all(same(a, b) for a, b in zip(head, reference))
        with Loader(plan, rank=0, backend=InlineBackend(chunk_docs=3)) as resumed:
            resumed.load_state_dict(state)
            tail = take(resumed, 30 - cut)
        assert all(same(a, b) for a, b in zip(tail, reference[cut:])), cut


@pytest.mark.slow
def test_resume_with_worker_processes_and_different_worker_counts():
    plan = make_plan()
    with Loader(plan, rank=0, backend="inline") as loader:
        reference = take(loader, 16)
    workers = {"min_workers": 1, "max_workers": 2, "chunk_docs": 5, "rescale_every": 3}
    with Loader(plan, rank=0, backend="process", workers=workers) as first:
        head = take(first, 7)
        state = first.state_dict()
    with Loader(plan, rank=0, backend="process", workers={"min_workers": 2, "max_workers": 2, "chunk_docs": 2}) as resumed:
        resumed.load_state_dict(state)
        tail = take(resumed, 9)
    assert all(same(a, b) for a, b in zip(head + tail, reference))


def spans_by_record(batches_per_rank):
    spans = defaultdict(list)
    for batches in batches_per_rank:
        for b in batches:
            for name, epoch, record, offset, n in b["documents"]:
                spans[(name, epoch, record)].append((offset, n))
    return spans


def doc_len(plan, name, record):
    src = {s.name: s for s in plan.sources}[name]
    t = src.text(record)
    return len(plan.tokenizer.encode(t)) if isinstance(t, str) else len(t)


def test_every_sample_exactly_once_per_epoch_per_source_across_ranks():
    plan = make_plan(world_size=4)
    per_rank, states = [], []
    for rank in range(4):
        with Loader(plan, rank=rank, backend="inline") as loader:
            per_rank.append(take(loader, 40))
            states.append(loader.state_dict())
    assert all(s == states[0] for s in states)
    spans = spans_by_record(per_rank)
    for src in plan.sources:
        assert states[0]["sources"][src.name]["position"] >= len(src), "test must complete epoch 0"
        for record in range(len(src)):
            got = sorted(spans[(src.name, 0, record)])
            pos = 0
            for off, n in got:
                assert off == pos, (src.name, record, got)
                pos += n
            assert pos == doc_len(plan, src.name, record)


def test_world_size_resplit_is_lossless():
    plan = make_plan(world_size=2)
    with Loader(plan, rank=0, backend="inline") as loader:
        take(loader, 5)
        state = loader.state_dict()

    def global_tokens(world_size, n):
        out = []
        for rank in range(world_size):
            with Loader(plan, rank=rank, world_size=world_size, backend="inline") as loader:
                loader.load_state_dict(state)
                out.append(take(loader, n))
        return [
            sorted(d for r in range(world_size) for d in out[r][step]["documents"]) for step in range(n)
        ], out

    two, _ = global_tokens(2, 6)
    four, by_rank = global_tokens(4, 6)
    one, _ = global_tokens(1, 6)
    # Pieces may be cut differently when packed for a different number of ranks; the tokens
    # delivered per document must be the same set.
    def covered(per_step):
        cov = defaultdict(set)
        for step, items in enumerate(per_step):
            for name, epoch, record, off, n in items:
                cov[(step, name, epoch, record)].update(range(off, off + n))
        return cov

    assert covered(two) == covered(four) == covered(one)
    assert all(b["input_ids"].shape == (2, 32) for b in by_rank[0])
    with pytest.raises(DataError, match="cannot be split equally over world_size 3"):
        Loader(plan, rank=0, world_size=3, backend="inline")
    with pytest.raises(DataError, match="rank 4 is outside world_size 4"):
        Loader(plan, rank=4, world_size=4, backend="inline")


def test_mixture_proportions_follow_weights():
    a = MemorySource("a", docs("a", 50, 5), weight=0.6)
    b = MemorySource("b", docs("b", 50, 6), weight=0.3)
    c = MemorySource("c", docs("c", 50, 7), weight=0.1)
    plan = Plan([a, b, c], seq_len=32, tokens_per_batch=32 * 7, seed=11)
    totals = np.zeros(3)
    with Loader(plan, backend="inline") as loader:
        for batch in take(loader, 200):
            q = np.array([batch["tokens_per_source"][n] for n in "abc"])
            assert (np.abs(q - np.array([0.6, 0.3, 0.1]) * 224) <= 1).all()  # within one token per step
            totals += q
    share = totals / totals.sum()
    # Each step's leftover token is a Bernoulli draw: the share's sd is < 0.5/sqrt(200)/224.
    assert np.abs(share - [0.6, 0.3, 0.1]).max() < 1e-3


def test_schedule_change_takes_effect_at_the_right_step():
    a = MemorySource("a", docs("a", 30, 1), weight=piecewise({0: 1.0, 5: 0.0}))
    b = MemorySource("b", docs("b", 30, 2), weight=piecewise({0: 0.0, 5: 1.0, 9: 1.0}))
    plan = Plan([a, b], seq_len=16, tokens_per_batch=64)
    with Loader(plan, backend="inline") as loader:
        got = [(x["tokens_per_source"]["a"], x["tokens_per_source"]["b"]) for x in take(loader, 10)]
    assert got == [(64, 0)] * 5 + [(0, 64)] * 5


def jsonl_with_bad_lines(tmp_path):
    lines = []
    for i in range(20):
        lines.append('{"text": broken' if i in (3, 11) else json.dumps({"text": f"document {i} " * 3}))
    p = tmp_path / "web.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("backend", ["inline", "process"])
def test_malformed_line_raises_with_file_and_line(tmp_path, backend):
    p = jsonl_with_bad_lines(tmp_path)
    plan = Plan([JsonlSource("web", p, cache_dir=tmp_path)], seq_len=16, tokens_per_batch=64)
    with Loader(plan, backend=backend, workers={"chunk_docs": 4} if backend == "process" else None) as loader:
        with pytest.raises(DataError, match=rf"source 'web': file '{p}' line (4|12): malformed JSON"):
            take(loader, 40)


def test_skip_and_count_reports_skipped_records(tmp_path):
    p = jsonl_with_bad_lines(tmp_path)
    plan = Plan([JsonlSource("web", p, cache_dir=tmp_path, on_error="skip")], seq_len=16, tokens_per_batch=64)
    with Loader(plan, backend="inline") as loader:
        while loader.state_dict()["sources"]["web"]["position"] < 2 * 18:
            next(loader)
        # Two full epochs consumed: the two bad lines were skipped twice.
        assert loader.skipped == {"web": 4}
        assert loader.stats()["skipped"] == {"web": 4}


def test_all_records_filtered_is_an_error():
    src = MemorySource("m", ["a", "b"], filter=lambda r: False)
    plan = Plan([src], seq_len=8, tokens_per_batch=8)
    with Loader(plan, backend="inline") as loader:
        with pytest.raises(DataError, match="source 'm' produced no tokens in a whole epoch"):
            next(loader)


def test_state_mismatch_errors():
    plan = make_plan()
    loader = Loader(plan, backend="inline")
    state = loader.state_dict()
    with pytest.raises(DataError, match="seed 99 differs"):
        loader.load_state_dict({**state, "seed": 99})
    with pytest.raises(DataError, match=r"sources \['a'\] differ"):
        loader.load_state_dict({**state, "sources": {"a": state["sources"]["a"]}})
    with pytest.raises(DataError, match="backend must be"):
        Loader(plan, backend="threads")


def test_steps_limit_and_reiteration_after_close():
    plan = make_plan()
    loader = Loader(plan, backend="inline", steps=3)
    assert [b["step"] for b in loader] == [0, 1, 2]
    loader.close()
    assert list(loader) == []


def test_close_stops_worker_processes():
    plan = make_plan()
    with Loader(plan, backend="process", workers={"min_workers": 1, "max_workers": 1}) as loader:
        next(loader)
        procs = [w.proc for pool in loader.backend._pools.values() for w in pool.workers]
        assert len(procs) == 3 and all(p.is_alive() for p in procs)
    assert not any(p.is_alive() for p in procs)
