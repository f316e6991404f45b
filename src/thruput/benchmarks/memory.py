"""Data-loading memory across ranks and sources: thruput's shared Ray actors vs torch DataLoader workers.

For every cell of R ranks x S sources, a fresh child process plays the R trainer ranks and
measures the total PSS (``/proc/PID/smaps_rollup``) of every process it started, itself
excluded:

* thruput: the process starts a 127.0.0.1-only Ray instance and iterates R ``Loader``s with the
  Ray backend. Counted: all of Ray's processes (gcs_server, raylet, dashboard and agents, log
  monitor, idle workers) and the data plane's actors (planner, constructor, the loader processes
  that the sources share, one per CPU of the loader budget, and one warm shadow).
* torch DataLoader: R DataLoaders with W workers each (fork), each worker holding every source.

A source's state is an in-memory int64 offset index of ``--source-mb`` MiB, built by the process
that first reads the source (as a JSONL source loads its byte-offset index, or as a worker opens
its files in ``worker_init_fn``), so it is private memory in each process that reads it.
Ray's fixed overhead is measured alone (Ray started, no sources) and reported beside the grid;
each cell also reports its actors' PSS per role (planner, constructors, loader processes, shadows).

The JSON also holds ``checkpoint``: the size and write time of a differential loader checkpoint
against a full dump of the same state.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from rich.table import Table

from thruput.console import make_console
from thruput.data.sources import Source

DESCRIPTION = "PSS of all data-loading processes, R ranks x S sources: thruput on Ray vs torch DataLoader (goal >= 3.6)"

SEQ_LEN = 512
ROWS_PER_RANK = 2
RECORDS = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4, help="torch DataLoader workers per rank")
    parser.add_argument("--source-mb", type=int, default=32, help="per-source state (offset index), MiB")
    parser.add_argument("--steps", type=int, default=6, help="batches per rank before measuring")
    parser.add_argument("--shadows", type=int, default=1, help="warm shadow loaders of the Ray data plane")


class IndexedSource(Source):
    """Synthetic text records behind an in-memory offset index of ``state_mb`` MiB, built on first read."""

    def __init__(self, name: str, state_mb: int, records: int = RECORDS) -> None:
        super().__init__(name)
        self.state_mb, self.records = state_mb, records
        self._index: np.ndarray | None = None

    def __len__(self) -> int:
        return self.records

    def open(self) -> None:
        if self._index is None:
            entries = self.state_mb * 2**20 // 8
            self._index = np.cumsum(np.full(entries, 97, dtype=np.int64))  # written: private pages

    def read(self, index: int) -> str:
        self.open()
        offset = int(self._index[index % self._index.size])
        return f"{self.name} record {index} at byte {offset}. " * (1 + index % 23)

    def where(self, index: int) -> str:
        return f"record {index}"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}  # like a file handle: never shipped, reopened where read


# --- measurement (in the child process) ---------------------------------------------------------


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process; 0 if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants_pss() -> tuple[int, dict[int, int]]:
    import psutil

    pids = [p.pid for p in psutil.Process().children(recursive=True)]
    per = {pid: pss_bytes(pid) for pid in pids}
    return sum(per.values()), per


def _cell_ray_idle() -> dict[str, Any]:
    import ray

    from thruput.data.ray_backend import start_local_ray

    start_local_ray(object_store_memory=256 * 2**20)
    time.sleep(3.0)  # Ray's agents and prestarted workers come up after init returns
    total, per = descendants_pss()
    ray.shutdown()
    return {"total_bytes": total, "processes": len(per)}


def _plan(ranks: int, sources: int, state_mb: int) -> Any:
    from thruput.data import Plan

    return Plan(
        [IndexedSource(f"s{i}", state_mb) for i in range(sources)],
        seq_len=SEQ_LEN,
        tokens_per_batch=SEQ_LEN * ROWS_PER_RANK * ranks,
        world_size=ranks,
        seed=0,
    )


def _cell_thruput(ranks: int, sources: int, state_mb: int, steps: int, shadows: int) -> dict[str, Any]:
    import ray

    from thruput.data import Loader
    from thruput.data.ray_backend import start_local_ray

    start_local_ray(object_store_memory=256 * 2**20)
    plan = _plan(ranks, sources, state_mb)
    opts = {"run_id": "bench-memory", "shadows": shadows}
    loaders = [Loader(plan, rank=r, world_size=ranks, backend="ray", workers=opts) for r in range(ranks)]
    for _ in range(steps):
        for loader in loaders:
            next(loader)
    pids = loaders[0].backend.pids()
    stats = loaders[0].stats()
    total, per = descendants_pss()
    roles = {  # sources share loader processes: each process counted once
        "planner": {pids["planner"]},
        "constructors": set(pids["constructors"]),
        "loader_processes": {p for ps in pids["loaders"].values() for p in ps},
        "shadows": set(pids["shadows"]),
    }
    by_role = {role: sum(per.get(p, 0) for p in ps) for role, ps in roles.items()}
    actors = sum(by_role.values())
    for loader in loaders:
        loader.close()
    ray.shutdown()
    return {
        "total_bytes": total,
        "data_plane_actors_bytes": actors,
        "actors_bytes_by_role": by_role,
        "ray_system_bytes": total - actors,
        "processes": len(per),
        "loaders_per_source": stats["workers"],
        "loader_processes": len(roles["loader_processes"]),
        "shadows": len(pids["shadows"]),
    }


def _cell_torch(ranks: int, sources: int, state_mb: int, steps: int, workers: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Mixed(Dataset):
        """Round-robin over every source: item i is record i // S of source i % S, as byte tokens."""

        def __init__(self, srcs: list[IndexedSource]) -> None:
            self.sources = srcs

        def __len__(self) -> int:
            return RECORDS * len(self.sources)

        def __getitem__(self, i: int) -> torch.Tensor:
            text = self.sources[i % len(self.sources)].text(i // len(self.sources))
            return torch.frombuffer(bytearray(text.encode()[:SEQ_LEN]), dtype=torch.uint8).long()

    def open_all(_: int) -> None:
        info = torch.utils.data.get_worker_info()
        for s in info.dataset.sources:
            s.open()

    def pad(items: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)

    loaders = []
    for rank in range(ranks):
        ds = Mixed([IndexedSource(f"s{i}", state_mb) for i in range(sources)])
        loaders.append(iter(DataLoader(ds, batch_size=ROWS_PER_RANK * 4, shuffle=True, num_workers=workers,
                                       worker_init_fn=open_all, collate_fn=pad, persistent_workers=True,
                                       generator=torch.Generator().manual_seed(rank))))
    for _ in range(max(steps, 2 * workers)):  # every worker has served batches (and opened every source)
        for it in loaders:
            next(it)
    total, per = descendants_pss()
    return {"total_bytes": total, "processes": len(per)}


def _child(cell: dict[str, Any]) -> dict[str, Any]:
    kind = cell.pop("kind")
    return {"ray_idle": _cell_ray_idle, "thruput": _cell_thruput, "torch": _cell_torch}[kind](**cell)


def _run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh process, so no cell sees another's memory or Ray instance."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "thruput.benchmarks.memory", json.dumps(cell)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench memory: cell {cell} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- checkpoints --------------------------------------------------------------------------------


def _checkpoint_figures(sources: int, saves: int = 40, every: int = 5) -> dict[str, Any]:
    """Differential vs full checkpoints of a real loader state (inline backend, ``sources`` sources)."""
    from thruput.data import DeltaCheckpointer, Loader

    plan = _plan(1, sources, 1)
    states = []
    with Loader(plan, backend="inline") as loader:
        for _ in range(saves * every):
            next(loader)
            if loader.state_dict()["step"] % every == 0:
                states.append(loader.state_dict())
    out: dict[str, Any] = {"sources": sources, "saves": saves, "every_steps": every}
    for label, full_every in (("full", 0), ("delta", saves)):
        with tempfile.TemporaryDirectory() as d:
            ckpt = DeltaCheckpointer(d, every=every, full_every=full_every, keep=saves)
            sizes, times = [], []
            for state in states:
                t0 = time.perf_counter()
                path = ckpt.save(state)
                times.append(time.perf_counter() - t0)
                sizes.append(path.stat().st_size)
            t0 = time.perf_counter()
            restored = DeltaCheckpointer(d).restore()
            restore_s = time.perf_counter() - t0
            assert restored == states[-1]
        body = sizes[1:] if label == "delta" else sizes  # the delta chain's first file is its snapshot
        out[label] = {
            "bytes_per_save": float(np.mean(body)),
            "seconds_per_save": float(np.median(times)),
            "restore_seconds": restore_s,
        }
    out["size_ratio_full_over_delta"] = out["full"]["bytes_per_save"] / out["delta"]["bytes_per_save"]
    return out


# --- the benchmark --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    cells = [(1, 2), (4, 8)] if args.quick else [(r, s) for r in (1, 2, 4) for s in (2, 4, 8)]
    common = {"state_mb": args.source_mb, "steps": args.steps}
    idle = _run_cell({"kind": "ray_idle"})
    result: dict[str, Any] = {
        "ratio_vs_torch": {},
        "thruput": {},
        "torch_dataloader": {},
        "ray_fixed_overhead": idle,
        "config": {
            "workers_per_rank": args.workers,
            "source_state_mib": args.source_mb,
            "steps": args.steps,
            "shadows": args.shadows,
            "cpus": os.cpu_count(),
            "seq_len": SEQ_LEN,
            "rows_per_rank": ROWS_PER_RANK,
        },
    }
    title = f"data-loading PSS, MiB (source state {args.source_mb} MiB, torch: {args.workers} workers/rank)"
    table = Table(title=title)
    columns = ("cell", "thruput total", "of which Ray system", "of which actors", "loader processes",
               "torch DataLoader", "torch / thruput")
    for col in columns:
        table.add_column(col, justify="right")
    mib = 2**20
    idle_mib = f"{idle['total_bytes'] / mib:.0f}"
    table.add_row("Ray alone, no sources", idle_mib, idle_mib, "0", "0", "-", "-")
    for ranks, sources in cells:
        key = f"R{ranks}_S{sources}"
        ours = _run_cell({"kind": "thruput", "ranks": ranks, "sources": sources, "shadows": args.shadows, **common})
        peer = _run_cell({"kind": "torch", "ranks": ranks, "sources": sources, "workers": args.workers, **common})
        ratio = peer["total_bytes"] / ours["total_bytes"]
        result["thruput"][key], result["torch_dataloader"][key], result["ratio_vs_torch"][key] = ours, peer, ratio
        table.add_row(
            key,
            f"{ours['total_bytes'] / mib:.0f}",
            f"{ours['ray_system_bytes'] / mib:.0f}",
            f"{ours['data_plane_actors_bytes'] / mib:.0f}",
            str(ours["loader_processes"]),
            f"{peer['total_bytes'] / mib:.0f}",
            f"{ratio:.2f}x",
        )
    result["checkpoint"] = _checkpoint_figures(8)
    console = make_console(min_width=130)  # the table needs the columns
    console.print(table)
    ck = result["checkpoint"]
    console.print(
        f"loader checkpoint, {ck['sources']} sources, every {ck['every_steps']} steps: "
        f"full {ck['full']['bytes_per_save']:.0f} B "
        f"in {1e3 * ck['full']['seconds_per_save']:.2f} ms, delta {ck['delta']['bytes_per_save']:.0f} B "
        f"in {1e3 * ck['delta']['seconds_per_save']:.2f} ms"
    )
    return result


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
