"""GhostVis VLM -> transformers ``Idefics3ForConditionalGeneration`` folder (SmolVLM's architecture; docs/interop.md).

Idefics3's connector is our ``pixel_shuffle`` resampler (the same space-to-depth order: token (i, j) holds the
r x r patches below and right of (r·i, r·j), row by row, each patch's features contiguous) followed by one
bias-free linear layer (``VisionConfig.projector_hidden = 0``). Its vision tower is SigLIP's (no class token)
and applies ``post_layernorm`` to the last block's output, so the encoder must keep and apply its final norm
(``VisionConfig.feature_norm = true``); the kept blocks end at our feature layer. Our image token becomes
``image_token_id``; a prompt holds ``num_vision_tokens`` of them per image, as in our own rendering.

The processor (Idefics3's, and Idefics2's for hf_idefics2) is written for a model trained on that family's
prompt and pixels (``VisionConfig.image_frame``, ``pad_to_square = false``): it then turns ``<image>`` in a
prompt into the ids our renderer makes, and an image into our pixels. Both processors hard-code the spellings
``<image>`` and ``<fake_token_around_image>`` (Idefics3's also ``<global-img>``), so the folder's tokenizer
spells our specials so (``IDEFICS_SPELLINGS``); the ids stay ours.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ghostvis.config import ModelConfig, VisionConfig
from ghostvis.interop.hf_llava import (POSITION_EMBEDDING_REFUSAL, VLMExport, VLMFolder, language_tensors,
                                        processor_refusal, read_vlm, vision_tensors, write_vlm_folder)
from ghostvis.interop.common import InteropError
from ghostvis.interop.hf_tokenizer import IDEFICS_SPELLINGS
from ghostvis.vision.transforms import data_config


def idefics3_refusal(model_cfg: ModelConfig, vision_cfg: VisionConfig) -> str | None:
    """Why this VLM cannot be a transformers Idefics3 (None when it can; the encoder family is checked on export)."""
    if vision_cfg.resampler != "pixel_shuffle":
        return f"its resampler is {vision_cfg.resampler!r}, Idefics3's is pixel_shuffle"
    if vision_cfg.projector_hidden != 0:
        return (f"its projector is an MLP (projector_hidden={vision_cfg.projector_hidden}), Idefics3's one bias-free "
                "linear layer: train with projector_hidden=0")
    if vision_cfg.position_embedding:
        return POSITION_EMBEDDING_REFUSAL
    if not vision_cfg.feature_norm:
        return "its features skip the encoder's final norm, which Idefics3 applies: train with feature_norm=true"
    return None


def siglip_vision_config(vlm: VLMExport, config_class: type, target: str) -> Any:
    """The Idefics2/Idefics3 vision config (SigLIP's shape with post_layernorm applied) of this encoder;
    InteropError for an encoder with a class token."""
    if vlm.family != "siglip":
        what = "is a CNN" if vlm.family == "cnn" else "has one"
        raise InteropError(f"{vlm.ckpt}: {target}'s vision tower is SigLIP's, without a class token; this encoder "
                           f"({vlm.vision_cfg.encoder}) {what}; train with a SigLIP-shaped encoder (as the vlm_tiny, "
                           "vlm_small, vlm_1.5b and vlm_7b presets do), or export just the LLM with --llm-only")
    v = vlm.vision_hf
    return config_class(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)


def save_idefics_processor(out: Path, vlm: VLMExport, frame: str) -> str | None:
    """The Idefics2/Idefics3 (``frame``) processor, where ``processor_refusal`` allows, and else why not: one
    unsplit image per ``<image>``, squashed to S x S with our interpolation and the encoder's mean/std; the
    prompt gets ``frame``'s tokens around ``num_vision_tokens`` image tokens."""
    no_processor = processor_refusal(vlm.vision_cfg, frame, squashes=True)
    if no_processor:
        return no_processor
    from PIL import Image
    from transformers import (AutoTokenizer, Idefics2ImageProcessor, Idefics2Processor, Idefics3ImageProcessor,
                              Idefics3Processor)

    data, size = data_config(vlm.vision_cfg), vlm.vision_cfg.image_size
    pixels = dict(do_convert_rgb=True, do_rescale=True, do_normalize=True, image_mean=list(data["mean"]),
                  image_std=list(data["std"]), resample=Image.Resampling[str(data["interpolation"]).upper()],
                  do_image_splitting=False, do_pad=True)
    if frame == "idefics3":  # unsplit, it only squashes to max_image_size; do_resize would resize once more first
        images, processor = Idefics3ImageProcessor(do_resize=False, max_image_size={"longest_edge": size},
                                                   **pixels), Idefics3Processor
    else:
        images, processor = Idefics2ImageProcessor(do_resize=True, size={"height": size, "width": size},
                                                   **pixels), Idefics2Processor
    processor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(str(out)),
              image_seq_len=vlm.vision_cfg.num_vision_tokens).save_pretrained(str(out))
    return None


def export_idefics3(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> VLMFolder:
    """GhostVis VLM export directory -> transformers Idefics3 folder (config.json, model.safetensors, tokenizer
    files, generation_config.json) that ``AutoModelForImageTextToText.from_pretrained`` opens, with Idefics3's
    processor where ``processor_refusal`` allows (module doc). Raises InteropError (with the reason) for
    other connectors and for an encoder with a class token."""
    from transformers import Idefics3Config, Idefics3VisionConfig

    vlm = read_vlm(ckpt_dir, dtype, idefics3_refusal, "Idefics3")
    vision = siglip_vision_config(vlm, Idefics3VisionConfig, "Idefics3")
    scale = math.isqrt(vlm.encoder.num_patches // vlm.vision_cfg.num_vision_tokens)
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=vlm.text_cfg.to_dict(), scale_factor=scale,
        image_token_id=vlm.tok.image_token_id, tie_word_embeddings=vlm.model_cfg.tie_embeddings, dtype=vlm.dtype,
        architectures=["Idefics3ForConditionalGeneration"])
    state = {**language_tensors(vlm.llm_state, "model.text_model"),
             **vision_tensors(vlm, "model.vision_model", {"projector.proj": "model.connector.modality_projection.proj"})}
    out = write_vlm_folder(vlm, out_dir, config, state, IDEFICS_SPELLINGS)
    return VLMFolder(config, save_idefics_processor(out, vlm, "idefics3"))
