"""The Ray actors of the shared data plane: planner, source loaders with warm shadows, constructors.

* ``Planner``: one per run, a detached actor named ``"planner"`` in the run's namespace, so every
  trainer rank finds the same one. It holds the plan, one pool of ``SourceLoader`` actors per
  source and ``shadows`` warm spare loaders, sizes the pools from the measured CPU seconds per
  token and the tokens consumed (within ``cpu_budget``), and opens one ``Constructor`` per session
  (a world size and a start state). Every actor it creates is owned by it and dies with it.
* ``SourceLoader``: tokenizes runs of one source's stream positions. A chunk is a pure function
  of (source, seed, positions), so any loader of a source can serve any run: that is what lets
  a shadow take over the runs a dead loader held, with nothing lost or repeated.
* ``Constructor``: pulls each source's chunks in stream order (tokens arrive through Ray's
  object store), mixes, balances and collates every rank's batch of each step, up to ``ahead``
  steps past the slowest rank, and hands each rank its own.

All actors reserve 0 CPUs from Ray: the planner budgets loader CPUs itself, and a per-actor
reservation would leave no room for shadows and constructors on a small machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from thruput.data.errors import DataError
from thruput.data.stream import Chunk, StreamOrder, tokenize_chunk

PLANNER_NAME = "planner"


def plan_fingerprint(plan: Any) -> str:
    """A short hash of what decides the tokens (not the world size): ranks must agree on it."""
    desc = {
        "sources": [(s.name, len(s)) for s in plan.sources],
        "seed": plan.seed,
        "seq_len": plan.seq_len,
        "tokens_per_batch": plan.tokens_per_batch,
        "packing": plan.packing,
        "balance": plan.balance,
        "cost": repr(plan.cost),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def session_key(world_size: int, state: Mapping[str, Any]) -> str:
    """Ranks that start the same world size from the same state share one constructor."""
    return hashlib.sha256(json.dumps([world_size, state], sort_keys=True).encode()).hexdigest()[:16]


def pool_sizes(cost_per_token: Sequence[float], demand: Sequence[float], budget: int, lo: int, hi: int) -> list[int]:
    """Loaders per source: shares of ``budget`` proportional to cost per token x tokens consumed.

    Each count is clamped to ``[lo, hi]``; leftover CPUs go to the largest fractional shares.
    Without measurements every source gets ``lo``.
    """
    work = np.asarray(cost_per_token, dtype=float) * np.maximum(np.asarray(demand, dtype=float), 1.0)
    if work.size == 0 or work.sum() <= 0:
        return [lo] * len(work)
    share = work / work.sum() * budget
    counts = np.clip(np.floor(share), lo, hi).astype(int)
    spare = budget - int(counts.sum())
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if spare <= 0:
            break
        if counts[i] < hi and share[i] > counts[i]:
            counts[i] += 1
            spare -= 1
    return counts.tolist()


def data_error(exc: RayTaskError) -> DataError:
    """The ``DataError`` a remote call raised, without Ray's wrapper and remote traceback."""
    cause = exc.cause
    return DataError(str(cause)) if isinstance(cause, DataError) else DataError(f"{cause!r}")


@ray.remote(num_cpus=0)
class SourceLoader:
    """Tokenizes runs of one source's stream; created empty (a warm shadow) until ``adopt``."""

    def __init__(self) -> None:
        self._source: Any = None

    def adopt(self, source: Any, tokenizer: Any, seed: int) -> int:
        """Take on ``source``: opens its index (the per-source state). Returns this process id."""
        self._source, self._tokenizer = source, tokenizer
        self._order = StreamOrder(source, seed)
        return os.getpid()

    def load(self, start: int, count: int) -> Chunk:
        try:
            return tokenize_chunk(self._source, self._tokenizer, self._order, start, count)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"source '{self._source.name}': {exc!r}") from exc

    def pid(self) -> int:
        return os.getpid()


class _Pool:
    """One source's loaders as the planner sees them: (key, handle) pairs, failures, takeovers."""

    def __init__(self) -> None:
        self.members: list[tuple[int, Any]] = []
        self.failures = 0
        self.takeovers = 0
        self.cpu_s = 0.0
        self.tokens = 0


@ray.remote(num_cpus=0, max_concurrency=64)
class Planner:
    """The run's coordinator; see the module docstring. ``options`` are ``RayBackend``'s pool options."""

    def __init__(self, plan: Any, fingerprint: str, options: Mapping[str, Any]) -> None:
        self.plan, self.fingerprint, self.opts = plan, fingerprint, dict(options)
        self.budget = int(self.opts["cpu_budget"] or max(int(ray.cluster_resources().get("CPU", 1)), 1))
        self._lock = threading.RLock()
        self._next_key = 0
        self.sources = {s.name: s for s in plan.sources}
        self.pools = {name: _Pool() for name in self.sources}
        self.shadows = [SourceLoader.remote() for _ in range(self.opts["shadows"])]
        self._warm_constructor: Any = Constructor.remote()  # the first session's, started alongside the loaders
        self.sessions: dict[str, dict[str, Any]] = {}
        self.closing = False
        self._adopting = [self._add_loader(name) for name in self.sources for _ in range(self.opts["min_workers"])]

    def _add_loader(self, name: str, actor: Any = None) -> Any:
        actor = actor if actor is not None else SourceLoader.remote()
        self._next_key += 1
        self.pools[name].members.append((self._next_key, actor))
        return actor.adopt.remote(self.sources[name], self.plan.tokenizer, self.plan.seed)

    # --- sessions -------------------------------------------------------------------------------

    def open(self, fingerprint: str, world_size: int, state: Mapping[str, Any], rank: int) -> tuple[str, Any] | None:
        """The session (key, constructor) for ``world_size`` ranks from ``state``; None while closing."""
        if fingerprint != self.fingerprint:
            raise DataError(
                "ray backend: this rank's plan differs from the plan the run's planner was started with "
                "(sources, seed, seq_len, tokens_per_batch, packing or balance); give each run its own run_id"
            )
        with self._lock:
            if self.closing:
                return None
            if self._adopting:  # a source whose index cannot be opened fails here, naming itself
                try:
                    ray.get(self._adopting)
                except RayTaskError as exc:
                    raise data_error(exc) from None
                self._adopting = []
            key = session_key(world_size, state)
            session = self.sessions.get(key)
            if session is None:
                constructor, self._warm_constructor = self._warm_constructor or Constructor.remote(), None
                me = ray.get_runtime_context().current_actor
                constructor.begin.remote(me, self.plan, world_size, dict(state), self.opts)
                session = self.sessions[key] = {"constructor": constructor, "open": set(), "released": set()}
            session["open"].add(rank)
            return key, session["constructor"]

    def release(self, key: str, rank: int) -> bool:
        """Rank ``rank`` is done with session ``key``; True when no session is left (the caller kills us)."""
        with self._lock:
            session = self.sessions.get(key)
            if session is not None:
                session["released"].add(rank)
                if session["released"] >= session["open"]:
                    ray.kill(session["constructor"])
                    del self.sessions[key]
            self.closing = not self.sessions
            return self.closing

    # --- pools ----------------------------------------------------------------------------------

    def roster(self, name: str) -> list[tuple[int, Any]]:
        with self._lock:
            return list(self.pools[name].members)

    def replace(self, name: str, dead: int) -> list[tuple[int, Any]]:
        """Loader ``dead`` of ``name`` died: a warm shadow adopts the source and joins the pool.

        Idempotent (several constructors may report the same death). Raises ``DataError`` once
        the source's loaders have died more than ``max_failures`` times: it keeps failing.
        """
        with self._lock:
            pool = self.pools[name]
            gone = [m for m in pool.members if m[0] == dead]
            if not gone:  # already replaced, or retired by a rescale: nothing failed
                return list(pool.members)
            pool.members.remove(gone[0])
            ray.kill(gone[0][1])
            while True:
                pool.failures += 1
                if pool.failures > self.opts["max_failures"]:
                    raise DataError(
                        f"source '{name}': its loader actors died {pool.failures} times "
                        f"(max_failures={self.opts['max_failures']}); the source keeps failing, stopping"
                    )
                shadow = self.shadows.pop(0) if self.shadows else SourceLoader.remote()
                self.shadows.append(SourceLoader.remote())  # the next shadow warms up in the background
                try:
                    ray.get(self._add_loader(name, shadow))
                except RayActorError:
                    pool.members.pop()
                    continue
                pool.takeovers += 1
                return list(pool.members)

    def report(self, usage: Mapping[str, tuple[float, int]]) -> dict[str, list[tuple[int, Any]]]:
        """Add a constructor's measured (CPU seconds, tokens) per source, resize pools, return rosters."""
        with self._lock:
            for name, (cpu_s, tokens) in usage.items():
                self.pools[name].cpu_s += cpu_s
                self.pools[name].tokens += tokens
            names = list(self.pools)
            cost = [p.cpu_s / p.tokens if p.tokens else 0.0 for p in self.pools.values()]
            demand = [p.tokens for p in self.pools.values()]
            targets = pool_sizes(cost, demand, self.budget, self.opts["min_workers"], self.opts["max_workers"])
            adopting = []
            for name, target in zip(names, targets):
                pool = self.pools[name]
                while len(pool.members) < target:
                    adopting.append(self._add_loader(name))
                while len(pool.members) > target:
                    # Queued after the calls already sent to it; a constructor whose later call
                    # fails sees a retired key and resubmits without counting a failure.
                    pool.members.pop()[1].__ray_terminate__.remote()
            ray.get(adopting)
            return {name: list(p.members) for name, p in self.pools.items()}

    # --- introspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "workers": {n: len(p.members) for n, p in self.pools.items()},
                "cpu_s_per_token": {n: (p.cpu_s / p.tokens if p.tokens else 0.0) for n, p in self.pools.items()},
                "loader_failures": {n: p.failures for n, p in self.pools.items()},
                "takeovers": {n: p.takeovers for n, p in self.pools.items()},
                "shadows": len(self.shadows),
                "sessions": len(self.sessions),
            }

    def pids(self) -> dict[str, Any]:
        """Process ids of every role (for fault injection and memory accounting)."""
        with self._lock:
            loaders = {n: [h for _, h in p.members] for n, p in self.pools.items()}
            shadows = list(self.shadows)
            constructors = [s["constructor"] for s in self.sessions.values()]
        return {
            "planner": os.getpid(),
            "loaders": {n: ray.get([h.pid.remote() for h in hs]) for n, hs in loaders.items()},
            "shadows": ray.get([h.pid.remote() for h in shadows]),
            "constructors": ray.get([c.pid.remote() for c in constructors]),
        }

    def ping(self) -> bool:
        return True


class _PoolClient:
    """One source's chunks, in stream order, for one constructor; hands a dead loader's runs to its shadow."""

    def __init__(self, name: str, planner: Any, position: int, opts: Mapping[str, Any]) -> None:
        self.name, self.planner = name, planner
        self.chunk_docs, self.prefetch = opts["chunk_docs"], opts["prefetch_chunks"]
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
        entry[1] = dict(self.roster)[key].load.remote(entry[0], self.chunk_docs)
        entry[2] = key

    def _submit(self) -> None:
        while len(self.pending) < max(self.prefetch, 2 * len(self.roster)):
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

    def begin(self, planner: Any, plan: Any, world_size: int, state: Mapping[str, Any], opts: Mapping[str, Any]) -> None:
        """Start building ``world_size`` ranks' batches from ``state`` (once per actor)."""
        try:
            self._begin(planner, plan, world_size, state, opts)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.begun.set()

    def _begin(self, planner: Any, plan: Any, world_size: int, state: Mapping[str, Any], opts: Mapping[str, Any]) -> None:
        from thruput.data.assemble import StreamReader

        self.planner, self.plan, self.world_size = planner, plan, world_size
        self.ahead, self.wait_s, self.rescale_every = opts["ahead"], opts["wait_s"], opts["rescale_every"]
        cursors = state["sources"]
        self.pools = {s.name: _PoolClient(s.name, planner, int(cursors[s.name]["position"]), opts) for s in plan.sources}
        self.readers = [
            StreamReader(s.name, len(s), self.pools[s.name].fetch, **{k: int(v) for k, v in cursors[s.name].items()})
            for s in plan.sources
        ]
        self.version = state["version"]  # the Loader's state format (loader.py imports torch; we do not)
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
        from thruput.data.assemble import collate_arrays, mix, rank_rows

        pieces = mix(self.plan, self.readers, step)
        batches = [
            collate_arrays(self.plan, pieces, rank_rows(self.plan, pieces, rank, self.world_size), step)
            for rank in range(self.world_size)
        ]
        state = {
            "version": self.version,
            "step": step + 1,
            "seed": self.plan.seed,
            "sources": {r.name: r.state() for r in self.readers},
        }
        return batches, state

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
