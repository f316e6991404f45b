"""Hugging Face accelerate: thruput's Loader in an accelerate loop, checkpointed with the run.

``accelerator.prepare`` returns an object it does not know (a thruput Loader) unchanged: it is
not sharded, moved or wrapped, so the Loader must be built for this process's rank and device
itself, and registered for ``save_state``/``load_state``. :func:`prepare_loader` does the three::

    loader = prepare_loader(accelerator, plan)          # instead of accelerator.prepare(DataLoader(...))
    model, optimizer, scheduler = accelerator.prepare(model, OffloadAdamW(model.parameters()), scheduler)
    accelerator.load_state(folder)                      # when resuming: the Loader continues exactly

OffloadAdamW needs nothing: it is a ``torch.optim.Optimizer``, so ``prepare`` wraps it in an
``AcceleratedOptimizer`` (``step``/``zero_grad`` skipped while accumulating), and
``accelerator.clip_grad_norm_`` clips its host gradients through ``p.grad``.

Needs the ``accelerate`` extra: ``pip install 'thruput[accelerate]'``.
"""
from __future__ import annotations

from typing import Any

try:
    import accelerate
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("thruput.accelerate needs accelerate: pip install 'thruput[accelerate]'") from exc

from thruput.data import Loader, Plan


def prepare_loader(accelerator: "accelerate.Accelerator", plan: Plan, **kwargs: Any) -> Loader:
    """A Loader of ``plan`` for this process (``rank``, ``world_size`` and ``device`` from
    ``accelerator``), registered with ``accelerator.register_for_checkpointing`` so that
    ``save_state`` stores its position and ``load_state`` restores it (register it in the same
    order in the resumed run, as accelerate requires of every custom object). ``kwargs`` go to
    ``Loader`` (``backend``, ``workers``, ``prefetch``, ``steps``); ``DataError`` if the plan
    does not divide over ``accelerator.num_processes``."""
    for key in ("rank", "world_size", "device"):
        if key in kwargs:
            raise TypeError(f"prepare_loader: {key} comes from the accelerator; do not pass it")
    loader = Loader(plan, accelerator.process_index, accelerator.num_processes, device=accelerator.device, **kwargs)
    accelerator.register_for_checkpointing(loader)
    return loader
