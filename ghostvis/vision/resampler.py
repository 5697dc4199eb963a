"""Resamplers: patch features [N, num_patches, in_dim] -> [N, num_tokens, out_dim] (docs/vision.md).

- `perceiver`: Idefics2's perceiver resampler: learned latents attend to [patches; latents], depth/heads set.
  It runs at the LLM's width after a SwiGLU projector (VisionTower), as Idefics2's connector does, so it
  exports as `Idefics2ForConditionalGeneration` (ghostvis/interop/hf_idefics2.py).
- `avgpool`: 2D adaptive average pooling of the patch grid to k x k tokens; no parameters.
- `pixel_shuffle`: space-to-depth by r (SmolVLM/nanoVLM): r*r neighbouring patches concatenated
  into one token, so tokens / r², width x r²; no parameters, no information thrown away.
- `none`: every patch token passes through unchanged (LLaVA-1.5's connector: the MLP projector alone);
  num_vision_tokens = number of patches. The one connector transformers' LLaVA expresses
  (launch/export.py --format hf exports it as `LlavaForConditionalGeneration`).

The grid resamplers (all but `perceiver`) keep the layout: token i is cell (i // k, i % k) of a k x k grid.
With VisionConfig.position_embedding they add a learned row and a learned column embedding to each token,
so the LLM, which sees the tokens only in a 1-D order, is told where each one is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ghostvis.config import VisionConfig
from ghostvis.model.layers import RMSNorm
from ghostvis.vision.projector import GatedMLP


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}={n} is not a perfect square (the resampler works on a square grid)")
    return side


def _to_grid(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[N, L, D] -> [N, D, g, g] for a square patch grid."""
    n, length, dim = x.shape
    g = _square_side(length, "number of patches")
    return x.transpose(1, 2).reshape(n, dim, g, g), g


class GridPosition(nn.Module):
    """Adds a learned row and column embedding (zero at the start) to tokens laid out on a side x side grid."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.side = side
        self.row = nn.Parameter(torch.zeros(side, 1, dim))
        self.col = nn.Parameter(torch.zeros(1, side, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.row + self.col).reshape(self.side * self.side, -1)


def _position(position: bool, num_tokens: int, dim: int) -> GridPosition | None:
    return GridPosition(_square_side(num_tokens, "VisionConfig.num_vision_tokens"), dim) if position else None


def _placed(x: torch.Tensor, position: GridPosition | None) -> torch.Tensor:
    return x if position is None else position(x)


PERCEIVER_EPS = 1e-6  # its RMSNorms' eps (Idefics2PerceiverConfig's default; the export writes it)


class PerceiverAttention(nn.Module):
    """The latents (queries) attend to [context; latents] (keys/values); bias-free projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = latents.shape
        h = self.heads
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(n, t, h, d // h).transpose(1, 2)
        # explicit lengths: a text-only batch passes n = 0 images, where -1 cannot be inferred
        k = self.k_proj(both).view(n, both.shape[1], h, d // h).transpose(1, 2)
        v = self.v_proj(both).view(n, both.shape[1], h, d // h).transpose(1, 2)
        if n == 0:  # an image-free batch: unpinned SDPA (cuDNN on that torch) returned None (torch 2.11, H100);
            # attention written out keeps q, k and v in the graph, so every weight gets its (zero) gradient
            out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(n, t, d))


class PerceiverLayer(nn.Module):
    """Pre-norm residuals: attention (latents and context RMSNorm'd apart), then a 4x SwiGLU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.input_latents_norm = RMSNorm(dim, PERCEIVER_EPS)
        self.input_context_norm = RMSNorm(dim, PERCEIVER_EPS)
        self.self_attn = PerceiverAttention(dim, heads)
        self.post_attention_layernorm = RMSNorm(dim, PERCEIVER_EPS)
        self.mlp = GatedMLP(dim, 4 * dim, dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context))
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """Idefics2's perceiver resampler: `num_tokens` learned latents, `depth` layers, a final RMSNorm. It runs at
    the LLM's width, after the projector (VisionTower), and its parameter names are transformers'
    (Idefics2PerceiverResampler), so the export copies them as they are."""

    def __init__(self, in_dim: int, num_tokens: int, depth: int, heads: int):
        super().__init__()
        if depth <= 0:
            raise ValueError(f"VisionConfig.resampler_depth must be positive for the perceiver, got {depth}")
        if heads <= 0 or in_dim % heads:
            raise ValueError(
                f"VisionConfig.resampler_heads={heads} must divide the perceiver's width (the LLM's) {in_dim}; "
                "pick a divisor"
            )
        self.num_tokens = num_tokens
        self.out_dim = in_dim
        self.latents = nn.Parameter(torch.randn(num_tokens, in_dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(in_dim, heads) for _ in range(depth))
        self.norm = RMSNorm(in_dim, PERCEIVER_EPS)
        self._register_load_state_dict_pre_hook(_refuse_old_perceiver)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm(latents)


def _refuse_old_perceiver(state: dict, prefix: str, *args: object) -> None:
    """Checkpoints of the earlier perceiver (LayerNorms, biased projections over the encoder's width, GELU MLP)
    hold `blocks.*`; no weights of it carry over, so say so instead of listing missing keys."""
    if any(k.startswith(prefix + "blocks.") for k in state):
        raise ValueError(
            f"{prefix}blocks.*: this checkpoint's perceiver is the earlier, pre-Idefics2 one, which this version no "
            "longer builds; retrain the connector (a vision_pretrain run from its LLM checkpoint), or load it with "
            "the GhostVis release it was trained with")


class AvgPoolResampler(nn.Module):
    """Average-pool the g x g patch grid to k x k tokens (num_tokens = k²)."""

    def __init__(self, in_dim: int, num_tokens: int, num_patches: int, position: bool = False):
        super().__init__()
        self.side = _square_side(num_tokens, "VisionConfig.num_vision_tokens (avgpool)")
        if num_tokens > num_patches:
            raise ValueError(
                f"avgpool: VisionConfig.num_vision_tokens={num_tokens} exceeds the encoder's {num_patches} patches"
            )
        self.num_tokens = num_tokens
        self.out_dim = in_dim
        self.position = _position(position, num_tokens, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, _ = _to_grid(x)
        return _placed(F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2), self.position)


class PixelShuffleResampler(nn.Module):
    """Space-to-depth: each r x r block of patches becomes one token of width in_dim * r²."""

    def __init__(self, in_dim: int, num_tokens: int, num_patches: int, position: bool = False):
        super().__init__()
        r = math.isqrt(num_patches // num_tokens)
        g = _square_side(num_patches, "number of patches")
        if r < 1 or r * r * num_tokens != num_patches or g % r:
            raise ValueError(
                f"pixel_shuffle: VisionConfig.num_vision_tokens={num_tokens} must be num_patches/r² for an "
                f"integer r dividing the {g}x{g} patch grid (e.g. {num_patches // 4} for r=2 when g is even)"
            )
        self.r = r
        self.num_tokens = num_tokens
        self.out_dim = in_dim * r * r
        self.position = _position(position, num_tokens, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        g, r = math.isqrt(length), self.r
        x = x.reshape(n, g // r, r, g // r, r, d).permute(0, 1, 3, 2, 4, 5)
        return _placed(x.reshape(n, (g // r) ** 2, r * r * d), self.position)


class IdentityResampler(nn.Module):
    """All patch tokens, unchanged (num_tokens = num_patches); no parameters."""

    def __init__(self, in_dim: int, num_tokens: int, num_patches: int, position: bool = False):
        super().__init__()
        if num_tokens != num_patches:
            raise ValueError(
                f"resampler 'none': VisionConfig.num_vision_tokens={num_tokens} must equal the encoder's number of "
                f"patches, {num_patches} ((image_size / patch_size)²); set num_vision_tokens={num_patches}"
            )
        self.num_tokens = num_tokens
        self.out_dim = in_dim
        self.position = _position(position, num_tokens, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _placed(x, self.position)


def build_resampler(cfg: VisionConfig, in_dim: int, num_patches: int) -> nn.Module:
    """The resampler named by `cfg.resampler`; every one exposes `num_tokens` and `out_dim`."""
    if cfg.resampler == "perceiver":
        if cfg.position_embedding:
            raise ValueError("VisionConfig.position_embedding needs a grid resampler (avgpool, pixel_shuffle or "
                             "none); the perceiver's latents have no place in the image")
        return PerceiverResampler(in_dim, cfg.num_vision_tokens, cfg.resampler_depth, cfg.resampler_heads)
    if cfg.resampler == "avgpool":
        return AvgPoolResampler(in_dim, cfg.num_vision_tokens, num_patches, cfg.position_embedding)
    if cfg.resampler == "pixel_shuffle":
        return PixelShuffleResampler(in_dim, cfg.num_vision_tokens, num_patches, cfg.position_embedding)
    if cfg.resampler == "none":
        return IdentityResampler(in_dim, cfg.num_vision_tokens, num_patches, cfg.position_embedding)
    raise ValueError(f"VisionConfig.resampler={cfg.resampler!r}; choose perceiver, avgpool, pixel_shuffle or none")
