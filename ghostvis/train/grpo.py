"""GRPO (group relative policy optimization) on verifiable rewards: the loss of `--stage rl`.

One call of the loss is one micro-batch of prompts (ghostvis/data/rl.py), and runs, inside the ordinary
training loop:

1. rollout: G = `--group-size` completions per prompt from the inference engine (KV cache, eval mode,
   no grad, `--temperature`, at most `--rl-max-new-tokens`), calculator tool use included;
2. reward: 1 if the reply's text (tool calls and their outputs left out) equals the reference answer after
   `normalize_answer` (ghostvis/tasks/qa.py), else 0 — exact match for visual QA, the final number for
   calculator arithmetic;
3. advantages: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), population std (ddof 0) over the G
   completions of one prompt. A group whose rewards are all equal (all right or all wrong) has nothing to
   compare and gets A = 0 everywhere: it adds no gradient;
4. policy loss over the completions' *sampled* tokens (prompt tokens, tokens the calculator forced and
   padding get no loss):  loss = -mean_t min(ρ_t A, clip(ρ_t, 1-ε, 1+ε) A) + β · mean_t KL_t,
   ρ_t = π(y_t) / π_old(y_t) with ε = `--clip-eps`. We take one gradient step per rollout, so π_old is the
   current policy itself (its log-probs detached from the same forward): ρ = 1, the clip is inactive and
   the gradient is the plain policy gradient A ∇log π; the clipped form stays so that reusing rollouts
   for several steps would be safe. KL_t = exp(q) - q - 1 with q = log π_ref(y_t) - log π(y_t) (the
   non-negative "k3" estimator) against a frozen copy of the starting model, only when β = `--kl-coef` > 0
   (off by default: no copy is kept). The mean is over all sampled tokens of the micro-batch.

Log-probs are those of the model at temperature 1; `--temperature` only shapes exploration. The loop logs
`reward` (mean over the micro-batch's completions, averaged over micro-batches and ranks),
`completion_tokens` (mean length) and, with the KL on, `kl` into metrics.jsonl.

Rollouts need every weight on every rank, so ZeRO-3 (partitioned parameters) is refused: use ZeRO <= 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ghostvis.infer.chat import reply_text
from ghostvis.infer.engine import Completion, Engine, evaluating
from ghostvis.tasks.qa import SKIP_CAUSES, reward
from ghostvis.train.engine import ConfigError
from ghostvis.train.settings import GRPOSettings

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """Rewards [N·G] (the G completions of a prompt adjacent) -> advantages [N·G], normalized per group."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), 0.0).view(-1)  # all-equal groups: exactly 0


def completion_targets(prompts: Sequence[Sequence[int]], completions: Sequence[Completion],
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets) [B, T] of prompt + completion rows, right-padded. targets[t] = idx[t+1] where that
    token was sampled by the policy, else -1 (prompt, tool-forced tokens, padding, the last position)."""
    rows = [list(p) + c.tokens for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (prompt, c) in enumerate(zip(prompts, completions)):
        idx[b, : len(rows[b])] = torch.tensor(rows[b])
        for i, (token, sampled) in enumerate(zip(c.tokens, c.sampled)):
            if sampled:
                targets[b, len(prompt) + i - 1] = token
    return idx, targets


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float, kl_coef: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, mean KL or None) from per-token log-probs [B, T], per-row advantages [B] and a 0/1 `mask`
    [B, T] of the tokens that count. Masked tokens contribute nothing, gradient included."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = -(surrogate * mask).sum() / n
    if kl_coef <= 0 or ref_logp is None:
        return loss, None
    q = (ref_logp - logp) * mask  # masked before exp: padding positions hold arbitrary values
    kl = ((torch.exp(q) - q - 1) * mask).sum() / n
    return loss + kl_coef * kl, kl.detach()


def rewards_of(engine: Engine, completions: Sequence[Completion], answers: Sequence[str]) -> torch.Tensor:
    return torch.tensor([reward(reply_text(engine, c.tokens), a) for c, a in zip(completions, answers)])


def token_logp(model: Any, idx: torch.Tensor, targets: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """log π(targets) per position [B, T] (0 where targets is -1): the model's per-token loss, negated."""
    kwargs = {} if pixel_values is None else {"pixel_values": pixel_values}
    return -model(idx, targets, reduction="none", **kwargs)


def grpo_loss(engine: Any, batch: dict[str, Any], *, settings: GRPOSettings, tokenizer: Any,
              reference: torch.nn.Module | None) -> tuple[torch.Tensor, dict[str, float]]:
    """One GRPO micro-batch: rollout -> rewards -> advantages -> policy loss (see the module doc)."""
    model, device, G = engine.module, engine.device, settings.group_size
    prompts = [p for p in batch["prompts"] for _ in range(G)]  # a prompt's completions are adjacent
    images = [im for im in batch["images"] for _ in range(G)]
    answers = [a for a in batch["answers"] for _ in range(G)]
    seed = int(torch.randint(2**62, ()).item())  # from the global RNG: checkpointed, so resume is exact
    with evaluating(model), torch.no_grad():
        sampler = Engine(model, tokenizer, device)
        completions = sampler.complete(prompts, images, max_new_tokens=settings.max_new_tokens,
                                       temperature=settings.temperature, seed=seed)
    rewards = rewards_of(sampler, completions, answers)
    advantages = group_advantages(rewards, G).to(device)

    idx, targets = completion_targets(prompts, completions, tokenizer.pad_token_id)
    idx, targets = idx.to(device), targets.to(device)
    pixels = None
    if getattr(model, "vision", None) is not None:  # always a tensor for a VLM, empty when text-only
        size = model.vision_config.image_size
        flat = [im for row in images for im in row]
        pixels = torch.stack(flat).to(device) if flat else torch.zeros(0, 3, size, size, device=device)
    logp = token_logp(engine, idx, targets, pixels)
    ref_logp = None
    if reference is not None:
        with torch.no_grad():
            ref_logp = token_logp(reference, idx, targets, pixels)  # the encoder casts pixels to its dtype
    loss, kl = policy_loss(logp, logp.detach(), advantages, targets != -1, settings.clip_eps, settings.kl_coef,
                           ref_logp)
    batch["num_tokens"] = int(sum(len(p) + len(c.tokens) for p, c in zip(prompts, completions)))  # for tokens/s
    metrics = {"reward": rewards.mean().item(),
               "completion_tokens": sum(len(c.tokens) for c in completions) / len(completions)}
    if kl is not None:
        metrics["kl"] = kl.item()
    # samples this rank skipped so far, by cause; every cause always, so every rank logs the same keys
    metrics.update({f"skipped_{cause.replace(' ', '_')}": float(batch.get("skipped", {}).get(cause, 0))
                    for cause in SKIP_CAUSES})
    return loss, metrics


def make_grpo_loss(req: Any) -> Callable:
    """The loss builder (`req` is a ghostvis.train.loop.LossRequest; its settings were checked when
    resolved): refuses ZeRO-3, keeps a frozen copy of the starting model when the KL penalty is on."""
    settings = req.settings.grpo
    if req.ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise ConfigError("--stage rl samples completions with the whole model on every rank, but ZeRO-3 "
                          "partitions the weights; use --ds_config ds_configs/zero2.json (or zero1)")
    reference = None
    if settings.kl_coef > 0:
        reference = req.initial_model().to(req.device).eval().requires_grad_(False)
        if req.dtype == "bf16":
            reference = reference.to(torch.bfloat16)
    return partial(grpo_loss, settings=settings, tokenizer=req.tokenizer, reference=reference)
