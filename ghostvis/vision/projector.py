"""Projector: resampled vision tokens -> LLM embedding width (LLaVA-1.5's two-layer MLP, or SmolVLM's linear)."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear, [N, T, in_dim] -> [N, T, out_dim]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        if hidden <= 0:
            raise ValueError(f"VisionConfig.projector_hidden must be positive, got {hidden}")
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearProjector(nn.Module):
    """One bias-free linear layer, [N, T, in_dim] -> [N, T, out_dim] (Idefics3/SmolVLM's modality projection)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """VisionConfig.projector_hidden: > 0 the MLP of that width, 0 the linear layer."""
    return LinearProjector(in_dim, out_dim) if hidden == 0 else MLPProjector(in_dim, hidden, out_dim)
