"""Shared fixtures. One Ray instance serves the whole test session; only tests that ask for it start it."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_address():
    """Address of a 127.0.0.1-only Ray instance (2 CPUs, no dashboard), shut down at session end."""
    ray = pytest.importorskip("ray")
    from thruput.data.ray_backend import start_local_ray

    address = start_local_ray(num_cpus=2, object_store_memory=200 * 2**20)
    yield address
    ray.shutdown()
