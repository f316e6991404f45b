"""The Ray actors of the shared data plane: planner, loader processes with warm shadows, constructors.

* ``Planner``: one per run, a detached actor named ``"planner"`` in the run's namespace, so every
  trainer rank finds the same one. It holds the plan, one pool of loaders per source and
  ``shadows`` warm spare loader processes, sizes the pools from the measured CPU seconds per
  token and the tokens consumed (within ``cpu_budget``), and opens one ``Constructor`` per session
  (a world size and a start state). Every actor it creates is owned by it and dies with it.
* ``LoaderHost``: one loader process; it tokenizes runs of the stream positions of each source
  it adopted. A source's loader is a slot on a host: several sources share a process (an idle
  Ray worker alone costs ~65 MiB), no more processes run than the budget has CPUs, and a
  source whose pool grows gets its further loaders in other processes. A chunk is a pure
  function of (source, seed, positions), so any loader of a source can serve any run: that is
  what lets a shadow take over the runs a dead process's loaders held, with nothing lost or
  repeated.
* ``Constructor`` (``constructor``): pulls each source's chunks in stream order (tokens through Ray's
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

import ray
from ray.exceptions import RayActorError, RayTaskError

from thruput.data.backends.options import BackendOptions
from thruput.data.backends.ray.constructor import Constructor, data_error
from thruput.data.backends.scaling import pool_sizes
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


def host_count(slots: Sequence[int], budget: int) -> int:
    """Loader processes for ``slots`` loaders per source: one per CPU of ``budget``, no more than loaders.

    A source's loaders sit in distinct processes (else they would share one GIL), so at least
    ``max(slots)``; more processes than CPUs add no throughput, only memory.
    """
    return max(min(budget, sum(slots)), max(slots, default=0))


@ray.remote(num_cpus=0)
class LoaderHost:
    """One loader process serving runs of the sources it adopted; created empty (a warm shadow) until ``adopt``.

    Calls run one at a time (an actor's default), so one source's ``StreamOrder`` cache is never
    shared by two threads.
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[Any, Any, StreamOrder]] = {}

    def adopt(self, source: Any, tokenizer: Any, seed: int) -> int:
        """Take on ``source`` (its index opens on first read: the per-source state). Returns this process id."""
        self._held[source.name] = (source, tokenizer, StreamOrder(source, seed))
        return os.getpid()

    def load(self, name: str, start: int, count: int) -> Chunk:
        source, tokenizer, order = self._held[name]
        try:
            return tokenize_chunk(source, tokenizer, order, start, count)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"source '{name}': {exc!r}") from exc

    def pid(self) -> int:
        return os.getpid()


class _Host:
    """A loader process as the planner sees it: its actor and its loader slots (key -> source)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.slots: dict[int, str] = {}
        self.held: set[str] = set()  # sources adopted; kept after a slot is retired (re-adopting would re-open)


class _Pool:
    """One source's loaders as the planner sees them: (key, host actor) pairs, failures, takeovers."""

    def __init__(self) -> None:
        self.members: list[tuple[int, Any]] = []
        self.failures = 0
        self.takeovers = 0
        self.cpu_s = 0.0
        self.tokens = 0


@ray.remote(num_cpus=0, max_concurrency=64)
class Planner:
    """The run's coordinator; see the module docstring. ``options``: ``RayBackend``'s ``BackendOptions`` (or a mapping of them)."""

    def __init__(self, plan: Any, fingerprint: str, options: BackendOptions | Mapping[str, Any]) -> None:
        self.plan, self.fingerprint, self.opts = plan, fingerprint, BackendOptions.of(options)
        self.budget = int(self.opts.cpu_budget or max(int(ray.cluster_resources().get("CPU", 1)), 1))
        self._lock = threading.RLock()
        self._next_key = 0
        self.sources = {s.name: s for s in plan.sources}
        self.pools = {name: _Pool() for name in self.sources}
        self.hosts: list[_Host] = []
        self.shadows = [LoaderHost.remote() for _ in range(self.opts.shadows)]
        self._warm_constructor: Any = Constructor.remote()  # the first session's, started alongside the loaders
        self.sessions: dict[str, dict[str, Any]] = {}
        self.closing = False
        lo = self.opts.min_workers
        wanted = host_count([lo] * len(self.sources), self.budget)
        adopting = [self._add_slot(n, self._host_for(n, wanted, {})) for _ in range(lo) for n in self.sources]
        self._adopting = [ref for ref in adopting if ref is not None]

    def _host_for(self, name: str, wanted: int, weight: Mapping[str, float]) -> _Host:
        """A new process while fewer than ``wanted`` run, else the least loaded one without ``name``."""
        free = [h for h in self.hosts if name not in h.slots.values()]
        if len(self.hosts) >= wanted and free:
            return min(free, key=lambda h: sum(weight.get(s, 1.0) for s in h.slots.values()))
        self.hosts.append(_Host(LoaderHost.remote()))
        return self.hosts[-1]

    def _add_slot(self, name: str, host: _Host) -> Any:
        """Give ``name`` a loader on ``host``; returns the adopt call (None if the host already holds it)."""
        self._next_key += 1
        host.slots[self._next_key] = name
        self.pools[name].members.append((self._next_key, host.actor))
        if name in host.held:
            return None
        host.held.add(name)
        return host.actor.adopt.remote(self.sources[name], self.plan.document_tokenizer, self.plan.seed)

    def _host_of(self, key: int) -> _Host | None:
        return next((h for h in self.hosts if key in h.slots), None)

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
        """Loader ``dead`` of ``name`` died: a warm shadow adopts every source its process served.

        Idempotent (several constructors, or several sources of one process, report the same
        death). Each of those sources counts a failure. A process that dies again while serving
        several sources is split, one process per source, so that the next death names its
        source. Raises ``DataError`` once a source has died more than ``max_failures`` times.
        """
        with self._lock:
            pool = self.pools[name]
            host = self._host_of(dead)
            if host is None:  # already replaced, or retired by a rescale: nothing failed
                return list(pool.members)
            self._drop_host(host)
            ray.kill(host.actor)
            moved = list(host.slots.values())
            while True:
                for n in moved:
                    self.pools[n].failures += 1
                failing = [n for n in moved if self.pools[n].failures > self.opts.max_failures]
                if failing:
                    raise DataError(self._failing(failing))
                split = len(moved) > 1 and any(self.pools[n].failures > 1 for n in moved)
                groups = [[n] for n in moved] if split else [moved]
                hosts = [_Host(self._take_shadow()) for _ in groups]
                self.hosts.extend(hosts)
                try:
                    ray.get([self._add_slot(n, h) for h, group in zip(hosts, groups) for n in group])
                except RayTaskError as exc:  # the source cannot even be opened any more
                    raise data_error(exc) from None
                except RayActorError:
                    for h in hosts:
                        self._drop_host(h)
                        ray.kill(h.actor)
                    continue
                for n in moved:
                    self.pools[n].takeovers += 1
                return list(pool.members)

    def _take_shadow(self) -> Any:
        """A warm shadow (a cold process if none is left); the next shadow warms up in the background."""
        actor = self.shadows.pop(0) if self.shadows else LoaderHost.remote()
        if len(self.shadows) < self.opts.shadows:
            self.shadows.append(LoaderHost.remote())
        return actor

    def _failing(self, failing: list[str]) -> str:
        limit, deaths = self.opts.max_failures, max(self.pools[n].failures for n in failing)
        if len(failing) == 1:
            return (
                f"source '{failing[0]}': its loader actors died {deaths} times (max_failures={limit}); "
                "the source keeps failing, stopping"
            )
        names = ", ".join(f"'{n}'" for n in failing)
        return (
            f"sources {names}: the loader process they share died {deaths} times (max_failures={limit}); "
            "one of them keeps failing, stopping"
        )

    def _drop_host(self, host: _Host) -> None:
        """Forget ``host`` and its slots (the caller ends the process)."""
        self.hosts.remove(host)
        for key, n in host.slots.items():
            self.pools[n].members = [m for m in self.pools[n].members if m[0] != key]

    def report(self, usage: Mapping[str, tuple[float, int]]) -> dict[str, list[tuple[int, Any]]]:
        """Add a constructor's measured (CPU seconds, tokens) per source, resize pools, return rosters.

        Pools shrink first (a process left without loaders ends), then grow on the least loaded
        processes, in new ones while fewer than ``host_count`` run.
        """
        with self._lock:
            for name, (cpu_s, tokens) in usage.items():
                self.pools[name].cpu_s += cpu_s
                self.pools[name].tokens += tokens
            names = list(self.pools)
            cost = [p.cpu_s / p.tokens if p.tokens else 0.0 for p in self.pools.values()]
            demand = [p.tokens for p in self.pools.values()]
            targets = pool_sizes(cost, demand, self.budget, self.opts.min_workers, self.opts.max_workers)
            work = {n: c * max(d, 1) or 1.0 for n, c, d in zip(names, cost, demand)}
            weight = {n: work[n] / t for n, t in zip(names, targets)}  # one loader's share of its source's work
            for name, target in zip(names, targets):
                pool = self.pools[name]
                while len(pool.members) > target:
                    # Calls already sent to a retired slot still succeed (its process keeps the
                    # source); a process with no slot left ends after the calls queued before
                    # this, and a constructor whose later call fails sees a retired key and
                    # resubmits without counting a failure.
                    key, _ = pool.members.pop()
                    host = self._host_of(key)
                    del host.slots[key]
                    if not host.slots:
                        self.hosts.remove(host)
                        host.actor.__ray_terminate__.remote()
            wanted = host_count(targets, self.budget)
            adopting = []
            for name, target in sorted(zip(names, targets), key=lambda nt: -weight[nt[0]]):
                while len(self.pools[name].members) < target:
                    adopting.append(self._add_slot(name, self._host_for(name, wanted, weight)))
            ray.get([ref for ref in adopting if ref is not None])
            return {name: list(p.members) for name, p in self.pools.items()}

    # --- introspection ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "workers": {n: len(p.members) for n, p in self.pools.items()},
                "cpu_s_per_token": {n: (p.cpu_s / p.tokens if p.tokens else 0.0) for n, p in self.pools.items()},
                "loader_failures": {n: p.failures for n, p in self.pools.items()},
                "takeovers": {n: p.takeovers for n, p in self.pools.items()},
                "loader_processes": len(self.hosts),
                "shadows": len(self.shadows),
                "sessions": len(self.sessions),
            }

    def pids(self) -> dict[str, Any]:
        """Process ids of every role (for fault injection and memory accounting).

        ``loaders``: per source, the process of each of its loaders (sources share processes).
        """
        with self._lock:
            slots = {n: [self._host_of(k) for k, _ in p.members] for n, p in self.pools.items()}
            hosts = list(self.hosts)
            shadows = list(self.shadows)
            constructors = [s["constructor"] for s in self.sessions.values()]
        pid = dict(zip(map(id, hosts), ray.get([h.actor.pid.remote() for h in hosts])))
        return {
            "planner": os.getpid(),
            "loaders": {n: [pid[id(h)] for h in hs] for n, hs in slots.items()},
            "shadows": ray.get([h.pid.remote() for h in shadows]),
            "constructors": ray.get([c.pid.remote() for c in constructors]),
        }

    def ping(self) -> bool:
        return True
