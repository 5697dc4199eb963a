"""GhostVis VLM -> transformers ``Idefics2ForConditionalGeneration`` folder (docs/interop.md).

Idefics2's connector is our ``perceiver`` connector: the encoder's features (SigLIP, ``post_layernorm`` applied:
``VisionConfig.feature_norm = true``) go through a bias-free SwiGLU projection to the LLM's width whose hidden
width is the LLM's ``ffn_dim`` (``modality_projection``; ``VisionConfig.projector_hidden``), then through the
perceiver resampler at that width (``perceiver_resampler``: latents attending to [context; latents], RMSNorm,
4x SwiGLU), whose ``num_vision_tokens`` outputs replace as many ``<|image|>`` ids. Our module names are
transformers', so the connector's tensors are copied under new prefixes only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ghostvis.config import LLM_FFN, ModelConfig, VisionConfig
from ghostvis.interop.hf_idefics3 import save_idefics_processor, siglip_vision_config
from ghostvis.interop.hf_llava import VLMFolder, language_tensors, read_vlm, vision_tensors, write_vlm_folder
from ghostvis.interop.hf_tokenizer import IDEFICS_SPELLINGS
from ghostvis.vision.resampler import PERCEIVER_EPS


def idefics2_refusal(model_cfg: ModelConfig, vision_cfg: VisionConfig) -> str | None:
    """Why this VLM cannot be a transformers Idefics2 (None when it can; the encoder family is checked on export)."""
    if vision_cfg.resampler != "perceiver":
        return f"its resampler is {vision_cfg.resampler!r}, Idefics2's is the perceiver"
    width = vision_cfg.for_llm(model_cfg).projector_hidden
    if width != model_cfg.ffn_dim:
        return (f"its SwiGLU projector's hidden width is {width}, Idefics2's is the LLM's "
                f"ffn_dim: train with projector_hidden={model_cfg.ffn_dim} (or {LLM_FFN}, the LLM's ffn_dim)")
    if not vision_cfg.feature_norm:
        return "its features skip the encoder's final norm, which Idefics2 applies: train with feature_norm=true"
    return None


def export_idefics2(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> VLMFolder:
    """GhostVis VLM export directory -> transformers Idefics2 folder (config.json, model.safetensors, tokenizer
    files, generation_config.json) that ``AutoModelForImageTextToText.from_pretrained`` opens, with Idefics2's
    processor where ``processor_refusal`` allows (hf_idefics3's module doc). Raises InteropError (with
    the reason) for other connectors and for an encoder with a class token."""
    from transformers import Idefics2Config, Idefics2PerceiverConfig, Idefics2VisionConfig

    vlm = read_vlm(ckpt_dir, dtype, idefics2_refusal, "Idefics2")
    vision = siglip_vision_config(vlm, Idefics2VisionConfig, "Idefics2")
    heads, width = vlm.vision_cfg.for_llm(vlm.model_cfg).resampler_heads, vlm.model_cfg.n_embd
    perceiver = Idefics2PerceiverConfig(
        hidden_act="silu", hidden_size=width, rms_norm_eps=PERCEIVER_EPS,
        resampler_n_latents=vlm.vision_cfg.num_vision_tokens, resampler_depth=vlm.vision_cfg.resampler_depth,
        resampler_n_heads=heads, resampler_head_dim=width // heads, num_key_value_heads=heads)
    config = Idefics2Config(
        vision_config=vision.to_dict(), perceiver_config=perceiver.to_dict(), text_config=vlm.text_cfg.to_dict(),
        image_token_id=vlm.tok.image_token_id, tie_word_embeddings=vlm.model_cfg.tie_embeddings, dtype=vlm.dtype,
        architectures=["Idefics2ForConditionalGeneration"])
    state = {**language_tensors(vlm.llm_state, "model.text_model"),
             **vision_tensors(vlm, "model.vision_model", {"projector": "model.connector.modality_projection",
                                                          "resampler": "model.connector.perceiver_resampler"})}
    out = write_vlm_folder(vlm, out_dir, config, state, IDEFICS_SPELLINGS)
    return VLMFolder(config, save_idefics_processor(out, vlm, "idefics2"))
