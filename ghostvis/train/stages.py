"""Stage specs: what trains, on which data, with which loss (DESIGN.md §6).

A stage is data, not code: the one loop in `loop.py` reads a `Stage` and builds parameter groups from its
`trainable` rules, a batch source for its `data_kind` and a loss for its `loss`. Adding a stage means
adding an entry to `STAGES`; adding a data kind or a loss means registering a builder in `loop.py`
(`DATA_BUILDERS`, `LOSSES`).

Parameter names follow docs/architecture.md. A VLM holds the GPT under `llm.` and the tower under
`vision.` (`vision.encoder.`, `vision.resampler.`, `vision.projector.`), so LLM rules accept an optional
`llm.` prefix and the same `base` rules train a bare GPT.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

DATA_KINDS = ("text-tokens", "image-text", "conversation")
LOSS_KINDS = ("lm", "grpo")

# The LLM's decoder blocks, with or without the VLM's `llm.` prefix; group 1 = the block index.
_BLOCK = r"(?:llm\.)?blocks\.(\d+)\."


@dataclass(frozen=True)
class ParamRule:
    """Parameters whose name matches `pattern` (re.match, i.e. anchored at the start) train at the learning
    rate named `lr` (a key of the stage's resolved lrs, set by the `--<lr>` flag), with weight decay on or
    off. `last_layers` names a setting K: the rule then covers only the LLM's last K blocks, and non-block
    parameters only when K <= 0 (= the whole LLM).
    """

    pattern: str
    lr: str
    weight_decay: bool
    last_layers: str | None = None

    def matches(self, name: str, n_layer: int, settings: dict[str, Any]) -> bool:
        if re.match(self.pattern, name) is None:
            return False
        if self.last_layers is None:
            return True
        k = int(settings[self.last_layers])
        block = re.match(_BLOCK, name)
        return k <= 0 or (block is not None and int(block.group(1)) >= n_layer - k)


@dataclass(frozen=True)
class Stage:
    """One training stage. Rules are tried in order; the first match decides a parameter's group, and a
    parameter no rule matches is frozen (requires_grad=False, in no optimizer group)."""

    name: str
    data_kind: str
    loss: str
    trainable: tuple[ParamRule, ...]
    needs_vision: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
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

    def rule_for(self, name: str, n_layer: int, settings: dict[str, Any]) -> ParamRule | None:
        return next((r for r in self.trainable if r.matches(name, n_layer, settings)), None)


# Norm gains, biases and embeddings take no weight decay (decaying them only hurts); matrices do.
_GAINS = r"(?:.*norm.*|.*\.bias$)"
_LLM = r"(?:llm\.)?"
_CONNECTOR = r"vision\.(?:resampler|projector)\."

_LLM_RULES = (
    ParamRule(_LLM + r"wte\.", "embed_lr", weight_decay=False),
    ParamRule(_LLM + r"lm_head\.", "head_lr", weight_decay=True),
    ParamRule(_LLM + r"(?:norm_f\.|blocks\.\d+\." + _GAINS + ")", "llm_lr", weight_decay=False),
    ParamRule(_LLM + r"blocks\.", "llm_lr", weight_decay=True),
)
_CONNECTOR_RULES = (
    ParamRule(_CONNECTOR + _GAINS, "connector_lr", weight_decay=False),
    ParamRule(_CONNECTOR, "connector_lr", weight_decay=True),
)
# SFT: the LLM rules limited to the last `--sft-layers` blocks (embeddings, head and final norm train only
# when it is 0 = all).
_SFT_LLM_RULES = tuple(dataclasses.replace(r, last_layers="sft_layers") for r in _LLM_RULES)

STAGES: dict[str, Stage] = {
    "base": Stage(
        name="base",
        data_kind="text-tokens",
        loss="lm",
        trainable=_LLM_RULES,
        defaults={"embed_lr": 3e-3, "head_lr": 3e-4, "llm_lr": 3e-4, "weight_decay": 0.1,
                  "warmup": 100, "schedule": "warmdown", "warmdown": 0.2},
        description="text pretraining: every LLM weight trains",
    ),
    "vision_pretrain": Stage(
        name="vision_pretrain",
        data_kind="image-text",
        loss="lm",
        trainable=_CONNECTOR_RULES,
        needs_vision=True,
        defaults={"connector_lr": 1e-3, "weight_decay": 0.0, "warmup": 50, "schedule": "cosine"},
        description="alignment: resampler + projector train; LLM and encoder frozen",
    ),
    "sft": Stage(
        name="sft",
        data_kind="conversation",
        loss="lm",
        trainable=_CONNECTOR_RULES + _SFT_LLM_RULES,
        needs_vision=True,
        defaults={"connector_lr": 2e-5, "llm_lr": 2e-5, "embed_lr": 2e-5, "head_lr": 2e-5, "sft_layers": 0, "weight_decay": 0.0,
                  "warmup": 20, "schedule": "cosine"},
        description="instruction tuning: connector + the last --sft-layers LLM blocks (0 = all)",
    ),
    "rl": Stage(
        name="rl",
        data_kind="conversation",
        loss="grpo",
        trainable=_LLM_RULES,
        needs_vision=True,
        defaults={"embed_lr": 1e-6, "head_lr": 1e-6, "llm_lr": 1e-6, "weight_decay": 0.0,
                  "warmup": 0, "schedule": "constant"},
        description="GRPO on verifiable rewards (reference answers in the conversation shards)",
    ),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"--stage {name!r} is unknown; choose one of {sorted(STAGES)}")
    return STAGES[name]
