"""Causal self-attention with grouped-query heads and the attention-kernel choice (docs/model.md).

Training attention (causal, Tq == Tk, CUDA, bf16/fp16) runs one kernel for the whole process, chosen
once by `select_attention` and named in the run log. `auto` takes the first kernel, in this order, that
imports and passes a forward + backward probe against SDPA's math backend in fp32:

    fa4 (flash-attn-4, CuTe DSL)  >  cudnn (SDPA, native GQA)  >  fa3  >  fa2  >  sdpa_flash  >  expand

The order follows one H200's measurements (torch 2.11, causal GQA, D=128, fwd+bwd): cuDNN ran 1.7-1.9x
SDPA's flash backend; flash-attn-4 is put first as the Hopper-tuned kernel, expected above cuDNN.
`bench/attention.py` re-measures every installed kernel on a card; change AUTO_ORDER if it disagrees. A kernel asked for by name that is missing or fails its probe is an
error, never a silent slower fallback. `expand` (K/V heads repeated, then SDPA with any backend) is
correct everywhere and is the only choice on CPU and in fp32: `enable_gqa` there silently falls back to
the slow math kernel.

Decode and chunked prefill (Tq != Tk, KV cache) use FA2/FA3 when the process chose it (their causal mask
is bottom-right aligned), else expanded K/V with an explicit offset mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ghostvis.cli import UserError
from ghostvis.config import ModelConfig
from ghostvis.model.kv_cache import KVCache
from ghostvis.model.layers import RMSNorm, apply_rotary
from ghostvis.model.parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tp, tp_size_rank

_HALF = (torch.bfloat16, torch.float16)
AUTO_ORDER = ("fa4", "cudnn", "fa3", "fa2", "sdpa_flash", "expand")
ATTENTION_CHOICES = ("auto", *AUTO_ORDER)


class AttentionError(UserError, ValueError):
    """An attention kernel asked for by name cannot run here (missing, or wrong on its probe)."""


def _import_fa4() -> Callable:
    from flash_attn.cute import flash_attn_func  # the flash-attn-4 wheel (`pip install .[gpu]`)
    return flash_attn_func


def _import_fa3() -> Callable:
    from flash_attn_interface import flash_attn_func  # FlashAttention-3 (Hopper), built from source
    return flash_attn_func


def _import_fa2() -> Callable:
    from flash_attn import flash_attn_func  # FlashAttention-2, built from source
    return flash_attn_func


_IMPORTS: dict[str, Callable[[], Callable]] = {"fa4": _import_fa4, "fa3": _import_fa3, "fa2": _import_fa2}
_flash_fns: dict[str, Callable] = {}


def _flash(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A FlashAttention-family kernel on [B, H, T, D] tensors (they take [B, T, H, D]; GQA native)."""
    out = _flash_fns[name](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    out = out[0] if isinstance(out, tuple) else out  # some versions also return the LSE
    return out.transpose(1, 2)


def _sdpa_pinned(backend: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _expand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def kernel_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The causal training attention of kernel `name` (importing what it needs; ImportError if missing)."""
    if name in _IMPORTS:
        if name not in _flash_fns:
            _flash_fns[name] = _IMPORTS[name]()
        return lambda q, k, v: _flash(name, q, k, v)
    if name in ("cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend
        backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
        return lambda q, k, v: _sdpa_pinned(backend, q, k, v)
    if name == "expand":
        return _expand
    raise AttentionError(f"--attention {name!r}: unknown kernel; choose from {', '.join(ATTENTION_CHOICES)}")


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel this process trains with, and why the ones before it in the order were skipped."""

    kernel: str
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.kernel + (f" (skipped: {'; '.join(self.skipped)})" if self.skipped else "")


_selected: tuple[str, Callable] | None = None  # (name, fn) once select_attention ran on CUDA


def probe_kernel(fn: Callable, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if `fn`'s causal GQA forward and gradients match SDPA math in fp32 within bf16 tolerance,
    else what went wrong. The inputs and the incoming gradient have the strides training gives them
    (q/k/v are transposed views of [B, T, H, D]; the gradient comes back through transpose + reshape):
    kernels have been wrong on exactly such non-contiguous layouts while right on contiguous ones."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, KV = 2, 256, 4, 2
    q, k, v = (torch.randn(B, T, h, head_dim, device=device, generator=g) for h in (H, KV, KV))
    grad = torch.randn(B, T, H * head_dim, device=device, generator=g)

    def run(f: Callable, dt: torch.dtype) -> list[torch.Tensor]:
        ins = [t.detach().to(dt, copy=True).requires_grad_(True) for t in (q, k, v)]
        out = f(*(t.transpose(1, 2) for t in ins)).transpose(1, 2).reshape(B, T, H * head_dim)
        out.backward(grad.to(dt))
        # a gradient that never arrived counts as zero: relative error 1
        return [out.float()] + [torch.zeros_like(t, dtype=torch.float32) if t.grad is None else t.grad.float()
                                for t in ins]

    try:
        from torch.nn.attention import SDPBackend
        groups = H // KV
        ref = run(lambda a, b, c: _sdpa_pinned(SDPBackend.MATH, a, b.repeat_interleave(groups, 1),
                                               c.repeat_interleave(groups, 1)), torch.float32)
        got = run(fn, dtype)
    except Exception as err:  # noqa: BLE001 - any failure means this kernel can't run here
        return f"failed its probe ({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''})"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        err = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
        if not err < 2e-2:  # bf16 operands land near 3e-3; NaN fails too
            return f"wrong on its probe ({name} relative error {err:.2e})"
    return None


def select_attention(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int = 128) -> AttentionChoice:
    """Choose the training attention kernel for this process (`name` in ATTENTION_CHOICES) and pin it.
    On CPU or in fp32 only `expand` runs (and `auto` is `expand`). Raises AttentionError when a kernel
    named explicitly cannot run, with the fix."""
    global _selected
    device = torch.device(device)
    if name not in ATTENTION_CHOICES:
        raise AttentionError(f"--attention {name!r}: unknown kernel; choose from {', '.join(ATTENTION_CHOICES)}")
    if device.type != "cuda" or dtype not in _HALF:
        if name not in ("auto", "expand"):
            raise AttentionError(f"--attention {name} needs a CUDA device and bf16/fp16 (here: {device.type}, "
                                 f"{str(dtype).removeprefix('torch.')}); use --attention auto or expand")
        _selected = None
        return AttentionChoice("expand")
    skipped = []
    for candidate in (AUTO_ORDER if name == "auto" else (name,)):
        try:
            fn = kernel_fn(candidate)
        except ImportError as err:
            reason = f"{candidate}: not installed ({err.name or err})"
        else:
            problem = probe_kernel(fn, device, dtype, head_dim)
            if problem is None:
                _selected = (candidate, fn)
                return AttentionChoice(candidate, tuple(skipped))
            reason = f"{candidate}: {problem}"
        if name != "auto":
            fix = " (pip install '.[gpu]' for fa4)" if candidate == "fa4" else ""
            raise AttentionError(f"--attention {candidate} cannot run here: {reason}{fix}; use --attention auto")
        skipped.append(reason)
    raise AttentionError("no attention kernel passed its probe: " + "; ".join(skipped))


def selected_attention() -> str:
    """The kernel causal training attention runs with in this process (`expand` until one is selected)."""
    return "expand" if _selected is None else _selected[0]


def attention_backend(q: torch.Tensor, q_len: int, kv_len: int) -> str:
    """Which kernel `attend` uses for these inputs: the selected one, "sdpa_gqa" (SDPA's own backend
    choice with native GQA, on CUDA half-precision causal inputs when nothing was selected, e.g. a
    serving process) or "expand"."""
    fast = q.is_cuda and q.dtype in _HALF
    if _selected is not None and fast and (q_len == kv_len or _selected[0] in ("fa2", "fa3")):
        return _selected[0]
    if _selected is None and fast and q_len == kv_len:
        return "sdpa_gqa"
    return "expand"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D] with Hq % Hkv == 0. The queries are the
    last Tq of the Tk positions (bottom-right aligned), which covers training (Tq == Tk), decode
    (Tq == 1) and chunked prefill onto a KV cache. Returns [B, Hq, Tq, D]."""
    q_len, kv_len = q.shape[2], k.shape[2]
    backend = attention_backend(q, q_len, kv_len)
    if backend == "sdpa_gqa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    if backend != "expand":
        return _selected[1](q, k, v)
    if q_len == kv_len:
        return _expand(q, k, v)
    # SDPA's is_causal is top-left aligned when Tq != Tk, so spell the offset mask out (decode needs none)
    offset = kv_len - q_len
    mask = None if q_len == 1 else (
        torch.arange(kv_len, device=q.device) <= (torch.arange(q_len, device=q.device) + offset).unsqueeze(-1))
    return attend_masked(q, k, v, mask)


def attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention under an explicit boolean mask (True = visible; None = all), broadcastable to
    [B, Hq, Tq, Tk]: chunked prefill, and decode over rows of different lengths. SDPA has no native GQA
    with a mask, so K/V are expanded."""
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
        self.cp = None  # a ContextParallel while training with --cp (GPT.set_context_parallel)

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
        if self.cp is not None and kv_cache is None:
            y = self.cp.attend(q, k, v)
        else:
            y = attend(q, k, v) if mask is None else attend_masked(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)
