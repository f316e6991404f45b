"""thruput.kernels.compile: padding to buckets, bounded recompiles, eager fallback."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

from thruput.kernels import compile as bucketed_compile
from thruput.kernels import linear_cross_entropy
from thruput.kernels.compile import _pad
from thruput.models import GPT, GPTConfig


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64))


def batch(b: int, t: int, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    # two packed documents per row: positions restart at 0 where the second one begins
    cut = t // 2
    pos = torch.cat([torch.arange(cut), torch.arange(t - cut)]).expand(b, t)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[:, -1] = -100
    return ids, pos, labels


def test_pad_fill_values_and_new_document_positions():
    pos = torch.tensor([[0, 1, 2], [5, 6, 0]])
    assert _pad(pos, 3, 5, "arange").tolist() == [[0, 1, 2, 0, 1], [5, 6, 0, 0, 1], [0, 1, 2, 3, 4]]
    labels = torch.tensor([[1, 2]])
    assert _pad(labels, 2, 3, -100).tolist() == [[1, 2, -100], [-100, -100, -100]]
    x = torch.ones(1, 2, 3)
    assert _pad(x, 1, 4, 0).shape == (1, 4, 3) and _pad(x, 1, 4, 0)[0, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="pad value"):
        _pad(labels, 2, 3, "zeros")


def test_padded_compiled_loss_and_grads_equal_eager():
    model = tiny_gpt()

    def loss_fn(input_ids, position_ids, labels):
        return linear_cross_entropy(model.hidden(input_ids, position_ids), model.lm_head.weight, labels)

    compiled = bucketed_compile(loss_fn, buckets=(16, 32), batch_buckets=(4,), backend="aot_eager")
    ids, pos, labels = batch(3, 11)
    loss = compiled(ids, pos, labels)
    got = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = loss_fn(ids, pos, labels)
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert compiled.stats()["padding_fraction"] == pytest.approx(1 - 33 / 64)


def test_module_outputs_are_sliced_back():
    model = tiny_gpt()
    compiled = bucketed_compile(model, buckets=(16,), backend="aot_eager")
    ids, pos, _ = batch(2, 9)
    out = compiled(ids, position_ids=pos)
    assert out.shape == (2, 9, 64)
    torch.testing.assert_close(out, model(ids, pos), rtol=1e-5, atol=1e-6)
    out = compiled(ids)  # no position ids: the causal path, pads after the real tokens
    torch.testing.assert_close(out, model(ids), rtol=1e-5, atol=1e-6)


def test_recompiles_bounded_by_buckets():
    def fn(x, labels):
        return (x.float().sin() * (labels != -100)).sum()

    buckets, batch_buckets = (8, 16, 32), (2, 4)
    compiled = bucketed_compile(fn, buckets=buckets, batch_buckets=batch_buckets, backend="aot_eager")
    rng = random.Random(0)
    hit = set()
    for _ in range(25):
        b, t = rng.randint(1, 4), rng.randint(1, 32)
        x, labels = torch.randn(b, t), torch.randint(0, 5, (b, t))
        hit.add((min(s for s in batch_buckets if s >= b), min(s for s in buckets if s >= t)))
        torch.testing.assert_close(compiled(x, labels), fn(x, labels), rtol=1e-6, atol=1e-6)
    stats = compiled.stats()
    assert stats["calls"] == 25
    assert stats["compiles"] == len(hit) and stats["recompiles"] == len(hit) - 1
    assert stats["compiles"] <= len(buckets) * len(batch_buckets)
    assert stats["graphs"] == stats["compiles"] and stats["compile_time_s"] > 0
    assert stats["fallback"] is None
    compiled.reset_stats()
    assert compiled.stats()["calls"] == 0


def test_compile_failure_falls_back_to_eager_with_reason():
    calls = []

    def broken_backend(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler in this test")

    model = tiny_gpt()
    compiled = bucketed_compile(model, buckets=(16,), backend=broken_backend)
    ids, _, _ = batch(2, 5)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler in this test.*running eagerly"):
        out = compiled(ids)
    assert torch.equal(out, model(ids))
    assert "RuntimeError: no C++ compiler in this test" in compiled.stats()["fallback"]
    n = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(compiled(ids), model(ids))  # eager now, no second attempt or warning
    assert len(calls) == n


def test_callers_errors_propagate_without_fallback():
    model = tiny_gpt()
    compiled = bucketed_compile(model, buckets=(128,), backend="aot_eager")
    with pytest.raises(ValueError, match="max_seq_len"):
        compiled(torch.zeros(1, 100, dtype=torch.long))
    assert compiled.stats()["fallback"] is None


@pytest.mark.parametrize("kw, match", [
    ({"buckets": (16, 8)}, "buckets must be"),
    ({"buckets": ()}, "buckets must be"),
    ({"buckets": (0, 8)}, "buckets must be"),
    ({"buckets": (8,), "batch_buckets": (2.5,)}, "batch_buckets must be"),
    ({"buckets": tuple(range(1, 10)), "batch_buckets": (1, 2)}, "recompile_limit"),
])
def test_bad_buckets_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        bucketed_compile(lambda x: x, backend="aot_eager", **kw)


def test_longer_than_largest_bucket_raises():
    compiled = bucketed_compile(lambda x: x * 2, buckets=(4, 8), backend="aot_eager")
    with pytest.raises(ValueError, match="sequence length 9 exceeds the largest bucket 8"):
        compiled(torch.ones(1, 9))


def test_dynamic_mode_without_buckets():
    compiled = bucketed_compile(lambda x: x.cos() + 1, buckets=None, backend="aot_eager")
    for t in (3, 5, 9, 17):
        x = torch.randn(2, t)
        torch.testing.assert_close(compiled(x), x.cos() + 1)
    assert compiled.stats()["compiles"] == 1  # one graph with symbolic shapes


@pytest.mark.slow
def test_inductor_backend_runs_and_counts():
    compiled = bucketed_compile(lambda x: torch.nn.functional.gelu(x) * 3, buckets=(8,))
    x = torch.randn(2, 5)
    torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(x) * 3)
    compiled(torch.randn(1, 7))
    stats = compiled.stats()
    assert stats["fallback"] is None, stats["fallback"]
    assert (stats["compiles"], stats["recompiles"]) == (2, 1)  # batch sizes 2 and 1: two graphs


def test_gpt_loss_on_variable_lengths_compiles_once_per_bucket():
    model = tiny_gpt()

    def loss_fn(input_ids, position_ids, labels):
        return linear_cross_entropy(model.hidden(input_ids, position_ids), model.lm_head.weight, labels)

    buckets = (8, 32)
    compiled = bucketed_compile(loss_fn, buckets=buckets, backend="aot_eager")
    lengths = [3, 9, 30, 16, 5, 2, 8, 32]  # t >= 2: batch() ignores the last label of a row
    for i, t in enumerate(lengths):
        ids, pos, labels = batch(2, t, seed=i)
        torch.testing.assert_close(compiled(ids, pos, labels), loss_fn(ids, pos, labels), rtol=1e-5, atol=1e-6)
    stats = compiled.stats()
    assert stats["compiles"] == len(buckets) and stats["recompiles"] == len(buckets) - 1
    assert stats["calls"] == len(lengths) and stats["fallback"] is None
