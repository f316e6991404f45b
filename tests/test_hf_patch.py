"""thruput.hf.patch: the fused loss equals the model's own, thruput batches fit, refusals change nothing."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import transformers as tf  # noqa: E402
from _hf_models import VOCAB, left_padded, pair, tiny  # noqa: E402

from thruput.data import Loader, MemorySource, Plan  # noqa: E402
from thruput.hf import hf_batch, patch  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32: the fused loss sums its chunks in another order


def _assert_grads_close(got: torch.nn.Module, want: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * float(q.grad.abs().max()), rtol=0, msg=name)


def _labels(seed: int = 0, shape: tuple[int, int] = (2, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, shape, generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt left out of the loss
    labels[1, 9:] = -100  # and padding
    return ids, labels


def _loader_batch() -> dict:
    docs = [f"doc {i}: " + "ab" * (3 + i % 11) for i in range(40)]
    plan = Plan([MemorySource("a", docs)], seq_len=32, tokens_per_batch=3 * 32, packing=True, seed=0)
    with Loader(plan, backend="inline", steps=1) as loader:
        return next(iter(loader))


# -- the loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])  # separate head, tied Conv1D model, tied + scaled
@pytest.mark.parametrize("num_items", [None, 11])
def test_fused_loss_and_gradients_equal_the_models_own(family: str, num_items: int | None) -> None:
    ref, model = pair(family)
    patch(model)
    ref.train()
    model.train()
    ids, labels = _labels()
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    out = model(input_ids=ids, labels=labels, **extra)
    want = ref(input_ids=ids, labels=labels, **extra)
    assert out.logits is None  # training with labels: the logits never existed in full
    torch.testing.assert_close(out.loss, want.loss, **TOL)
    out.loss.backward()
    want.loss.backward()
    _assert_grads_close(model, ref)


def test_gradient_accumulation_with_num_items_equals_one_big_batch() -> None:
    _, model = pair("llama")
    patch(model)
    model.train()
    big = copy.deepcopy(model)
    ids, labels = _labels(shape=(4, 16))
    labels[3, 4:] = -100  # the micro-batches hold different numbers of targets
    kept = (labels[:, 1:] != -100).sum()
    for rows in (slice(0, 1), slice(1, 4)):
        model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=kept).loss.backward()
    big(input_ids=ids, labels=labels).loss.backward()
    _assert_grads_close(model, big)


def test_shift_labels_keep_the_last_target_of_a_row() -> None:
    ref, model = pair("llama")
    patch(model)
    model.train()
    ids, _ = _labels()
    targets = torch.randint(0, VOCAB, ids.shape)  # every position, the last included, has a target
    logits = ref(input_ids=ids).logits
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(model(input_ids=ids, labels=ids, shift_labels=targets).loss, want, **TOL)


def test_label_smoothing_equals_trainers_label_smoother() -> None:
    from transformers.trainer_pt_utils import LabelSmoother

    ref, model = pair("llama")
    patch(model, label_smoothing=0.1)
    model.train()
    ids, labels = _labels()
    want = LabelSmoother(epsilon=0.1)(ref(input_ids=ids), labels, shift_labels=True)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want, **TOL)


def test_logits_in_eval_on_request_and_without_labels() -> None:
    ref, model = pair("llama")
    patch(model)
    ids, labels = _labels()
    want = ref(input_ids=ids, labels=labels)
    evaluated = model(input_ids=ids, labels=labels)  # eval mode: logits and the same loss
    torch.testing.assert_close(evaluated.logits, want.logits, **TOL)
    torch.testing.assert_close(evaluated.loss, want.loss, **TOL)
    model.train()
    asked = model(input_ids=ids, labels=labels, return_logits=True)
    torch.testing.assert_close(asked.logits, want.logits, **TOL)
    torch.testing.assert_close(model(input_ids=ids).logits, want.logits, **TOL)
    torch.testing.assert_close(model(ids).logits, want.logits, **TOL)  # positional, as in the original
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], want.loss, **TOL)


def test_generate_gives_the_same_tokens() -> None:
    """Greedy, a batch with left padding (the dense-mask path) and past the sliding window."""
    ref, model = pair("mistral")
    patch(model)
    ids, mask = left_padded(2, 5, pad=2)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, **options),
                       ref.generate(ids, attention_mask=mask, **options))
    assert torch.equal(model.generate(ids[:1], **options), ref.generate(ids[:1], **options))


# -- thruput batches ------------------------------------------------------------------------

def _alone_loss(ref: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Each document piece of the batch run alone through the unpatched model; mean over targets."""
    b, t = batch["input_ids"].shape
    flat = {k: batch[k].flatten() for k in ("input_ids", "shift_labels", "position_ids")}
    cu = batch["cu_seqlens"].tolist()
    total = torch.zeros(())
    for start, end in zip(cu[:-1], cu[1:]):
        logits = ref(input_ids=flat["input_ids"][None, start:end],
                     position_ids=flat["position_ids"][None, start:end]).logits[0]
        total = total + F.cross_entropy(logits, flat["shift_labels"][start:end], reduction="sum")
    return total / (batch["shift_labels"] != -100).sum()


def test_thruput_batch_fits_patched_and_unpatched_models() -> None:
    batch = _loader_batch()
    assert (batch["shift_labels"][:, -1] != -100).any()  # a document continues in the next row
    ref, model = pair("llama")
    want = _alone_loss(ref, batch)
    patch(model)
    model.train()
    torch.testing.assert_close(model(**batch).loss, want, **TOL)
    ref.train()
    torch.testing.assert_close(ref(**hf_batch(batch)).loss, want, **TOL)  # transformers' own packing


def test_a_raw_loader_batch_never_gets_its_targets_shifted_twice() -> None:
    """The Loader's targets are ``shift_labels``: an unpatched model given the raw batch computes
    no loss (it would shift ``labels`` again), and ``labels`` added to a Loader batch is refused."""
    batch = _loader_batch()
    assert "labels" not in batch
    ref, model = pair("llama")
    ref.train()
    raw = {k: v for k, v in batch.items() if k in ("input_ids", "shift_labels", "position_ids")}
    assert ref(**raw).loss is None
    patch(model)
    with pytest.raises(TypeError, match=r"\['labels'\] given both by the thruput batch and separately"):
        model(**batch, labels=batch["shift_labels"])
    with pytest.raises(ValueError, match="'labels'.* not keys of a thruput Loader batch"):
        hf_batch({**batch, "labels": batch["shift_labels"]})


def test_patched_model_refuses_unknown_keys() -> None:
    _, model = pair("llama")
    patch(model)
    ids, labels = _labels()
    with pytest.raises(TypeError, match=r"\['colour'\]"):
        model(input_ids=ids, labels=labels, colour="red")
    with pytest.raises(ValueError, match=r"\['colour'\]"):
        hf_batch({**_loader_batch(), "colour": "red"})
    with pytest.raises(TypeError, match=r"\['colour'\]"):
        model(**_loader_batch(), colour="red")


# -- patch itself ---------------------------------------------------------------------------

def _state(model: torch.nn.Module) -> tuple:
    return ("forward" in model.__dict__, model.config._attn_implementation, id(model.config))


def test_unsupported_architecture_is_refused_with_the_list() -> None:
    model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=VOCAB, word_embed_proj_dim=64))
    before = _state(model)
    with pytest.raises(TypeError, match=r"OPTForCausalLM.*supported: .*GPT2LMHeadModel.*LlamaForCausalLM"):
        patch(model)
    assert _state(model) == before


def test_soft_capped_logits_refuse_the_fused_loss_and_change_nothing() -> None:
    model = tiny("gemma2", final_logit_softcapping=30.0)
    before = _state(model)
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0.*loss=False"):
        patch(model)
    assert _state(model) == before
    patch(model, loss=False)  # attention alone is fine; the model keeps its soft-capped loss
    assert model.config._attn_implementation == "thruput"


def test_patch_twice_and_per_instance() -> None:
    config = tiny("llama").config
    first, second = tf.LlamaForCausalLM(config), tf.LlamaForCausalLM(config)  # one config object
    assert patch(first) is first
    assert patch(first) is first  # the same options again: nothing to do
    with pytest.raises(ValueError, match="already patched"):
        patch(first, loss=False)
    assert second.config._attn_implementation == "sdpa" and "forward" not in second.__dict__
    clone = copy.deepcopy(first)
    assert clone.forward.model is clone  # a copy of a patched model is patched itself


def test_levers_switch_off_separately() -> None:
    ref, model = pair("llama")
    patch(model, attention=False)
    model.train()
    ids, labels = _labels()
    assert model.config._attn_implementation == "sdpa"
    assert model(input_ids=ids, labels=labels).logits is None
    _, other = pair("llama")
    patch(other, loss=False)
    other.train()
    out = other(input_ids=ids, labels=labels)
    assert other.config._attn_implementation == "thruput" and out.logits is not None
    torch.testing.assert_close(out.loss, ref.train()(input_ids=ids, labels=labels).loss, **TOL)


def test_lora_trains_only_adapters_with_the_unpatched_loss() -> None:
    peft = pytest.importorskip("peft")
    ids, labels = _labels()
    base = tiny("llama")
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.load_state_dict(ref.state_dict())
    assert patch(model) is model
    ref.train()
    model.train()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss,
                               **TOL)
    batch = _loader_batch()
    torch.testing.assert_close(model(**batch).loss, ref(**hf_batch(batch)).loss, **TOL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_gradient_checkpointing_and_autocast() -> None:
    ref, model = pair("llama")
    patch(model)
    ids, labels = _labels()
    for m in (ref, model):
        m.activation_checkpointing_enable()
        m.train()
    model(input_ids=ids, labels=labels).loss.backward()
    ref(input_ids=ids, labels=labels).loss.backward()
    _assert_grads_close(model, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # bf16 logits


def test_thruput_does_not_import_transformers_and_a_missing_extra_says_what_to_install() -> None:
    code = ("import sys, thruput\nthruput.linear_cross_entropy, thruput.Loader\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "sys.modules['transformers'] = None  # as if the extra were not installed\n"
            "import thruput.hf\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ImportError: thruput.hf needs transformers >= 5: pip install 'thruput[hf]'" in done.stderr, done.stderr


def test_hf_batch_makes_a_continued_piece_boundary_visible_to_an_unpatched_model() -> None:
    from thruput.hf import hf_batch

    # Row 0: a piece ending at position 2, then a continued piece at 3, 4, 5 (the positions
    # alone merge them); row 1: a continued piece at 7, 8 after a document at 0..3 (visible).
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 7, 8]])
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3]], dtype=torch.int32)
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "position_ids": position_ids,
             "segment_ids": segment_ids, "cu_seqlens": torch.tensor([0, 3, 6, 10, 12], dtype=torch.int32)}
    out = hf_batch(batch)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 7, 8]]
    assert "segment_ids" not in out
