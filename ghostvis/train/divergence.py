"""Stopping a diverged run (docs/training.md, "Divergence").

A step is bad when DeepSpeed skipped its update, or its loss or gradient norm is not finite; every rank
agrees through one all-reduce of a flag per step. The run stops after `max_consecutive` bad steps in a row,
or when more than `max_fraction` of the last `window` steps (counted once `max_consecutive` steps are in
it) were bad. A checkpoint is trusted only once the step after it was good: the weights it holds gave a
finite loss and gradients. On a stop, checkpoints not trusted are dropped and `latest` names the newest
trusted one, so a resume (or `--rollbacks`) never starts from ruined weights.
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist


class DivergenceGuard:
    """Counts bad steps and which checkpoints are trusted (the same on every rank)."""

    def __init__(self, max_consecutive: int, max_fraction: float, window: int = 100) -> None:
        self.max_consecutive, self.max_fraction = max_consecutive, max_fraction
        self.recent: deque[bool] = deque(maxlen=window)
        self.consecutive = 0
        self.unconfirmed: list[int] = []  # checkpoint steps whose next step has not run yet, or was bad

    def saved(self, step: int) -> None:
        """A checkpoint of `step` exists; trusted once the next step is good."""
        self.unconfirmed.append(step)

    def check(self, applied: bool, loss: float, grad_norm: float | None, device: torch.device) -> str | None:
        """Record one step; the reason to stop, or None."""
        bad = not applied or not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag.item() > 0
        if not bad:
            self.unconfirmed.clear()  # the weights they hold just gave a good step
        self.recent.append(bad)
        self.consecutive = self.consecutive + 1 if bad else 0
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            return f"{self.consecutive} bad updates in a row (--max-skipped-updates {self.max_consecutive})"
        n, n_bad = len(self.recent), sum(self.recent)
        if self.max_consecutive > 0 and n >= min(self.max_consecutive, self.recent.maxlen) \
                and n_bad > self.max_fraction * n:
            return (f"{n_bad} of the last {n} updates were bad, more than --max-skipped-fraction "
                    f"{self.max_fraction:g}")
        return None

    def reset(self, resumed_step: int | None) -> None:
        """After a rollback to the checkpoint of `resumed_step`."""
        self.recent.clear()
        self.consecutive = 0
        self.unconfirmed = [] if resumed_step is None else [resumed_step]
