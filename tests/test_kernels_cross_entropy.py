"""linear_cross_entropy: parity with F.cross_entropy(hidden @ W.T, labels), options, errors."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from thruput.kernels import default_chunk_size, linear_cross_entropy

FP32_RTOL = 1e-5
# bf16 inputs: the logits are a bf16 matmul and d hidden is a bf16 matmul of a bf16-rounded
# gradient, so each carries ~2^-8 relative rounding; the fp32 reference sees the same inputs.
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_RTOL = 3e-2


def naive(hidden, weight, labels, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    logits = (hidden @ weight.T).float()
    flat = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    loss = F.cross_entropy(flat, y, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    keep = y != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(flat, dim=-1).pow(2) * keep
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss.sum() / keep.sum() if reduction == "mean" else loss.sum()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(shape, d, vocab, dtype=torch.float32, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, labels


def grads(loss, hidden, weight, seed=1):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(loss.shape, generator=g) if loss.dim() else torch.tensor(1.7)
    return torch.autograd.grad(loss, (hidden, weight), grad_out)


CASES = [  # (token shape, d, vocab, chunk_size, ignore_index, smoothing, z_loss)
    ((37,), 16, 53, 8, -100, 0.0, 0.0),
    ((3, 11), 24, 100, 7, -100, 0.1, 0.0),
    ((2, 9), 8, 257, None, -100, 0.0, 1e-3),
    ((64,), 32, 31, 64, -100, 0.3, 1e-2),
    ((5, 6), 16, 40, 1, 3, 0.05, 1e-4),  # a non-default ignore_index that is also a valid id
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
def test_fp32_parity_with_naive(case, reduction):
    shape, d, vocab, chunk, ignore_index, smoothing, z_loss = case
    hidden, weight, labels = make(shape, d, vocab, seed=len(shape) + vocab)
    if ignore_index != -100:
        labels[labels == -100] = ignore_index
    kw = dict(ignore_index=ignore_index, label_smoothing=smoothing, z_loss=z_loss, reduction=reduction)
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, impl="torch", **kw)
    ref = naive(hidden, weight, labels, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel(out, ref) <= FP32_RTOL
    for got, want in zip(grads(out, hidden, weight), grads(ref, hidden, weight)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) <= FP32_RTOL
    if reduction == "none":
        assert torch.all(out[labels == ignore_index] == 0)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=2).map(tuple),
    d=st.integers(1, 24),
    vocab=st.integers(2, 300),
    chunk=st.one_of(st.none(), st.integers(1, 40)),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.9]),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    z_loss=st.sampled_from([0.0, 1e-3]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_fp32_parity_on_random_shapes(shape, d, vocab, chunk, ignore_frac, smoothing, z_loss, reduction, seed):
    hidden, weight, labels = make(shape, d, vocab, ignore_frac=ignore_frac, seed=seed)
    if not (labels != -100).any():
        labels.view(-1)[0] = 0  # keep one token: with none kept "mean" is nan (tested elsewhere)
    kw = dict(label_smoothing=smoothing, z_loss=z_loss, reduction=reduction)
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk, impl="torch", **kw)
    ref = naive(hidden, weight, labels, **kw)
    assert out.shape == ref.shape
    assert rel(out, ref) <= FP32_RTOL
    for got, want in zip(grads(out, hidden, weight, seed), grads(ref, hidden, weight, seed)):
        # Random shapes include near-cancelling gradients (e.g. smoothing 1.0 over 2 classes:
        # p - 1/2 with p ~ 1/2), where a relative norm only measures the cancellation; there
        # the differences must stay at fp32 rounding of the O(1) terms (atol 1e-6).
        assert rel(got, want) <= FP32_RTOL or torch.allclose(got, want, rtol=FP32_RTOL, atol=1e-6)


def test_empty_input_matches_torch():
    hidden, weight, labels = make((0,), 4, 6)
    for reduction in ("mean", "sum", "none"):
        out = linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        ref = F.cross_entropy(hidden @ weight.T, labels, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)
    dh, dw = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, reduction="sum"), (hidden, weight))
    assert dh.shape == (0, 4) and torch.count_nonzero(dw) == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_against_fp32_reference(reduction):
    hidden, weight, labels = make((4, 16), 32, 96, dtype=torch.bfloat16)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    out = linear_cross_entropy(hidden, weight, labels, chunk_size=24, impl="torch", **kw)
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = naive(h32, w32, labels, **kw)
    assert out.dtype == torch.float32
    assert rel(out, ref) <= BF16_LOSS_RTOL
    got = grads(out, hidden, weight)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.bfloat16]
    for g, want in zip(got, grads(ref, h32, w32)):
        assert rel(g.float(), want) <= BF16_GRAD_RTOL


def test_chunking_does_not_change_result():
    hidden, weight, labels = make((50,), 16, 70)
    outs = [linear_cross_entropy(hidden, weight, labels, chunk_size=c, impl="torch") for c in (1, 7, 50, 999)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=0)


def test_all_ignored_matches_torch():
    hidden, weight, labels = make((6,), 8, 10, ignore_frac=1.0)
    out = linear_cross_entropy(hidden, weight, labels)
    ref = naive(hidden, weight, labels)
    assert torch.isnan(out) and torch.isnan(ref)
    for g in grads(out, hidden, weight):
        assert torch.count_nonzero(g) == 0
    assert linear_cross_entropy(hidden, weight, labels, reduction="sum").item() == 0.0


def test_frozen_weight_and_no_grad():
    hidden, weight, labels = make((12,), 8, 20)
    weight.requires_grad_(False)
    out = linear_cross_entropy(hidden, weight, labels)
    (dh,) = torch.autograd.grad(out, (hidden,))
    (ref_dh,) = torch.autograd.grad(naive(hidden, weight, labels), (hidden,))
    assert rel(dh, ref_dh) <= FP32_RTOL
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, labels)
    assert not out.requires_grad
    assert rel(out, naive(hidden, weight, labels)) <= FP32_RTOL


def test_traceable_by_torch_compile_fullgraph():
    hidden, weight, labels = make((2, 5), 8, 12)

    def loss_fn(h, w, y):
        return linear_cross_entropy(h, w, y, label_smoothing=0.1, chunk_size=4, impl="torch")

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    out = compiled(hidden, weight, labels)
    assert rel(out, naive(hidden, weight, labels, label_smoothing=0.1)) <= FP32_RTOL
    for got, want in zip(grads(out, hidden, weight), grads(loss_fn(hidden, weight, labels), hidden, weight)):
        assert rel(got, want) <= FP32_RTOL


def test_default_chunk_size():
    assert default_chunk_size(256) == 4096
    assert default_chunk_size(32768) == 256
    assert default_chunk_size(131072) == 256  # floor: smaller chunks make the matmuls slow
    assert default_chunk_size(10**7) == 256


@pytest.mark.parametrize("mutate, match", [
    (lambda h, w, y: (h[..., :-1], w, y), "last dim"),
    (lambda h, w, y: (h, w, y[:-1]), "labels shape"),
    (lambda h, w, y: (h, w[None], y), "weight must be"),
    (lambda h, w, y: (h.double(), w, y), "dtype"),
    (lambda h, w, y: (h, w, y.float()), "integer"),
    (lambda h, w, y: (h, w, torch.where(torch.arange(y.numel()) == 3, 10, y)), r"labels\[3\] = 10"),
    (lambda h, w, y: (h, w, torch.where(torch.arange(y.numel()) == 2, -1, y)), r"labels\[2\] = -1"),
])
def test_bad_inputs_raise(mutate, match):
    h, w, y = mutate(*make((8,), 4, 10, ignore_frac=0.0))
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(h, w, y)


@pytest.mark.parametrize("kw, match", [
    ({"reduction": "avg"}, "reduction"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"z_loss": -1.0}, "z_loss"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"impl": "cuda"}, "impl"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*make((4,), 4, 6), **kw)


_TRITON_PARITY = textwrap.dedent("""
    import torch
    from thruput.kernels import linear_cross_entropy
    torch.manual_seed(0)
    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm()).item()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for reduction in ("mean", "sum", "none"):
            for smoothing, z_loss in ((0.0, 0.0), (0.2, 1e-2)):
                h = torch.randn(13, 8).to(dtype).requires_grad_()
                w = torch.randn(37, 8).to(dtype).requires_grad_()
                y = torch.randint(0, 37, (13,))
                y[::4] = -100
                res = []
                for impl in ("torch", "triton"):
                    out = linear_cross_entropy(h, w, y, label_smoothing=smoothing, z_loss=z_loss,
                                               reduction=reduction, chunk_size=5, impl=impl)
                    g = torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
                    res.append((out, *torch.autograd.grad(out, (h, w), g)))
                for name, a, b in zip(("loss", "dh", "dw"), res[1], res[0]):
                    err = rel(a.float(), b.float())
                    assert err <= tol, (dtype, reduction, smoothing, z_loss, name, err)
    # vocabularies wider than one block (4096 fp32, 8192 bf16): the online max/sum across blocks
    for dtype, vocab, tol in ((torch.float32, 4100, 1e-5), (torch.bfloat16, 8300, 2e-2)):
        h = (3 * torch.randn(4, 8)).to(dtype).requires_grad_()
        w = torch.randn(vocab, 8).to(dtype).requires_grad_()
        y = torch.tensor([0, vocab - 1, -100, 4097])
        res = []
        for impl in ("torch", "triton"):
            out = linear_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=1e-3, impl=impl)
            res.append((out, *torch.autograd.grad(out, (h, w))))
        for name, a, b in zip(("loss", "dh", "dw"), res[1], res[0]):
            err = rel(a.float(), b.float())
            assert err <= tol, (dtype, vocab, name, err)
    print("OK")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_torch_under_interpreter():
    # TRITON_INTERPRET must be set before triton is imported, hence a fresh interpreter
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_PARITY], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_on_cuda_matches_naive(dtype, tol):
    hidden, weight, labels = make((4, 256), 64, 1000, dtype=dtype)
    hidden, weight, labels = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (hidden, weight, labels))
    out = linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1, z_loss=1e-4, impl="auto")
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = naive(h32, w32, labels, label_smoothing=0.1, z_loss=1e-4)
    assert rel(out, ref) <= tol
    for got, want in zip(grads(out, hidden, weight), grads(ref, h32, w32)):
        assert rel(got.float(), want) <= tol
