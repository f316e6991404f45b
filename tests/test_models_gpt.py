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
    from thruput.models.segments import document_mask, document_starts

    mask = document_mask(document_starts(pos))
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


def _random_packed(gen: torch.Generator, rows: int, t: int, continued: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and segment ids of packed rows: pieces of 1 to t tokens; with ``continued`` any
    piece may continue a document mid-way, even at the position where the previous one ended."""
    pos, seg = [], []
    for _ in range(rows):
        row: list[int] = []
        ids: list[int] = []
        while len(row) < t:  # the first piece possibly mid-document
            n = int(torch.randint(1, t + 1, (1,), generator=gen))
            start = int(torch.randint(0, 50, (1,), generator=gen)) if continued or not row else 0
            if continued and row and torch.rand((), generator=gen) < 0.3:
                start = row[-1] + 1  # indistinguishable from the previous piece by positions alone
            row += range(start, start + min(n, t - len(row)))
            ids += [len(seg) * t + len(set(ids))] * (len(row) - len(ids))
        pos.append(row)
        seg.append(ids)
    return torch.tensor(pos), torch.tensor(seg)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("by", ["positions", "segment_ids"])
def test_segment_attention_equals_masked_sdpa_forward_and_backward(seed: int, by: str) -> None:
    from thruput.models.segments import Segments, document_mask, document_starts, segment_attention

    gen = torch.Generator().manual_seed(seed)
    b, h, t, d = 3, 2, 70, 8
    pos, seg = _random_packed(gen, b, t, continued=by == "segment_ids")
    ids = {"position_ids": pos} if by == "positions" else {"position_ids": pos, "segment_ids": seg}
    q, k, v = (torch.randn(b, h, t, d, generator=gen, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(document_starts(**ids)))
    got = segment_attention(q, k, v, Segments.from_ids(**ids))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(b, h, t, d, generator=gen)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    got_grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_segments_cover_every_position_once_in_few_groups() -> None:
    from thruput.models.segments import Segments

    pos = torch.tensor([[0, 1, 2, 0, 1, 0] + list(range(18)) + list(range(40))])
    segments = Segments.from_ids(pos)
    covered = torch.cat([index[valid] for index, valid in segments.groups])
    assert sorted(covered.tolist()) == list(range(64))
    # lengths 3, 2, 1 -> 16; 18 -> 24; 40 -> 48
    assert sorted(index.shape for index, _ in segments.groups) == [(1, 24), (1, 48), (3, 16)]


def test_compiled_packed_forward_equals_eager(model: GPT) -> None:
    x = torch.randint(0, 64, (2, 40))
    pos = torch.cat([torch.arange(7), torch.arange(33)]).expand(2, 40)
    compiled = torch.compile(model.hidden)
    torch.testing.assert_close(compiled(x, pos), model.hidden(x, pos), atol=1e-5, rtol=1e-5)


def test_continued_piece_attends_only_within_itself_with_its_positions(model: GPT) -> None:
    # Row: the last 10 tokens of document A (positions 30..39), then document C continued from
    # position 40: by positions alone the two look like one document; segment ids separate them.
    x = torch.randint(0, 64, (1, 30))
    pos = torch.arange(30, 60)[None]
    seg = torch.tensor([[0] * 10 + [1] * 20])
    packed = model(x, pos, seg)
    torch.testing.assert_close(packed[:, :10], model(x[:, :10], pos[:, :10]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 10:], model(x[:, 10:], pos[:, 10:]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x, pos)[:, 10:], packed[:, 10:], atol=1e-3)  # merged without them


def test_segment_ids_without_positions_and_shape_check(model: GPT) -> None:
    x = torch.randint(0, 64, (2, 24))
    seg = torch.tensor([0] * 9 + [1] * 15).expand(2, 24)
    got = model(x, segment_ids=seg)
    torch.testing.assert_close(got[:, 9:], model(x[:, 9:], torch.arange(9, 24).expand(2, 15)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segment_ids shape"):
        model(x, segment_ids=seg[:, :5])


def test_compiled_with_segment_ids_pads_them_as_their_own_segment(model: GPT) -> None:
    from thruput.kernels import compile as bucketed_compile

    x = torch.randint(0, 64, (2, 20))
    pos = torch.arange(20, 40).expand(2, 20)
    seg = torch.tensor([0] * 8 + [1] * 12).expand(2, 20)
    compiled = bucketed_compile(model.hidden, buckets=(32,), backend="eager")
    torch.testing.assert_close(compiled(x, pos, seg), model.hidden(x, pos, seg), atol=1e-5, rtol=1e-5)
