"""Compile policy: torch.compile with shape buckets, recompile accounting and eager fallback.

Variable sequence lengths make torch.compile recompile (or fall back to slower dynamic-shape
kernels). Padding each batch up to the next of a few fixed lengths bounds the number of graphs
by the number of buckets; the padded positions are kept out of the loss by label
``ignore_index`` and out of attention by position (and segment) ids that start a new document.
"""
from __future__ import annotations

import bisect
import inspect
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch._dynamo.utils import counters

PadValue = int | float | str  # a fill value, or "arange" for position ids

# segment_ids -1: the padded columns are a segment of their own (real ids are >= 0)
DEFAULT_PAD_VALUES: dict[str, PadValue] = {"labels": -100, "shift_labels": -100, "position_ids": "arange", "segment_ids": -1}


def _check_buckets(name: str, buckets: Sequence[int] | None) -> tuple[int, ...] | None:
    if buckets is None:
        return None
    out = tuple(buckets)
    if not out or any(not isinstance(b, int) or b <= 0 for b in out) or list(out) != sorted(set(out)):
        raise ValueError(f"{name} must be strictly increasing positive ints, got {buckets!r}")
    return out


def _bucket(size: int, buckets: tuple[int, ...] | None, what: str) -> int:
    if buckets is None:
        return size
    i = bisect.bisect_left(buckets, size)
    if i == len(buckets):
        raise ValueError(f"{what} {size} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def _pad(t: torch.Tensor, rows: int, cols: int, value: PadValue) -> torch.Tensor:
    b, s = t.shape[:2]
    if (b, s) == (rows, cols):
        # contiguous, so that strides (which Dynamo guards on) are the same for every call
        return t.contiguous()
    if value == "arange":
        # padded columns restart at 0, so they form their own document and real tokens never
        # attend to them (nor they, under a causal mask, affect real tokens)
        out = torch.arange(cols, device=t.device, dtype=t.dtype).expand(rows, cols).clone()
        out[:b, s:] = torch.arange(cols - s, device=t.device, dtype=t.dtype)
        out[:b, :s] = t
        return out
    if isinstance(value, str):
        raise ValueError(f"pad value must be a number or 'arange', got {value!r}")
    out = torch.full((rows, cols, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    out[:b, :s] = t
    return out


def _unpad(out: Any, padded: tuple[int, int], real: tuple[int, int]) -> Any:
    if isinstance(out, torch.Tensor):
        return out[: real[0], : real[1]] if out.dim() >= 2 and tuple(out.shape[:2]) == padded else out
    if isinstance(out, tuple):
        return type(out)(*(_unpad(o, padded, real) for o in out)) if hasattr(out, "_fields") \
            else tuple(_unpad(o, padded, real) for o in out)
    if isinstance(out, list):
        return [_unpad(o, padded, real) for o in out]
    if isinstance(out, dict):
        return {k: _unpad(v, padded, real) for k, v in out.items()}
    return out


def _reason(exc: BaseException) -> str:
    """``Outer: root cause`` in one line; Dynamo wraps backend errors in its own exception."""
    root = exc
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
        root = inner
    lines = str(root).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0] if lines else ''}"
    return text if root is exc else f"{type(exc).__name__} caused by {text}"


def _graph_count() -> int:
    return counters["stats"]["unique_graphs"]


class BucketedCompiled:
    """A callable that pads its inputs to a shape bucket and runs them through torch.compile.

    The batch shape ``(B, T)`` is read from the first tensor argument with two or more dims.
    Every tensor argument whose leading dims are ``(B, T)`` is padded to ``(B', T')``: ``T'`` is
    the smallest of ``buckets`` >= T, ``B'`` likewise from ``batch_buckets`` (B is kept when that
    is None). Padding uses ``pad_values[name]`` for the argument called ``name`` (default
    ``labels=-100``, ``shift_labels=-100``, ``position_ids="arange"``, ``segment_ids=-1``, anything else 0). Tensor
    outputs whose leading dims are ``(B', T')`` are sliced back to ``(B, T)``; other outputs (a
    loss) pass unchanged, so a loss function that uses ``ignore_index=-100`` returns exactly the
    unpadded loss.

    The wrapped function must be causal in T and independent per row for the sliced outputs to
    equal the unpadded ones (a decoder LM is; the padded rows and columns only add work).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        buckets: Sequence[int] | None,
        *,
        batch_buckets: Sequence[int] | None = None,
        pad_values: Mapping[str, PadValue] | None = None,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
        fullgraph: bool = False,
    ) -> None:
        self.fn = fn
        self.buckets = _check_buckets("buckets", buckets)
        self.batch_buckets = _check_buckets("batch_buckets", batch_buckets)
        self.pad_values = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
        n_shapes = (len(self.buckets) if self.buckets else 1) * (len(self.batch_buckets) if self.batch_buckets else 1)
        limit = torch._dynamo.config.recompile_limit
        if self.buckets is not None and n_shapes > limit:
            raise ValueError(f"{n_shapes} bucket shapes exceed torch._dynamo.config.recompile_limit={limit}; "
                             "use fewer buckets or raise the limit")
        self._signature = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn)
        # buckets: one static graph per bucket; no buckets: let dynamo mark the dims dynamic
        dynamic = False if self.buckets is not None else True
        self.compiled = torch.compile(fn, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
        self._fallback: str | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters reported by :meth:`stats` (the fallback decision is kept)."""
        self._calls = self._compiles = self._graphs = 0
        self._compile_time_s = 0.0
        self._tokens = self._padded_tokens = 0

    def stats(self) -> dict[str, Any]:
        """Plain numbers for the profiler.

        ``compiles``: calls that compiled at least one new graph; ``recompiles``: those after the
        first (each a shape or guard change); ``graphs``: graphs compiled (more than
        ``compiles`` when the function has graph breaks); ``compile_time_s``: wall seconds of the
        calls that compiled (Dynamo tracing, the forward backend compile and that one run; a
        backward graph compiled lazily during ``.backward()`` is not included);
        ``padding_fraction``: share of the padded tokens that are padding; ``fallback``: why
        the wrapper runs eagerly, or None.
        """
        return {
            "calls": self._calls,
            "compiles": self._compiles,
            "recompiles": max(0, self._compiles - 1),
            "graphs": self._graphs,
            "compile_time_s": self._compile_time_s,
            "padding_fraction": 1.0 - self._tokens / self._padded_tokens if self._padded_tokens else 0.0,
            "fallback": self._fallback,
        }

    def _pad_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, tuple[int, int] | None, tuple[int, int] | None]:
        bound = self._signature.bind(*args, **kwargs)
        first = next((v for v in bound.arguments.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if first is None or (self.buckets is None and self.batch_buckets is None):
            return args, kwargs, None, None
        real = (first.shape[0], first.shape[1])
        padded = (_bucket(real[0], self.batch_buckets, "batch size"), _bucket(real[1], self.buckets, "sequence length"))
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == real:
                bound.arguments[name] = _pad(value, *padded, self.pad_values.get(name, 0))
        self._tokens += real[0] * real[1]
        self._padded_tokens += padded[0] * padded[1]
        return bound.args, bound.kwargs, padded, real

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._calls += 1
        if self._fallback is not None:
            return self.fn(*args, **kwargs)
        p_args, p_kwargs, padded, real = self._pad_args(args, kwargs)
        graphs_before = _graph_count()
        start = time.perf_counter()
        try:
            out = self.compiled(*p_args, **p_kwargs)
        except Exception as exc:  # noqa: BLE001 -- decide below whether it is a compile failure
            # An error that eager also raises belongs to the caller; only a failure that eager
            # does not reproduce is the compiler's, and switches this wrapper to eager for good.
            out = self.fn(*args, **kwargs)
            self._fallback = _reason(exc)
            warnings.warn(f"thruput.kernels.compile: torch.compile failed ({self._fallback}); "
                          "running eagerly from now on", RuntimeWarning, stacklevel=2)
            return out
        new_graphs = _graph_count() - graphs_before
        if new_graphs:
            self._compiles += 1
            self._graphs += new_graphs
            self._compile_time_s += time.perf_counter() - start
        return _unpad(out, padded, real) if padded is not None and padded != real else out


def compile(
    fn: Callable[..., Any],
    buckets: Sequence[int] | None = (128, 256, 512, 1024),
    *,
    batch_buckets: Sequence[int] | None = None,
    pad_values: Mapping[str, PadValue] | None = None,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    fullgraph: bool = False,
) -> BucketedCompiled:
    """Compile ``fn`` (a module or function) with shape buckets; see :class:`BucketedCompiled`.

    Args:
        buckets: allowed sequence lengths (strictly increasing); None compiles with dynamic
            shapes and no padding instead.
        batch_buckets: allowed batch sizes, or None to keep the batch size as it comes (each
            new batch size then costs a recompile, visible in ``stats()``).
        pad_values: fill value per argument name (``"arange"``: positions of a new document).
        backend, mode, fullgraph: passed to ``torch.compile``.

    Inputs longer than the largest bucket raise ``ValueError``. If compiling fails (no C++
    compiler, an unsupported op, a backend error) the call is re-run eagerly, a
    ``RuntimeWarning`` says why, and every later call runs eagerly (``stats()["fallback"]``).
    """
    return BucketedCompiled(fn, buckets, batch_buckets=batch_buckets, pad_values=pad_values,
                            backend=backend, mode=mode, fullgraph=fullgraph)
