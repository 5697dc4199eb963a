"""Building blocks: RMSNorm, rotary position embedding, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ghostvis.model.parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tp


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale. Pass `tp_group` when the input is split across TP ranks (QK-norm
    over each rank's own heads): the replicated weight then gets the gradient summed over the group."""

    def __init__(self, dim: int, eps: float = 1e-6, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), copy_to_tp(self.weight, self.tp_group), self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), in the Hugging Face "rotate_half" layout
    (frequencies repeated over both halves of head_dim) so Qwen2/Llama weights load unpermuted.
    Buffers are non-persistent: rebuilt from the config, never stored in checkpoints."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables(None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim))
        t = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().float(), emb.sin().float()

    def reset_parameters(self) -> None:
        """Recompute the tables in place (after `to_empty()` from the meta device)."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, offset: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [offset, offset + length), shape [length, head_dim]."""
        return self.cos[offset:offset + length], self.sin[offset:offset + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for per-row positions [B, T], shaped [B, 1, T, head_dim] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [..., T, head_dim] by the positions' angles (cos/sin [T, head_dim])."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel: one all-reduce."""

    def __init__(self, dim: int, ffn_dim: int, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.gate_proj = ColumnParallelLinear(dim, ffn_dim, tp_group=tp_group, copy_input=False)
        self.up_proj = ColumnParallelLinear(dim, ffn_dim, tp_group=tp_group, copy_input=False)
        self.down_proj = RowParallelLinear(ffn_dim, dim, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, self.tp_group)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
