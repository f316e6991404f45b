"""thruput.hf attention: each document of a packed batch gets exactly what it gets alone."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import FAMILIES, VOCAB, WINDOW, left_padded, pair, tiny  # noqa: E402

from thruput.hf import patch  # noqa: E402
from thruput.hf.attention import document_segments  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32; the packed and the alone runs differ in summation order

# Two rows of 24 tokens: (start, length, first position) of each document piece. Row 1 begins
# with the continuation of a document (positions 4..13), as a split document's second piece.
PIECES = [(0, 0, 7, 0), (0, 7, 11, 0), (0, 18, 6, 0), (1, 0, 10, 4), (1, 10, 14, 0)]
B, T = 2, 24


def _packed() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T))
    pos = torch.zeros(B, T, dtype=torch.long)
    for row, start, n, first in PIECES:
        pos[row, start:start + n] = torch.arange(first, first + n)
    return ids, pos


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Equal to 1e-5 of the tensor's largest entry: gradients summed over documents in another order."""
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0, msg=msg)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_and_gradients_equal_each_document_alone(family: str) -> None:
    ref, model = pair(family)
    patch(model)
    ids, pos = _packed()
    weight = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(2))
    packed = model(input_ids=ids, position_ids=pos).logits
    (packed * weight).sum().backward()
    for row, start, n, first in PIECES:
        span = slice(start, start + n)
        alone = ref(input_ids=ids[row:row + 1, span], position_ids=torch.arange(first, first + n)[None]).logits
        torch.testing.assert_close(packed[row:row + 1, span], alone, **TOL)
        (alone * weight[row:row + 1, span]).sum().backward()  # reference gradients: the sum over documents
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert_close_scaled(got[name], want[name], msg=name)


def test_boundaries_from_cu_seqlens_win_over_position_ids() -> None:
    """A flattened batch (transformers' DataCollatorWithFlattening with flash kwargs): documents
    known only from ``cu_seq_lens_q``; an unpatched sdpa model ignores them and mixes documents."""
    ref, model = pair("llama")
    patch(model)
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 20))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    flat = torch.arange(20)[None]  # continuous positions: no boundary in them
    out = model(input_ids=ids, position_ids=flat, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
    second = ref(input_ids=ids[:, 8:], position_ids=flat[:, 8:]).logits
    torch.testing.assert_close(out[:, 8:], second, **TOL)
    mixed = ref(input_ids=ids, position_ids=flat, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
    assert (mixed[:, 8:] - second).abs().max() > 1e-3


def test_default_cache_does_not_let_attention_cross_documents() -> None:
    """With ``use_cache=True`` (the default) transformers turns its packed-sequence detection off;
    the patched model still keeps documents apart."""
    ref, model = pair("llama")
    patch(model)
    ids, pos = _packed()
    with_cache = model(input_ids=ids, position_ids=pos, use_cache=True).logits
    without = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(with_cache, without, **TOL)
    unpatched = ref(input_ids=ids, position_ids=pos, use_cache=True).logits
    assert (unpatched - without).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_position_ids_is_plain_causal(family: str) -> None:
    ref, model = pair(family)
    patch(model)
    ids = torch.randint(0, VOCAB, (2, 17))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, **TOL)


def test_padding_mask_is_applied() -> None:
    """Left padding known only from ``attention_mask``: the real tokens never see the padding."""
    ref, model = pair("llama")
    patch(model)
    ids, mask = left_padded(2, 12, pad=5)
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 5:], ref(input_ids=ids, attention_mask=mask).logits[0, 5:], **TOL)
    assert (got[0, 5:] - ref(input_ids=ids).logits[0, 5:]).abs().max() > 1e-3


def test_sliding_window_applies_inside_long_documents() -> None:
    """A document longer than the window: the window is applied (not silently dropped)."""
    ref, model = pair("mistral")
    patch(model)
    ids = torch.randint(0, VOCAB, (1, 3 * WINDOW))
    pos = torch.cat([torch.arange(2), torch.arange(3 * WINDOW - 2)])[None]
    out = model(input_ids=ids, position_ids=pos).logits
    long_doc = ref(input_ids=ids[:, 2:], position_ids=pos[:, 2:]).logits
    torch.testing.assert_close(out[:, 2:], long_doc, **TOL)
    no_window = tiny("mistral", sliding_window=None)(input_ids=ids[:, 2:], position_ids=pos[:, 2:]).logits
    assert (no_window - long_doc).abs().max() > 1e-3  # the window matters for this document


def test_attention_dropout_follows_training_mode() -> None:
    """p = 1 drops every attention weight in training (deterministic), none in eval."""
    ref, model = pair("llama", attention_dropout=1.0)
    patch(model)
    ids, pos = _packed()
    ref.train()
    model.train()
    torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits,
                               ref(input_ids=ids, position_ids=pos, use_cache=False).logits, **TOL)
    model.eval()
    dropped = tiny("llama")  # same weights, no dropout
    assert (model(input_ids=ids[:, :7]).logits - dropped(input_ids=ids[:, :7]).logits).abs().max() < 1e-5


def test_no_dense_mask_and_work_follows_the_documents(monkeypatch) -> None:
    """Four documents of 32 in a row of 128: 4 * 32^2 query-key pairs per layer, a quarter of the
    row's 128^2, and no [T x T] mask is built."""
    import thruput.hf.attention as attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **options):
        calls.append((q.shape[0] * q.shape[2] * k.shape[2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **options)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    _, model = pair("llama")
    patch(model)
    ids = torch.randint(0, VOCAB, (1, 128))
    model(input_ids=ids, position_ids=torch.arange(32).repeat(4)[None])
    layers = model.config.num_hidden_layers
    assert sum(n for n, _ in calls) == layers * 4 * 32**2
    assert all(mask is None for _, mask in calls)


def test_document_segments_reads_one_boundary_source() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 57, 58, 59]])
    assert document_segments((1, 8), position_ids=pos) is not None
    assert document_segments((2, 4), position_ids=torch.arange(4)[None]) is None  # one document per row
    assert document_segments((1, 8)) is None
    with pytest.raises(ValueError, match="crosses a row boundary"):
        document_segments((2, 4), cu_seqlens=torch.tensor([0, 6, 8]))
    with pytest.raises(ValueError, match="rise strictly"):
        document_segments((1, 8), cu_seqlens=torch.tensor([0, 5, 7]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_equals_alone_on_cuda(family: str) -> None:
    ref, model = (m.cuda() for m in pair(family))
    patch(model)
    ids, pos = (x.cuda() for x in _packed())
    packed = model(input_ids=ids, position_ids=pos).logits
    for row, start, n, first in PIECES:
        span = slice(start, start + n)
        alone = ref(input_ids=ids[row:row + 1, span],
                    position_ids=torch.arange(first, first + n, device="cuda")[None]).logits
        torch.testing.assert_close(packed[row:row + 1, span], alone, atol=1e-4, rtol=1e-4)
