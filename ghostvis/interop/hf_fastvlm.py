"""GhostVis VLM with a timm ResNet tower -> transformers ``FastVlmForConditionalGeneration`` folder (docs/interop.md).

FastVLM's vision tower is transformers' ``TimmWrapperModel``: any timm model by name, built with ``model_args``;
its ``forward_features`` map (``[N, C, H, W]``) is flattened row by row into H·W tokens, as our encoder flattens a
CNN's feature map, and goes through LLaVA's MLP (``Linear(C, n_embd) -> GELU -> Linear(n_embd, n_embd)``). So our
``resampler="none"`` connector with ``projector_hidden = n_embd`` (or -1, the LLM's width: the vlm_tiny_cnn preset)
over a ResNet read at stage k is FastVLM with the ResNet's later stages given no blocks (``layers`` = the kept block
counts, then zeros: timm builds those stages empty, as our encoder prunes them). The encoder's tensors keep their
timm names under ``model.vision_tower.timm_model``. FastVLM has no pixel shuffle, so a CNN read through one has no
transformers equivalent.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ghostvis.config import LLM_WIDTH, ModelConfig, VisionConfig
from ghostvis.interop.hf_llava import (LLAVA_PROJECTOR, POSITION_EMBEDDING_REFUSAL, language_tensors, read_vlm,
                                        VLMFolder, processor_refusal, save_processor, vision_tensors,
                                        write_vlm_folder)
from ghostvis.interop.hf_vision import encoder_kind

_STAGES = ("layer1", "layer2", "layer3", "layer4")  # timm ResNet's stages (feature_info 1..4; 0 is the stem)


def fastvlm_refusal(model_cfg: ModelConfig, vision_cfg: VisionConfig) -> str | None:
    """Why this VLM cannot be a transformers FastVLM (None when it can)."""
    if vision_cfg.resampler != "none":
        return (f"its resampler is {vision_cfg.resampler!r}; FastVLM feeds every cell of a CNN's map to its MLP "
                "(resampler='none'), and has no pixel shuffle")
    if (width := vision_cfg.for_llm(model_cfg).projector_hidden) != model_cfg.n_embd:
        return (f"its projector's hidden width is {width}, FastVLM's MLP is the LLM's width: "
                f"train with projector_hidden={model_cfg.n_embd} (or {LLM_WIDTH}, the LLM's width)")
    if vision_cfg.position_embedding:
        return POSITION_EMBEDDING_REFUSAL
    kind = encoder_kind(vision_cfg)  # last: it builds the encoder (on the meta device)
    if kind != "resnet":
        return (f"its encoder ({vision_cfg.encoder}) is {'a ViT' if kind == 'vit' else 'not a timm ResNet'}; "
                "FastVLM's tower here is a timm ResNet read at one stage")
    if vision_cfg.feature_layer in (0, -len(_STAGES) - 1):
        return "it reads the ResNet's stem (feature_layer 0), which timm cannot end a ResNet at: read a stage (1-4)"
    return None


def _blocks(stage: torch.nn.Module) -> int:
    """A ResNet stage's block count; a pruned stage is an empty Sequential or, in some timm versions, an Identity."""
    return len(list(stage.children()))


def export_fastvlm(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> VLMFolder:
    """GhostVis VLM export directory -> transformers FastVLM folder (config.json, model.safetensors, tokenizer
    files, generation_config.json) that ``AutoModelForImageTextToText.from_pretrained`` opens, with LLaVA's
    processor (FastVLM has none of its own), which ``AutoProcessor.from_pretrained`` opens, where the map is a
    square whose cells divide the image and the model's images are unframed; else feed our transform's pixels,
    normalised (``[batch, 3, S, S]``), and our renderer's ids.
    Raises InteropError (with the reason) for other connectors and towers."""
    from transformers import FastVlmConfig, TimmWrapperConfig

    vlm = read_vlm(ckpt_dir, dtype, fastvlm_refusal, "FastVLM")
    timm_model = vlm.encoder.model  # pruned: the stages after the feature layer are empty
    vision = TimmWrapperConfig(
        architecture=vlm.vision_cfg.encoder, do_pooling=False, hidden_size=vlm.encoder.dim,
        model_args={**vlm.vision_cfg.encoder_kwargs, "layers": [_blocks(getattr(timm_model, s)) for s in _STAGES]})
    config = FastVlmConfig(
        vision_config=vision.to_dict(), text_config=vlm.text_cfg.to_dict(), image_token_id=vlm.tok.image_token_id,
        image_seq_length=vlm.encoder.num_patches, projector_hidden_act="gelu",  # exact GELU, like our nn.GELU()
        multimodal_projector_bias=True, tie_word_embeddings=vlm.model_cfg.tie_embeddings, dtype=vlm.dtype,
        architectures=["FastVlmForConditionalGeneration"])
    state = {**language_tensors(vlm.llm_state, "model.language_model"),
             **vision_tensors(vlm, "model.vision_tower.timm_model", LLAVA_PROJECTOR)}
    out = write_vlm_folder(vlm, out_dir, config, state)
    rows, cols = vlm.encoder.grid
    no_processor = processor_refusal(vlm.vision_cfg, "none", squashes=False)
    if rows != cols or vlm.vision_cfg.image_size % rows:  # LLaVA's processor counts (S / cell)² tokens
        no_processor = f"its {rows} x {cols} feature map is not a square grid whose cells divide the image"
    if no_processor is None:
        save_processor(out, vlm.vision_cfg, "cnn", vlm.vision_cfg.image_size // rows, vlm.tok.image_token_id)
    return VLMFolder(config, no_processor)
