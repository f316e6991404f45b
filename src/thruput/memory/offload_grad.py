"""``HostGrad``: what ``p.grad`` holds once OffloadAdamW has moved a gradient to the host.

A ``torch.Tensor`` subclass with the parameter's shape, dtype, device and strides and no
storage of its own: it stands for that parameter's piece(s) of the fp32 host accumulator, so
that code written for ``torch.optim.AdamW`` finds the gradient where torch puts it. Its
``__torch_dispatch__`` runs what training loops do to gradients on the host buffers directly:

* ``add_`` (autograd accumulating a second backward into ``p.grad``): streamed to the host
  like the hook's first gradient;
* ``zero_`` / ``fill_(0)`` (``zero_grad(set_to_none=False)``): the next gradient overwrites;
* ``linalg_vector_norm``, ``mul_`` / ``div_`` by a scalar (``torch.nn.utils.clip_grad_norm_``
  calls them per tensor for subclasses) and ``_amp_foreach_non_finite_check_and_unscale_``
  (``GradScaler.unscale_``);
* ``detach`` / ``alias`` (``.data``): another handle on the same gradient.

Any other op is correct, only slower: the gradient is materialised on the parameter's device
in its dtype (from the fp32 host value), the op runs, and what the op's schema says it writes
goes back to the host. View ops give a view handle that resolves (and writes back) through
its parent. Values are those of the fp32 accumulator, rounded to the parameter's dtype when
materialised. A handle still referenced when a later backward replaces the gradient (after
``zero_grad()``) keeps its value, as a torch tensor would: it is snapshotted first.

The host side is a :class:`GradSource` (``offload_stream.GradientStream``, or ZeRO-2's, whose
``host`` refuses: each rank holds only a shard).
"""
from __future__ import annotations

from numbers import Number
from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten


class GradUnavailable(RuntimeError):
    """A source cannot serve this use of ``p.grad`` (ZeRO-2: a shard); the message says what to call."""


class GradSource(Protocol):
    """The host side of a parameter's gradient."""

    def add(self, p: Tensor, grad: Tensor) -> None:
        """Add ``grad`` (a real tensor shaped like ``p``) to ``p``'s gradient."""

    def zero(self, p: Tensor) -> None:
        """Make ``p``'s gradient zero."""

    def host(self, p: Tensor) -> Tensor:
        """``p``'s gradient as an fp32 CPU tensor shaped like ``p`` that may be written (a view
        of the accumulator); the caller calls :meth:`stored` after writing. May raise."""

    def stored(self, p: Tensor) -> None:
        """``host(p)`` was written."""


class HostGrad(Tensor):
    """A handle on a parameter's host gradient (see the module docstring); made by GradSources."""

    _source: GradSource
    _param: Tensor
    _of: HostGrad | None  # the root handle (the one in p.grad) of a view or alias; None for a root
    _view_fn: Callable[[Tensor], Tensor] | None  # from the root's value to this view's
    _frozen: Tensor | None  # the snapshot of a replaced gradient (then the source is not used)

    @staticmethod
    def __new__(cls, source: GradSource, param: Tensor, *, root: HostGrad | None = None,
                view_fn: Callable[[Tensor], Tensor] | None = None, meta: Tensor | None = None) -> HostGrad:
        if meta is None:
            meta = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device="meta")
        r = Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(),
                                          storage_offset=meta.storage_offset(), dtype=meta.dtype,
                                          device=param.device, requires_grad=False)
        r._source, r._param, r._view_fn, r._frozen = source, param, view_fn, None
        r._of = root  # not self for a root: a cycle would keep a dropped gradient alive until gc
        r._meta = meta
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def _root(self) -> HostGrad:
        return self if self._of is None else self._of

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        try:
            return f"HostGrad({self._value()!r})"
        except GradUnavailable:
            return f"HostGrad(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, unreadable)"

    # --- values ----------------------------------------------------------------------------

    def _live(self) -> bool:
        """True for the root handle (or an alias of it) whose value is still the source's."""
        return self._view_fn is None and self._root._frozen is None

    def _materialize(self) -> Tensor:
        """The root's value as a tensor on the parameter's device: the snapshot itself once
        frozen (writes land in it), else a new copy (write it back with :meth:`_store`)."""
        root = self._root
        if root._frozen is not None:
            return root._frozen
        host = root._source.host(root._param)
        return host.to(device=root._param.device, dtype=root._param.dtype, copy=True)

    def _store(self, value: Tensor) -> None:
        root = self._root
        if root._frozen is None:
            root._source.host(root._param).copy_(value)
            root._source.stored(root._param)

    def _value(self) -> Tensor:
        base = self._materialize()
        return base if self._view_fn is None else self._view_fn(base)

    def _freeze(self) -> None:
        """Snapshot the root's value: the source is about to hold another gradient."""
        if self._root._frozen is None:
            self._root._frozen = self._materialize()

    # --- dispatch --------------------------------------------------------------------------

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            hot = _HOT.get(func)
            if hot is not None:
                out = hot(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            if func.is_view and isinstance(args[0], HostGrad) and _count_handles((args[1:], kwargs)) == 0:
                return _view(func, args, kwargs)
            return _fallback(func, args, kwargs)
        except GradUnavailable as e:
            raise GradUnavailable(f"{e} (op {func})") from None


def _count_handles(tree: Any) -> int:
    return sum(isinstance(x, HostGrad) for x in tree_flatten(tree)[0])


def _live_root(x: Any) -> bool:
    return isinstance(x, HostGrad) and x._live()


def _is_scalar(x: Any) -> bool:
    return isinstance(x, Number) or (isinstance(x, Tensor) and not isinstance(x, HostGrad) and x.dim() == 0)


def _cpu_scalar(x: Any) -> Any:
    return x.to("cpu") if isinstance(x, Tensor) else x


# --- hot ops: straight on the host buffers ---------------------------------------------------


def _add_(self: Any, other: Any, alpha: Any = 1) -> Any:
    if not (_live_root(self) and isinstance(other, Tensor) and not isinstance(other, HostGrad) and alpha == 1
            and other.shape == self.shape and other.device == self.device):
        return NotImplemented
    self._root._source.add(self._root._param, other)
    return self


def _zero_(self: Any) -> Any:
    if not _live_root(self):
        return NotImplemented
    self._root._source.zero(self._root._param)
    return self


def _fill_(self: Any, value: Any) -> Any:
    return _zero_(self) if _is_scalar(value) and float(value) == 0.0 else NotImplemented


def _scale_(op: Callable[[Tensor, Any], Tensor]) -> Callable[..., Any]:
    def handler(self: Any, other: Any) -> Any:
        if not (_live_root(self) and _is_scalar(other)):
            return NotImplemented
        root = self._root
        op(root._source.host(root._param), _cpu_scalar(other))
        root._source.stored(root._param)
        return self

    return handler


def _vector_norm(self: Any, ord: Any = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    if not _live_root(self):
        return NotImplemented
    root = self._root
    norm = torch.linalg.vector_norm(root._source.host(root._param), ord, dim, keepdim, dtype=dtype)
    return norm.to(device=self.device, dtype=self.dtype if dtype is None else dtype)


def _unscale_(grads: list[Any], found_inf: Tensor, inv_scale: Tensor) -> Any:
    """GradScaler.unscale_: the host gradients unscaled and checked on the host, the others by
    the op itself; ``found_inf`` becomes 1 if either found a non-finite value."""
    mine = [g for g in grads if _live_root(g)]
    if not mine:
        return NotImplemented
    others = [g for g in grads if not _live_root(g)]
    if others:
        aten._amp_foreach_non_finite_check_and_unscale_(others, found_inf, inv_scale)
    host_inf = found_inf.to("cpu", copy=True)
    hosts = [g._root._source.host(g._root._param) for g in mine]
    torch._amp_foreach_non_finite_check_and_unscale_(hosts, host_inf, inv_scale.to("cpu"))
    for g in mine:
        g._root._source.stored(g._root._param)
    found_inf.copy_(torch.maximum(found_inf, host_inf.to(found_inf.device)))
    return None


_HOT: dict[Any, Callable[..., Any]] = {
    aten.add_.Tensor: _add_,
    aten.zero_.default: _zero_,
    aten.fill_.Scalar: _fill_,
    aten.fill_.Tensor: _fill_,
    aten.mul_.Tensor: _scale_(Tensor.mul_),
    aten.mul_.Scalar: _scale_(Tensor.mul_),
    aten.div_.Tensor: _scale_(Tensor.div_),
    aten.div_.Scalar: _scale_(Tensor.div_),
    aten.linalg_vector_norm.default: _vector_norm,
    aten._amp_foreach_non_finite_check_and_unscale_.default: _unscale_,
}


# --- views and the generic fallback ----------------------------------------------------------


def _view(func: Any, args: tuple, kwargs: dict) -> Any:
    """A view op on a handle: handles that resolve through it (aliases of a root stay roots)."""
    x: HostGrad = args[0]
    rest = args[1:]
    if func in (aten.detach.default, aten.alias.default) and x._view_fn is None:
        return HostGrad(x._root._source, x._param, root=x._root, meta=x._meta)
    parent = x._view_fn
    meta_out = func(x._meta, *rest, **kwargs)

    def view_fn_for(index: int | None) -> Callable[[Tensor], Tensor]:
        def fn(base: Tensor) -> Tensor:
            out = func(base if parent is None else parent(base), *rest, **kwargs)
            return out if index is None else out[index]

        return fn

    if isinstance(meta_out, Tensor):
        return HostGrad(x._source, x._param, root=x._root, view_fn=view_fn_for(None), meta=meta_out)
    return type(meta_out)(HostGrad(x._source, x._param, root=x._root, view_fn=view_fn_for(i), meta=m)
                          for i, m in enumerate(meta_out))


def _written(func: Any, args: tuple, kwargs: dict) -> list[HostGrad]:
    """The handles among the arguments that the op's schema says it writes."""
    out: list[HostGrad] = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out.extend(x for x in tree_flatten(value)[0] if isinstance(x, HostGrad))
    return out


def _fallback(func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on materialised values; write back what it wrote; return handles for the
    outputs that are its written arguments (in-place and out= ops return them)."""
    bases: dict[int, tuple[HostGrad, Tensor]] = {}  # one value per root, so that aliases alias
    unwrapped: dict[int, Tensor] = {}

    def unwrap(x: Any) -> Any:
        if not isinstance(x, HostGrad):
            return x
        root = x._root
        if id(root) not in bases:
            bases[id(root)] = (root, root._materialize())
        base = bases[id(root)][1]
        value = base if x._view_fn is None else x._view_fn(base)
        unwrapped[id(x)] = value
        return value

    written = _written(func, args, kwargs)
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    for root in {id(x._root): x._root for x in written}.values():
        root._store(bases[id(root)][1])
    by_value = {id(unwrapped[id(x)]): x for x in written}
    return tree_map(lambda t: by_value.get(id(t), t) if isinstance(t, Tensor) else t, out)
