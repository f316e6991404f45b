"""The demo's peers: the packed peer sees what thruput's plan sees, and its model gives the same answer.

These are tests of the peers, so that ``bench e2e``'s comparisons are fair. Speed is not asserted.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thruput.demo.workload import LEVERS, DemoSetup, DemoWorkload, variant_config


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> DemoWorkload:
    return DemoWorkload(DemoSetup.tiny(), tmp_path_factory.mktemp("demo"))


def test_packed_peer_sees_thruputs_tokens_per_source_step_by_step(workload) -> None:
    from thruput.train import build_loader

    s = workload.setup
    cfg = variant_config(s, LEVERS, name="thruput", rows=workload.packed_rows, steps=workload.packed_steps,
                         token_shares=workload.token_shares, out_dir=workload.out_dir)
    loader = build_loader(cfg, 0, 1)
    try:
        ours = [next(loader)["tokens_per_source"] for _ in range(workload.packed_steps)]
    finally:
        loader.close()
    theirs = []
    shape = (workload.packed_rows, s.seq_len)
    for batch in workload.peer_loader("packed_peer"):
        theirs.append(batch["tokens_per_source"])
        ids, pos, targets = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
        assert ids.shape == pos.shape == targets.shape == shape  # as many rows as thruput's, all full
        assert sum(batch["tokens_per_source"].values()) == ids.numel() and batch["padding_ratio"] == 0.0
        # Positions restart at each piece; a piece's targets are its next tokens, none past its end.
        bounds = batch["cu_seqlens"].tolist()
        assert bounds[0] == 0 and bounds[-1] == ids.numel()
        flat_ids, flat_pos, flat_targets = ids.flatten(), pos.flatten(), targets.flatten()
        for start, end in zip(bounds, bounds[1:]):
            assert torch.equal(flat_pos[start:end], torch.arange(end - start))
            assert torch.equal(flat_targets[start:end - 1], flat_ids[start + 1:end])
            assert flat_targets[end - 1] == -100
    assert len(theirs) == len(ours) == workload.packed_steps
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert sum(a.values()) == sum(b.values()) == workload.packed_rows * s.seq_len
        # each is floor or ceil of w * tokens: at most one token apart per source and step
        assert all(abs(a[n] - b[n]) <= 1 for n in a), (step, a, b)


def test_packed_peer_rows_are_the_documents_own_tokens(workload) -> None:
    from thruput.demo.packed_peer import PackedRows

    s, data = workload.setup, workload.dataset
    weights = [workload.token_shares[n] for n in data.names]
    sampler = PackedRows(data.document_lengths, weights, workload.packed_rows, s.seq_len, steps=2, seed=s.seed)
    batch = next(iter(workload.peer_loader("packed_peer")))
    pieces = next(iter(sampler))
    want = np.concatenate([data.tokens(src, record)[start:start + n] for _, src, record, start, n in pieces])
    assert np.array_equal(batch["input_ids"].flatten().numpy(), want)
    assert [row for row, *_ in pieces] == sorted(row for row, *_ in pieces)  # rows filled in order


def test_dense_mask_attention_equals_per_document_attention() -> None:
    from thruput.models import GPT, GPTConfig

    torch.manual_seed(0)
    fast = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=48))
    dense = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=48, attention="dense_mask"))
    dense.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 64, (3, 48))
    position_ids = torch.cat([torch.arange(n) for n in (20, 28, 5, 43, 48)]).view(3, 48)  # pieces per row
    want = fast(ids, position_ids)
    got = dense(ids, position_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it is not plain causal attention over the row, which would mix documents
    assert not torch.allclose(dense(ids), got, atol=1e-3)
    with pytest.raises(ValueError, match="^attention must be 'segments' or 'dense_mask'"):
        GPTConfig(attention="flash")


@pytest.mark.slow
def test_quick_e2e_writes_consistent_figures(tmp_path, monkeypatch) -> None:
    from thruput.benchmarks import e2e
    from thruput.cli import main

    # The quick workload with the data plane as thruput's only lever: the same code path, no compile.
    monkeypatch.setattr(e2e, "LEVERS", ("data_plane",))
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--quick", "--no-levers", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    runs, setup = figures["runs"], figures["setup"]
    assert list(runs) == ["packed_peer", "baseline", "thruput"]
    rate = {name: run["useful_tokens_per_s"] for name, run in runs.items()}
    assert figures["speedup_vs_packed_peer"] == pytest.approx(rate["thruput"] / rate["packed_peer"])
    assert figures["speedup"] == pytest.approx(rate["thruput"] / rate["baseline"])
    assert figures["goals"]["speedup_vs_packed_peer_min"] == 1.15
    assert figures["goals_met"]["speedup_vs_packed_peer"] == (figures["speedup_vs_packed_peer"] >= 1.15)
    # The packed peer trains as many steps of as many rows as thruput, on as many tokens.
    assert runs["packed_peer"]["steps"] == runs["thruput"]["steps"] == setup["packed_steps"]
    assert runs["baseline"]["steps"] == setup["baseline_steps"]
    rows_tokens = setup["packed_steps"] * setup["packed_rows"] * setup["seq_len"]
    # labelled: every token but each piece's last (the peer) or each document's last (thruput)
    assert rows_tokens * 0.8 < runs["packed_peer"]["useful_tokens"] < runs["thruput"]["useful_tokens"] <= rows_tokens
    scores = figures["attention_scores"]
    assert scores["dense"] == setup["packed_steps"] * setup["packed_rows"] * setup["seq_len"] ** 2
    assert scores["dense_over_per_document"] == pytest.approx(scores["dense"] / scores["per_document"])
    assert scores["dense_over_per_document"] > 1
