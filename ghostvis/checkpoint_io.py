"""The for-use export of a trained model, and loading it back (docs/architecture.md, "Training").

    <dir>/llm.safetensors      the GPT's parameters, names as in docs/architecture.md
    <dir>/vision.safetensors   the vision tower's (VLMs only), names relative to the tower
    <dir>/config.json          {"format", "model": ModelConfig, "vision": VisionConfig | null, "tokenizer": {...}, ...}
    <dir>/tokenizer/           Tokenizer.save files

Files are written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ghostvis.config import ModelConfig, VisionConfig
from ghostvis.tokenizer import Tokenizer

FORMAT = "ghostvis-export/1"
CONFIG_FILE, LLM_FILE, VISION_FILE, TOKENIZER_DIR = "config.json", "llm.safetensors", "vision.safetensors", "tokenizer"


def module_files(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """File name -> module: a VLM (has `.llm` and `.vision`) splits in two, a GPT is all LLM."""
    if hasattr(model, "llm") and hasattr(model, "vision"):
        return {LLM_FILE: model.llm, VISION_FILE: model.vision}
    return {LLM_FILE: model}


def export(model: torch.nn.Module, out_dir: str | Path, *, tokenizer: Tokenizer, extra: dict[str, Any] | None = None,
           is_writer: bool = True) -> None:
    """Write the export. In a multi-rank run every rank calls this (ZeRO-3 gathers each partitioned
    parameter collectively) and only `is_writer` (rank 0) writes. `extra` goes into config.json."""
    import deepspeed  # only training exports; loading must work without DeepSpeed state

    out = Path(out_dir)
    model_cfg: ModelConfig = model.config
    vision_cfg: VisionConfig | None = getattr(model, "vision_config", None)
    for file_name, module in module_files(model).items():
        tensors: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            # one parameter at a time: a 7B model never has to fit gathered on one GPU
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_writer:
                    tensors[name] = param.detach().to("cpu", copy=True).contiguous()
        if is_writer:
            out.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out / f"{file_name}.tmp"), metadata={"format": FORMAT})
            os.replace(out / f"{file_name}.tmp", out / file_name)
    if not is_writer:
        return
    tokenizer.save(out / TOKENIZER_DIR)
    config = {"format": FORMAT, "model": model_cfg.to_dict(), "vision": vision_cfg.to_dict() if vision_cfg else None,
              "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}, **(extra or {})}
    (out / f"{CONFIG_FILE}.tmp").write_text(json.dumps(config, indent=1))
    os.replace(out / f"{CONFIG_FILE}.tmp", out / CONFIG_FILE)


def read_config(path: str | Path) -> tuple[ModelConfig, VisionConfig | None, dict[str, Any]]:
    """(model config, vision config or None, the whole config.json) of an export directory."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: point to a directory written by training (--out) or export")
    raw = json.loads(cfg_path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {raw.get('format')!r}, expected {FORMAT!r}")
    vision = VisionConfig.from_dict(raw["vision"]) if raw.get("vision") else None
    return ModelConfig.from_dict(raw["model"]), vision, raw


def load_weights(module: torch.nn.Module, file: str | Path) -> None:
    """Copy a safetensors file into `module` (strict: missing or extra names raise, naming them)."""
    with safe_open(str(file), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{file}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} parameters; "
                         "the file does not belong to this config")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Tokenizer, ModelConfig]:
    """(model in eval mode on `device`, tokenizer, model config) from an export directory."""
    path = Path(path)
    model_cfg, vision_cfg, raw = read_config(path)
    tokenizer = Tokenizer.load(path / TOKENIZER_DIR)
    if tokenizer.fingerprint != raw["tokenizer"]["fingerprint"]:
        raise ValueError(f"{path / TOKENIZER_DIR} is not the tokenizer this model was trained with "
                         f"(fingerprint {tokenizer.fingerprint[:12]} != {raw['tokenizer']['fingerprint'][:12]} in {CONFIG_FILE})")
    with torch.device(device):
        if vision_cfg is None:
            from ghostvis.model.gpt import GPT

            model: torch.nn.Module = GPT(model_cfg)
        else:
            from ghostvis.model.vlm import VLM

            vision_cfg.pretrained_path = None  # the trained tower's weights come from vision.safetensors
            model = VLM(model_cfg, vision_cfg)
    for file_name, module in module_files(model).items():
        load_weights(module, path / file_name)
    return model.eval(), tokenizer, model_cfg
