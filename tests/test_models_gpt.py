import pytest
import torch

from thruput.models import GPT, GPTConfig


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=48))


def test_shapes_and_hidden_matches_forward(model: GPT) -> None:
    x = torch.randint(0, 64, (3, 40))
    logits = model(x)
    assert logits.shape == (3, 40, 64)
    torch.testing.assert_close(model.lm_head(model.hidden(x)), logits)


def test_packed_documents_equal_separate_runs(model: GPT) -> None:
    x = torch.randint(0, 64, (2, 40))
    pos = torch.cat([torch.arange(15), torch.arange(25)]).expand(2, 40)
    packed = model(x, pos)
    torch.testing.assert_close(packed[:, :15], model(x[:, :15]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 15:], model(x[:, 15:]), atol=1e-5, rtol=1e-5)


def test_position_ids_of_plain_row_equal_causal_path(model: GPT) -> None:
    x = torch.randint(0, 64, (2, 33))
    pos = torch.arange(33).expand(2, 33)
    torch.testing.assert_close(model(x, pos), model(x), atol=1e-5, rtol=1e-5)


def test_row_starting_mid_document_is_one_document(model: GPT) -> None:
    x = torch.randint(0, 64, (1, 20))
    pos = torch.arange(57, 77)[None]
    from thruput.models.segments import document_mask

    mask = document_mask(pos)
    assert mask.sum().item() == 20 * 21 // 2
    assert model(x, pos).shape == (1, 20, 64)


def test_no_attention_across_documents(model: GPT) -> None:
    x = torch.randint(0, 64, (1, 30))
    pos = torch.cat([torch.arange(10), torch.arange(20)])[None]
    y = x.clone()
    y[0, :10] = torch.randint(0, 64, (10,))
    torch.testing.assert_close(model(x, pos)[:, 10:], model(y, pos)[:, 10:])


def test_flops_per_token_formula(model: GPT) -> None:
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.d_model
    assert model.num_params() == n
    assert model.flops_per_token() == 6 * n + 12 * cfg.n_layers * cfg.d_model * cfg.max_seq_len
    assert model.flops_per_token(10.0) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 10.0


@pytest.mark.parametrize(
    "kwargs, key",
    [({"d_model": 30, "n_heads": 4}, "divisible"), ({"n_layers": 0}, "n_layers"), ({"d_model": 12, "n_heads": 4}, "even")],
)
def test_bad_config_names_the_problem(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        GPTConfig(**kwargs)


def test_too_long_sequence_is_rejected(model: GPT) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))


def _random_packed_positions(gen: torch.Generator, rows: int, t: int) -> torch.Tensor:
    pos = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < t:  # documents of 1 to t tokens, the first possibly mid-document
            n = int(torch.randint(1, t + 1, (1,), generator=gen))
            start = int(torch.randint(0, 50, (1,), generator=gen)) if not row else 0
            row += range(start, start + min(n, t - len(row)))
        pos.append(row)
    return torch.tensor(pos)


@pytest.mark.parametrize("seed", range(4))
def test_segment_attention_equals_masked_sdpa_forward_and_backward(seed: int) -> None:
    from thruput.models.segments import Segments, document_mask, segment_attention

    gen = torch.Generator().manual_seed(seed)
    b, h, t, d = 3, 2, 70, 8
    pos = _random_packed_positions(gen, b, t)
    q, k, v = (torch.randn(b, h, t, d, generator=gen, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(pos))
    got = segment_attention(q, k, v, Segments.from_position_ids(pos))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(b, h, t, d, generator=gen)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    got_grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_segments_cover_every_position_once_in_few_groups() -> None:
    from thruput.models.segments import Segments

    pos = torch.tensor([[0, 1, 2, 0, 1, 0] + list(range(18)) + list(range(40))])
    segments = Segments.from_position_ids(pos)
    covered = torch.cat([index[valid] for index, valid in segments.groups])
    assert sorted(covered.tolist()) == list(range(64))
    # lengths 3, 2, 1 -> 16; 18 -> 24; 40 -> 48
    assert sorted(index.shape for index, _ in segments.groups) == [(1, 24), (1, 48), (3, 16)]


def test_compiled_packed_forward_equals_eager(model: GPT) -> None:
    x = torch.randint(0, 64, (2, 40))
    pos = torch.cat([torch.arange(7), torch.arange(33)]).expand(2, 40)
    compiled = torch.compile(model.hidden)
    torch.testing.assert_close(compiled(x, pos), model.hidden(x, pos), atol=1e-5, rtol=1e-5)
