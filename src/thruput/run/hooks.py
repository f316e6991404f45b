"""The torch hooks behind ``thruput run``: what each phase is, and how it is observed.

=============  ==============================================================================
phase          observed at
=============  ==============================================================================
data_wait      ``__next__`` of every torch DataLoader iterator (``_BaseDataLoaderIter``, which
               torchdata's StatefulDataLoader also goes through) and of ``thruput.data.Loader``
forward        the outermost module call: a global forward pre-hook
               (``register_module_forward_pre_hook``) that, at an outermost call, removes
               itself and puts an ``always_call`` forward hook on that module; the hook puts
               the global one back when the module returns. Inner module calls therefore
               meet no hook at all and keep torch's fast path
backward       ``torch.autograd.backward``, which ``Tensor.backward`` calls
optimizer      global optimizer step pre/post hooks; the clock optimizer's step ends the step
comm           the collectives of ``torch.distributed`` the script calls (the call, so an
               ``async_op=True`` collective counts its launch, not its wait); each blocking
               call also feeds the per-rank record (``thruput.profile.collectives``:
               ``compute_before_comm``, ``comm_wait``). DDP's reducer runs its all-reduces
               in C++, out of sight: a DDP script's waits stay inside ``backward``
h2d            ``Tensor.to`` / ``Tensor.cuda`` from the CPU to a CUDA device (only when CUDA
               is available: otherwise ``Tensor.to`` is left alone)
=============  ==============================================================================

A forward re-run inside backward (activation checkpointing) is an outermost call there, so
its time is forward, not backward. Only calls on the thread that installed the hooks count
(DataParallel replicas, pin-memory threads and autograd's device threads are not the training
loop), and nothing is recorded while ``torch.compile`` traces, so the hooks never enter a
graph. ``remove()`` restores every patched attribute and removes every handle.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.modules.module as nn_module
import torch.optim.optimizer as optim_module
from torch.utils.data import dataloader as torch_dataloader

from thruput.profile.collectives import collective
from thruput.run.recorder import Recorder

COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
    "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
    "gather_object", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
    "scatter_object_list", "send",
)


class TorchHooks:
    """Installs the hooks that feed a ``Recorder``; ``remove()`` undoes all of them.

    Usable as a context manager. Installing twice without removing is a RuntimeError.
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, bool, Any]] = []
        # The global forward pre-hook's handle (None inside an outermost forward), the hook on
        # the last outermost module and that module (owner), and the module whose outermost
        # forward is running.
        self._forward: dict[str, Any] = {"pre": None, "post": None, "owner": None, "module": None}
        self._installed = False

    def __enter__(self) -> "TorchHooks":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        if self._installed:
            raise RuntimeError("TorchHooks.install: already installed; call remove() first")
        self._installed = True
        rec = self.recorder
        main = threading.get_ident()
        get_ident = threading.get_ident
        compiling = torch.compiler.is_compiling
        forward = self._forward

        def forward_pre(module: torch.nn.Module, args: tuple) -> None:
            if compiling() or get_ident() != main:
                return
            # An outermost call: the global hook leaves until it returns, so the inner modules
            # take torch's hook-free fast path; a hook on this module marks the return.
            forward["pre"].remove()
            forward["pre"] = None
            if forward["owner"] is not module:
                if forward["post"] is not None:  # on the previous outermost module, idle since
                    forward["post"].remove()
                forward["post"] = module.register_forward_hook(forward_post, always_call=True)
                forward["owner"] = module
            forward["module"] = module
            rec.forward_begins(module, args)

        def forward_post(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if forward["module"] is not module or get_ident() != main:
                return
            # The module hook stays registered (removing it here would change the dict torch is
            # iterating when the forward raised); an outermost call of another module moves it.
            forward["module"] = None
            forward["pre"] = nn_module.register_module_forward_pre_hook(forward_pre)
            rec.exit()

        def optimizer_pre(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            if get_ident() == main:
                rec.optimizer_begins(optimizer)

        def optimizer_post(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            if get_ident() == main:
                rec.optimizer_ends(optimizer)

        def timed(phase: str, original: Callable, counts_batch: bool = False,
                  records_wait: bool = False) -> Callable:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if compiling() or get_ident() != main:
                    return original(*args, **kwargs)
                rec.enter(phase)
                try:
                    if records_wait and not kwargs.get("async_op"):
                        with collective():
                            result = original(*args, **kwargs)
                    else:
                        result = original(*args, **kwargs)
                finally:
                    rec.exit()
                if counts_batch:
                    rec.batch(result)
                return result

            wrapper.__wrapped__ = original
            wrapper.__name__ = getattr(original, "__name__", phase)
            wrapper.__doc__ = getattr(original, "__doc__", None)
            return wrapper

        forward["pre"] = nn_module.register_module_forward_pre_hook(forward_pre)
        self._handles += [
            optim_module.register_optimizer_step_pre_hook(optimizer_pre),
            optim_module.register_optimizer_step_post_hook(optimizer_post),
        ]
        iterator = torch_dataloader._BaseDataLoaderIter
        self._patch(iterator, "__next__", timed("data_wait", iterator.__next__, counts_batch=True))
        from thruput.data.loader import Loader

        self._patch(Loader, "__next__", timed("data_wait", Loader.__next__, counts_batch=True))
        self._patch(torch.autograd, "backward", timed("backward", torch.autograd.backward))
        if torch.distributed.is_available():
            import torch.distributed.distributed_c10d as c10d

            for name in COLLECTIVES:
                original = getattr(c10d, name, None)
                if original is None:
                    continue
                wrapper = timed("comm", original, records_wait=True)
                self._patch(c10d, name, wrapper)
                if getattr(torch.distributed, name, None) is original:
                    self._patch(torch.distributed, name, wrapper)
        if torch.cuda.is_available():
            self._install_h2d(rec, main, compiling)

    def _install_h2d(self, rec: Recorder, main: int, compiling: Callable[[], bool]) -> None:
        get_ident = threading.get_ident
        to, cuda = torch.Tensor.to, torch.Tensor.cuda

        def timed_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.is_cuda or compiling() or get_ident() != main or not _targets_cuda(args, kwargs):
                return to(self, *args, **kwargs)
            rec.enter("h2d")
            try:
                return to(self, *args, **kwargs)
            finally:
                rec.exit()

        def timed_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.is_cuda or compiling() or get_ident() != main:
                return cuda(self, *args, **kwargs)
            rec.enter("h2d")
            try:
                return cuda(self, *args, **kwargs)
            finally:
                rec.exit()

        self._patch(torch.Tensor, "to", timed_to)
        self._patch(torch.Tensor, "cuda", timed_cuda)

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        own = name in vars(owner)
        self._patches.append((owner, name, own, vars(owner)[name] if own else None))
        setattr(owner, name, replacement)

    def remove(self) -> None:
        """Restore every patched attribute and remove every hook (safe to call twice)."""
        for handle in [*self._handles, self._forward["pre"], self._forward["post"]]:
            if handle is not None:
                handle.remove()
        self._forward = {"pre": None, "post": None, "owner": None, "module": None}
        for owner, name, own, original in reversed(self._patches):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._handles, self._patches = [], []
        self._installed = False


def _targets_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` moves to a CUDA device."""
    device = kwargs.get("device", args[0] if args else None)
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.Tensor):
        return device.is_cuda
    return isinstance(device, int) and not isinstance(device, bool)
