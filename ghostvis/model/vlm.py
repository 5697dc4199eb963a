"""VLM = GPT + VisionTower: images become vision tokens spliced in at `<|image|>` positions.

Parameter names start with `llm.` (the GPT's names, docs/architecture.md) and `vision.encoder.`,
`vision.resampler.`, `vision.projector.`; the trainer's freezing rules match on these prefixes.
"""

from __future__ import annotations

import torch
from torch import nn

from ghostvis.config import ModelConfig, VisionConfig
from ghostvis.model.gpt import GPT
from ghostvis.model.kv_cache import KVCache
from ghostvis.vision.tower import VisionTower


class VLM(nn.Module):
    def __init__(self, model_cfg: ModelConfig, vision_cfg: VisionConfig, *, llm: GPT | None = None,
                 tower: VisionTower | None = None, freeze_encoder: bool = True):
        """`llm` / `tower`: parts already built (checkpoint_io.build_model builds them apart under ZeRO-3)."""
        super().__init__()
        if model_cfg.image_token_id is None:
            raise ValueError(
                "VLM needs ModelConfig.image_token_id (the tokenizer's <|image|> id, "
                "tokenizer.image_token_id); it is None in this config"
            )
        if not 0 <= model_cfg.image_token_id < model_cfg.vocab_size:
            raise ValueError(
                f"ModelConfig.image_token_id={model_cfg.image_token_id} is outside the vocabulary "
                f"(vocab_size={model_cfg.vocab_size})"
            )
        self.config = model_cfg
        self.vision_config = vision_cfg
        self.llm = llm if llm is not None else GPT(model_cfg)
        self.vision = tower if tower is not None else VisionTower(vision_cfg, model_cfg,
                                                                  freeze_encoder=freeze_encoder)

    @classmethod
    def from_llm(cls, gpt: GPT, vision_cfg: VisionConfig, image_token_id: int | None = None) -> VLM:
        """Add a fresh vision tower to a (text-trained) GPT; its weights are kept, not copied.
        `image_token_id` sets the config's id when the text checkpoint was saved without one."""
        if image_token_id is not None:
            gpt.config.image_token_id = image_token_id
        return cls(gpt.config, vision_cfg, llm=gpt)

    @property
    def num_vision_tokens(self) -> int:
        return self.vision.num_vision_tokens

    def image_embeds(self, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """Vision tokens [N, num_vision_tokens, n_embd] from pixels or cached encoder features (not both);
        None when neither is given (text only)."""
        if pixel_values is not None and image_features is not None:
            raise ValueError("give pixel_values or image_features (cached encoder features), not both")
        if pixel_values is not None:
            return self.vision(pixel_values)
        if image_features is not None:
            return self.vision.forward_features(image_features)
        return None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, reduction: str = "mean",
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`pixel_values` [N, 3, S, S] (or `image_features` [N, num_patches, dim]) hold every image of the
        batch in order of appearance (row-major over batch, then position); N may be 0. Returns what
        `GPT.forward` returns. In multi-rank training pass an empty tensor rather than None on a text-only
        batch: every rank then runs the same modules (ZeRO-3 gathers parameters collectively) and the
        splice (masked_scatter) still hands the resampler/projector zero gradients. `document_ids`: packed
        rows (GPT.forward)."""
        cp = self.llm.cp if kv_cache is None else None
        images = pixel_values if pixel_values is not None else image_features
        if cp is None or images is None:
            embeds = self.image_embeds(pixel_values, image_features)
        else:  # each image is encoded on one CP rank, then every rank gets them all
            share = cp.image_share(len(images))
            embeds = cp.gather_images(self.image_embeds(*(None if t is None else t[share]
                                                          for t in (pixel_values, image_features))), len(images))
        return self.llm(idx, targets, image_embeds=embeds, kv_cache=kv_cache, reduction=reduction,
                        document_ids=document_ids)
