"""`thruput bench loader`: the workload's peers see the same data, and the quick run's figures hold together.

Speed is not asserted: the numbers depend on the machine and its load.
"""
import json
import math

import numpy as np
import pytest
import torch

from thruput.benchmarks._loader_workload import PeerChunks, make_sources, write_corpus
from thruput.cli import main
from thruput.data import ByteTokenizer


def test_peer_chunks_cover_each_cleaned_document_exactly(tmp_path) -> None:
    lengths = write_corpus(tmp_path, n_docs=6, max_len=300, seed=3)
    sources = make_sources(tmp_path, unit_rounds=1, weights=[0.4, 0.3, 0.2, 0.1])
    seq_len = 64
    data = PeerChunks(sources, list(lengths.values()), seq_len)
    tok = ByteTokenizer()
    for s, source in enumerate(sources):
        for r in range(len(source)):
            rows = [i for i, (cs, cr, _) in enumerate(data.chunks) if cs == s and cr == r]
            chunks = [data[i][1] for i in rows]
            assert all(c.size <= seq_len + 1 for c in chunks)
            # Consecutive chunks overlap by one token (the last target is the next input).
            joined = np.concatenate([c[:-1] for c in chunks[:-1]] + [chunks[-1]])
            assert np.array_equal(joined, tok.encode(source.text(r)))
    # Each source is drawn in proportion to its weight, whatever its number of chunks.
    w = data.sample_weights()
    per_source = torch.zeros(4, dtype=torch.double).index_add_(0, torch.as_tensor(data.chunks[:, 0]), w)
    assert torch.allclose(per_source / per_source.sum(), torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.double))


def test_quick_run_writes_consistent_figures(tmp_path) -> None:
    out = tmp_path / "loader.json"
    # Cheaper than the default quick run: shorter rows and lighter cleaning, same code path.
    argv = ["bench", "loader", "--quick", "--json", str(out), "--seq-len", "256", "--rows", "8", "--unit-rounds", "16"]
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    peers = ("thruput", "packed_peer", "torch_dataloader", "torchdata")
    for peer in peers:
        f = figures[peer]
        assert set(f) >= {"useful_tokens_per_s", "stall_fraction", "padding_ratio", "peak_memory_bytes"}
        assert f["useful_tokens_per_s"] > 0 and math.isfinite(f["useful_tokens_per_s"])
        assert 0.0 <= f["stall_fraction"] <= 1.0
        assert f["peak_memory_bytes"] > 0
    budget = figures["workload"]["worker_processes"]
    assert figures["torch_dataloader"]["worker_processes"] == figures["torchdata"]["worker_processes"] == budget
    assert figures["packed_peer"]["worker_processes"] == budget
    assert figures["speedup_vs_packed_peer"] == pytest.approx(
        figures["thruput"]["useful_tokens_per_s"] / figures["packed_peer"]["useful_tokens_per_s"])
    assert figures["packed_peer"]["padding_ratio"] == 0.0
    assert figures["thruput"]["worker_processes"] <= budget
    assert figures["speedup_vs_torch"] == pytest.approx(
        figures["thruput"]["useful_tokens_per_s"] / figures["torch_dataloader"]["useful_tokens_per_s"]
    )
    # Packing fills every row; the pad-to-longest peers cannot, with long-tailed lengths.
    assert figures["thruput"]["padding_ratio"] == 0.0
    assert figures["goals_met"]["padding_ratio"] is True
    assert figures["torch_dataloader"]["padding_ratio"] > 0.1 and figures["torchdata"]["padding_ratio"] > 0.1
    # The costliest source got the most workers, and thruput stayed within the process budget.
    workers = figures["thruput"]["workers_per_source"]
    assert max(workers, key=workers.get) == "heaviest"
    costs = figures["workload"]["sources"]
    assert costs["heaviest"]["preprocess_cpu_s_per_token"] > 5 * costs["light"]["preprocess_cpu_s_per_token"]


def test_packed_peer_sees_thruputs_tokens_per_source_step_by_step(tmp_path) -> None:
    from thruput.benchmarks._loader_workload import QuotaPieces, packed_peer_loader
    from thruput.data import Loader, Plan

    lengths = write_corpus(tmp_path, n_docs=40, max_len=900, seed=4)
    weights = [0.4, 0.3, 0.2, 0.1]
    sources = make_sources(tmp_path, unit_rounds=1, weights=weights)
    seq_len, rows, steps = 128, 4, 12
    tokens = rows * seq_len  # w * tokens = 204.8, 153.6, 102.4, 51.2: rounding decides each step
    plan = Plan(sources, seq_len=seq_len, tokens_per_batch=tokens, packing=True, seed=0)
    with Loader(plan, backend="inline", steps=steps) as loader:
        ours = [batch["tokens_per_source"] for batch in loader]
    peer = packed_peer_loader(sources, list(lengths.values()), tokens, seq_len, workers=0, seed=0)
    theirs = []
    tok = ByteTokenizer()
    for batch, _ in zip(peer, range(steps)):
        theirs.append(batch["tokens_per_source"])
        # The peer yields transformers' unshifted labels.
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        assert ids.shape == pos.shape == labels.shape == (1, tokens)  # one padding-free row
        starts = (pos[0] == 0).nonzero().flatten()
        assert (labels[0, starts] == -100).all() and (labels[0, 1:][pos[0, 1:] > 0] == ids[0, 1:][pos[0, 1:] > 0]).all()
        assert int(torch.diff(torch.cat([starts, torch.tensor([tokens])])).max()) <= seq_len  # pieces <= a row
    names = [s.name for s in sources]
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert sum(a.values()) == sum(b.values()) == tokens
        # each is floor or ceil of w * tokens: at most one token apart per source and step
        assert all(abs(a[n] - b[n]) <= 1 for n in names), (step, a, b)
    totals = {n: sum(t[n] for t in theirs) for n in names}
    assert all(abs(totals[n] - w * tokens * steps) <= steps for n, w in zip(names, weights))
    # the peer's tokens are the cleaned documents' own tokens, piece by piece
    pieces = next(iter(QuotaPieces(list(lengths.values()), weights, tokens, seq_len, seed=0)))
    first = next(iter(packed_peer_loader(sources, list(lengths.values()), tokens, seq_len, workers=0, seed=0)))
    want = np.concatenate([tok.encode(sources[s].text(r))[start:start + n] for s, r, start, n in pieces])
    assert np.array_equal(first["input_ids"][0].numpy(), want)
