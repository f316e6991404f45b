"""The data constructor of a Ray session: chunks in stream order from the loader pools, then batches.

``Constructor`` pulls each source's chunks through a ``_PoolClient`` (tokens arrive through Ray's
object store), mixes, balances and collates every rank's batch of each step, up to ``ahead``
steps past the slowest rank, and hands each rank its own. When a loader dies, the client asks the
planner for a replacement (a warm shadow) and resends the dead loader's runs to it, in order.
It imports no torch: ranks turn the numpy arrays into tensors.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from thruput.data.backends.options import BackendOptions
from thruput.data.backends.scaling import in_flight
from thruput.data.errors import DataError
from thruput.data.stream import Chunk


def data_error(exc: RayTaskError) -> DataError:
    """The ``DataError`` a remote call raised, without Ray's wrapper and remote traceback."""
    cause = exc.cause
    return DataError(str(cause)) if isinstance(cause, DataError) else DataError(f"{cause!r}")


class _PoolClient:
    """One source's chunks, in stream order, for one constructor; hands a dead loader's runs to its shadow."""

    def __init__(self, name: str, planner: Any, position: int, opts: BackendOptions) -> None:
        self.name, self.planner = name, planner
        self.chunk_docs, self.prefetch = opts.chunk_docs, opts.prefetch_chunks
        self.roster: list[tuple[int, Any]] = ray.get(planner.roster.remote(name))
        self.pending: deque[list[Any]] = deque()  # [start, object ref, loader key], stream order
        self.next_submit = position
        self.cpu_s, self.tokens = 0.0, 0

    def _send(self, entry: list[Any]) -> None:
        """Submit run ``entry[0]`` to the roster's least busy loader."""
        load = {key: 0 for key, _ in self.roster}
        for e in self.pending:
            if e[2] in load:
                load[e[2]] += 1
        key = min(load, key=load.__getitem__)
        entry[1] = dict(self.roster)[key].load.remote(self.name, entry[0], self.chunk_docs)
        entry[2] = key

    def _submit(self) -> None:
        while len(self.pending) < in_flight(self.prefetch, len(self.roster)):
            entry = [self.next_submit, None, None]
            self._send(entry)
            self.pending.append(entry)
            self.next_submit += self.chunk_docs

    def set_roster(self, roster: list[tuple[int, Any]]) -> None:
        self.roster = roster

    def fetch(self) -> Chunk:
        while True:
            self._submit()
            start, ref, key = self.pending[0]
            try:
                chunk = ray.get(ref)
            except RayTaskError as exc:  # the source itself failed: deterministic, so never retried
                raise data_error(exc) from None
            except (RayActorError, ObjectLostError):
                self._take_over(key)
                continue
            self.pending.popleft()
            self.cpu_s += chunk.cpu_s
            self.tokens += int(chunk.tokens.size)
            return chunk

    def _take_over(self, dead: int) -> None:
        try:
            self.roster = ray.get(self.planner.replace.remote(self.name, dead))
        except RayTaskError as exc:
            raise data_error(exc) from None
        alive = {key for key, _ in self.roster}
        for entry in self.pending:  # the dead loader's cursor: its runs, resent in stream order
            if entry[2] not in alive:
                self._send(entry)

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, tokens) since the last call."""
        out = (self.cpu_s, self.tokens)
        self.cpu_s, self.tokens = 0.0, 0
        return out


@ray.remote(num_cpus=0, max_concurrency=64)
class Constructor:
    """Builds every rank's batch of each step of one session, ``ahead`` steps past the slowest rank."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.begun = threading.Event()  # begin() and the ranks' batch() calls may arrive in any order

    def begin(
        self, planner: Any, plan: Any, world_size: int, state: Mapping[str, Any], opts: BackendOptions
    ) -> None:
        """Start building ``world_size`` ranks' batches from ``state`` (once per actor)."""
        try:
            self._begin(planner, plan, world_size, state, opts)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.begun.set()

    def _begin(
        self, planner: Any, plan: Any, world_size: int, state: Mapping[str, Any], opts: BackendOptions
    ) -> None:
        from thruput.data.assemble import open_readers

        self.planner, self.plan, self.world_size = planner, plan, world_size
        self.ahead, self.wait_s, self.rescale_every = opts.ahead, opts.wait_s, opts.rescale_every
        cursors = state["sources"]
        self.pools = {
            s.name: _PoolClient(s.name, planner, int(cursors[s.name]["position"]), opts) for s in plan.sources
        }
        self.readers = open_readers(plan, state, lambda name: self.pools[name].fetch)
        self.next_build = int(state["step"])
        self.wanted = [self.next_build] * world_size  # the next step each rank will ask for
        self.built: dict[int, tuple[list[Any], dict[str, Any]]] = {}
        threading.Thread(target=self._build_loop, name="thruput-constructor", daemon=True).start()

    def _build_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.next_build < min(self.wanted) + self.ahead)
                    step = self.next_build
                item = self._build(step)
                with self.cond:
                    self.built[step] = item
                    self.next_build += 1
                    self.cond.notify_all()
                if self.rescale_every and (step + 1) % self.rescale_every == 0:
                    usage = {name: pool.usage() for name, pool in self.pools.items()}
                    for name, roster in ray.get(self.planner.report.remote(usage)).items():
                        self.pools[name].set_roster(roster)
        except BaseException as exc:  # handed to the ranks, which raise it
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _build(self, step: int) -> tuple[list[Any], dict[str, Any]]:
        from thruput.data.assemble import build_batches, loader_state

        batches = build_batches(self.plan, self.readers, step, range(self.world_size), self.world_size)
        return batches, loader_state(self.plan, self.readers, step + 1)

    def batch(self, step: int, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank ``rank``'s batch of ``step`` (numpy arrays) and the state after ``step``.

        Raises ``DataError`` if building failed, if the step was already handed to this rank, or
        if the other ranks lag more than ``ahead`` steps behind for ``wait_s`` seconds.
        """
        self.begun.wait()
        if self.error is not None and not hasattr(self, "wanted"):
            raise DataError(f"ray backend: the data constructor failed to start: {self.error!r}")
        with self.cond:
            if step != self.wanted[rank]:
                raise DataError(f"ray backend: rank {rank} asked for step {step}, expected step {self.wanted[rank]}")
            deadline = time.monotonic() + self.wait_s
            while step not in self.built:
                if self.error is not None:
                    if isinstance(self.error, DataError):
                        raise DataError(str(self.error))
                    raise DataError(f"ray backend: building step {step} failed: {self.error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    late = [r for r, s in enumerate(self.wanted) if s + self.ahead <= step]
                    if not late:
                        raise DataError(
                            f"ray backend: no batch for step {step} in {self.wait_s:.0f} s from the data constructor, "
                            "which is alive and no rank is behind (a source read that hangs?)"
                        )
                    raise DataError(
                        f"ray backend: rank {rank} waited {self.wait_s:.0f} s for step {step}; ranks {late} are more "
                        f"than {self.ahead} steps behind (all {self.world_size} ranks must iterate together)"
                    )
                self.cond.wait(min(left, 1.0))
            batches, state = self.built[step]
            out, batches[rank] = batches[rank], None
            self.wanted[rank] = step + 1
            if all(b is None for b in batches):
                del self.built[step]
            self.cond.notify_all()
            return out, state

    def pid(self) -> int:
        return os.getpid()
