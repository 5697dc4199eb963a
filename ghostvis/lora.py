"""LoRA: low-rank adapters on the LLM's linear layers (docs/training.md#lora).

Our projections are tensor-parallel modules (ColumnParallelLinear / RowParallelLinear), not nn.Linear, so
peft does not apply; this is the few lines it takes. A matched layer gets two parameters, `lora_A` [r, in]
(random) and `lora_B` [out, r] (zeros: training starts from the base model exactly), and a forward hook
adding `alpha/r · x Aᵀ Bᵀ` to its output. Only they train (with the stage's connector, if any). At the end of a
run `save_adapter` writes them to adapter.safetensors + adapter.json and `merge` folds them into the weights
(W += alpha/r · B A), so the run's export is an ordinary model that every loader and launch/export.py open.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ghostvis.model.parallel import ColumnParallelLinear, RowParallelLinear
from ghostvis.train.engine import ConfigError
from ghostvis.train.settings import Settings
from ghostvis.train.stages import ParamRule, Stage

DEFAULT_TARGETS = r"\.(?:q|k|v|o|gate|up|down)_proj$"  # attention and MLP projections
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
# The adapters train at the LLM's lr; every other LLM weight is frozen (--train-llm-layers 0).
LORA_RULE = ParamRule(r".*\.lora_[AB]$", "llm_lr", weight_decay=False, group="llm")


class LoRAError(ConfigError):
    """Bad LoRA settings; the message names the flag and the fix."""


def _hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    x = args[0].to(module.lora_A.dtype)
    return out + module.lora_scale * F.linear(F.linear(x, module.lora_A), module.lora_B).to(out.dtype)


def _layers(model: nn.Module, targets: str) -> list[tuple[str, nn.Module]]:
    patterns = [re.compile(p.strip()) for p in targets.split(",") if p.strip()]
    # exact types: the LM head (a ColumnParallelLinear subclass) computes the loss itself
    linear = [(n, m) for n, m in model.named_modules() if type(m) in (ColumnParallelLinear, RowParallelLinear)]
    matched = [(n, m) for n, m in linear if any(p.search(n) for p in patterns)]
    if not matched:
        examples = ", ".join(n for n, _ in linear[:4])
        raise LoRAError(f"--lora-targets {targets!r} matches no linear layer (regexes searched in module names "
                        f"such as {examples}); the default {DEFAULT_TARGETS!r} takes every attention and MLP "
                        "projection")
    return matched


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Attach adapters to the linear layers whose module name matches a regex of the comma list `targets`;
    returns their names. Call under the run's seed: A is random."""
    if rank <= 0:
        raise LoRAError(f"--lora-rank {rank}: give a positive rank (e.g. 16)")
    names = []
    for name, module in _layers(model, targets):
        out_features, in_features = module.weight.shape
        dev, dtype = module.weight.device, module.weight.dtype
        # A like nn.Linear's default init (kaiming-uniform), B zero: the adapted model starts as the base one
        bound = 1 / math.sqrt(in_features)
        module.lora_A = nn.Parameter(torch.empty(rank, in_features, device=dev, dtype=dtype).uniform_(-bound, bound))
        module.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=dev, dtype=dtype))
        module.lora_scale = alpha / rank
        module._lora_hook = module.register_forward_hook(_hook)
        names.append(name)
    return names


def lora_stage(stage: Stage, settings: Settings) -> tuple[Stage, Settings]:
    """The stage with the adapters trainable and the LLM's own weights frozen (its other rules unchanged)."""
    return (dataclasses.replace(stage, trainable=(LORA_RULE, *stage.trainable)),
            dataclasses.replace(settings, train_llm_layers=0))


def _adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "_lora_hook")]


def save_adapter(model: nn.Module, out: Path, config: dict[str, Any], is_writer: bool = True) -> None:
    """adapter.safetensors (every lora_A / lora_B, by module name) and adapter.json (`config`: rank, alpha,
    targets, base). Collective under ZeRO-3: every rank calls it."""
    import deepspeed

    tensors = {}
    for name, module in _adapted(model):
        with deepspeed.zero.GatheredParameters([module.lora_A, module.lora_B], modifier_rank=None):
            tensors[f"{name}.lora_A"] = module.lora_A.detach().to("cpu", copy=True).contiguous()
            tensors[f"{name}.lora_B"] = module.lora_B.detach().to("cpu", copy=True).contiguous()
    if is_writer:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / ADAPTER_FILE))
        (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Put adapter.safetensors' tensors (in run directory `path`) into a model that `add_lora` adapted with the
    same settings."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / ADAPTER_FILE))
    adapted = dict(_adapted(model))
    for key, value in tensors.items():
        name, part = key.rsplit(".", 1)
        getattr(adapted[name], part).data.copy_(value)


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += scale · B A) and remove it: the model is a plain one again.
    Collective under ZeRO-3: every rank calls it."""
    import deepspeed

    for _, module in _adapted(model):
        params = [module.weight, module.lora_A, module.lora_B]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            delta = module.lora_scale * (module.lora_B.float() @ module.lora_A.float())
            module.weight.add_(delta.to(module.weight.dtype))
        module._lora_hook.remove()
        del module._lora_hook, module.lora_A, module.lora_B, module.lora_scale
