"""The Ray actors of the shared data plane: planner, source loaders with warm shadows, constructors.

* ``Planner``: one per run, a detached actor named ``"planner"`` in the run's namespace, so every
  trainer rank finds the same one. It holds the plan, one pool of ``SourceLoader`` actors per
  source and ``shadows`` warm spare loaders, sizes the pools from the measured CPU seconds per
  token and the tokens consumed (within ``cpu_budget``), and opens one ``Constructor`` per session
  (a world size and a start state). Every actor it creates is owned by it and dies with it.
* ``SourceLoader``: tokenizes runs of one source's stream positions. A chunk is a pure function
  of (source, seed, positions), so any loader of a source can serve any run: that is what lets
  a shadow take over the runs a dead loader held, with nothing lost or repeated.
* ``Constructor`` (``ray_constructor``): pulls each source's chunks in stream order (tokens through Ray's
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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from thruput.data.errors import DataError
from thruput.data.ray_constructor import Constructor, data_error
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

    def open(
        self, fingerprint: str, world_size: int, state: Mapping[str, Any], rank: int, suspect: str | None = None
    ) -> tuple[str, Any] | None:
        """The session (key, constructor) for ``world_size`` ranks from ``state``; None while closing.

        ``suspect``: a session whose constructor a rank saw die; it is dropped if it does not answer.
        """
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
            stale = self.sessions.get(suspect) if suspect else None
            if stale is not None:
                try:
                    ray.get(stale["constructor"].pid.remote(), timeout=10)
                except (RayActorError, ray.exceptions.GetTimeoutError):
                    ray.kill(stale["constructor"])
                    del self.sessions[suspect]
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
                if len(self.shadows) < self.opts["shadows"]:
                    self.shadows.append(SourceLoader.remote())  # the next shadow warms up in the background
                try:
                    ray.get(self._add_loader(name, shadow))
                except RayTaskError as exc:  # the source cannot even be opened any more
                    raise data_error(exc) from None
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
