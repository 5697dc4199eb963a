"""Hugging Face SigLIP/CLIP vision weights -> timm ViT state dicts (docs/interop.md).

A local folder holding a ``SiglipVisionModel``/``CLIPVisionModel`` (or a full ``SiglipModel``/``CLIPModel``,
whose text tower is ignored) becomes the timm ``vit_*_siglip_*`` / ``vit_*_clip_*`` model's state dict.
``VisionConfig.pretrained_path`` accepts such a folder directly (ghostvis/vision/encoder.py calls
``timm_state_dict_from_hf``); ``timm_spec_from_hf`` says which timm name and kwargs fit it.

Name map (HF -> timm): q/k/v projections are concatenated into ``attn.qkv``; CLIP's ``class_embedding`` is
``cls_token`` and ``pre_layrnorm`` is ``norm_pre``; ``post_layernorm`` is ``norm``; SigLIP's attention-pool
head (``head.*``, a ``nn.MultiheadAttention``) is timm's ``attn_pool``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostvis.interop.hf_llm import InteropError, SafetensorsFolder

_PATCH = "embeddings.patch_embedding.weight"
# HF hidden_act -> timm act_layer
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}
_FAMILIES = {"siglip": "siglip", "siglip_vision_model": "siglip", "clip": "clip", "clip_vision_model": "clip"}


def read_vision_config(hf_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """(family "siglip"|"clip", the vision config dict) of a HF folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face SigLIP/CLIP model folder")
    raw = json.loads(path.read_text())
    family = _FAMILIES.get(raw.get("model_type"))
    if family is None:
        raise InteropError(f"{path}: model_type {raw.get('model_type')!r} is not a SigLIP/CLIP vision model; "
                           f"supported: {sorted(_FAMILIES)}")
    cfg = raw.get("vision_config", raw) if raw["model_type"] in ("siglip", "clip") else raw
    act = cfg.get("hidden_act", "gelu_pytorch_tanh" if family == "siglip" else "quick_gelu")
    if act not in _ACTS:
        raise InteropError(f"{path}: hidden_act {act!r} has no timm equivalent; supported: {sorted(_ACTS)}")
    return family, {**cfg, "hidden_act": act}


def timm_spec_from_hf(hf_dir: str | Path) -> dict[str, Any]:
    """VisionConfig fields (``encoder``, ``image_size``, ``encoder_kwargs``) of a timm model with the HF
    folder's exact shape and activation."""
    family, cfg = read_vision_config(hf_dir)
    dim, hidden = cfg.get("hidden_size", 768), cfg.get("intermediate_size", 3072)
    kwargs: dict[str, Any] = {
        "embed_dim": dim, "depth": cfg.get("num_hidden_layers", 12), "num_heads": cfg.get("num_attention_heads", 12),
        "patch_size": cfg.get("patch_size", 16 if family == "siglip" else 32),
        "mlp_ratio": (hidden + 0.5) / dim,  # timm takes int(dim * ratio): the half keeps the rounding exact
        "act_layer": _ACTS[cfg["hidden_act"]],
    }
    if family == "siglip" and not cfg.get("vision_use_head", True):
        kwargs["global_pool"] = ""  # no attention-pool head in the checkpoint
    encoder = "vit_base_patch16_siglip_224" if family == "siglip" else "vit_base_patch16_clip_224"
    return {"encoder": encoder, "image_size": cfg.get("image_size", 224), "encoder_kwargs": kwargs}


def _check_model(family: str, cfg: dict[str, Any], model: nn.Module, where: str) -> None:
    """What shapes can't show: the activation and LayerNorm eps of the timm model built by VisionConfig."""
    from timm.layers import get_act_layer

    want_act = get_act_layer(_ACTS[cfg["hidden_act"]])
    got_act = type(model.blocks[0].mlp.act)
    if got_act is not want_act:
        raise InteropError(
            f"{where}: the HF model uses hidden_act={cfg['hidden_act']!r} but the timm encoder has "
            f"{got_act.__name__}; add \"act_layer\": \"{_ACTS[cfg['hidden_act']]}\" to VisionConfig.encoder_kwargs "
            "(ghostvis.interop.hf_vision.timm_spec_from_hf gives the full matching spec)")
    eps = cfg.get("layer_norm_eps", 1e-6 if family == "siglip" else 1e-5)
    if abs(model.blocks[0].norm1.eps - eps) > 1e-12:
        raise InteropError(f"{where}: layer_norm_eps={eps} but the timm encoder's LayerNorm eps is "
                           f"{model.blocks[0].norm1.eps}; pick the timm {family} model family")


def timm_state_dict_from_hf(hf_dir: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """timm state dict of a HF SigLIP/CLIP vision model (read tensor by tensor, safetensors only). With
    ``model`` (the timm encoder it is meant for) the activation and norm eps are checked too."""
    family, cfg = read_vision_config(hf_dir)
    if model is not None:
        _check_model(family, cfg, model, str(hf_dir))
    weights = SafetensorsFolder(hf_dir)
    prefixes = [k[: -len(_PATCH)] for k in weights.weight_map if k.endswith(_PATCH) and "text" not in k]
    if len(prefixes) != 1:
        raise InteropError(f"{hf_dir}: expected one vision tower ('...{_PATCH}'), found {len(prefixes)}")
    pre = prefixes[0]

    def get(name: str) -> torch.Tensor:
        return weights.get(pre + name)

    out: dict[str, torch.Tensor] = {"patch_embed.proj.weight": get(_PATCH)}
    pos = get("embeddings.position_embedding.weight")
    out["pos_embed"] = pos.unsqueeze(0)
    if family == "clip":
        out["cls_token"] = get("embeddings.class_embedding").reshape(1, 1, -1)
        _copy_norm(out, get, "pre_layrnorm", "norm_pre")
    else:
        out["patch_embed.proj.bias"] = get("embeddings.patch_embedding.bias")
    for i in range(cfg.get("num_hidden_layers", 12)):
        h, t = f"encoder.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{t}attn.qkv.{p}"] = torch.cat([get(f"{h}self_attn.{x}_proj.{p}") for x in "qkv"])
            out[f"{t}attn.proj.{p}"] = get(f"{h}self_attn.out_proj.{p}")
            out[f"{t}mlp.fc1.{p}"] = get(f"{h}mlp.fc1.{p}")
            out[f"{t}mlp.fc2.{p}"] = get(f"{h}mlp.fc2.{p}")
        _copy_norm(out, get, h + "layer_norm1", t + "norm1")
        _copy_norm(out, get, h + "layer_norm2", t + "norm2")
    _copy_norm(out, get, "post_layernorm", "norm")
    if family == "siglip" and pre + "head.probe" in weights:
        d = pos.shape[-1]
        out["attn_pool.latent"] = get("head.probe")
        w, b = get("head.attention.in_proj_weight"), get("head.attention.in_proj_bias")
        out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = w[:d], w[d:]
        out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = b[:d], b[d:]
        for p in ("weight", "bias"):
            out[f"attn_pool.proj.{p}"] = get(f"head.attention.out_proj.{p}")
            out[f"attn_pool.norm.{p}"] = get(f"head.layernorm.{p}")
            out[f"attn_pool.mlp.fc1.{p}"] = get(f"head.mlp.fc1.{p}")
            out[f"attn_pool.mlp.fc2.{p}"] = get(f"head.mlp.fc2.{p}")
    return {k: v.contiguous() for k, v in out.items()}


def _copy_norm(out: dict[str, torch.Tensor], get: Any, hf_name: str, timm_name: str) -> None:
    for p in ("weight", "bias"):
        out[f"{timm_name}.{p}"] = get(f"{hf_name}.{p}")
