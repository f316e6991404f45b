"""One rank of ``thruput bench stragglers`` (and of its tests): a tiny data-parallel step under
torchrun (gloo), profiled by ``StepProfiler``, with a slowdown planted on one rank.

Every rank sleeps ``--base`` seconds in its forward (a step of known length, so the planted
ratio is well defined on a loaded machine), reduces the loss scale and the gradients with
thruput's own collectives (``backward_global_mean``'s all-reduce and ``GradientBuckets``),
and writes ``OUT/NAME-rankR.json``. Planted on ``--slow-rank`` in every ``--every``-th step
after the warm-up step, by ``--case``:

* ``sleep``: ``--extra`` more seconds in its forward;
* ``clock``: the same, while its clock source (``FakeClock``, the only source every case
  samples) reports a frequency drop with a throttle reason;
* ``data``: ``--extra`` seconds inside its loader's ``next()``;
* ``clean``: nothing.

``--overhead-rounds R`` instead alternates rounds with and without the per-rank recorder
(``StepProfiler(collectives=...)``; the arm that goes first alternates) and rank 0 writes
``OUT/overhead.json``: the median step time of each arm per round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from thruput.comm import GradientBuckets
from thruput.profile import ClockSampler, StepProfiler, run_document, save_json
from thruput.train import backward_global_mean

FULL_MHZ = 3000.0
DROPPED_MHZ = 1500.0


class FakeClock:
    """A clock source whose frequency the workload sets: ``FULL_MHZ`` unless ``mhz`` is
    lowered, and then throttled with the reason ``planted_power_cap``."""

    name = "fake"
    clock_metric = "cpu_mhz"
    available = True
    reason = "planted by thruput bench stragglers"

    def __init__(self) -> None:
        self.mhz = FULL_MHZ

    def read(self) -> dict[str, float]:
        return {"cpu_mhz": self.mhz}

    def throttle_reasons(self, sample: dict[str, float]) -> list[str]:
        return ["planted_power_cap"] if sample["cpu_mhz"] < 0.9 * FULL_MHZ else []


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="job")
    p.add_argument("--case", choices=["clean", "sleep", "clock", "data"], default="clean")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--slow-rank", type=int, default=1)
    p.add_argument("--every", type=int, default=1, help="plant in every k-th step after the warm-up step")
    p.add_argument("--base", type=float, default=0.02, help="seconds every rank sleeps in its forward")
    p.add_argument("--extra", type=float, default=0.2, help="planted seconds")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--overhead-rounds", type=int, default=0)
    p.add_argument("--steps-per-round", type=int, default=5)
    return p.parse_args(argv)


class Step:
    """The model, its collectives and optimizer; ``run(prof, planted)`` trains one step."""

    def __init__(self, args: argparse.Namespace, clock: FakeClock) -> None:
        torch.manual_seed(0)
        self.args, self.clock = args, clock
        self.world = dist.get_world_size()
        self.model = torch.nn.Sequential(torch.nn.Linear(args.dim, args.dim), torch.nn.ReLU(),
                                         torch.nn.Linear(args.dim, 1))
        self.comm = GradientBuckets(self.model.parameters(), op="all_reduce")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(dist.get_rank())
        self.x, self.y = torch.randn(32, args.dim, generator=gen), torch.randn(32, 1, generator=gen)

    def batch(self, planted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if planted and self.args.case == "data":
            time.sleep(self.args.extra)
        return self.x, self.y

    def run(self, prof: StepProfiler, planted: bool) -> None:
        args = self.args
        with prof.step(tokens=self.x.numel(), samples=self.x.shape[0]):
            with prof.phase("data_wait"):
                x, y = self.batch(planted)
            with prof.phase("forward"):
                time.sleep(args.base)
                if planted and args.case in ("sleep", "clock"):
                    self.clock.mhz = DROPPED_MHZ if args.case == "clock" else FULL_MHZ
                    time.sleep(args.extra)
                    self.clock.mhz = FULL_MHZ
                loss = torch.nn.functional.mse_loss(self.model(x), y)
            with prof.phase("backward"):
                backward_global_mean(loss, x.shape[0], self.world, x.device)
            prof.add_time("comm", self.comm.finish())
            with prof.phase("optimizer"):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)


def planted_step(args: argparse.Namespace, rank: int, step: int) -> bool:
    return args.case != "clean" and rank == args.slow_rank and step >= 1 and (step - 1) % args.every == 0


def overhead(args: argparse.Namespace, step: Step, clock: FakeClock) -> None:
    rounds: dict[str, list[float]] = {"with_recorder": [], "without_recorder": []}
    for i in range(args.overhead_rounds):
        arms = ["with_recorder", "without_recorder"]
        for arm in arms if i % 2 == 0 else arms[::-1]:
            prof = StepProfiler(warmup_steps=0, collectives=arm == "with_recorder")
            times = []
            for _ in range(args.steps_per_round):
                t0 = time.perf_counter()
                step.run(prof, planted=False)
                times.append(time.perf_counter() - t0)
            rounds[arm].append(statistics.median(times))
    if dist.get_rank() == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "overhead.json").write_text(json.dumps(rounds))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    clock = FakeClock()
    step = Step(args, clock)
    try:
        if args.overhead_rounds:
            overhead(args, step, clock)
            return
        prof = StepProfiler(clocks=ClockSampler([clock], hz=50), warmup_steps=1)
        for i in range(args.steps):
            step.run(prof, planted_step(args, rank, i))
        document = run_document(prof, name=f"{args.name}-rank{rank}",
                                meta={"planted": {"case": args.case, "rank": args.slow_rank, "every": args.every,
                                                  "extra_s": args.extra, "base_s": args.base}})
        save_json(document, Path(args.out) / f"{args.name}-rank{rank}.json")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
