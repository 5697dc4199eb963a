"""GhostVis VLM -> transformers ``LlavaForConditionalGeneration`` folder (docs/interop.md, "Export").

Only the LLaVA-1.5 connector has a transformers equivalent: every patch token of one encoder layer through a
two-layer GELU MLP whose hidden width is the LLM's (``resampler="none"``, ``projector_hidden = n_embd``).
The language model goes through hf_llm's Qwen2/Llama mapping, the timm encoder through hf_vision's reverse
name table (SigLIP without class token, CLIP with), the projector's fc1/fc2 become linear_1/linear_2.

Our encoder keeps only the blocks up to its feature layer (the rest are pruned), so the HF vision tower gets
exactly those blocks and ``vision_feature_layer = -1``: transformers' ``hidden_states[-1]`` of SigLIP/CLIP is
the last block's output before ``post_layernorm`` (which LLaVA never applies), the same tensor as our
``hidden_states[-2]`` of the full encoder. ``post_layernorm`` is written as weight 1, bias 0 (unused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ghostvis import checkpoint_io
from ghostvis.config import LLM_WIDTH, ModelConfig, VisionConfig
from ghostvis.interop.common import InteropError
from ghostvis.interop.hf_llm import hf_llm_state, write_generation_and_tokenizer
from ghostvis.interop.hf_vision import encoder_kind, hf_state_dict_from_timm, hf_vision_config_from_timm, timm_family
from ghostvis.tokenizer import Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer

_ENCODER = "encoder.model."  # the timm model's prefix in vision.safetensors (names relative to the tower)
# why no transformers VLM class takes a tower with VisionConfig.position_embedding
POSITION_EMBEDDING_REFUSAL = ("its connector adds a learned grid position embedding (position_embedding), which "
                              "transformers lacks")
LLAVA_PROJECTOR = {"projector.fc1": "model.multi_modal_projector.linear_1",
                   "projector.fc2": "model.multi_modal_projector.linear_2"}


def llava_refusal(model_cfg: ModelConfig, vision_cfg: VisionConfig) -> str | None:
    """Why this VLM cannot be a transformers LLaVA (None when it can)."""
    if vision_cfg.resampler != "none":
        return (f"its connector is the {vision_cfg.resampler!r} resampler + projector, which transformers' LLaVA "
                "cannot express (LLaVA = an MLP over every patch token: VisionConfig.resampler='none')")
    if vision_cfg.position_embedding:
        return POSITION_EMBEDDING_REFUSAL
    if vision_cfg.feature_norm:
        return "its encoder applies its final norm to the features (feature_norm), which LLaVA never does"
    if (width := vision_cfg.for_llm(model_cfg).projector_hidden) != model_cfg.n_embd:
        return (f"its projector's hidden width is {width}, but LLaVA's MLP projector is "
                f"hidden = LLM width ({model_cfg.n_embd}); train with VisionConfig.projector_hidden={model_cfg.n_embd} "
                f"(or {LLM_WIDTH}, the LLM's width)")
    if encoder_kind(vision_cfg) != "vit":  # last: it builds the encoder (on the meta device)
        return (f"its encoder ({vision_cfg.encoder}) is a CNN, LLaVA's vision tower a ViT (SigLIP/CLIP); a timm ResNet "
                "with LLaVA's connector exports as FastVLM")
    return None


@dataclass
class VLMFolder:
    """What a VLM export wrote: the transformers config, and why no processor was written (None: one was)."""

    config: Any
    no_processor: str | None


def processor_refusal(vision_cfg: VisionConfig, frame: str, squashes: bool) -> str | None:
    """Why a family's processor, which frames images as ``frame`` (``IMAGE_FRAMES``) and, with ``squashes``, never
    pads them to a square, would not build this model's inputs (None when it would)."""
    if vision_cfg.image_frame != frame:
        return (f"the model's images are framed {vision_cfg.image_frame!r}, the processor's {frame!r}: train with "
                f"--vision image_frame={frame}")
    if squashes and vision_cfg.pad_to_square:
        return ("the model saw images padded to a square, the processor squashes them: train with "
                "--vision pad_to_square=false")
    return None


@dataclass
class VLMExport:
    """What every VLM export starts from: the checkpoint's configs, tokenizer, the language model in HF names,
    the encoder's architecture (meta tensors) and its HF vision config."""

    ckpt: Path
    model_cfg: ModelConfig
    vision_cfg: VisionConfig
    tok: Tokenizer
    text_cfg: Any
    llm_state: dict[str, torch.Tensor]
    dtype: torch.dtype
    encoder: Any
    vision_hf: Any
    family: str


def read_vlm(ckpt_dir: str | Path, dtype: torch.dtype | None, refusal: Callable[[ModelConfig, VisionConfig], str | None],
             target: str) -> VLMExport:
    """Read a GhostVis VLM export for `target` (a transformers class name); InteropError if it is text-only
    or `refusal` gives a reason."""
    ckpt = Path(ckpt_dir)
    model_cfg, vision_cfg, _ = checkpoint_io.read_config(ckpt)
    if vision_cfg is None:
        raise InteropError(f"{ckpt} holds a language model only; export it with export_llm")
    reason = refusal(model_cfg, vision_cfg)
    if reason:
        raise InteropError(f"{ckpt}: this VLM cannot be exported as a transformers {target}: {reason}")
    tok = load_tokenizer(ckpt / checkpoint_io.TOKENIZER_DIR)
    text_cfg, llm_state = hf_llm_state(ckpt, model_cfg, tok, dtype)
    store_dtype = llm_state["model.norm.weight"].dtype
    # the architecture only (shapes, activation, eps, kept blocks); the weights are read from the files
    encoder = checkpoint_io.build_model(model_cfg, vision_cfg, ckpt, device="meta").vision.encoder
    if not encoder.is_vit:  # a CNN has no SigLIP/CLIP config; its exporter (FastVLM) describes it itself
        return VLMExport(ckpt, model_cfg, vision_cfg, tok, text_cfg, llm_state, store_dtype, encoder, None, "cnn")
    vision_hf = hf_vision_config_from_timm(encoder.model, vision_cfg.image_size, store_dtype)
    return VLMExport(ckpt, model_cfg, vision_cfg, tok, text_cfg, llm_state, store_dtype, encoder, vision_hf,
                     timm_family(encoder.model))


def vision_tensors(vlm: VLMExport, tower: str, connector: dict[str, str]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of vision.safetensors as HF SigLIP/CLIP names under `tower` (a prefix; a CNN's keep
    their timm names, as transformers' TimmWrapperModel has them), and the connector's renamed by `connector` (our
    module name -> theirs: the tensors under it keep their suffix), floating ones cast to the export dtype."""
    path = vlm.ckpt / checkpoint_io.VISION_FILE
    with safe_open(str(path), framework="pt", device="cpu") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    timm_state = {k[len(_ENCODER):]: v for k, v in stored.items() if k.startswith(_ENCODER)}
    if vlm.family == "cnn":
        hf = timm_state
    else:
        hf = hf_state_dict_from_timm(timm_state, vlm.family, where=str(path))
        hf.setdefault("post_layernorm.weight", torch.ones(vlm.encoder.dim))  # pruned: written as 1/0 (LLaVA never
        hf.setdefault("post_layernorm.bias", torch.zeros(vlm.encoder.dim))  # applies it; Idefics3 needs the real one)
    out = {f"{tower}.{k}": v for k, v in hf.items()}
    for ours, theirs in connector.items():
        for k, v in stored.items():
            if k.startswith(ours + "."):
                out[theirs + k[len(ours):]] = v
    # BatchNorm's num_batches_tracked stays an integer
    return {k: (v.to(vlm.dtype) if v.is_floating_point() else v).contiguous() for k, v in out.items()}


def write_vlm_folder(vlm: VLMExport, out_dir: str | Path, config: Any, state: dict[str, torch.Tensor],
                     spellings: dict[str, str] | None = None) -> Path:
    """model.safetensors, config.json, generation_config.json and the tokenizer files (``spellings``: the target
    family's names for our special tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})  # transformers needs "pt"
    config.save_pretrained(str(out))
    write_generation_and_tokenizer(vlm.text_cfg, vlm.tok, out, spellings)
    return out


def language_tensors(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Qwen2/Llama names -> the VLM's: `model.*` under `prefix` (LLaVA: model.language_model), lm_head kept."""
    return {(f"{prefix}." + k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}


def save_processor(out: Path, vision_cfg: VisionConfig, family: str, patch_size: int, image_token_id: int) -> None:
    """preprocessor_config.json + processor_config.json: our transform (pad to square with the mean colour,
    resize to S x S, never crop, the encoder's mean/std) as LlavaImageProcessor; the processor expands each
    image token (``<|image|>``) in a prompt to the image's (S / patch_size)² tokens (+1 for CLIP's class token,
    which LLaVA drops)."""
    from PIL import Image
    from transformers import AutoTokenizer, LlavaImageProcessor, LlavaProcessor

    from ghostvis.vision.transforms import data_config

    data = data_config(vision_cfg)
    size = vision_cfg.image_size
    images = LlavaImageProcessor(
        do_pad=vision_cfg.pad_to_square, do_resize=True, size={"height": size, "width": size}, do_center_crop=False,
        resample=Image.Resampling[str(data["interpolation"]).upper()], image_mean=list(data["mean"]),
        image_std=list(data["std"]), do_rescale=True, do_normalize=True, do_convert_rgb=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default" if family == "clip" else "full",
        image_token=tokenizer.convert_ids_to_tokens(image_token_id),  # its spelling there (an alias's, say)
        num_additional_image_tokens=1 if family == "clip" else 0)
    processor.save_pretrained(str(out))


def export_llava(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> VLMFolder:
    """GhostVis VLM export directory -> transformers LLaVA folder (config.json, model.safetensors, tokenizer and
    processor files, generation_config.json) that ``LlavaForConditionalGeneration.from_pretrained`` and
    ``AutoProcessor.from_pretrained`` open; no processor for a model trained with framed images (LLaVA's
    writes none). Raises InteropError (with the reason) for other connectors."""
    from transformers import LlavaConfig

    vlm = read_vlm(ckpt_dir, dtype, llava_refusal, "LLaVA")
    config = LlavaConfig(
        text_config=vlm.text_cfg, vision_config=vlm.vision_hf, image_token_index=vlm.tok.image_token_id,
        image_seq_length=vlm.encoder.num_patches, projector_hidden_act="gelu",  # exact GELU, like our nn.GELU()
        vision_feature_layer=-1,  # the kept blocks end at our feature layer (module docstring)
        vision_feature_select_strategy="default" if vlm.family == "clip" else "full",  # "default" drops CLS
        multimodal_projector_bias=True, tie_word_embeddings=vlm.model_cfg.tie_embeddings, dtype=vlm.dtype,
        architectures=["LlavaForConditionalGeneration"])
    state = {**language_tensors(vlm.llm_state, "model.language_model"),
             **vision_tensors(vlm, "model.vision_tower.vision_model", LLAVA_PROJECTOR)}
    out = write_vlm_folder(vlm, out_dir, config, state)
    no_processor = processor_refusal(vlm.vision_cfg, "none", squashes=False)
    if no_processor is None:
        save_processor(out, vlm.vision_cfg, vlm.family, vlm.vision_hf.patch_size, vlm.tok.image_token_id)
    return VLMFolder(config, no_processor)
