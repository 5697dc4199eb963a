"""Image encoder: any timm ViT or CNN by name, patch features from an inner layer (docs/vision.md).

A ViT gives the patch tokens of block `feature_layer`; a CNN (ResNet, ConvNeXt, ...: any timm model with
`feature_info`) gives the feature map of stage `feature_layer` (an index into `model.feature_info`), each
cell a patch token in row-major order: a small CNN learns local features from little data, from scratch.

Nothing is downloaded: the model is built with `pretrained=False`. Weights come in as a timm state dict
(`load_timm_state_dict`); reading them from a local timm `.safetensors` file or a Hugging Face SigLIP/CLIP
folder is the loading layer's job (`ghostvis.checkpoint_io.load_encoder_weights`).
Blocks after the feature layer (and the final norm/head) are pruned, so they cost no compute, no memory
and hold no never-trained parameters.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import timm
from safetensors.torch import save_file
from torch import nn

from ghostvis.config import VisionConfig
from ghostvis.vision.transforms import data_config, normalize_pixels

def _tower_sdpa(cuda: bool) -> contextlib.AbstractContextManager:
    """The SDPA backends a timm tower may use on CUDA: all but cuDNN. A text-only batch of an SFT mixture (the
    arithmetic) hands the tower zero images, and under torch 2.11 the cuDNN backend returned None for the
    ViT's attention over that empty batch (H100, sft step 48, the first such batch; the perceiver then
    failed on the same batch until its reshape named its lengths); the flash and memory-efficient backends
    take any batch, empty ones included."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _no_download_error(what: str) -> ValueError:
    return ValueError(
        f"vision encoder: {what} would need a download, and GhostVis never downloads at run time. "
        "Build the architecture by its timm name (VisionConfig.encoder, e.g. 'vit_so400m_patch14_siglip_384') "
        "and give the weights locally: --encoder-weights = a timm-format .safetensors "
        "or a Hugging Face SigLIP/CLIP folder (see docs/interop.md)."
    )


def _create_timm_model(cfg: VisionConfig, timm_kwargs: dict[str, Any]) -> nn.Module:
    name = cfg.encoder
    if ":" in name:  # hf-hub:, local-dir:, timm/ hub prefixes fetch configs or weights
        raise _no_download_error(f"encoder name {name!r}")
    if timm_kwargs.get("pretrained"):
        raise _no_download_error("pretrained=True in VisionConfig.encoder_kwargs")
    if not timm.is_model(name):
        raise ValueError(
            f"VisionConfig.encoder={name!r} is not a timm model name; list them with "
            "`python -c \"import timm; print(timm.list_models('vit_*'))\"`"
        )
    kwargs = {"num_classes": 0, "img_size": cfg.image_size, **timm_kwargs, "pretrained": False}
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "img_size" in timm_kwargs or "img_size" not in str(e):
            raise ValueError(f"timm model {name!r} does not accept {sorted(kwargs)} ({e})") from e
    kwargs.pop("img_size")  # a CNN takes any input size and has no such argument
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm model {name!r} does not accept {sorted(kwargs)} ({e})") from e


class VisionEncoder(nn.Module):
    """timm ViT or CNN -> patch features [N, num_patches, dim] from layer `cfg.feature_layer` (a ViT's
    prefix cls/register tokens dropped, a CNN's feature map flattened row by row). `frozen` (the default;
    a run setting, not architecture): no grads, always eval, run under no_grad."""

    def __init__(self, cfg: VisionConfig, *, frozen: bool = True):
        super().__init__()
        self.frozen = frozen
        model = _create_timm_model(cfg, dict(cfg.encoder_kwargs))
        self.is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
        if not hasattr(model, "forward_intermediates") or not (self.is_vit or hasattr(model, "feature_info")):
            raise ValueError(f"VisionConfig.encoder={cfg.encoder!r} is neither a ViT nor a CNN with feature_info "
                             "and forward_intermediates")
        n_blocks = len(model.blocks) if self.is_vit else len(model.feature_info)
        layer = cfg.feature_layer if cfg.feature_layer >= 0 else n_blocks + cfg.feature_layer
        if not 0 <= layer < n_blocks:
            what = "blocks" if self.is_vit else "feature stages (model.feature_info)"
            raise ValueError(
                f"VisionConfig.feature_layer={cfg.feature_layer} is outside the encoder's {n_blocks} {what}"
            )
        self.layer = layer
        self.model = model
        norm = data_config(cfg)  # uint8 pixels are normalised here, on the accelerator (transforms.py)
        self.mean, self.std = tuple(norm["mean"]), tuple(norm["std"])
        full_keys = set(model.state_dict())
        self.feature_norm = cfg.feature_norm
        model.prune_intermediate_layers([layer], prune_norm=not cfg.feature_norm, prune_head=True)
        # keys a full timm checkpoint has but the pruned encoder doesn't: tolerated when loading
        self._pruned_keys = full_keys - set(model.state_dict())
        if self.is_vit:
            self.dim: int = model.embed_dim
            grid = model.patch_embed.grid_size
        else:
            self.dim = int(model.feature_info[layer]["num_chs"])
            side = -(-cfg.image_size // int(model.feature_info[layer]["reduction"]))  # padded convs round up
            grid = (side, side)
        self.grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        self.num_patches: int = self.grid[0] * self.grid[1]
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        # a frozen encoder stays in eval mode (dropout/drop-path off) even inside model.train()
        return super().train(mode and not self.frozen)

    def load_timm_state_dict(self, state: dict[str, torch.Tensor], source: str | Path) -> None:
        """Load timm-format weights: a full timm checkpoint (its pruned blocks and classifier head are
        dropped) or one written by `save_encoder_weights`; `source` names them in errors."""
        state = {k: v for k, v in state.items() if k not in self._pruned_keys and not k.startswith("head.")}
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"encoder weights {str(source)!r} do not match timm model {type(self.model).__name__} "
                f"(feature layer {self.layer}): missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]} "
                "(is VisionConfig.encoder the architecture these weights belong to?)"
            )

    def save_encoder_weights(self, path: str | Path) -> None:
        """Write the (pruned) encoder's weights as timm-format safetensors."""
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, str(path))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> patch features [N, num_patches, dim]. uint8 pixels (what
        `image_transform` makes) are normalised with the encoder's mean/std; float pixels are taken as
        already normalised."""
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels(pixel_values, self.mean, self.std)
        grad = contextlib.nullcontext() if not self.frozen else torch.no_grad()
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if pixel_values.is_cuda
                    else contextlib.nullcontext())
        with grad, autocast, _tower_sdpa(pixel_values.is_cuda):
            (features,) = self.model.forward_intermediates(
                pixel_values.to(next(self.model.parameters()).dtype), indices=[self.layer], norm=self.feature_norm,
                output_fmt="NLC" if self.is_vit else "NCHW", intermediates_only=True, stop_early=True,
            )
        return features if self.is_vit else features.flatten(2).transpose(1, 2)
