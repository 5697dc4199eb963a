"""Projector: resampled vision tokens -> LLM embedding width (LLaVA-1.5's two-layer MLP)."""

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
