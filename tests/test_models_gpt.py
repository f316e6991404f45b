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
    from thruput.models.gpt import document_mask

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
