"""One conformance suite for every backend (inline, process, Ray), its options, the shared scaling rule.

For the same plan every backend yields bitwise the same batches; its state, taken at a random
step, resumes on any backend (itself included) with the batches an uninterrupted run yields.
Ray cases share the session's 127.0.0.1-only instance (``ray_address``), one run id each.
"""
from __future__ import annotations

import json
import random
import uuid

import pytest
import torch
from test_data_loader import make_plan

from thruput.data import BackendOptions, DataError, InlineBackend, Loader, resolve_backend
from thruput.data.backends.scaling import pool_sizes

BACKENDS = ["inline", "process", "ray"]
STEPS = 5
WORLD = 2


def options(backend, request):
    """Chunk sizes unlike the reference's (32): chunking must not show in the batches."""
    if backend == "inline":
        return {"chunk_docs": 3}
    if backend == "process":
        # forkserver: forking a test process whose Ray client runs gRPC threads can deadlock a worker
        return {"min_workers": 1, "max_workers": 2, "chunk_docs": 5, "start_method": "forkserver"}
    address = request.getfixturevalue("ray_address")
    return {"address": address, "run_id": uuid.uuid4().hex[:8], "chunk_docs": 4, "shadows": 0}


def run(plan, backend, opts, steps, state=None):
    """``steps`` batches of every rank (ranks interleaved, as in training) and each rank's final state."""
    loaders = [Loader(plan, rank=r, world_size=WORLD, backend=backend, workers=opts) for r in range(WORLD)]
    try:
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        batches = [[] for _ in loaders]
        for _ in range(steps):
            for r, loader in enumerate(loaders):
                batches[r].append(next(loader))
        return batches, [loader.state_dict() for loader in loaders]
    finally:
        for loader in loaders:
            loader.close()


def identical(a, b):
    """Same keys; tensors equal in dtype, shape and every element; everything else equal."""
    if a.keys() != b.keys():
        return False
    for k in a:
        if torch.is_tensor(a[k]):
            if not (torch.is_tensor(b[k]) and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.fixture(scope="module")
def plan():
    return make_plan(world_size=WORLD)


@pytest.fixture(scope="module")
def reference(plan):
    """The uninterrupted run: inline, default options, STEPS steps per rank."""
    return run(plan, "inline", None, STEPS)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_yield_bitwise_the_same_batches(plan, reference, backend, request):
    got, states = run(plan, backend, options(backend, request), STEPS)
    assert all(identical(a, b) for r in range(WORLD) for a, b in zip(got[r], reference[r], strict=True))
    assert states[0] == states[1] and states[0]["step"] == STEPS


# Each backend's round trip, and a cycle in which each one resumes another's state and hands
# its own to a third (all nine pairs would add Ray sessions, not cases).
PAIRS = [(b, b) for b in BACKENDS] + [("inline", "process"), ("process", "ray"), ("ray", "inline")]


@pytest.mark.parametrize("first, second", PAIRS)
def test_state_at_a_random_step_resumes_on_any_backend(plan, reference, first, second, request):
    at = random.Random(f"{first}-{second}").randrange(1, STEPS)
    head, states = run(plan, first, options(first, request), at)
    state = json.loads(json.dumps(states[0]))  # plain data: what a checkpoint stores
    assert states[1] == states[0] and state["step"] == at
    tail, _ = run(plan, second, options(second, request), STEPS - at, state)
    for r in range(WORLD):
        assert all(identical(a, b) for a, b in zip(head[r] + tail[r], reference[r], strict=True))


# --- what "auto" picks, and the options --------------------------------------------------------------


@pytest.mark.parametrize("world_size, address, cpu_budget, expected", [
    (1, None, None, "process"),
    (1, None, 0, "inline"),  # no CPUs for loaders: read in the training process
    (1, None, 4, "process"),
    (2, None, 0, "ray"),
    (1, "auto", None, "ray"),
])
def test_auto_is_decided_in_one_place(world_size, address, cpu_budget, expected):
    assert resolve_backend("auto", world_size, address=address, cpu_budget=cpu_budget) == expected
    assert resolve_backend("inline", 8, address="auto") == "inline"  # a name is taken as it is


def test_unknown_backend_and_options_are_refused_naming_them():
    with pytest.raises(DataError, match=r"backend must be one of 'auto', 'inline', 'process', 'ray'"):
        resolve_backend("threads", 1)
    with pytest.raises(DataError, match=r"backend options: unknown 'max_worker' \(known: min_workers, max_workers"):
        BackendOptions.of({"max_worker": 2})
    with pytest.raises(DataError, match=r"ahead must be >= 1, got 0"):
        BackendOptions(ahead=0)
    with pytest.raises(DataError, match=r"cpu_budget must be >= 1 .* backend='inline'"):
        BackendOptions(cpu_budget=0)


def test_an_option_of_another_backend_is_refused_not_ignored():
    plan = make_plan(world_size=1)
    with pytest.raises(DataError, match=r"the process backend does not use 'shadows'"):
        Loader(plan, backend="process", workers={"shadows": 2})
    with pytest.raises(DataError, match=r"the inline backend does not use 'max_workers'"):
        InlineBackend(max_workers=2)
    with pytest.raises(DataError, match=r"the ray backend does not use 'start_method'"):
        Loader(plan, backend="ray", workers={"start_method": "spawn"})
    # "auto" choosing a local backend drops what only names a Ray run
    assert Loader(plan, workers={"run_id": "x"}).backend.options.run_id is None


def test_one_scaling_rule_corrects_an_overdrawn_budget():
    # a's share is 5.6 of 6 CPUs, but b, c and d need one loader each: a gets what is left.
    assert pool_sizes([40.0, 1.0, 1.0, 1.0], [1000] * 4, 6, 1, 6) == [3, 1, 1, 1]
    assert pool_sizes([1.0, 1.0], [0, 0], 1, 1, 4) == [1, 1]  # min_workers alone exceeds the budget
