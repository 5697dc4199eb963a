"""Hugging Face SigLIP/CLIP vision weights <-> timm ViT state dicts (docs/interop.md).

A local folder holding a ``SiglipVisionModel``/``CLIPVisionModel`` (or a full ``SiglipModel``/``CLIPModel``,
whose text tower is ignored) becomes the timm ``vit_*_siglip_*`` / ``vit_*_clip_*`` model's state dict.
``--encoder-weights`` accepts such a folder directly (``read_encoder_weights`` reads it, or a timm-format
``.safetensors`` file); ``timm_spec_from_hf`` says which timm name and kwargs fit it.

Name map (HF -> timm): q/k/v projections are concatenated into ``attn.qkv``; CLIP's ``class_embedding`` is
``cls_token`` and ``pre_layrnorm`` is ``norm_pre``; ``post_layernorm`` is ``norm``; SigLIP's attention-pool
head (``head.*``, a ``nn.MultiheadAttention``) is timm's ``attn_pool``. One name table (``_name_table``)
serves both directions; ``hf_state_dict_from_timm`` and ``hf_vision_config_from_timm`` go back (LLaVA export,
ghostvis/interop/hf_llava.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ghostvis.files import safetensors_shapes
from ghostvis.interop.common import InteropError, SafetensorsFolder

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


def _name_table(family: str, n_layers: int, pool_head: bool) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Rows of (timm names, HF names relative to the vision tower) holding the same numbers, used in both
    directions. A side with several names is their concatenation along dim 0 (HF q/k/v = timm ``qkv``; the
    pool's ``in_proj`` = timm ``q`` + ``kv``, split by ``_SHARES``); ``_TIMM_EXTRA_DIMS`` gives the reshape."""
    rows: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("patch_embed.proj.weight",), (_PATCH,)), (("pos_embed",), ("embeddings.position_embedding.weight",))]
    same = [("norm", "post_layernorm")]  # module pairs with identical weight/bias
    if family == "clip":
        rows.append((("cls_token",), ("embeddings.class_embedding",)))
        same.append(("norm_pre", "pre_layrnorm"))
    else:
        rows.append((("patch_embed.proj.bias",), ("embeddings.patch_embedding.bias",)))
    for i in range(n_layers):
        t, h = f"blocks.{i}.", f"encoder.layers.{i}."
        rows += [((f"{t}attn.qkv.{p}",), tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv"))
                 for p in ("weight", "bias")]
        same += [(t + a, h + b) for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
                                             ("attn.proj", "self_attn.out_proj"), ("mlp.fc1", "mlp.fc1"),
                                             ("mlp.fc2", "mlp.fc2"))]
    if pool_head:
        rows.append((("attn_pool.latent",), ("head.probe",)))
        rows += [((f"attn_pool.q.{p}", f"attn_pool.kv.{p}"), (f"head.attention.in_proj_{p}",))
                 for p in ("weight", "bias")]
        same += [("attn_pool.proj", "head.attention.out_proj"), ("attn_pool.norm", "head.layernorm"),
                 ("attn_pool.mlp.fc1", "head.mlp.fc1"), ("attn_pool.mlp.fc2", "head.mlp.fc2")]
    rows += [((f"{a}.{p}",), (f"{b}.{p}",)) for a, b in same for p in ("weight", "bias")]
    return rows


_SHARES = {"attn_pool.kv.weight": 2, "attn_pool.kv.bias": 2}  # k and v: twice q's rows
_TIMM_EXTRA_DIMS = {"pos_embed": 1, "cls_token": 2}  # timm's leading singleton dims ([1, N, D], [1, 1, D])


def _regroup(tensors: list[torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    """One side's tensors concatenated along dim 0, split into the other side's ``names``."""
    whole = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    shares = [_SHARES.get(n, 1) for n in names]
    unit = whole.shape[0] // sum(shares)
    return list(whole.split([unit * k for k in shares])) if len(names) > 1 else [whole]


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
    pool_head = family == "siglip" and pre + "head.probe" in weights
    out: dict[str, torch.Tensor] = {}
    for timm_names, hf_names in _name_table(family, cfg.get("num_hidden_layers", 12), pool_head):
        for name, t in zip(timm_names, _regroup([weights.get(pre + n) for n in hf_names], timm_names)):
            out[name] = t.reshape((1,) * _TIMM_EXTRA_DIMS.get(name, 0) + tuple(t.shape)).contiguous()
    return out


def read_encoder_weights(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A timm state dict from a local timm-format safetensors file or a Hugging Face SigLIP/CLIP folder
    (converted on the fly; `model`, the timm encoder, lets the converter check the activation), with errors
    that say what to do."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"encoder weights {str(p)!r} do not exist: give a local timm .safetensors file "
                                "or a Hugging Face SigLIP/CLIP folder")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"encoder weights {str(p)!r}: a folder without a model; give a .safetensors file")
        state = timm_state_dict_from_hf(p, model)
    elif p.suffix != ".safetensors":
        raise ValueError(
            f"encoder weights {str(p)!r}: only .safetensors weights are read (pickled "
            ".bin/.pt/.pth files are never loaded); convert it with safetensors.torch.save_file"
        )
    else:
        safetensors_shapes(p)  # refuses a renamed pickle before safetensors reads it
        state = load_file(str(p))
    if model is not None:
        _check_class_token(state, model, str(p))
    return state


def _check_class_token(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> None:
    """Weights and encoder agree on the class token (a supervised ViT such as timm's vit_small_patch16_224 has
    one; SigLIP-shaped encoders, vlm_small's included, do not); otherwise a clear error with both ways out."""
    has = getattr(model, "cls_token", None) is not None
    if ("cls_token" in state) == has:
        return
    if not has:
        raise InteropError(
            f"encoder weights {where!r} have a class token (cls_token) but the encoder is built without one "
            "(VisionConfig.encoder_kwargs class_token=false, e.g. vlm_small's SigLIP-shaped tower); to start from "
            "them, build the supervised ViT they belong to with --vision 'encoder_kwargs={}' (its VLM exports to "
            "transformers with --llm-only only), or give SigLIP weights")
    raise InteropError(f"encoder weights {where!r} have no class token (cls_token) but the encoder is built with one; "
                       "add \"class_token\": false and \"global_pool\": \"\" to VisionConfig.encoder_kwargs")


def hf_state_dict_from_timm(state: dict[str, torch.Tensor], family: str,
                            where: str = "timm state dict") -> dict[str, torch.Tensor]:
    """The inverse over the same table: a timm ViT state dict -> HF SigLIP/CLIP vision tensors (names relative
    to the tower, e.g. ``encoder.layers.0.self_attn.q_proj.weight``). The final norm and the pool head are
    optional (a pruned encoder has neither); any other missing tensor, or a timm tensor with no place in the
    HF model (register tokens, layer scale, q/k norm, a CLIP without pre-norm, ...), is refused by name."""
    n_layers = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    rows = _name_table(family, n_layers, pool_head="attn_pool.latent" in state)
    optional = {n for timm_names, _ in rows for n in timm_names if n.startswith("norm.")}
    known = {n for timm_names, _ in rows for n in timm_names}
    missing = sorted(known - optional - set(state))
    extra = sorted(set(state) - known)
    if missing or extra:
        raise InteropError(
            f"{where}: this timm encoder has no Hugging Face {family} vision equivalent: timm tensors {extra[:6]} "
            f"have no place in it and {missing[:6]} are missing (a {family} export needs "
            + ("a class token, a pre-norm (norm_pre) and no patch-embedding bias, like timm's vit_*_clip_*"
               if family == "clip" else "no class token and a biased patch embedding, like timm's vit_*_siglip_*")
            + "; no register tokens, layer scale or q/k norm)")
    out: dict[str, torch.Tensor] = {}
    for timm_names, hf_names in rows:
        if not all(n in state for n in timm_names):
            continue  # the optional final norm
        tensors = [state[n].reshape(state[n].shape[_TIMM_EXTRA_DIMS.get(n, 0):]) for n in timm_names]
        out.update({n: t.contiguous() for n, t in zip(hf_names, _regroup(tensors, hf_names))})
    return out


def encoder_kind(vision_cfg: Any) -> str:
    """"vit", "resnet" (timm's ResNet family: resnet10t, resnet18, ...) or "cnn" (another CNN) for a
    VisionConfig, from its architecture built on the meta device (no memory, no weights)."""
    from timm.models.resnet import ResNet

    from ghostvis.vision.encoder import VisionEncoder

    with torch.device("meta"):
        encoder = VisionEncoder(vision_cfg)
    return "vit" if encoder.is_vit else "resnet" if isinstance(encoder.model, ResNet) else "cnn"


def timm_family(model: nn.Module) -> str:
    """The HF family a timm ViT can become: "clip" with a class token, "siglip" without."""
    return "clip" if getattr(model, "cls_token", None) is not None else "siglip"


def hf_vision_config_from_timm(model: nn.Module, image_size: int, dtype: torch.dtype) -> Any:
    """The transformers ``SiglipVisionConfig`` (no class token) or ``CLIPVisionConfig`` (class token) with the
    timm ViT's shape, activation and LayerNorm eps; ``num_hidden_layers`` = the blocks ``model`` has."""
    from timm.layers import get_act_layer
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    family = timm_family(model)
    act_names = {get_act_layer(timm_name): hf_name for hf_name, timm_name in _ACTS.items()}
    act = act_names.get(type(model.blocks[0].mlp.act))
    if act is None:
        raise InteropError(f"timm encoder activation {type(model.blocks[0].mlp.act).__name__} has no Hugging Face "
                           f"SigLIP/CLIP equivalent; supported timm act_layer: {sorted(set(_ACTS.values()))}")
    patch = model.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise InteropError(f"timm encoder patch size {tuple(patch)} is not square; HF SigLIP/CLIP need square patches")
    n_pos, want = model.pos_embed.shape[1], model.patch_embed.num_patches + (family == "clip")
    if n_pos != want:  # e.g. timm's no_embed_class: the class token has no position row
        raise InteropError(f"timm encoder has {n_pos} position embeddings; a HF {family} vision model has one per "
                           f"patch{' and one for the class token' if family == 'clip' else ''} ({want})")
    block = model.blocks[0]
    fields = dict(hidden_size=model.embed_dim, intermediate_size=block.mlp.fc1.out_features,
                  num_hidden_layers=len(model.blocks), num_attention_heads=block.attn.num_heads,
                  image_size=image_size, patch_size=int(patch[0]), hidden_act=act, layer_norm_eps=block.norm1.eps,
                  dtype=dtype)
    if family == "clip":
        return CLIPVisionConfig(**fields)
    return SiglipVisionConfig(**fields, vision_use_head=hasattr(model, "attn_pool") and model.attn_pool is not None)
