"""Client-side learning-rate schedule (docs/training.md).

DeepSpeed's built-in schedulers write one lr into every group, which erases per-group rates, so we never
use them: each step the loop sets `group["lr"] = group["base_lr"] * lr_multiplier(step, ...)` itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SCHEDULES = ("constant", "warmdown", "cosine")


def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str, warmdown: float = 0.2,
                  final: float = 0.0) -> float:
    """Multiplier for step `step` (0-based) of `total`: linear warmup over `warmup` steps, then
    `constant` (1.0), `warmdown` (1.0, then linear to `final` over the last `warmdown` fraction of the run)
    or `cosine` (1.0 → `final` over the steps after warmup)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule {schedule!r} is unknown; choose one of {SCHEDULES}")
    if not 0.0 <= warmdown <= 1.0:
        raise ValueError(f"--warmdown is a fraction of --steps in [0, 1], got {warmdown}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "warmdown":
        decay_steps = round(warmdown * total)
        left = total - step  # steps left including this one
        return 1.0 if left > decay_steps else final + (1.0 - final) * left / decay_steps
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(param_groups: Iterable[dict], multiplier: float) -> None:
    """Set every group's lr from its own `base_lr` (groups are ours, built by engine.build_param_groups)."""
    for group in param_groups:
        group["lr"] = group["base_lr"] * multiplier
