"""Stage specs: what trains, on which data, with which loss (docs/training.md).

A stage is data, not code: the one loop in `loop.py` reads a `Stage` and builds parameter groups from its
`trainable` rules, a batch source for its `data_kind` and a loss for its `loss`. Adding a stage means
adding an entry to `STAGES`; adding a data kind or a loss means registering a builder in `loop.py`
(`DATA_BUILDERS`, `LOSSES`).

Parameter names follow docs/architecture.md. A VLM holds the GPT under `llm.` and the tower under
`vision.` (`vision.encoder.`, `vision.resampler.`, `vision.projector.`), so LLM rules accept an optional
`llm.` prefix and the same `base` rules train a bare GPT.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ghostvis.train.settings import Settings

DATA_KINDS = ("text-tokens", "image-text", "conversation", "prompts")  # prompts: conversation shards read for RL
LOSS_KINDS = ("lm", "grpo")

# The LLM's decoder blocks, with or without the VLM's `llm.` prefix; group 1 = the block index.
LLM_BLOCK = r"(?:llm\.)?blocks\.(\d+)\."


@dataclass(frozen=True)
class ParamRule:
    """Parameters whose name matches `pattern` (re.match, i.e. anchored at the start) train at the learning
    rate named `lr` (a key of `Settings.lrs`, set by the `--<lr>` flag), with weight decay on or off.
    `group` (llm | encoder | connector) is what `--freeze` names: a rule of a frozen group matches
    nothing. With `last_layers`, the rule covers only the LLM's last K = `Settings.train_llm_layers`
    blocks (`--train-llm-layers`; K = 0: none), and every LLM weight, embeddings and head included, when
    K < 0 (= all).
    """

    pattern: str
    lr: str
    weight_decay: bool
    group: str = "llm"
    last_layers: bool = False

    def matches(self, name: str, n_layer: int, settings: Settings) -> bool:
        if self.group in settings.freeze or re.match(self.pattern, name) is None:
            return False
        if not self.last_layers:
            return True
        k = settings.train_llm_layers
        block = re.match(LLM_BLOCK, name)
        return k < 0 or (k > 0 and block is not None and int(block.group(1)) >= n_layer - k)


@dataclass(frozen=True)
class Stage:
    """One training stage. Rules are tried in order; the first match decides a parameter's group, and a
    parameter no rule matches is frozen (requires_grad=False, in no optimizer group)."""

    name: str
    data_kind: str
    loss: str
    trainable: tuple[ParamRule, ...]
    needs_vision: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # Settings fields (lrs by name), before flags
    description: str = ""

    def __post_init__(self) -> None:
        if self.data_kind not in DATA_KINDS:
            raise ValueError(f"Stage {self.name}: data_kind={self.data_kind!r}; choose one of {DATA_KINDS}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"Stage {self.name}: loss={self.loss!r}; choose one of {LOSS_KINDS}")

    @property
    def lr_names(self) -> tuple[str, ...]:
        """The learning-rate settings this stage uses, in rule order, without repeats."""
        return tuple(dict.fromkeys(rule.lr for rule in self.trainable))

    def rule_for(self, name: str, n_layer: int, settings: Settings) -> ParamRule | None:
        return next((r for r in self.trainable if r.matches(name, n_layer, settings)), None)


# Norm gains, biases and embeddings take no weight decay (decaying them only hurts); matrices do.
_GAINS = r"(?:.*norm.*|.*\.bias$)"
_LLM = r"(?:llm\.)?"
_CONNECTOR = r"vision\.(?:resampler|projector)\."
_ENCODER = r"vision\.encoder\."
FREEZE_GROUPS = ("llm", "encoder", "connector")
ALL_LAYERS = -1  # --train-llm-layers all

# Every LLM rule is limited by --train-llm-layers K (embeddings, head and final norm train only with `all`).
_LLM_RULES = tuple(ParamRule(p, lr, weight_decay=wd, group="llm", last_layers=True) for p, lr, wd in (
    (_LLM + r"wte\.", "embed_lr", False),
    (_LLM + r"lm_head\.", "head_lr", True),
    (_LLM + r"(?:norm_f\.|blocks\.\d+\." + _GAINS + ")", "llm_lr", False),
    (_LLM + r"blocks\.", "llm_lr", True),
))
# The vision tower: connector (resampler + projector) at --vision-lr, encoder at --encoder-lr. The
# encoder's group is in every vision stage's default --freeze: it trains only when --encoder-lr is given
# or an explicit --freeze leaves it out.
_VISION_RULES = (
    ParamRule(_CONNECTOR + _GAINS, "vision_lr", weight_decay=False, group="connector"),
    ParamRule(_CONNECTOR, "vision_lr", weight_decay=True, group="connector"),
    ParamRule(_ENCODER + _GAINS, "encoder_lr", weight_decay=False, group="encoder"),
    ParamRule(_ENCODER, "encoder_lr", weight_decay=True, group="encoder"),
)
_VISION_DEFAULTS = {"freeze": ("encoder",), "encoder_lr": 1e-5}


def _llm_lrs(lr: float) -> dict[str, float]:
    """One learning rate for every LLM part: embedding, head and blocks."""
    return {"embed_lr": lr, "head_lr": lr, "llm_lr": lr}


# GRPO (ghostvis/train/grpo.py; settings.GRPOSettings): completions per prompt, their length cap, sampling
# temperature, KL penalty against the frozen starting model (0 = off), PPO clip range of the per-token ratio.
_GRPO_DEFAULTS = {"group_size": 8, "rl_max_new_tokens": 64, "temperature": 1.0, "kl_coef": 0.0, "clip_eps": 0.2}

STAGES: dict[str, Stage] = {
    "base": Stage(
        name="base",
        data_kind="text-tokens",
        loss="lm",
        trainable=_LLM_RULES,
        defaults={"embed_lr": 3e-3, "head_lr": 3e-4, "llm_lr": 3e-4, "weight_decay": 0.1, "freeze": (),
                  "train_llm_layers": ALL_LAYERS, "warmup": 100, "schedule": "warmdown", "warmdown": 0.2},
        description="text pretraining: every LLM weight trains",
    ),
    "vision_pretrain": Stage(
        name="vision_pretrain",
        data_kind="image-text",
        loss="lm",
        trainable=_VISION_RULES + _LLM_RULES,
        needs_vision=True,
        defaults={**_VISION_DEFAULTS, "vision_lr": 1e-3, **_llm_lrs(1e-5), "train_llm_layers": 0,
                  "weight_decay": 0.0, "warmup": 50, "schedule": "cosine"},
        description="alignment: resampler + projector train; LLM and encoder frozen",
    ),
    "sft": Stage(
        name="sft",
        data_kind="conversation",
        loss="lm",
        trainable=_VISION_RULES + _LLM_RULES,
        needs_vision=True,
        defaults={**_VISION_DEFAULTS, "vision_lr": 2e-5, **_llm_lrs(2e-5), "train_llm_layers": ALL_LAYERS,
                  "weight_decay": 0.0, "warmup": 20, "schedule": "cosine"},
        description="instruction tuning: connector + the last --train-llm-layers LLM blocks (default all)",
    ),
    "rl": Stage(
        name="rl",
        data_kind="prompts",
        loss="grpo",
        trainable=_VISION_RULES + _LLM_RULES,
        needs_vision=True,
        defaults={**_VISION_DEFAULTS, **_GRPO_DEFAULTS, "vision_lr": 1e-6, **_llm_lrs(1e-6),
                  "train_llm_layers": ALL_LAYERS, "weight_decay": 0.0, "warmup": 0, "schedule": "constant"},
        description="GRPO on verifiable rewards (reference answers in the conversation shards)",
    ),
}


def parse_layers(text: str) -> int:
    """A `--train-llm-layers` value: a block count, or `all` (ALL_LAYERS)."""
    if text == "all":
        return ALL_LAYERS
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of blocks (0 = none) or 'all'")
    return int(text)


def parse_freeze(text: str) -> tuple[str, ...]:
    """A `--freeze` value: comma list of FREEZE_GROUPS, `none` (or empty) = freeze nothing. Names are
    checked by the caller, whose error names its own flag."""
    return tuple(g.strip() for g in text.split(",") if g.strip() and g.strip() != "none")


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"--stage {name!r} is unknown; choose one of {sorted(STAGES)}")
    return STAGES[name]
