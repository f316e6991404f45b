"""What the trainer iterates: batches for one rank, prefetched, with exact resumption."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from thruput.data.assemble import STATE_VERSION, initial_state
from thruput.data.backends import Backend, BackendOptions, make_backend
from thruput.data.errors import DataError
from thruput.data.plan import Plan

_POLL_S = 0.1  # how often a blocked put or get checks that the other side is still there
_JOIN_S = 10.0  # how long close() waits for the prefetch thread

log = logging.getLogger(__name__)

Build = Callable[[int], tuple[dict[str, Any], dict[str, Any]]]


class Loader:
    """Iterate batches of ``plan`` for data-parallel ``rank`` of ``world_size`` (default ``plan.world_size``).

    Each batch is a dict:

    * ``input_ids``, ``shift_labels``, ``position_ids``: int64 ``[B, T]`` with ``B = rows per
      rank``, ``T = seq_len``. ``shift_labels[b, t]`` is the target of ``input_ids[b, t]``
      (already shifted, named as transformers' loss names shifted targets; there is no
      ``labels`` key, so a model that shifts ``labels`` itself cannot shift these twice);
      -100 at padding and at the last token of a document (with ``plan.eos``, documents end in
      the EOS token: the label of the token before it is the EOS id). ``position_ids`` are each
      token's position in its document: 0 where a document begins, and a piece of a document
      split across rows continues where the previous piece ended (so they can exceed ``T``);
      padding counts from 0.
    * ``segment_ids``: int32 ``[B, T]``, the index of each token's piece (padding tails count
      as their own) in batch order. Attention belongs inside a piece: a continued piece cannot
      see the previous row, and positions alone cannot always tell pieces apart.
    * ``cu_seqlens``: int32 boundaries of the same pieces over the flattened ``B*T`` tokens,
      flash-attention style; ``max_seqlen``: the longest one.
    * ``tokens_per_source``: non-padding tokens per source name; ``padding_ratio`` in [0, 1].
    * ``documents``: ``(source, epoch, record, token_offset, length)`` per piece, in row order.
    * ``step``: the step this batch belongs to.

    ``backend`` is who reads the sources: ``"process"`` (source-loader worker processes),
    ``"inline"`` (no processes), ``"ray"`` (Ray actors shared by all ranks), ``"auto"`` (the
    default: ``"ray"`` when ``world_size > 1`` or ``workers`` names an ``address``, else
    ``"process"``; see ``thruput.data.resolve_backend``), or any object with the ``Backend``
    protocol. ``workers``: the backend's options (a mapping or ``BackendOptions``: pool sizes,
    ``chunk_docs``, Ray's ``address`` and ``run_id``, ...); one the backend does not read
    raises ``DataError``. The backend never changes which tokens a step gets. ``prefetch``
    batches are prepared ahead by a background thread. With a CUDA ``device``, batches are
    pinned and copied without blocking. Iteration is endless unless ``steps`` is set.

    ``state_dict()`` describes the position after the last batch returned; loading it into a new
    Loader (any number of workers, any ``world_size`` that divides the rows) continues with
    bitwise the same global batches. Errors from sources surface as ``DataError``.
    """

    def __init__(
        self,
        plan: Plan,
        rank: int = 0,
        world_size: int | None = None,
        *,
        backend: str | Backend = "auto",
        workers: Mapping[str, Any] | BackendOptions | None = None,
        prefetch: int = 2,
        device: str | torch.device | None = None,
        steps: int | None = None,
    ) -> None:
        self.plan = plan
        self.world_size = plan.world_size if world_size is None else world_size
        plan.check_world_size(self.world_size)
        if not 0 <= rank < self.world_size:
            raise DataError(f"loader: rank {rank} is outside world_size {self.world_size}")
        if prefetch < 1:
            raise DataError(f"loader: prefetch must be >= 1, got {prefetch}")
        self.rank = rank
        self.prefetch = prefetch
        self.steps = steps
        self.device = torch.device(device) if device is not None else None
        self.backend = make_backend(backend, self.world_size, workers)
        self._state: dict[str, Any] = initial_state(plan)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()  # each run gets its own queue and event
        self._copy_stream = None
        self.wait_s = 0.0  # total time __next__ blocked waiting for data
        self.last_wait_s = 0.0

    # --- production (background thread) -------------------------------------------------------

    def _start(self) -> None:
        state = self.state_dict()
        self.backend.open(self.plan, self.rank, self.world_size, state)
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        pin = self.device is not None and self.device.type == "cuda"
        # The thread holds no reference to the Loader: a Loader dropped mid-iteration is
        # collected, and its __del__ stops the thread and the backend.
        self._thread = threading.Thread(
            target=_produce,
            args=(self.backend.batch, state["step"], self.steps, pin, self._queue, self._stop),
            name="thruput-loader",
            daemon=True,
        )
        self._thread.start()

    # --- consumption ------------------------------------------------------------------------

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._thread is None:
            if self.steps is not None and self._state["step"] >= self.steps:
                raise StopIteration
            self._start()
        t0 = time.perf_counter()
        item = self._get()
        self.last_wait_s = time.perf_counter() - t0
        self.wait_s += self.last_wait_s
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        batch, self._state = item
        if self.device is not None and self.device.type == "cuda":
            batch = self._to_device(batch)
        return batch

    def _get(self) -> Any:
        """The next item of the prefetch thread; a ``DataError`` if the thread ended without one.

        How long a batch may take is the backend's to bound (each has a ``wait_s``); this wait
        ends when the thread does.
        """
        assert self._thread is not None
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()  # put just before it ended
                    except queue.Empty:
                        return DataError("loader: the prefetch thread ended without a batch or an error")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Copy pinned tensors on a side stream; the compute stream waits for it, not the host."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._copy_stream):
            out = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._copy_stream)
        for v in out.values():
            if torch.is_tensor(v):
                v.record_stream(current)  # keep the memory alive until the compute stream is done with it
        return out

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-data position after the last batch returned (step and per-source cursors)."""
        s = self._state
        return {**s, "sources": {n: dict(c) for n, c in s["sources"].items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; ``DataError`` if it does not match this plan's sources and seed."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state: version {state.get('version')!r}, expected {STATE_VERSION}")
        if state.get("seed") != self.plan.seed:
            raise DataError(f"loader state: seed {state.get('seed')!r} differs from the plan's seed {self.plan.seed}")
        names = set(state.get("sources", {}))
        if names != set(self.plan.names):
            raise DataError(f"loader state: sources {sorted(names)} differ from the plan's {sorted(self.plan.names)}")
        self._shutdown()
        self._state = {
            "version": STATE_VERSION,
            "step": int(state["step"]),
            "seed": self.plan.seed,
            "sources": {n: {k: int(v) for k, v in c.items()} for n, c in state["sources"].items()},
        }

    @property
    def skipped(self) -> dict[str, int]:
        """Malformed records skipped so far per source (sources with ``on_error="skip"``)."""
        return {n: c["skipped"] for n, c in self._state["sources"].items()}

    def stats(self) -> dict[str, Any]:
        """Plain-data figures: wait time, skipped records and the backend's own (workers, costs)."""
        return {"wait_s": self.wait_s, "skipped": self.skipped, **self.backend.stats()}

    # --- shutdown -----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._stop.set()
        self.backend.close()  # first: a producer blocked in fetch() must wake up to see the stop
        if self._thread is not None:
            self._thread.join(_JOIN_S)
            if self._thread.is_alive():
                # Only a read stuck in the thread itself (the inline backend, a custom one) gets
                # here: the process and Ray backends' waits end at close(). Its queue is its own.
                log.warning(
                    "thruput.data: the loader's prefetch thread did not stop within %.0f s (a source read that "
                    "hangs?); it is left running", _JOIN_S,
                )
            self._thread = None

    def close(self) -> None:
        """Stop the prefetch thread and all workers; the loader may be iterated again afterwards."""
        self._shutdown()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._shutdown()
        except Exception:
            pass


def _produce(build: Build, step: int, steps: int | None, pin: bool, out: queue.Queue[Any], stop: threading.Event) -> None:
    """The prefetch thread: the backend's batches from ``step`` on, as tensors, into ``out`` until ``steps`` or ``stop``."""
    try:
        while not stop.is_set() and (steps is None or step < steps):
            arrays, state = build(step)
            batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
            if pin:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            step += 1
            if not _put(out, stop, (batch, state)):
                return
        _put(out, stop, StopIteration())
    except BaseException as exc:  # handed to the consumer, which raises it in its own thread
        _put(out, stop, exc)


def _put(out: queue.Queue[Any], stop: threading.Event, item: Any) -> bool:
    """Put ``item`` unless the consumer stops the run first (a Loader closed or collected)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
