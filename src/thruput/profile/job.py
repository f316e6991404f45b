"""One report for a distributed job, merged from the run documents its ranks wrote.

Every rank writes its own run document (``thruput run``: ``NAME-rankR.json``; ``thruput
train``: ``NAME-rankR.json`` in ``profile.report_dir``; a ``StepProfiler`` user: any name, with
``run_document`` filling ``meta.rank``/``meta.world_size`` from torch.distributed), and
``thruput report DIR/`` merges them here. No live connection is needed.

Why files and a merge rather than an all-gather per step: the per-step cost of profiling stays
at zero collectives (an all-gather, however small, is one more synchronisation point per step,
and it would itself wait for the straggler it is meant to find), a rank that crashed or hung
still leaves a document to compare (an all-gather would hang with it), and the merge can be
re-run offline with other thresholds. The price: ranks are lined up by step index, and their
timelines by each document's wall-clock ``origin_unix_s`` (as exact as the hosts' clocks).

``merge_job`` takes documents; ``load_job`` a folder. Bad input is an ``InputError`` naming the
file: two documents for one rank, different world sizes, no rank in the metadata, or no step
that every present rank recorded. Missing ranks and runs of different lengths are reported
(``missing_ranks``, ``notes``) and the common steps compared.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from thruput.errors import InputError
from thruput.profile.report import load_json

JOB_SCHEMA = "thruput.job/1"


def step_work(step: dict[str, Any]) -> float:
    """A rank's own time in one step before its last collective: ``compute_before_comm`` plus
    ``data_wait``; for a step without recorded collectives, the step time less ``comm``."""
    if step.get("compute_before_comm") is not None:
        return step["compute_before_comm"] + step["phases"].get("data_wait", 0.0)
    return step["time_s"] - step["phases"].get("comm", 0.0)


def rank_documents(folder: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """The run documents in ``folder`` (``*.json``, Perfetto traces left out), loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"not a folder of run documents: {folder}")
    paths = sorted(p for p in folder.glob("*.json") if not p.name.endswith(".trace.json"))
    if not paths:
        raise InputError(f"{folder}: no run documents (*.json)")
    return [(p, load_json(p)) for p in paths]


def load_job(folder: str | os.PathLike) -> dict[str, Any]:
    """``merge_job`` over the run documents in ``folder``."""
    return merge_job(rank_documents(folder))


def merge_job(documents: list[tuple[Path | str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge ranks' run documents (``(source, document)`` pairs) into a job document: the
    per-rank table, the spread across ranks per common step, and the straggler verdict.
    See the module docstring for the errors."""
    from thruput.profile.stragglers import job_verdict

    by_rank: dict[int, tuple[str, dict[str, Any]]] = {}
    world_sizes: dict[int, str] = {}
    for source, doc in documents:
        meta = doc.get("meta") or {}
        rank, world = meta.get("rank"), meta.get("world_size")
        if not isinstance(rank, int) or not isinstance(world, int):
            raise InputError(f"{source}: meta.rank / meta.world_size missing: not a rank of a distributed "
                             f"run (report it alone: thruput report {source})")
        if rank in by_rank:
            raise InputError(f"{source}: rank {rank} again (also in {by_rank[rank][0]}): documents of "
                             f"two runs in one folder")
        by_rank[rank] = (str(source), doc)
        world_sizes.setdefault(world, str(source))
    if len(world_sizes) > 1:
        found = ", ".join(f"{w} ({src})" for w, src in world_sizes.items())
        raise InputError(f"ranks disagree on world_size: {found}")
    world = next(iter(world_sizes))
    ranks = sorted(by_rank)
    missing = sorted(set(range(world)) - set(ranks))
    notes = [f"missing ranks {missing} of world size {world}: compared the {len(ranks)} present"] if missing else []
    measured = {r: _measured(by_rank[r][1]) for r in ranks}
    counts = {r: len(steps) for r, steps in measured.items()}
    common = sorted(set.intersection(*(set(steps) for steps in measured.values())))
    if not common:
        raise InputError(f"no measured step that every rank recorded (steps per rank: {counts})")
    if len(set(counts.values())) > 1:
        notes.append(f"runs of different lengths (measured steps per rank: {counts}): "
                     f"compared the {len(common)} steps every rank has")
    unrecorded = [r for r in ranks if all(s.get("compute_before_comm") is None for s in measured[r].values())]
    if unrecorded:
        notes.append(f"ranks {unrecorded} have no per-rank collective record (no collective seen, e.g. DDP's C++ "
                     f"reducer): their own work is estimated as step time less comm, and waits hidden inside "
                     f"other phases count as work")
    job: dict[str, Any] = {
        "schema": JOB_SCHEMA,
        "name": _job_name(by_rank[ranks[0]][1]),
        "world_size": world,
        "ranks": ranks,
        "missing_ranks": missing,
        "files": {r: by_rank[r][0] for r in ranks},
        "notes": notes,
        "steps": common,
        "per_rank": [_rank_row(r, [measured[r][s] for s in common]) for r in ranks],
        "spread": _spread(ranks, common, measured),
        "documents": {r: by_rank[r][1] for r in ranks},
    }
    job["verdict"] = job_verdict(job, measured).to_dict()
    return job


def _measured(doc: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Step index -> step, after the document's warm-up steps."""
    warmup = (doc.get("summary") or {}).get("warmup_steps", 0)
    steps = doc.get("steps") or []
    return {s["step"]: s for s in (steps[warmup:] or steps)}


def _job_name(doc: dict[str, Any]) -> str:
    name = str(doc.get("name", "job"))
    stem, sep, tail = name.rpartition("-rank")
    return stem if sep and tail.isdigit() else name


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def clock_of(step: dict[str, Any]) -> tuple[float | None, float | None]:
    """(mean clock of the step's first clock source with a frequency, highest throttled share
    of its sources); None where the step has no clock sample."""
    mhz = share = None
    for stats in (step.get("clock") or {}).values():
        if mhz is None:
            mhz = next((v for k, v in stats.items() if k.startswith("mean_") and k.endswith("_mhz")), None)
        share = max(share or 0.0, stats.get("throttled_share", 0.0))
    return mhz, share


def _rank_row(rank: int, steps: list[dict[str, Any]]) -> dict[str, Any]:
    clocks = [clock_of(s) for s in steps]
    return {
        "rank": rank,
        "steps": len(steps),
        "step_time_s": _median([s["time_s"] for s in steps]),
        "compute_before_comm_s": _median([s.get("compute_before_comm") for s in steps]),
        "comm_wait_s": _median([s.get("comm_wait") for s in steps]),
        "data_wait_s": _median([s["phases"].get("data_wait", 0.0) for s in steps]),
        "work_s": _median([step_work(s) for s in steps]),
        "clock_mhz": _median([c[0] for c in clocks]),
        "throttled_share": _median([c[1] for c in clocks]),
    }


def _spread(ranks: list[int], common: list[int], measured: dict[int, dict[int, dict]]) -> list[dict[str, Any]]:
    """Per common step: the slowest and fastest rank by own work, and the difference (s)."""
    out = []
    for step in common:
        work = {r: step_work(measured[r][step]) for r in ranks}
        slow, fast = max(work, key=work.get), min(work, key=work.get)
        out.append({"step": step, "slowest_rank": slow, "fastest_rank": fast,
                    "spread_s": work[slow] - work[fast],
                    "step_time_s": max(measured[r][step]["time_s"] for r in ranks)})
    return out
