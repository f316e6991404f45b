"""Who reads the sources: one protocol (``Backend``), three implementations, one set of options.

* ``InlineBackend``: the calling thread tokenizes (tests, debugging, tiny data).
* ``ProcessBackend`` (``process/``): worker processes per source on this machine.
* ``RayBackend`` (``ray/``): Ray actors shared by every rank, on any node.

``resolve_backend`` says what ``"auto"`` picks; ``BackendOptions`` holds every option;
``scaling.pool_sizes`` is the one rule that sizes the process and Ray pools.
"""
from thruput.data.backends.base import Backend, ChunkBackend
from thruput.data.backends.inline import InlineBackend
from thruput.data.backends.options import BackendOptions
from thruput.data.backends.registry import make_backend, resolve_backend

__all__ = ["Backend", "BackendOptions", "ChunkBackend", "InlineBackend", "make_backend", "resolve_backend"]
