"""The memory planner: parsing, the formulas, predictions against measurement, properties."""
from __future__ import annotations

import gc

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from thruput.memory import OffloadAdamW, largest_model, parse_bytes, plan, render_plan
from thruput.errors import InputError
from thruput.memory.plan import SPEED_ORDER, format_bytes, infer_shape, parse_count
from thruput.models import GPT, GPTConfig


@pytest.mark.parametrize("text, value", [
    ("24GiB", 24 * 2**30), ("512MB", 512_000_000), ("1.5TB", 1_500_000_000_000), ("100B", 100),
    ("2 gib", 2 * 2**30), ("1.5e1GB", 15 * 10**9), (7e9, 7_000_000_000), (2**30, 2**30), ("64KiB", 65536),
])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text, match", [
    ("24", "'24' has no unit: write e.g. 24GiB"), ("7e9", "no unit"), ("24G", "ambiguous: write 24GiB"),
    ("1.5t", "ambiguous"), ("", "cannot parse"), ("GiB", "cannot parse"), ("12 parsecs", "cannot parse"),
    ("-1GB", "cannot parse"), ("1e400GB", ">= 0"), ("nan", "cannot parse"), ("7B params", "cannot parse"),
])
def test_parse_bytes_needs_a_memory_unit(text, match):
    with pytest.raises(InputError, match=match):
        parse_bytes(text)


@pytest.mark.parametrize("text, value", [
    ("7B", 7 * 10**9), ("7b", 7 * 10**9), ("350M", 350 * 10**6), ("1.5k", 1500), ("2T", 2 * 10**12),
    ("7e9", 7 * 10**9), ("7G", 7 * 10**9), ("125000", 125_000), (7e9, 7 * 10**9), (" 13 B ", 13 * 10**9),
])
def test_parse_count_reads_k_m_b_t_suffixes(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["7GB", "7GiB", "seven", "", "-7B", "7 billion"])
def test_parse_count_rejects_sizes_and_words(text):
    with pytest.raises(InputError):
        parse_count(text)


def test_formulas_for_a_7b_model():
    n = 7_000_000_000
    result = plan(n, device_memory=parse_bytes("24GiB"), host_memory=parse_bytes("256GiB"), dtype="bf16",
                  batch_size=1, seq_len=2048, d_model=4096, n_layers=32)
    none, off, ckpt = result["no_offload"], result["offload"], result["offload+ckpt"]
    assert none.device_bytes - none.device_parts["activations"] == 16 * n  # 2 + 2 + 4 + 8
    assert off.device_parts["params"] == 2 * n and off.device_parts["grads_in_flight"] == 32 * 2**20
    assert off.host_bytes == 20 * n  # 4 master + 8 states + 4 fp32 grads + 2 + 2 pinned staging
    assert none.device_parts["activations"] == 1 * 2048 * 4096 * 32 * 34
    assert ckpt.device_parts["activations"] == 2048 * 4096 * 32 * 2 + 2048 * 4096 * 34
    assert not none.fits and off.fits and result.best == "offload"
    assert not result["offload+zero2"].applicable and not result["offload+zero2"].fits
    int8 = plan(n, device_memory=2**40, host_memory=2**50, state_dtype="int8", dtype="bf16")
    assert int8["offload"].host_parts["states"] == int(n * (2 + 8 / 256))


def test_zero2_divides_host_state_by_world_size():
    one = plan(1e9, device_memory=2**40, host_memory=2**50, world_size=1)["offload"]
    z = plan(1e9, device_memory=2**40, host_memory=2**50, world_size=4, gpus_per_host=1)["offload+zero2"]
    assert z.host_bytes == one.host_bytes // 4
    assert z.device_parts["grad_shards"] == 2 * 10**9 // 4


def test_model_argument_counts_unique_trainable_params_and_reads_the_shape():
    model = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
    model.embed.weight.requires_grad_(False)
    result = plan(model, device_memory=2**30, host_memory=2**30, dtype="fp32")
    total = sum(p.numel() for p in model.parameters())
    assert (result.n_params, result.n_trainable) == (total, total - 64 * 32)
    assert (result.d_model, result.n_layers) == (32, 2)


def test_infer_shape_follows_the_llama_aspect_ratio():
    assert infer_shape(12 * 32 * 4096**2) == (4096, 32)
    assert infer_shape(10**9, d_model=2048) == (2048, 20)


@pytest.mark.parametrize("model_dtype, state_dtype", [
    (torch.float32, "fp32"), (torch.float32, "bf16"), (torch.bfloat16, "fp32"), (torch.bfloat16, "int8"),
])
def test_host_prediction_equals_offload_optimizer_bytes(model_dtype, state_dtype):
    """The planner's host bytes for ``offload`` (device_type='cpu') are what OffloadAdamW
    allocates for the small GPT; int8 differs only by the per-bucket rounding of 256-blocks."""
    model = GPT(GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)).to(model_dtype)
    dtype = "fp32" if model_dtype == torch.float32 else "bf16"
    opt = OffloadAdamW(model.parameters(), state_dtype=state_dtype, bucket_mb=0.05, impl="torch")
    predicted = plan(model, device_memory=2**30, host_memory=2**30, dtype=dtype, state_dtype=state_dtype,
                     device_type="cpu")["offload"].host_bytes
    if state_dtype == "int8":
        assert 0 <= opt.host_bytes() - predicted <= 8 * len(opt.segments)
    else:
        assert opt.host_bytes() == predicted


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_adamw_step_memory_growth_matches_the_no_offload_prediction():
    """A real fp32 torch AdamW step: the gradients and the two states appear, 12 B/param on
    top of the parameters (the ``no_offload`` strategy minus params and activations), within 10%
    (process RSS; allocator slack and page granularity make up the rest)."""
    torch.manual_seed(0)
    # 36 MiB tensors: above glibc's largest mmap threshold, so every new buffer is fresh pages
    # (not heap memory that earlier tests freed) and shows up in RSS.
    params = [nn.Parameter(torch.randn(3072, 3072)) for _ in range(4)]
    predicted = plan(sum(p.numel() for p in params), device_memory=2**40, host_memory=2**40, dtype="fp32",
                     device_type="cpu")["no_offload"]
    expected = predicted.device_parts["grads"] + predicted.device_parts["states"]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gc.collect()
    before = _rss()
    for p in params:
        p.sum().backward()  # a gradient per parameter and no activations
    opt.step()
    grown = _rss() - before
    assert abs(grown - expected) <= 0.10 * expected, (grown, expected)


_sizes = st.integers(min_value=10**6, max_value=10**12)


@settings(max_examples=60, deadline=None)
@given(n1=_sizes, n2=_sizes, world=st.integers(1, 64), dtype=st.sampled_from(["bf16", "fp16", "fp32"]),
       state_dtype=st.sampled_from(["fp32", "bf16", "int8"]))
def test_predictions_grow_with_the_parameter_count(n1, n2, world, dtype, state_dtype):
    lo, hi = sorted((n1, n2))
    shape = {"d_model": 1024, "n_layers": 16, "world_size": world, "dtype": dtype, "state_dtype": state_dtype}
    a = plan(lo, device_memory=2**40, host_memory=2**50, **shape)
    b = plan(hi, device_memory=2**40, host_memory=2**50, **shape)
    for sa, sb in zip(a.strategies, b.strategies):
        assert sa.device_bytes <= sb.device_bytes and sa.host_bytes <= sb.host_bytes


@settings(max_examples=60, deadline=None)
@given(n=_sizes, w1=st.integers(2, 256), w2=st.integers(2, 256))
def test_zero2_host_bytes_per_rank_shrink_with_world_size(n, w1, w2):
    lo, hi = sorted((w1, w2))
    per_rank = [plan(n, device_memory=2**40, host_memory=2**50, world_size=w, gpus_per_host=1)["offload+zero2"]
                for w in (lo, hi)]
    assert per_rank[1].host_bytes <= per_rank[0].host_bytes
    assert per_rank[1].device_bytes <= per_rank[0].device_bytes


@settings(max_examples=80, deadline=None)
@given(n=_sizes, dev=st.integers(2**30, 2**40), host=st.integers(2**30, 2**42), world=st.integers(1, 16),
       batch=st.integers(1, 16), ckpt_extra=st.integers(0, 2**36))
def test_fits_and_best_are_consistent(n, dev, host, world, batch, ckpt_extra):
    result = plan(n, device_memory=dev, host_memory=host, world_size=world, batch_size=batch, seq_len=1024)
    for s in result.strategies:
        assert s.fits == (s.applicable and s.device_bytes <= dev and s.host_bytes <= host)
        assert s.device_bytes == sum(s.device_parts.values()) and s.host_bytes == sum(s.host_parts.values())
        assert result[s.name.removesuffix("+ckpt") + "+ckpt"].device_bytes <= s.device_bytes  # ckpt never costs more
    fitting = [name for name in SPEED_ORDER if result[name].fits]
    assert result.best == (fitting[0] if fitting else None)
    # more device memory never makes a fitting strategy stop fitting
    bigger = plan(n, device_memory=dev + ckpt_extra, host_memory=host, world_size=world, batch_size=batch,
                  seq_len=1024)
    assert all(bigger[name].fits for name in fitting)


def test_bad_input_and_rendering():
    for kwargs, match in [({"world_size": 0}, "world_size"), ({"dtype": "fp8"}, "dtype"),
                          ({"state_dtype": "fp4"}, "state_dtype"), ({"seq_len": -1}, "seq_len"),
                          ({"device_memory": 0}, "device_memory")]:
        args = {"device_memory": 2**30, "host_memory": 2**30, **kwargs}
        with pytest.raises(ValueError, match=match):
            plan(1e9, **args)
    with pytest.raises(ValueError, match="parameter count"):
        plan(0, device_memory=2**30)
    table = render_plan(plan(1e9, device_memory=2**34, host_memory=2**36, world_size=2))
    assert table.row_count == 6 and "fastest that fits" in str(table.caption)


def test_estimate_cli_prints_the_table(capsys):
    from thruput.cli import main

    assert main(["estimate", "--params", "7e9", "--device-memory", "24GiB", "--host-memory", "256GiB"]) == 0
    out = capsys.readouterr().out
    assert "offload+zero2+ckpt" in out and "fastest that fits: offload" in out
    assert main(["estimate", "--params", "lots", "--device-memory", "24GiB"]) == 2
    assert "cannot parse 'lots'" in capsys.readouterr().err


def test_estimate_reads_7b_as_seven_billion_and_needs_a_memory_unit(capsys):
    from thruput.cli import main

    assert main(["estimate", "--params", "7B", "--device-memory", "24GiB", "--host-memory", "256GiB"]) == 0
    out = capsys.readouterr().out
    assert "7B params" in out and "fastest that fits: offload" in out
    assert main(["estimate", "--params", "7B", "--device-memory", "24"]) == 2
    err = capsys.readouterr().err
    assert err == "thruput estimate: '24' has no unit: write e.g. 24GiB (2^30 bytes) or 24GB (10^9 bytes)\n"


def test_nothing_fits_names_the_closest_strategy_and_the_limit_it_exceeds():
    result = plan(70e9, device_memory=24 * 2**30, host_memory=2**50, dtype="bf16", seq_len=2048)
    assert result.best is None
    closest = result["offload+ckpt"]  # the smallest device overshoot; the host has room
    over = closest.device_bytes - 24 * 2**30
    assert result.headline() == (f"nothing fits; closest is offload+ckpt: device {format_bytes(closest.device_bytes)}"
                                 f" > 24.0 GiB ({format_bytes(over)} over)")
    host_bound = plan(7e9, device_memory=2**40, host_memory=2**30)  # no_offload fits the device
    assert host_bound.best == "no_offload"
    starved = plan(7e9, device_memory=20 * 2**30, host_memory=100 * 2**30, dtype="bf16")  # 130 GiB of host states
    assert starved.best is None and starved.headline().startswith("nothing fits; closest is offload+ckpt: host ")
    assert "device" not in starved.headline()


def test_largest_model_ratio_is_bounded_by_the_model_states_and_shrinks_with_activations():
    """ZeRO-Offload's accounting: 16 B/param on the device without offload, 2 with it, so the
    largest-model ratio is at most 8; the activations and the gradient bucket, which both arms
    need, push it below 8, checkpointing brings it back towards 8."""
    from thruput.benchmarks.offload import largest_models

    device = 80 * 2**30
    tiny_acts = largest_models(device, batch=1, seq_len=1)["ckpt_off"]
    assert 7.99 < tiny_acts["ratio"] <= 8.0
    rows = largest_models(device, batch=4, seq_len=256)
    assert rows["ckpt_off"]["ratio"] < rows["ckpt_on"]["ratio"] < 8.0
    with pytest.raises(KeyError, match="no strategy"):
        largest_model("fastest", device_memory=device)
    for key, suffix in (("ckpt_off", ""), ("ckpt_on", "+ckpt")):
        for arm in ("no_offload", "offload"):
            n = rows[key][arm]
            args = dict(device_memory=device, host_memory=2**50, batch_size=4, seq_len=256)
            assert plan(n, **args)[arm + suffix].fits and not plan(int(n * 1.002), **args)[arm + suffix].fits
        # activations grow with the model: the offload arm's model is bigger, so are they
        assert rows[key]["offload_activation_bytes"] > rows[key]["no_offload_activation_bytes"]


def test_offload_device_gradients_hold_at_least_the_largest_parameter_gradient():
    model = nn.Sequential(nn.Embedding(1_000_000, 64, device="meta"), nn.Linear(64, 64, device="meta"))
    off = plan(model, device_memory=2**40, host_memory=2**50, dtype="bf16")["offload"]
    assert off.device_parts["grads_in_flight"] == 2 * 64_000_000  # > the 32 MiB bucket
    small = plan(nn.Linear(64, 64, device="meta"), device_memory=2**40, host_memory=2**50, dtype="bf16")
    assert small["offload"].device_parts["grads_in_flight"] == 2 * (64 * 64 + 64)  # all of T*p < bucket
