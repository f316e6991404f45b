"""The training loop of ``thruput bench profiler``, shared by its in-process and process arms.

Run as ``python -m thruput.benchmarks._profiler_workload RESULT.json --steps N [--threads T]
[--traceml]`` for one whole-process arm: it trains the demo GPT for N steps and writes each
step's wall and process CPU time (seconds) to RESULT.json. ``--traceml`` wraps each step in
``traceml_ai.trace_step(model)``, the instrumentation TraceML documents for a plain loop; the
process must then run under ``traceml run``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from thruput.models import GPT, GPTConfig

BATCH, SEQ = 8, 256


def make_workload(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer, Iterator[torch.Tensor]]:
    """The demo GPT (128 wide, 4 layers), AdamW, and an endless DataLoader of 8 x 257 tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=SEQ))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(torch.randint(0, 256, (8 * BATCH, SEQ + 1))), batch_size=BATCH)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            for (batch,) in loader:
                yield batch

    return model, opt, batches()


def train_step(model: GPT, opt: torch.optim.Optimizer, batches: Iterator[torch.Tensor]) -> None:
    """One plain step: fetch, forward and loss, backward, AdamW."""
    batch = next(batches)
    loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time is what a profiler costs even
    when other jobs share the cores: being descheduled adds wall time, not CPU time."""
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--traceml", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, opt, batches = make_workload()
    if args.traceml:
        import traceml_ai as traceml

        traceml.init(mode="auto")
        around: Callable[[], contextlib.AbstractContextManager] = lambda: traceml.trace_step(model)
    else:
        around = contextlib.nullcontext

    def step() -> None:
        with around():
            train_step(model, opt, batches)

    times = [timed(step) for _ in range(args.steps)]
    Path(args.result).write_text(json.dumps({"step_s": [w for w, _ in times], "cpu_s": [c for _, c in times]}))


if __name__ == "__main__":
    main()
