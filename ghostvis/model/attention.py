"""Causal self-attention with grouped-query heads and the attention-kernel choice (docs/model.md).

Training attention (causal, Tq == Tk, CUDA, bf16/fp16) runs one kernel for the whole process, chosen
once by `select_attention` and named in the run log. `auto` takes the first kernel, in this order, that
imports and passes a forward + backward probe against SDPA's math backend in fp32:

    fa4 (flash-attn-4, CuTe DSL)  >  cudnn (SDPA, native GQA)  >  fa3  >  fa2  >  sdpa_flash  >  expand

The order follows measurements (torch 2.11, causal GQA, D=128, fwd+bwd): cuDNN ran 1.7-1.9x SDPA's flash
backend on an H200; on an H100 flash-attn-4 led cuDNN from 8k tokens a row up and trailed it at 2k, so rows
shorter than FA4_FROM_SEQ try cuDNN first (`auto_order`). `bench/attention.py` re-measures every installed
kernel on a card; change AUTO_ORDER if it disagrees. A kernel asked for by name that is missing or fails its
probe is an error, never a silent slower fallback. `expand` (K/V heads repeated, then SDPA with any backend) is
correct everywhere and is the only choice on CPU and in fp32: `enable_gqa` there silently falls back to
the slow math kernel.

Decode and chunked prefill (Tq != Tk, KV cache) use FA2/FA3 when the process chose it (their causal mask
is bottom-right aligned), else expanded K/V with an explicit offset mask.

Packed rows (`--pack`, ghostvis/data/packing.py) hold several documents; each attends causally to itself
only. `select_attention(..., packed="auto")` also picks the document-masked kernel, first of PACKED_ORDER that
passes the same probe against masked SDPA math (`--packed-attention` names one instead):

    varlen (the chosen FlashAttention's cu_seqlens entry)  >  flex (flex_attention + block mask)  >  sdpa_mask

varlen and flex skip the masked work (flex at 128×128-block granularity) and build no [T, T] mask;
`sdpa_mask` (a boolean [B, 1, T, T] mask, expanded K/V) computes every pair and stores the mask: it is the
correct-everywhere fallback and the only one on CPU and in fp32. `bench/attention.py --packed` measures them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
# Below this many tokens a row `auto` tries cuDNN before fa4: on an H100 (BENCHMARKS.md, thirteenth session)
# fa4 through its custom op ran 0.79x cuDNN at 16x2048 and 1.04x / 1.08x at 2x8192 / 1x32768.
FA4_FROM_SEQ = 8192
ATTENTION_CHOICES = ("auto", *AUTO_ORDER)
PACKED_ORDER = ("varlen", "flex", "sdpa_mask")
PACKED_CHOICES = ("auto", *PACKED_ORDER)


class AttentionError(UserError, ValueError):
    """An attention kernel asked for by name cannot run here (missing, or wrong on its probe)."""


def _import_fa4() -> Callable:
    from ghostvis.model.fa4_op import fa4_causal  # needs the flash-attn-4 wheel (`pip install .[gpu]`)
    def causal_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        assert causal, "ghostvis::fa4_causal_fwd is causal attention only"
        return fa4_causal(q, k, v)
    return causal_only


def _import_fa3() -> Callable:
    from flash_attn_interface import flash_attn_func  # FlashAttention-3 (Hopper), built from source
    return flash_attn_func


def _import_fa2() -> Callable:
    from flash_attn import flash_attn_func  # FlashAttention-2, built from source
    return flash_attn_func


def _import_fa4_varlen() -> Callable:
    from flash_attn.cute import flash_attn_varlen_func
    # without max_seqlen_q it schedules every query block as if one document held all the tokens
    return lambda q, k, v, cu, n: flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n,
                                                         max_seqlen_k=n, causal=True)


def _import_fa3_varlen() -> Callable:
    from flash_attn_interface import flash_attn_varlen_func
    return lambda q, k, v, cu, n: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)


def _import_fa2_varlen() -> Callable:
    from flash_attn import flash_attn_varlen_func
    return lambda q, k, v, cu, n: flash_attn_varlen_func(q, k, v, cu, cu, n, n, causal=True)


_IMPORTS: dict[str, Callable[[], Callable]] = {"fa4": _import_fa4, "fa3": _import_fa3, "fa2": _import_fa2}
_VARLEN_IMPORTS: dict[str, Callable[[], Callable]] = {"fa4": _import_fa4_varlen, "fa3": _import_fa3_varlen,
                                                      "fa2": _import_fa2_varlen}
_flash_fns: dict[str, Callable] = {}
_varlen_fns: dict[str, Callable] = {}


def varlen_fn(flash: str) -> Callable:
    """The cu_seqlens entry of FlashAttention kernel `flash` (fa4, fa3, fa2): fn(q, k, v, cu_seqlens, max_len)
    on [total, heads, D] tensors (ImportError if missing)."""
    if flash not in _VARLEN_IMPORTS:
        raise AttentionError(f"{flash} has no cu_seqlens (varlen) entry; varlen runs with fa4, fa3 or fa2")
    if flash not in _varlen_fns:
        _varlen_fns[flash] = _VARLEN_IMPORTS[flash]()
    return _varlen_fns[flash]


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


# ---- packed rows: attention inside each document only ------------------------------------------------

@dataclass
class Documents:
    """The documents of packed rows, in the form the packed kernel takes: `ids` [B, T] (ghostvis/data/packing.py)
    plus a boolean mask [B, 1, T, T] (sdpa_mask), a flex BlockMask (flex), or cu_seqlens over the flattened
    rows, the longest document and the FlashAttention entry that takes them (varlen)."""

    ids: torch.Tensor
    kernel: str
    mask: torch.Tensor | None = None
    block_mask: Any = None
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    varlen: Callable | None = None


def documents(ids: torch.Tensor, kernel: str | None = None, flash: str | None = None) -> Documents:
    """What `attend_documents` needs for `ids` [B, T], built once per forward for every layer (default
    kernel: the one select_attention chose, else sdpa_mask; varlen's `flash` default: the chosen dense one)."""
    kernel = kernel or ("sdpa_mask" if _packed is None else _packed)
    B, T = ids.shape
    if kernel == "sdpa_mask":
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        return Documents(ids, kernel, mask=((ids.unsqueeze(2) == ids.unsqueeze(1)) & causal).unsqueeze(1))
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (ids[b, q] == ids[b, kv]) & (kv <= q)

        return Documents(ids, kernel, block_mask=create_block_mask(same_document, B, None, T, T, device=ids.device,
                                                                    _compile=ids.is_cuda))
    if kernel == "varlen":
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]  # every row starts a document too
        first = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
        return Documents(ids, kernel, cu_seqlens=cu, max_len=int((cu[1:] - cu[:-1]).max()),
                         varlen=varlen_fn(flash or selected_attention()))
    raise AttentionError(f"unknown packed attention kernel {kernel!r}; choose from {', '.join(PACKED_ORDER)}")


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, T] of packed rows: 0, 1, ... restarting wherever `document_ids` changes."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


_flex_compiled: Callable | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    global _flex_compiled
    if _flex_compiled is None:  # flex_attention runs its fused kernel only compiled
        from torch.nn.attention.flex_attention import flex_attention
        _flex_compiled = torch.compile(flex_attention)  # a dimension that changes (a short batch) turns dynamic
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attend_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
    """Causal attention of packed rows, each position seeing only its own document. q [B, Hq, T, D]; k, v
    [B, Hkv, T, D]; returns [B, Hq, T, D]."""
    if docs.kernel == "sdpa_mask":
        return attend_masked(q, k, v, docs.mask)
    if docs.kernel == "flex":
        return _flex(q, k, v, docs.block_mask)
    B, H, T, D = q.shape
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]  # [total, heads, D]
    out = docs.varlen(*flat, docs.cu_seqlens, docs.max_len)
    out = out[0] if isinstance(out, tuple) else out  # some versions also return the LSE
    return out.view(B, T, H, D).transpose(1, 2)


# ---- what a checkpointed block keeps -------------------------------------------------------------------

# The kernels' forward ops: SDPA's fused backends, flash-attn-4's custom op once registered. SDPA's math backend,
# FA2/FA3 and varlen calls are not named, so with them a checkpointed block recomputes its attention (the planner
# still counts it kept).
_KERNEL_OPS = frozenset(("aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention",
                         "aten::_scaled_dot_product_efficient_attention",
                         "aten::_scaled_dot_product_flash_attention_for_cpu", "ghostvis::fa4_causal_fwd"))


def is_attention_kernel(op: Any) -> bool:
    """Whether dispatcher op `op` is a training attention kernel's forward (selective checkpointing keeps its
    outputs: docs/parallelism.md, "Activation checkpointing")."""
    return op.name() in _KERNEL_OPS


# ---- choosing the kernels -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionChoice:
    """The kernel this process trains with, and why the ones before it in the order were skipped; with
    packed rows also the document-masked kernel (and what it skipped)."""

    kernel: str
    skipped: tuple[str, ...] = ()
    packed: str | None = None
    packed_skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        text = self.kernel + (f" (skipped: {'; '.join(self.skipped)})" if self.skipped else "")
        if self.packed is not None:
            text += f"; packed rows: {self.packed}" + (
                f" (skipped: {'; '.join(self.packed_skipped)})" if self.packed_skipped else "")
        return text


_selected: tuple[str, Callable] | None = None  # (name, fn) once select_attention ran on CUDA
_packed: str | None = None  # the packed kernel select_attention(packed=...) chose

# document lengths of the probe's two rows: T = 300 ends in a partial 128-block, as packed rows (--pack sizes them
# from the data) mostly do
PROBE_DOCUMENTS = ((100, 56, 99, 45), (300,))


def probe_kernel(fn: Callable, device: torch.device, dtype: torch.dtype, head_dim: int,
                 document_ids: torch.Tensor | None = None) -> str | None:
    """None if `fn`'s causal GQA forward and gradients match SDPA math in fp32 within bf16 tolerance,
    else what went wrong. The inputs and the incoming gradient have the strides training gives them
    (q/k/v are transposed views of [B, T, H, D]; the gradient comes back through transpose + reshape):
    kernels have been wrong on exactly such non-contiguous layouts while right on contiguous ones.
    With `document_ids` [2, 300] the reference attends within documents only (packed kernels)."""
    g = torch.Generator(device=device).manual_seed(0)
    B, T, H, KV = 2, 300, 4, 2
    ref_mask = None if document_ids is None else documents(document_ids, "sdpa_mask").mask
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
        if ref_mask is None:
            ref = run(lambda a, b, c: _sdpa_pinned(SDPBackend.MATH, a, b.repeat_interleave(groups, 1),
                                                   c.repeat_interleave(groups, 1)), torch.float32)
        else:
            ref = run(lambda a, b, c: attend_masked(a, b, c, ref_mask), torch.float32)
        got = run(fn, dtype)
    except Exception as err:  # noqa: BLE001 - any failure means this kernel can't run here
        return f"failed its probe ({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''})"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        err = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
        if not err < 2e-2:  # bf16 operands land near 3e-3; NaN fails too
            return f"wrong on its probe ({name} relative error {err:.2e})"
    return None


def auto_order(seq_len: int | None) -> tuple[str, ...]:
    """The kernels `auto` tries, in order, for rows of `seq_len` tokens (None: long rows)."""
    if seq_len is not None and seq_len < FA4_FROM_SEQ:
        return ("cudnn", *(k for k in AUTO_ORDER if k != "cudnn"))
    return AUTO_ORDER


def select_attention(name: str, device: torch.device | str, dtype: torch.dtype, head_dim: int = 128,
                     packed: str | None = None, seq_len: int | None = None) -> AttentionChoice:
    """Choose the training attention kernel for this process (`name` in ATTENTION_CHOICES) and pin it;
    `auto` tries `auto_order(seq_len)`, or AUTO_ORDER for packed rows, whose document-masked kernel `packed`
    (PACKED_CHOICES; None: rows are not packed) chooses: `auto` takes the first of PACKED_ORDER that passes
    its probe (module docstring).
    On CPU or in fp32 only `expand` runs (and `auto` is `expand`; packed rows: sdpa_mask). Raises
    AttentionError when a kernel named explicitly cannot run, with the fix."""
    # packed rows skip the length-aware order: fa4 stays first, and its cu_seqlens entry is the varlen kernel
    choice = _select_dense(name, torch.device(device), dtype, head_dim, None if packed else seq_len)
    return choice if packed is None else _select_packed(choice, packed, torch.device(device), dtype, head_dim)


def _select_packed(choice: AttentionChoice, name: str, device: torch.device, dtype: torch.dtype,
                   head_dim: int) -> AttentionChoice:
    """`name`, or under `auto` the first kernel of PACKED_ORDER, that runs here and passes the document-masked
    probe (sdpa_mask is the reference's own computation, so it always can)."""
    global _packed
    if name not in PACKED_CHOICES:
        raise AttentionError(f"--packed-attention {name!r}: choose from {', '.join(PACKED_CHOICES)}")
    if device.type != "cuda" or dtype not in _HALF:
        if name not in ("auto", "sdpa_mask"):
            raise AttentionError(f"--packed-attention {name} runs only on a GPU in bf16/fp16; on {device.type} "
                                 f"in {str(dtype).removeprefix('torch.')} packed rows use sdpa_mask (pass auto)")
        _packed = "sdpa_mask"
        return dataclasses.replace(choice, packed=_packed)
    ids = torch.cat([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)).unsqueeze(0)
                     for d in PROBE_DOCUMENTS]).to(device)
    skipped = []
    for candidate in PACKED_ORDER if name == "auto" else (name,):
        if candidate == "varlen" and choice.kernel not in _VARLEN_IMPORTS:
            skipped.append(f"varlen: {choice.kernel} has no cu_seqlens entry (varlen needs --attention "
                           f"{', '.join(_VARLEN_IMPORTS)})")
            continue
        try:
            docs = documents(ids, candidate, choice.kernel)
        except ImportError as err:
            skipped.append(f"{candidate}: not installed ({err.name or err})")
            continue
        except Exception as err:  # noqa: BLE001 - a kernel whose mask can't be built here is skipped
            skipped.append(f"{candidate}: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
            continue
        problem = probe_kernel(lambda q, k, v: attend_documents(q, k, v, docs), device, dtype, head_dim, ids)
        if problem is None:
            _packed = candidate
            return dataclasses.replace(choice, packed=candidate, packed_skipped=tuple(skipped))
        skipped.append(f"{candidate}: {problem}")
    if name != "auto":
        raise AttentionError(f"--packed-attention {name} cannot run here: {skipped[0].split(': ', 1)[1]}; "
                             "pass --packed-attention auto to take the first that can")
    raise AttentionError("no packed attention kernel passed its probe: " + "; ".join(skipped))


def _select_dense(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                  seq_len: int | None) -> AttentionChoice:
    global _selected
    if name not in ATTENTION_CHOICES:
        raise AttentionError(f"--attention {name!r}: unknown kernel; choose from {', '.join(ATTENTION_CHOICES)}")
    if device.type != "cuda" or dtype not in _HALF:
        if name not in ("auto", "expand"):
            raise AttentionError(f"--attention {name} needs a CUDA device and bf16/fp16 (here: {device.type}, "
                                 f"{str(dtype).removeprefix('torch.')}); use --attention auto or expand")
        _selected = None
        return AttentionChoice("expand")
    skipped = []
    for candidate in (auto_order(seq_len) if name == "auto" else (name,)):
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
                kv_cache: KVCache | None = None, docs: Documents | None = None) -> torch.Tensor:
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
        if docs is not None:
            y = attend_documents(q, k, v, docs)
        elif self.cp is not None and kv_cache is None:
            y = self.cp.attend(q, k, v)
        else:
            y = attend(q, k, v) if mask is None else attend_masked(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)
