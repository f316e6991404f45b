"""One rank of ``thruput bench stragglers`` (and of its tests): a tiny data-parallel step under
torchrun (gloo), profiled by ``StepProfiler``, with a slowdown planted on one rank.

Every rank sleeps ``--base`` seconds in its forward (a step of known length, so the planted
ratio is well defined on a loaded machine), reduces the loss scale and the gradients with
thruput's own collectives (``backward_global_mean``'s all-reduce and ``GradientBuckets``),
and writes ``OUT/CASE/NAME-rankR.json`` for each of ``--cases`` (one launch, one process group,
so the cases share the start-up cost). Planted on ``--slow-rank`` in every ``--every``-th step
after the warm-up step, by case:

* ``sleep``: ``--extra`` more seconds in its forward;
* ``clock``: the same, while its clock source (``FakeClock``, the only source every case
  samples) reports a frequency drop with a throttle reason;
* ``data``: ``--extra`` seconds inside its loader's ``next()``;
* ``clean``: nothing.

``--overhead-rounds R`` then alternates steps with and without the per-rank recorder
(``StepProfiler(collectives=...)``; the arm that goes first alternates per pair) and rank 0
writes ``OUT/overhead.json``: the median wall and process CPU time of a step, per arm and round.
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

CASES = ("clean", "sleep", "clock", "data")
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
    p.add_argument("--cases", default="clean", help="comma-separated: clean, sleep, clock, data")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--slow-rank", type=int, default=1)
    p.add_argument("--every", type=int, default=1, help="plant in every k-th step after the warm-up step")
    p.add_argument("--base", type=float, default=0.02, help="seconds every rank sleeps in its forward")
    p.add_argument("--extra", type=float, default=0.2, help="planted seconds")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--overhead-dim", type=int, default=256, help="model width of the overhead rounds (no sleep)")
    p.add_argument("--overhead-rounds", type=int, default=0)
    p.add_argument("--steps-per-round", type=int, default=5)
    args = p.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"unknown --cases {sorted(unknown)}; known: {', '.join(CASES)}")
    return args


class Step:
    """The model, its collectives and optimizer; ``run(prof, planted)`` trains one step of
    ``case`` (``base`` seconds of sleep in every forward, ``extra`` planted)."""

    def __init__(self, args: argparse.Namespace, clock: FakeClock, dim: int, base: float) -> None:
        torch.manual_seed(0)
        self.args, self.clock, self.base = args, clock, base
        self.case = "clean"
        self.world = dist.get_world_size()
        self.model = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(),
                                         torch.nn.Linear(dim, 1))
        self.comm = GradientBuckets(self.model.parameters(), op="all_reduce")
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(dist.get_rank())
        self.x, self.y = torch.randn(32, dim, generator=gen), torch.randn(32, 1, generator=gen)

    def batch(self, planted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if planted and self.case == "data":
            time.sleep(self.args.extra)
        return self.x, self.y

    def run(self, prof: StepProfiler, planted: bool) -> None:
        args = self.args
        with prof.step(tokens=self.x.numel(), samples=self.x.shape[0]):
            with prof.phase("data_wait"):
                x, y = self.batch(planted)
            with prof.phase("forward"):
                if self.base:
                    time.sleep(self.base)
                if planted and self.case in ("sleep", "clock"):
                    self.clock.mhz = DROPPED_MHZ if self.case == "clock" else FULL_MHZ
                    time.sleep(args.extra)
                    self.clock.mhz = FULL_MHZ
                loss = torch.nn.functional.mse_loss(self.model(x), y)
            with prof.phase("backward"):
                backward_global_mean(loss, x.shape[0], self.world, x.device)
            prof.add_time("comm", self.comm.finish())
            with prof.phase("optimizer"):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)


def planted_step(args: argparse.Namespace, case: str, rank: int, step: int) -> bool:
    return case != "clean" and rank == args.slow_rank and step >= 1 and (step - 1) % args.every == 0


def overhead(args: argparse.Namespace, step: Step) -> None:
    """Steps alternate between the two arms (each pair in alternating order), so load that
    drifts over seconds falls on both alike; per round, the median step of each arm."""
    arms = {"with_recorder": StepProfiler(warmup_steps=0, collectives=True),
            "without_recorder": StepProfiler(warmup_steps=0, collectives=False)}
    rounds: dict[str, list[float]] = {f"{arm}_{clock}": [] for arm in arms for clock in ("wall_s", "cpu_s")}
    for _ in range(args.overhead_rounds):
        times: dict[str, list[float]] = {key: [] for key in rounds}
        for i in range(args.steps_per_round):
            for arm in list(arms) if i % 2 == 0 else list(arms)[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                step.run(arms[arm], planted=False)
                times[f"{arm}_wall_s"].append(time.perf_counter() - t0)
                times[f"{arm}_cpu_s"].append(time.process_time() - c0)
        for key, values in times.items():
            rounds[key].append(statistics.median(values))
    if dist.get_rank() == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "overhead.json").write_text(json.dumps(rounds))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    clock = FakeClock()
    try:
        step = Step(args, clock, args.dim, args.base)
        for case in args.cases.split(","):
            step.case = case
            prof = StepProfiler(clocks=ClockSampler([clock], hz=50), warmup_steps=1)
            for i in range(args.steps):
                step.run(prof, planted_step(args, case, rank, i))
            document = run_document(prof, name=f"{args.name}-rank{rank}",
                                    meta={"planted": {"case": case, "rank": args.slow_rank, "every": args.every,
                                                      "extra_s": args.extra, "base_s": args.base}})
            save_json(document, Path(args.out) / case / f"{args.name}-rank{rank}.json")
        if args.overhead_rounds:
            overhead(args, Step(args, clock, args.overhead_dim, 0.0))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
