"""The Ray backend: every trainer rank, on any node, is served by one shared set of actors.

    loader = Loader(plan, rank, world_size, backend="ray", workers={"address": None, "run_id": "exp7"})

Each rank connects to Ray (an existing cluster when ``address`` is given, else a local instance
that rank 0 starts and the other ranks on the machine join), finds or creates the run's planner
(named ``"planner"`` in namespace ``thruput-<run_id>``, so two runs never share actors) and
asks the session's constructor for its batch of each step. The roles are in ``roles``.

Failures:

* a source-loader actor or its process dies: a warm shadow takes over its runs; batches are
  unchanged (no sample lost or repeated).
* a source keeps failing (its loaders died more than ``max_failures`` times, or it raises a
  ``DataError``): ``fetch`` raises ``DataError`` naming the source; nothing retries forever.
* the planner (or a constructor) dies: a warning says so, and the data plane is rebuilt from the
  state after the last batch this rank received (its last checkpoint), at most ``max_recoveries``
  times; the batches that follow are the ones an uninterrupted run would have produced.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from thruput.data.backends.options import SHARED, BackendOptions
from thruput.data.backends.ray.constructor import data_error
from thruput.data.backends.ray.roles import PLANNER_NAME, Planner, plan_fingerprint
from thruput.data.errors import DataError

log = logging.getLogger(__name__)

_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_POLL_S = 0.5  # how often a waiting batch() checks whether the backend was closed


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode: it neither rewrites 127.0.0.1 nor listens on other interfaces.

    Ray resolves 127.0.0.1 to the machine's routable address and listens on every interface
    unless the switch it uses on macOS and Windows is off; the processes Ray starts inherit it.
    """
    from ray._private import ray_constants

    previous_env, previous = os.environ.get(_LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
        if previous_env is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = previous_env


def start_local_ray(num_cpus: int | None = None, dashboard: bool = False, **init_kwargs: Any) -> str:
    """Start a private Ray instance: every process listens on 127.0.0.1 only; returns its address.

    The dashboard is off unless ``dashboard``; Ray's token authentication keeps its default
    (on in Ray 2.60, unless ``RAY_AUTH_MODE=disabled``). Other processes on the machine join
    with ``connect(address, rank)``. ``DataError`` (and the instance stopped) if Ray chose a
    routable address anyway, which a Ray release that drops the loopback switch would do.
    """
    # The switch is what binds: Ray rewrites an explicit 127.0.0.1 to the routable address
    # while it is on. The explicit address states the intent to releases that honour it.
    with _loopback_only():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            **init_kwargs,
        )
    address, node = ray.get_runtime_context().gcs_address, ray.util.get_node_ip_address()
    if not (_is_loopback(address) and _is_loopback(node)):
        ray.shutdown()
        raise DataError(
            f"ray backend: Ray {ray.__version__} started its local instance on {node} ({address}), not on "
            "127.0.0.1 only; start one yourself (`ray start --head --node-ip-address 127.0.0.1`) and pass its address"
        )
    return address


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (``host`` or ``host:port``) is this machine's loopback."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    return host == "localhost" or host.startswith("127.")


def connect(address: str | None, rank: int, wait_s: float = 60.0) -> None:
    """Join Ray: the running connection, ``address``, or this machine's instance (rank 0 starts it)."""
    if ray.is_initialized():
        return
    if address:
        with _loopback_only() if _is_loopback(address) else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=False)
        return
    if rank == 0:
        start_local_ray()
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with _loopback_only():  # rank 0's local instance listens on 127.0.0.1 only
                ray.init(address="auto", log_to_driver=False)
            return
        except ConnectionError:
            if time.monotonic() > deadline:
                raise DataError(
                    f"ray backend: rank {rank} found no Ray instance on this machine after {wait_s:.0f} s; "
                    "rank 0 starts one, or pass workers={'address': ...} (e.g. from `ray start --head`)"
                ) from None
            time.sleep(0.5)


class RayBackend:
    """Batches from the run's shared Ray actors; options (``BackendOptions``) are fixed at construction.

    ``RayBackend(address=..., run_id="exp7")`` or ``RayBackend(BackendOptions(...))``:

    * ``address``: a Ray cluster (``"host:port"``, ``"auto"``); None uses the running
      connection or a local 127.0.0.1-only instance.
    * ``run_id``: names the namespace ``thruput-<run_id>``; default: a hash of the plan.
      Concurrent runs of the same plan need distinct ids.
    * ``min_workers``, ``max_workers``, ``cpu_budget`` (default: the cluster's CPUs): loaders
      per source, sized by ``scaling.pool_sizes`` every ``rescale_every`` steps. Sources share
      loader processes, one per CPU of the budget (a source's own loaders are in distinct
      processes): many sources do not cost one process (~65 MiB) each. ``chunk_docs``
      documents per load call, ``prefetch_chunks`` calls in flight per source; ``shadows`` warm
      spare loader processes; ``max_failures`` loader deaths per source before the run stops.
    * ``ahead``: steps built past the slowest rank; ``wait_s``: longest wait for one batch
      before ``DataError`` (a rank that stopped iterating); ``max_recoveries``: planner or
      constructor deaths survived per ``open``.

    ``DataError`` for a process-only option (``start_method``).
    """

    READS = (*SHARED, "address", "run_id", "shadows", "ahead", "max_recoveries")

    def __init__(self, options: BackendOptions | Mapping[str, Any] | None = None, **fields: Any) -> None:
        self.options = BackendOptions.of(options, **fields).check_for("ray", self.READS)
        self.address, self.run_id, self.max_recoveries = self.options.address, self.options.run_id, self.options.max_recoveries
        self.planner: Any = None
        self._session: tuple[str, Any] | None = None
        self._last_stats: dict[str, Any] = {}
        self.recoveries = 0

    @property
    def namespace(self) -> str:
        return f"thruput-{self.run_id}"

    # --- lifecycle -------------------------------------------------------------------------------

    def open(self, plan: Any, rank: int, world_size: int, state: Mapping[str, Any]) -> None:
        """Join the run's session for ``world_size`` ranks starting at ``state`` (the Loader calls this)."""
        self.close()
        connect(self.address, rank)
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.fingerprint = plan_fingerprint(plan)
        self.run_id = self.run_id or self.fingerprint
        self._state = dict(state)
        self.recoveries = 0
        self._join()

    def _join(self, suspect: str | None = None, wait_s: float = 60.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            self.planner = Planner.options(
                name=PLANNER_NAME, namespace=self.namespace, get_if_exists=True, lifetime="detached"
            ).remote(self.plan, self.fingerprint, self.options)
            try:
                opening = self.planner.open.remote(self.fingerprint, self.world_size, self._state, self.rank, suspect)
                got = ray.get(opening)
            except RayTaskError as exc:
                raise data_error(exc) from None
            except RayActorError:
                got = None  # the previous run's planner is shutting down; its name frees shortly
            if got is not None:
                self._session = got
                return
            if time.monotonic() > deadline:
                raise DataError(f"ray backend: no session opened with the planner in namespace {self.namespace!r}")
            time.sleep(0.2)

    def close(self) -> None:
        """Leave the session; the last rank to leave the run's last session stops the planner."""
        if self._session is None:
            return
        key, _ = self._session
        self._session = None  # first: a batch() waiting in another thread gives up
        try:
            self._last_stats = ray.get(self.planner.stats.remote(), timeout=10)
            if ray.get(self.planner.release.remote(key, self.rank), timeout=10):
                ray.kill(self.planner)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass  # already gone: nothing left to release

    # --- data -------------------------------------------------------------------------------------

    def batch(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's batch of ``step`` (numpy arrays) and the state after it."""
        if self._session is None:
            raise DataError("ray backend: open() must be called before batch()")
        ref = self._session[1].batch.remote(step, self.rank)
        # The constructor may wait wait_s for lagging ranks, then build: past twice that it is stuck.
        deadline = time.monotonic() + 2 * self.options.wait_s
        while True:
            try:
                arrays, state = ray.get(ref, timeout=_POLL_S)
                break
            except ray.exceptions.GetTimeoutError:
                if time.monotonic() > deadline:
                    raise DataError(
                        f"ray backend: no batch for step {step} in {2 * self.options.wait_s:.0f} s from the data "
                        f"constructor of namespace {self.namespace!r}, which is alive (a source read that hangs?)"
                    ) from None
            except RayTaskError as exc:
                raise data_error(exc) from None
            except RayActorError:
                if self._session is not None:
                    self._recover(step)
                    ref = self._session[1].batch.remote(step, self.rank)
            if self._session is None:  # close() from another thread: the Loader is shutting down
                raise DataError("ray backend: closed while fetching")
        self._state = state
        # Arrays from the object store are read-only views of it: copy them out for the tensors.
        batch = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
        return batch, state

    def _recover(self, step: int) -> None:
        """Rebuild the session from the state after this rank's last batch, once per ``max_recoveries``."""
        try:
            ray.get(self.planner.ping.remote(), timeout=10)
            who = "its data constructor"
        except (RayActorError, ray.exceptions.GetTimeoutError):
            who = "the data planner"
        if self.recoveries >= self.max_recoveries:
            raise DataError(
                f"ray backend: {who} died at step {step} (namespace {self.namespace!r}) after "
                f"{self.recoveries} recoveries; resume the run from its last checkpoint"
            )
        self.recoveries += 1
        log.warning(
            "thruput.data: %s died at step %d (namespace %r); rank %d resumes from its last checkpoint "
            "(the state after step %d) and rebuilds the data plane",
            who, step, self.namespace, self.rank, step - 1,
        )
        self._join(suspect=self._session[0])  # the planner drops the dead session, if it still lives

    def stats(self) -> dict[str, Any]:
        """Pool sizes, loader processes, measured CPU s per token, failures and takeovers (last known if closed)."""
        if self._session is not None:
            try:
                self._last_stats = ray.get(self.planner.stats.remote(), timeout=10)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                pass
        return {"backend": "ray", "namespace": self.namespace, "recoveries": self.recoveries, **self._last_stats}

    def pids(self) -> dict[str, Any]:
        """Process ids of the planner, loaders per source, shadows and constructors."""
        return ray.get(self.planner.pids.remote(), timeout=60)
