"""Document ends and continuations in batches: the EOS option, positions of split documents."""
from __future__ import annotations

import pytest
import torch

from thruput.data import ByteTokenizer, DataError, HFTokenizer, Loader, MemorySource, Plan
from thruput.models import GPT, GPTConfig

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog " * (1 + i % 5) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, bpe) -> HFTokenizer:
    folder = tmp_path_factory.mktemp("tok")
    bpe(folder, TEXTS, vocab_size=100)
    return HFTokenizer(folder)


def _batches(plan: Plan, steps: int) -> list[dict]:
    with Loader(plan, backend="inline", steps=steps) as loader:
        return list(loader)


def _document(plan: Plan, name: str, record: int) -> list[int]:
    return plan.document_tokenizer(plan.sources[plan.names.index(name)].text(record)).tolist()


def _check_batch(plan: Plan, batch: dict) -> list[int]:
    """Inputs, labels and positions of every piece against its document; the flat positions
    where a label is the EOS id because the next token of the document is its end."""
    ids, labels, pos = (batch[k].flatten().tolist() for k in ("input_ids", "shift_labels", "position_ids"))
    t, eos_targets = 0, []
    for i, (name, epoch, record, offset, n) in enumerate(batch["documents"]):
        if not plan.packing:  # one piece per row, then padding
            t = i * plan.seq_len
        doc = _document(plan, name, record)
        assert ids[t : t + n] == doc[offset : offset + n]
        assert labels[t : t + n] == (doc[offset + 1 : offset + n + 1] + [-100])[:n]
        assert pos[t : t + n] == list(range(offset, offset + n))
        if offset <= len(doc) - 2 < offset + n:
            eos_targets.append(t + len(doc) - 2 - offset)
        t += n
    return eos_targets


@pytest.mark.parametrize("packing", [True, False])
def test_eos_ends_every_document_and_is_predicted_from_its_last_token(tokenizer, packing):
    plan = Plan([MemorySource("a", TEXTS)], seq_len=24, tokens_per_batch=24 * 4, packing=packing, tokenizer=tokenizer)
    eos = tokenizer.eos_id
    assert plan.eos_id == eos is not None
    for batch in _batches(plan, 6):
        targets = _check_batch(plan, batch)
        labels, ids = batch["shift_labels"].flatten(), batch["input_ids"].flatten()
        assert torch.nonzero(labels == eos).flatten().tolist() == targets  # exactly at document ends
        assert (labels[ids == eos] == -100).all()  # nothing is predicted from the EOS itself
    assert any(_check_batch(plan, b) for b in _batches(plan, 6))


def test_eos_reaches_worker_processes(tokenizer):
    plan = Plan([MemorySource("a", TEXTS)], seq_len=24, tokens_per_batch=24 * 4, tokenizer=tokenizer)
    with Loader(plan, backend="process", workers={"max_workers": 1}, steps=3) as loader:
        batches = list(loader)
    for got, want in zip(batches, _batches(plan, 3)):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["shift_labels"], want["shift_labels"])
    assert any((b["input_ids"] == tokenizer.eos_id).any() for b in batches)


def test_eos_reaches_ray_loaders(tokenizer, ray_address):
    import uuid

    plan = Plan([MemorySource("a", TEXTS)], seq_len=24, tokens_per_batch=24 * 4, tokenizer=tokenizer)
    options = {"address": ray_address, "run_id": uuid.uuid4().hex[:8], "chunk_docs": 4, "shadows": 0}
    with Loader(plan, backend="ray", workers=options, steps=2) as loader:
        batches = list(loader)
    for got, want in zip(batches, _batches(plan, 2)):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["shift_labels"], want["shift_labels"])
    assert any((b["input_ids"] == tokenizer.eos_id).any() for b in batches)


def test_eos_off_keeps_minus_100_at_document_ends(tokenizer):
    plan = Plan([MemorySource("a", TEXTS)], seq_len=24, tokens_per_batch=24 * 4, tokenizer=tokenizer, eos=False)
    assert plan.eos_id is None
    for batch in _batches(plan, 4):
        _check_batch(plan, batch)  # documents without EOS: the label after a document's last token is -100
        assert not (batch["input_ids"] == tokenizer.eos_id).any()
        assert not (batch["shift_labels"] == tokenizer.eos_id).any()


def test_eos_default_follows_the_tokenizer():
    assert Plan([MemorySource("a", ["x"])], seq_len=4, tokens_per_batch=4).eos_id is None  # bytes: no EOS
    with pytest.raises(DataError, match=r"plan: eos=True, but the tokenizer \(ByteTokenizer\) has no EOS token"):
        Plan([MemorySource("a", ["x"])], seq_len=4, tokens_per_batch=4, tokenizer=ByteTokenizer(), eos=True)
    with pytest.raises(DataError, match="eos must be True, False or None"):
        Plan([MemorySource("a", ["x"])], seq_len=4, tokens_per_batch=4, eos="yes")


def test_eos_is_appended_to_pre_tokenized_documents_but_not_to_empty_ones(tokenizer):
    plan = Plan([MemorySource("a", [[5, 6, 7], [], "", [8]])], seq_len=4, tokens_per_batch=8, tokenizer=tokenizer)
    eos = tokenizer.eos_id
    assert plan.document_tokenizer([5, 6, 7]).tolist() == [5, 6, 7, eos]
    assert plan.document_tokenizer([]).tolist() == [] and plan.document_tokenizer("").tolist() == []
    for batch in _batches(plan, 3):
        _check_batch(plan, batch)
        assert {r for _, _, r, _, _ in batch["documents"]} <= {0, 3}  # empty records never become documents


def test_split_document_positions_continue_across_rows():
    long_doc = list(range(1, 101))  # one document of 100 tokens, rows of 32
    plan = Plan([MemorySource("a", [long_doc])], seq_len=32, tokens_per_batch=32 * 2, packing=True, balance="none")
    batches = _batches(plan, 3)
    offsets = [(o, n) for b in batches for _, _, _, o, n in b["documents"]]
    assert offsets[:4] == [(0, 32), (32, 32), (64, 32), (96, 4)]
    for b in batches:
        _check_batch(plan, b)
    first = batches[0]
    assert first["position_ids"][1].tolist() == list(range(32, 64))  # the second row continues
    assert first["shift_labels"][0, -1] == 33  # the first row's last token predicts the second row's first


def test_gpt_on_a_batch_equals_each_piece_alone_with_its_positions():
    torch.manual_seed(0)
    docs = [list(range(i % 7 + 1, i % 7 + 1 + 5 + (i * 37) % 60)) for i in range(30)]
    plan = Plan([MemorySource("a", docs)], seq_len=32, tokens_per_batch=32 * 4, seed=1)
    model = GPT(GPTConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)).eval()
    with torch.no_grad():
        for batch in _batches(plan, 3):
            ids, pos, seg = (batch[k] for k in ("input_ids", "position_ids", "segment_ids"))
            out = model(ids, pos, seg).flatten(0, 1)
            continued = 0
            cu = batch["cu_seqlens"].tolist()
            for start, end in zip(cu[:-1], cu[1:]):
                b, t0, t1 = start // 32, start % 32, start % 32 + end - start
                alone = model(ids[b : b + 1, t0:t1], pos[b : b + 1, t0:t1])[0]
                torch.testing.assert_close(out[start:end], alone, atol=1e-5, rtol=1e-5)
                continued += int(pos[b, t0]) > 0
            assert continued  # some pieces continue a document split across rows
