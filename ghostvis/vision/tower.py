"""VisionTower = encoder -> resampler -> projector: images to LLM-width vision tokens. The perceiver connector
runs the other way round, encoder -> projector (SwiGLU) -> perceiver at the LLM's width, as Idefics2's does."""

from __future__ import annotations

import torch
from torch import nn

from ghostvis.config import ModelConfig, VisionConfig
from ghostvis.vision.encoder import VisionEncoder
from ghostvis.vision.projector import build_projector
from ghostvis.vision.resampler import build_resampler


class VisionTower(nn.Module):
    """Parameter names: `encoder.model.*` (timm), `resampler.*`, `projector.fc1/fc2.*` (MLP), `projector.proj.*`
    (linear) or `projector.gate_proj/up_proj/down_proj.*` (the perceiver's SwiGLU)."""

    def __init__(self, vision_cfg: VisionConfig, model_cfg: ModelConfig, *, freeze_encoder: bool = True):
        super().__init__()
        self.config = vision_cfg = vision_cfg.for_llm(model_cfg)  # the widths it takes from the LLM resolved
        llm_dim = model_cfg.n_embd
        self.encoder = VisionEncoder(vision_cfg, frozen=freeze_encoder)
        self.project_first = vision_cfg.resampler == "perceiver"
        if self.project_first:
            self.projector = build_projector(self.encoder.dim, vision_cfg.projector_hidden, llm_dim, gated=True)
            self.resampler = build_resampler(vision_cfg, llm_dim, self.encoder.num_patches)
        else:
            self.resampler = build_resampler(vision_cfg, self.encoder.dim, self.encoder.num_patches)
            self.projector = build_projector(self.resampler.out_dim, vision_cfg.projector_hidden, llm_dim)

    @property
    def num_vision_tokens(self) -> int:
        return self.resampler.num_tokens

    @property
    def feature_shape(self) -> tuple[int, int]:
        """Shape of one image's cached encoder features: (num_patches, encoder dim)."""
        return self.encoder.num_patches, self.encoder.dim

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> encoder features [N, num_patches, dim] (what data_prep caches)."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be [N, 3, {size}, {size}] (VisionConfig.image_size), got {tuple(pixel_values.shape)}"
            )
        return self.encoder(pixel_values)

    def forward_features(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features [N, num_patches, dim] (live or cached) -> [N, num_vision_tokens, llm_dim]."""
        if features.dim() != 3 or tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"image features must be [N, {self.feature_shape[0]}, {self.feature_shape[1]}] for encoder "
                f"{self.config.encoder!r} at image_size {self.config.image_size}, got {tuple(features.shape)} "
                "(were the cached features made with a different VisionConfig?)"
            )
        # a bf16-autocast encoder returns bf16; the trainable part runs in its own parameter dtype
        features = features.to(next(self.projector.parameters()).dtype)
        if self.project_first:
            return self.resampler(self.projector(features))
        return self.projector(self.resampler(features))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> vision tokens [N, num_vision_tokens, llm_dim]."""
        return self.forward_features(self.encode(pixel_values))
