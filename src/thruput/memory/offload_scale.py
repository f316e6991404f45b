"""OffloadAdamW's own loss scaling: a fixed or dynamic factor, and the overflow check per step.

A step whose gradients hold inf/NaN (their sum of squares is not finite) is skipped; the dynamic
scale starts at 2**16, halves on such a step and doubles after ``growth_interval`` good ones.
"""
from __future__ import annotations

import math
from typing import Any, Callable


class LossScale:
    """``loss_scale``: None (no scaling), a positive number, or ``"dynamic"``; ValueError otherwise."""

    def __init__(self, loss_scale: float | str | None, growth_interval: int) -> None:
        if not (loss_scale is None or loss_scale == "dynamic"
                or (isinstance(loss_scale, (int, float)) and loss_scale > 0)):
            raise ValueError(f"loss_scale must be None, 'dynamic' or a positive number, got {loss_scale!r}")
        self.dynamic = loss_scale == "dynamic"
        self.value: float | None = 2.0**16 if self.dynamic else (None if loss_scale is None else float(loss_scale))
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0
        self.last_step_skipped = False

    @property
    def factor(self) -> float:
        """What the loss is multiplied by (1.0 without scaling)."""
        return 1.0 if self.value is None else self.value

    def step_ok(self, grad_sq_sum: Callable[[], float]) -> bool:
        """Whether this step's (scaled) gradients are finite; updates the dynamic scale and the
        skip counters. ``grad_sq_sum`` is called only when scaling is on."""
        self.last_step_skipped = False
        if self.value is None:
            return True
        overflow = not math.isfinite(grad_sq_sum())
        if self.dynamic:
            self.good_steps = 0 if overflow else self.good_steps + 1
            if overflow:
                self.value *= 0.5
            elif self.good_steps >= self.growth_interval:
                self.value *= 2.0
                self.good_steps = 0
        if overflow:
            self.skipped_steps += 1
            self.last_step_skipped = True
        return not overflow

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.value, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """A saved scale is taken only when this run scales too."""
        self.value = sd["scale"] if self.value is not None else None
        self.good_steps = int(sd["good_steps"])
        self.skipped_steps = int(sd["skipped_steps"])
