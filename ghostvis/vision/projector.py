"""Projector: vision tokens -> LLM embedding width (LLaVA-1.5's two-layer MLP, SmolVLM's linear, or Idefics2's
SwiGLU MLP, which the perceiver connector uses before resampling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free, [N, T, in_dim] -> [N, T, out_dim]: Idefics2's modality projection
    and its perceiver's MLP (transformers' Idefics2MLP, same names). Plain nn.Linear: the vision tower is
    replicated on tensor-parallel ranks and LoRA adapts the LLM's layers only."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        if hidden <= 0:
            raise ValueError(f"VisionConfig.projector_hidden must be positive for the perceiver's SwiGLU, got {hidden}")
        self.gate_proj = nn.Linear(in_dim, hidden, bias=False)
        self.up_proj = nn.Linear(in_dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_projector(in_dim: int, hidden: int, out_dim: int, gated: bool = False) -> nn.Module:
    """VisionConfig.projector_hidden: > 0 the MLP of that width (SwiGLU when `gated`), 0 the linear layer."""
    if gated:
        return GatedMLP(in_dim, hidden, out_dim)
    return LinearProjector(in_dim, out_dim) if hidden == 0 else MLPProjector(in_dim, hidden, out_dim)
