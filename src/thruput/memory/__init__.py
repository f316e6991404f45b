"""thruput.memory: training bigger models on the same hardware (ZeRO-Offload style).

* :class:`OffloadAdamW` -- a ``torch.optim.Optimizer`` keeping fp32 master weights, gradients
  and Adam states in host memory; gradients stream to the host during backward, and
  ``p.grad`` becomes a :class:`HostGrad` standing for the host value.
* :class:`Zero2OffloadAdamW` -- the same, each data-parallel rank owning a shard (ZeRO-2).
* :func:`adamw_step` / :class:`AdamState` -- the one-pass CPU AdamW kernel and its states.
* :func:`plan` -- predicted device and host memory per strategy, and what fits;
  :func:`largest_model` -- the largest model a strategy fits on a device.
"""
from thruput.memory.adam import STATE_DTYPES, AdamState, adamw_step, kernel_available
from thruput.memory.offload import OffloadAdamW
from thruput.memory.offload_grad import HostGrad
from thruput.memory.plan import MemoryPlan, StrategyEstimate, largest_model, parse_bytes, plan, render_plan
from thruput.memory.shard import Zero2OffloadAdamW

__all__ = ["STATE_DTYPES", "AdamState", "HostGrad", "MemoryPlan", "OffloadAdamW", "StrategyEstimate", "Zero2OffloadAdamW",
           "adamw_step", "kernel_available", "largest_model", "parse_bytes", "plan", "render_plan"]
