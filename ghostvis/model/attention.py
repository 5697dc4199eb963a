"""Causal self-attention with grouped-query heads and the attention-kernel dispatch (docs/model.md).

Dispatch, first match wins:
1. `flash_attn` (FA3's `flash_attn_interface` or FA2) when importable, on CUDA, in bf16/fp16. Its
   causal mask is bottom-right aligned, so it also serves decode and chunked prefill; GQA is native.
2. SDPA with `enable_gqa=True` on CUDA, bf16/fp16, causal, no explicit mask (Tq == Tk): the one
   case where SDPA's flash backend runs GQA natively.
3. Otherwise K/V heads are expanded with `repeat_interleave` first: `enable_gqa` anywhere else
   silently falls back to the slow math backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ghostvis.config import ModelConfig
from ghostvis.model.kv_cache import KVCache
from ghostvis.model.layers import RMSNorm, apply_rotary
from ghostvis.model.parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tp, tp_size_rank

try:  # FlashAttention-3 (Hopper) ships as flash_attn_interface
    from flash_attn_interface import flash_attn_func as _flash_attn_func
except ImportError:
    try:
        from flash_attn import flash_attn_func as _flash_attn_func
    except ImportError:
        _flash_attn_func = None

_HALF = (torch.bfloat16, torch.float16)


def attention_backend(q: torch.Tensor, q_len: int, kv_len: int) -> str:
    """Which kernel `attend` uses for these inputs: "flash_attn", "sdpa_gqa" or "sdpa_expand"."""
    if _flash_attn_func is not None and q.is_cuda and q.dtype in _HALF:
        return "flash_attn"
    if q.is_cuda and q.dtype in _HALF and q_len == kv_len:
        return "sdpa_gqa"
    return "sdpa_expand"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] with Hq % Hkv == 0. The queries are the
    last Tq of the Tk positions (bottom-right aligned), which covers training (Tq == Tk), decode
    (Tq == 1) and chunked prefill onto a KV cache. Returns [B, Hq, Tq, D]."""
    q_len, kv_len = q.shape[2], k.shape[2]
    backend = attention_backend(q, q_len, kv_len)
    if backend == "flash_attn":
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
        return out.transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    if backend == "sdpa_gqa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # SDPA's is_causal is top-left aligned when Tq != Tk, so spell the offset mask out
    offset = kv_len - q_len
    mask = torch.arange(kv_len, device=q.device) <= (torch.arange(q_len, device=q.device) + offset).unsqueeze(-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention under an explicit boolean mask (True = visible), broadcastable to [B, Hq, Tq, Tk]:
    decode over rows of different lengths. SDPA takes no native GQA with a mask, so K/V are expanded."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    """GQA self-attention: column-parallel q/k/v (each rank holds n_head/tp query heads and the
    n_kv_head/tp KV heads they use), optional QK-norm (Qwen3-style, before RoPE), row-parallel output."""

    def __init__(self, config: ModelConfig, layer_idx: int, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        tp_size, _ = tp_size_rank(tp_group)
        self.tp_group, self.layer_idx = tp_group, layer_idx
        self.head_dim = config.head_dim
        self.n_head, self.n_kv_head = config.n_head // tp_size, config.n_kv_head // tp_size
        d, hd, bias = config.n_embd, config.head_dim, config.qkv_bias
        self.q_proj = ColumnParallelLinear(d, config.n_head * hd, bias, tp_group, copy_input=False)
        self.k_proj = ColumnParallelLinear(d, config.n_kv_head * hd, bias, tp_group, copy_input=False)
        self.v_proj = ColumnParallelLinear(d, config.n_kv_head * hd, bias, tp_group, copy_input=False)
        self.o_proj = RowParallelLinear(config.n_head * hd, d, tp_group=tp_group)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps, tp_group)
            self.k_norm = RMSNorm(hd, config.norm_eps, tp_group)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        x = copy_to_tp(x, self.tp_group)  # one backward all-reduce for q, k and v together
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        mask = getattr(kv_cache, "attn_mask", None)  # per-row lengths (RaggedKVCache)
        y = attend(q, k, v) if mask is None else attend_masked(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)
