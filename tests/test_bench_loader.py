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
    peers = ("thruput", "torch_dataloader", "torchdata")
    for peer in peers:
        f = figures[peer]
        assert set(f) >= {"useful_tokens_per_s", "stall_fraction", "padding_ratio", "peak_memory_bytes"}
        assert f["useful_tokens_per_s"] > 0 and math.isfinite(f["useful_tokens_per_s"])
        assert 0.0 <= f["stall_fraction"] <= 1.0
        assert f["peak_memory_bytes"] > 0
    budget = figures["workload"]["worker_processes"]
    assert figures["torch_dataloader"]["worker_processes"] == figures["torchdata"]["worker_processes"] == budget
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
