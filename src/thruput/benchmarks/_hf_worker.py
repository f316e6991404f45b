"""One training step variant of a transformers Llama on packed rows, in a fresh process.

Run as ``python -m thruput.benchmarks._hf_worker VARIANT DEVICE ROWS SEQ_LEN REPS``; prints one
JSON line: forward+backward times (wall, and CPU time of the process: steadier on a shared
machine), peak memory growth over the memory held once the model, its
gradients and the batch exist (as ``_kernels_ce_worker`` measures it), and the loss.

Variants: ``sdpa`` and ``eager`` are the unpatched model fed ``hf_batch(batch)`` (transformers'
own packed-sequence handling: a block-diagonal mask from the restarting ``position_ids``);
``thruput`` is ``patch(model)``; ``thruput_loss`` / ``thruput_attention`` switch one lever on.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from thruput.benchmarks._kernels_ce_worker import _memory_now, _peak, _sync

VOCAB = 32000


def packed_batch(rows: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Loader-style batch: documents of lengths ~ lognormal (median ~200 tokens) packed in order,
    the last one of a row cut and continued in the next; labels shifted, -100 at document ends."""
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, VOCAB, (rows, seq_len + 1)))
    labels = ids[:, 1:].clone()
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    cu = [0]
    for r in range(rows):
        t = 0
        while t < seq_len:
            n = min(int(np.clip(rng.lognormal(5.3, 0.9), 16, 4 * seq_len)), seq_len - t)
            position_ids[r, t:t + n] = torch.arange(n)
            if t + n < seq_len:
                labels[r, t + n - 1] = -100  # a document's last token has no target
            t += n
            cu.append(r * seq_len + t)
    return {"input_ids": ids[:, :-1].contiguous(), "shift_labels": labels, "position_ids": position_ids,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": int(np.diff(cu).max())}


def _model(variant: str, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from thruput.hf import patch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to(device).train()
    if variant == "eager":
        model.set_attn_implementation("eager")
    elif variant.startswith("thruput"):
        patch(model, loss=variant != "thruput_attention", attention=variant != "thruput_loss")
    elif variant != "sdpa":
        raise ValueError(f"unknown variant {variant!r}")
    return model


def measure(variant: str, device: str, rows: int, seq_len: int, reps: int) -> dict:
    from thruput.hf import hf_batch

    dev = torch.device(device)
    model = _model(variant, dev)

    def on_device(rows: int, seq_len: int) -> dict:
        return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in hf_batch(packed_batch(rows, seq_len)).items()}

    model(**on_device(1, 64)).loss.backward()  # warm-up: thread pools, lazy init, the gradients
    batch = on_device(rows, seq_len)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = _memory_now(dev)  # parameters and their gradients exist from the warm-up on
    times, cpu_times, loss = [], [], torch.zeros(())
    for _ in range(reps):
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"variant": variant, "device": device, "times_s": times, "cpu_times_s": cpu_times,
            "peak_delta_bytes": _peak(dev) - baseline,
            "loss": float(loss.detach()), "documents": len(batch["cu_seq_lens_q"]) - 1}


if __name__ == "__main__":
    name, dev_name, *nums = sys.argv[1:]
    print(json.dumps(measure(name, dev_name, *(int(n) for n in nums))))
