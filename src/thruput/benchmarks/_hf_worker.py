"""One arm of ``thruput bench hf`` in a fresh process: train, score on the held-out documents.

Run as ``python -m thruput.benchmarks._hf_worker ARM SPEC.json`` (``hf.py`` writes the spec:
the workload, the data files, the shared training set). Prints one JSON line: the arm's step
end times and labelled targets per step, padding, peak memory growth and held-out loss.

Peak memory is the growth of the process's peak RSS (``ru_maxrss``; on CUDA
``max_memory_allocated``) over what it holds once the model exists: optimizer states,
gradients, activations, logits and the arm's data pipeline, as ``_kernels_ce_worker`` measures
it. A fresh process per arm keeps one arm's peak from hiding another's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from thruput.benchmarks._hf_arms import held_out_loss, train_hf, train_thruput
from thruput.benchmarks._hf_setup import Data, Workload, load_documents, thruput_plan
from thruput.benchmarks._kernels_ce_worker import _memory_now, _peak

ARMS = ("hf_default", "hf_best", "thruput")


def build_model(work: Workload, vocab_size: int) -> torch.nn.Module:
    """The random-init Llama of ``work`` (the same weights in every arm: seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(work.seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=work.seq_len, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None, attention_dropout=0.0, **work.model)
    config.use_cache = False  # training: a cache would also turn off transformers' packed-sequence masks
    return LlamaForCausalLM(config)


def run_arm(arm: str, spec: dict[str, Any]) -> dict[str, Any]:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    work = Workload(**spec["work"])
    data = Data(Path(spec["tokenizer"]), {k: Path(v) for k, v in spec["sources"].items()}, Path(spec["held_out_text"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(work, spec["vocab_size"]).to(device)
    baseline = _memory_now(device)
    if arm == "thruput":
        log = train_thruput(model, thruput_plan(work, data), work)
    else:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data.tokenizer), pad_token="<pad>", eos_token="<eos>")
        log = train_hf(arm, model, load_documents(Path(spec["train"])), work, tokenizer)
    peak = _peak(device) - baseline
    loss = held_out_loss(model.cpu(), load_documents(Path(spec["held_out"])), pad_id=0)
    return {"arm": arm, **log.summary(), "peak_delta_bytes": peak, "held_out_loss": loss,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    arm_name, spec_path = sys.argv[1:]
    print(json.dumps(run_arm(arm_name, json.loads(Path(spec_path).read_text()))))
