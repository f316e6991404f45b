"""The optimizer as the training loop drives it: one small interface for torch and offloaded ones.

``build_optimizer`` picks the optimizer from the run config and wraps it once in its adapter;
the loop then calls ``clip``, ``step``, ``copy_back`` and ``flush`` without knowing which it
holds, and checkpoints ``adapter.optimizer`` (a ``torch.optim.Optimizer``) like any other.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch
import torch.distributed as dist


class OptimizerStep(Protocol):
    """One optimizer step of the loop, whichever optimizer makes it."""

    optimizer: torch.optim.Optimizer  # what LR schedulers and checkpoints see
    reduces_gradients: bool  # reduces the data-parallel gradients itself (the loop then does not)
    collective_state: bool  # its state_dict() is a collective: every rank calls it

    def clip(self, max_norm: float | None) -> None:
        """Clip the gradients to global L2 norm ``max_norm`` (None: no clipping)."""

    def step(self) -> None:
        """Update the weights from the gradients, then drop the gradients."""

    def copy_back(self) -> None:
        """Finish putting the updated weights on the device (its own profiler phase)."""

    def flush(self) -> None:
        """Land any update still in flight: afterwards the model holds the newest weights."""


class TorchStep:
    """Any ``torch.optim.Optimizer`` whose gradients are the parameters' own ``.grad``."""

    reduces_gradients = False
    collective_state = False

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def clip(self, max_norm: float | None) -> None:
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def copy_back(self) -> None:
        pass  # the weights were updated in place on the device

    def flush(self) -> None:
        pass


class OffloadStep:
    """``OffloadAdamW`` / ``Zero2OffloadAdamW``: gradients, master weights and update on the host.

    Clipping is its one-pass ``clip_grad_norm_`` over the host buckets; the copies of the
    updated weights back to the device are ``copy_back``; ``flush`` waits for a delayed update."""

    def __init__(self, optimizer: Any) -> None:
        from thruput.memory import Zero2OffloadAdamW

        self.optimizer = optimizer
        sharded = isinstance(optimizer, Zero2OffloadAdamW)
        self.reduces_gradients = self.collective_state = sharded

    def clip(self, max_norm: float | None) -> None:
        if max_norm is not None:
            self.optimizer.clip_grad_norm_(max_norm)

    def step(self) -> None:
        self.optimizer.step(copy_back=False)
        self.optimizer.zero_grad(set_to_none=True)

    def copy_back(self) -> None:
        self.optimizer.copy_back()

    def flush(self) -> None:
        self.optimizer.flush()


def optimizer_step(optimizer: torch.optim.Optimizer) -> OptimizerStep:
    """The adapter for ``optimizer``: :class:`OffloadStep` for thruput's offloaded AdamW, else
    :class:`TorchStep`."""
    from thruput.memory import OffloadAdamW

    return OffloadStep(optimizer) if isinstance(optimizer, OffloadAdamW) else TorchStep(optimizer)


def build_optimizer(cfg: Any, params: Iterable[torch.nn.Parameter]) -> OptimizerStep:
    """The run's optimizer (``cfg.optimizer``: torch AdamW or thruput's OffloadAdamW, ZeRO-2
    under torchrun with ``zero2``) over the trainable ``params``; weight decay only on matrices."""
    o = cfg.optimizer
    trainable = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # e.g. LoRA adapters: matrices only
    if o.kind == "offload_adamw":
        from thruput.memory import OffloadAdamW, Zero2OffloadAdamW

        sharded = o.zero2 and dist.is_initialized() and dist.get_world_size() > 1
        optimizer = (Zero2OffloadAdamW if sharded else OffloadAdamW)(
            groups, lr=o.lr, betas=o.betas, eps=o.eps, state_dtype=o.state_dtype,
            delayed_update_after=o.delayed_update_after)
    else:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    return optimizer_step(optimizer)
