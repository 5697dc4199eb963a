"""`Settings`: one stage's training settings as typed values, resolved once per run from the stage's
defaults (stages.py) overridden by the flags (or a --config recipe, which sets the same flags). Every part
that needs a setting reads it here: the parameter groups (learning rates, weight decay, freeze groups,
trained LLM blocks), the schedule, and GRPO's loss.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from ghostvis.train.engine import ConfigError
from ghostvis.train.stages import ALL_LAYERS, FREEZE_GROUPS, Stage

MAX_LR = 1e30
# --init-perturb's default with --init-shrink: the share of fresh initial weights added to the shrunk blocks
# (docs/demo.md: 0.5 x base + 0.1 x fresh binds where 0.5 + 0.5 does not)
DEFAULT_INIT_PERTURB = 0.1
# flags that override a stage default of the same name
SETTING_FLAGS = ("weight_decay", "warmup", "schedule", "warmdown", "train_llm_layers", "freeze", "group_size",
                 "rl_max_new_tokens", "temperature", "kl_coef", "clip_eps")


@dataclass(frozen=True)
class GRPOSettings:
    """GRPO's (ghostvis/train/grpo.py): completions per prompt, their length cap, sampling temperature, KL
    penalty against the frozen starting model (0 = off), PPO clip range of the per-token ratio."""

    group_size: int
    max_new_tokens: int
    temperature: float
    kl_coef: float
    clip_eps: float

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"--group-size {self.group_size}: GRPO compares completions of one prompt, use >= 2")
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ConfigError(f"--rl-max-new-tokens ({self.max_new_tokens}) must be >= 1 and --temperature "
                              f"({self.temperature}) > 0: rollouts must sample")
        if self.kl_coef < 0 or self.clip_eps <= 0:
            raise ConfigError(f"--kl-coef ({self.kl_coef}) must be >= 0 and --clip-eps ({self.clip_eps}) > 0")


@dataclass(frozen=True)
class Settings:
    """What a stage trains and how fast. `lrs`: learning-rate name (a ParamRule's `lr`) -> value; `freeze`:
    FREEZE_GROUPS whose rules match nothing; `train_llm_layers`: the LLM's last K blocks train (ALL_LAYERS
    = every LLM weight, embeddings and head included); `grpo`: set for the GRPO loss only."""

    lrs: dict[str, float]
    weight_decay: float = 0.0
    freeze: tuple[str, ...] = ()
    train_llm_layers: int = ALL_LAYERS
    warmup: int = 0
    schedule: str = "constant"
    warmdown: float = 0.2  # fraction of the steps decaying to 0 (schedule "warmdown")
    grpo: GRPOSettings | None = None

    @classmethod
    def of(cls, stage: Stage, values: dict[str, Any]) -> Settings:
        """Typed settings from name -> value (a stage's defaults, overridden); lrs are the stage's own."""
        grpo = None
        if "group_size" in values:
            grpo = GRPOSettings(int(values["group_size"]), int(values["rl_max_new_tokens"]),
                                float(values["temperature"]), float(values["kl_coef"]), float(values["clip_eps"]))
        plain = {f.name for f in dataclasses.fields(cls)} - {"lrs", "grpo"}
        return cls(lrs={name: float(values[name]) for name in stage.lr_names if name in values},
                   grpo=grpo, **{k: v for k, v in values.items() if k in plain})


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def refuse_flags_on_frozen(stage: Stage, args: argparse.Namespace, freeze: tuple[str, ...]) -> None:
    """ConfigError when a flag given in `args` (a group's learning rate, --train-llm-layers) trains a group that
    the explicit --freeze `freeze` lists."""
    given = {r.lr: r.group for r in stage.trainable if getattr(args, r.lr, None) is not None}
    if getattr(args, "train_llm_layers", None):
        given["train_llm_layers"] = "llm"
    for key, group in given.items():
        if group in freeze:
            raise ConfigError(f"{_flag(key)} trains the {group} but --freeze lists it; drop one")


def resolve_settings(stage: Stage, args: argparse.Namespace) -> Settings:
    """Stage defaults overridden by every flag the user gave (flags default to None = "stage default";
    `--lr` sets every learning rate the stage uses that has no flag of its own). `--encoder-lr` unfreezes
    the encoder; a group named in an explicit `--freeze` refuses the flags that would train it."""
    values = dict(stage.defaults)
    for name in stage.lr_names:
        given = getattr(args, name, None)
        if given is None:
            given = args.lr
        if given is not None:
            values[name] = given
        if name not in values:
            raise ConfigError(f"--stage {stage.name}: no learning rate for '{name}'; pass {_flag(name)}")
        if not 0 <= values[name] <= MAX_LR:  # beyond, AdamW's fp32 step size overflows inside the optimizer
            flag = _flag(name) if getattr(args, name, None) is not None else "--lr"
            raise ConfigError(f"{flag} {values[name]:g} is out of range: a learning rate must be finite "
                              f"and in [0, {MAX_LR:g}] (typical values are 1e-5 to 3e-3)")
    for key in SETTING_FLAGS:
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    freeze = tuple(values.get("freeze", ()))
    unknown = sorted(set(freeze) - set(FREEZE_GROUPS))
    if unknown:
        raise ConfigError(f"--freeze {','.join(unknown)}: choose among {','.join(FREEZE_GROUPS)}")
    if getattr(args, "freeze", None) is not None:
        refuse_flags_on_frozen(stage, args, freeze)
    elif getattr(args, "encoder_lr", None) is not None:
        freeze = tuple(g for g in freeze if g != "encoder")
    values["freeze"] = freeze
    return Settings.of(stage, values)
