"""flash-attn-4's causal attention as two torch custom ops (docs/model.md, "Attention kernels").

flash_attn.cute's own entry is a torch.autograd.Function whose forward JIT-compiles CuTe DSL kernels, which
Dynamo cannot trace: under `--compile` each block's graph would break there. Registered as custom ops with
shape-only (fake) implementations, the forward and the backward are each one opaque node that Inductor
schedules around, and activation checkpointing sees one op. Importing this module needs flash_attn.cute (the
`gpu` extra); ghostvis/model/attention.py imports it only when fa4 is asked for or probed.
"""

from __future__ import annotations

import torch
from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd


@torch.library.custom_op("ghostvis::fa4_causal_fwd", mutates_args=(), device_types="cuda")
def fa4_causal_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention on contiguous [B, T, H, D] q and [B, T, KV, D] k, v: (out [B, T, H, D], lse [B, H, T])."""
    out, lse, *_ = _flash_attn_fwd(q, k, v, causal=True, return_lse=True)
    return out, lse


@fa4_causal_fwd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("ghostvis::fa4_causal_bwd", mutates_args=(), device_types="cuda")
def fa4_causal_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=True)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # as the fake says (a no-op for contiguous inputs)


@fa4_causal_bwd.register_fake
def _(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
      lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor,
              _dlse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_causal_bwd(dout.contiguous(), q, k, v, out, lse)


fa4_causal_fwd.register_autograd(_backward, setup_context=_save)


def fa4_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn-4 causal GQA attention on [B, T, H, D] tensors (the layout FlashAttention takes)."""
    return fa4_causal_fwd(q.contiguous(), k.contiguous(), v.contiguous())[0]
