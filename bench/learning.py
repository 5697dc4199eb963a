"""The learning check every throughput bench runs on the steps it times (BENCHMARKS.md, "How we measure").

A speed figure counts only if the same steps trained the model. Every side of a bench starts from the same
weights and sees the same batches (`learnable_batches`, deterministic from a seed), keeps every step's
loss, and must pass `check_learning` against a reference side (a plain eager PyTorch loop, or a side the
bench names): its loss falls, and it tracks the reference. A side that fails prints FAILED in place of
its number (bench/pipeline.py, whose sides are whole trainer runs, keeps the row with FAILED in its speed
cells).

Why not random tokens: nothing in them is learnable, so a side whose gradients are all zero looks exactly
like one that trains. Here tokens come from a small span of the vocabulary, in pairs: a random token, then
its image under one fixed permutation of the span. Every position teaches the same two things whatever the
batch shape, so even one 32k-token row per step learns: the unigram part within a few steps (loss falls
from about ln V towards ln span), then the pair map on every second token. (Rows that repeated one random
segment, the earlier design, taught almost nothing per step at batch 1: only that row's 64 tokens.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

MIN_DROP = 0.05  # a side's loss must fall at least this fraction (first step's loss → mean of the last 3)
CONTROL_MARGIN = 0.01  # a LoRA side must end this fraction of its first loss below the frozen-adapter control
CONTROL_START_RTOL = 0.01  # ... whose first loss must be its own within this fraction (same weights and batch)
TRACK_ABS, TRACK_REL = 0.1, 0.02  # allowed gap to the reference: TRACK_ABS + TRACK_REL × the reference's mean


SPAN = 4096  # the most distinct token ids the batches use


def learnable_batches(vocab: int, batch: int, seq: int, device: torch.device | str,
                      seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) `[batch, seq]` forever: tokens from the first min(SPAN, vocab / 4) ids, in pairs (a
    random token, then its image under one fixed random permutation of the span). The same seed gives the
    same batches on any device."""
    g = torch.Generator().manual_seed(seed)
    span = max(2, min(SPAN, vocab // 4))
    successor = torch.randperm(span, generator=g)
    half = (seq + 2) // 2
    while True:
        first = torch.randint(0, span, (batch, half), generator=g)
        rows = torch.stack((first, successor[first]), dim=-1).flatten(1)[:, :seq + 1].to(device, non_blocking=True)
        yield rows[:, :-1], rows[:, 1:]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str


def _non_finite(losses: list[float]) -> Verdict | None:
    """A failing verdict naming the first non-finite step, or None."""
    bad = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
    return None if bad is None else Verdict(False, f"non-finite loss at step {bad}")


def loss_series(losses: list[float], reference: list[float] | None) -> str:
    """Every step's loss of a side and of its reference, for the log of a failed check: where the runs parted
    shows whether it was a bug or one run leaving the plateau a step later."""
    runs = [("losses", losses)] + ([("reference losses", reference)] if reference is not None else [])
    return "\n".join(f"{name + ':':17s} " + " ".join(f"{x:.3f}" for x in run) for name, run in runs)


def tail_mean(losses: list[float], n: int = 3) -> float:
    """The mean of the last `n` losses: where a side ended."""
    tail = losses[-n:]
    return sum(tail) / len(tail)


def check_learning(losses: list[float], reference: list[float] | None = None,
                   min_drop: float = MIN_DROP) -> Verdict:
    """Did this side learn? Its loss must be finite and fall by `min_drop` (first → mean of the last 3
    steps), and, given a reference run of the same steps, its mean and its end must each lie within
    TRACK_ABS + TRACK_REL × the reference's mean of the reference's. Means rather than step-by-step
    gaps: two correct runs (bf16 vs fp32, compiled vs eager) can cross a loss cliff a step apart."""
    if not losses:
        return Verdict(False, "no losses recorded")
    if (bad := _non_finite(losses)) is not None:
        return bad
    first, last = losses[0], tail_mean(losses)
    drop = (first - last) / abs(first) if first else 0.0
    summary = f"loss {first:.3f} → {last:.3f} ({100 * drop:.1f}% drop)"
    if drop < min_drop:
        return Verdict(False, f"{summary}: it did not learn (needs ≥ {100 * min_drop:.0f}%)")
    if reference is None:
        return Verdict(True, summary)
    n = min(len(losses), len(reference))
    if n < len(reference):
        return Verdict(False, f"{summary}: {len(losses)} steps against the reference's {len(reference)}")
    ref_mean = sum(reference) / n
    tol = TRACK_ABS + TRACK_REL * abs(ref_mean)
    mean_gap = abs(sum(losses[:n]) / n - ref_mean)
    end_gap = abs(tail_mean(losses[:n]) - tail_mean(reference))
    summary += f", gap to reference mean {mean_gap:.3f} / end {end_gap:.3f} (tolerance {tol:.3f})"
    if mean_gap > tol or end_gap > tol:
        return Verdict(False, f"{summary}: it does not track the reference")
    return Verdict(True, summary)


def check_beats_control(losses: list[float], control: list[float], margin: float = CONTROL_MARGIN) -> Verdict:
    """Did the adapters learn? A LoRA side's own fall can't show it: on random weights most of a model's
    first fall is which tokens occur at all, held by the frozen head and embedding, and the stage's connector
    trains too. So it runs beside a control of the same steps with its adapters kept at zero (`--lora-control`),
    and must end (mean of the last 3) below the control's end by `margin` × its first loss. Both start from the
    same weights with the adapters at zero, so their first losses must agree: a different start proves the flags
    differ, though the same start does not prove they match (rank, lr or compile leave step 0 alone)."""
    if not losses or len(losses) != len(control):
        return Verdict(False, f"{len(losses)} steps against the control's {len(control)}")
    for name, run in (("this run", losses), ("the control", control)):
        if (bad := _non_finite(run)) is not None:
            return Verdict(False, f"{name}: {bad.message}")
    if abs(losses[0] - control[0]) > CONTROL_START_RTOL * abs(control[0]):
        return Verdict(False, f"first loss {losses[0]:.3f} against the control's {control[0]:.3f}: not the same "
                              "start (run the control with this run's flags)")
    first, last, floor = losses[0], tail_mean(losses), tail_mean(control)
    gain = (floor - last) / abs(first) if first else 0.0
    summary = (f"loss {first:.3f} → {last:.3f}, {100 * gain:.1f}% of the first loss below the control with "
               f"frozen adapters ({control[0]:.3f} → {floor:.3f})")
    if gain < margin:
        return Verdict(False, f"{summary}: the adapters did not learn (needs ≥ {100 * margin:.0f}%)")
    return Verdict(True, summary)
