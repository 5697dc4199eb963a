"""The output head and its cross-entropy in one step, chunked over tokens (docs/model.md, "Loss").

A large vocabulary's logits dominate training memory: 32k tokens × 152k vocabulary is 20 GB in fp32,
and the log-softmax and its gradient each hold as much again. Here one chunk of tokens' logits exists at
a time: forward keeps only the log-sum-exp per token, and backward recomputes each chunk's logits (one
extra head matmul, about 2% of a 7B model's step) to form the gradient. The weight may be this rank's
vocabulary shard under tensor parallelism: the max, sum-exp and target logit of every chunk are
all-reduced over the TP group (Megatron's vocab-parallel cross-entropy), so no rank holds full logits.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


IGNORE_INDEX = -1
CHUNK_ELEMENTS = 2**28  # logits per chunk (512 MiB in bf16): large enough for full-speed matmuls


def _tp_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _sharded(group: dist.ProcessGroup | None) -> bool:
    """Whether the vocabulary is split over more than one rank of `group`."""
    return group is not None and dist.get_world_size(group) > 1


def _all_reduce_(x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if _sharded(group):
        dist.all_reduce(x, op=op, group=group)
    return x


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (fp32 master weights + bf16 autocast), else the input's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `x @ weightᵀ` (soft-capped, padding columns excluded) without the logits."""

    @staticmethod
    def forward(ctx, x, weight, targets, group, vocab_size, cap, chunk):
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        dtype = _compute_dtype(x)
        x, w = x.to(dtype), weight.to(dtype)
        col_start = _tp_rank(group) * w.shape[0]
        first_pad = vocab_size - col_start  # this shard's first padding column (may lie outside it)
        local_t, in_range = _local_targets(targets, col_start, w.shape[0])
        sharded = _sharded(group)
        # Built out of place (a list of chunks, then cat + where): under torch.compile (torch 2.11) an
        # autograd.Function whose output was written in place aliases a pre-mutation intermediate, and the
        # gradient reaches that phantom instead of x and the weight: every gradient upstream comes back 0
        # (docs/training.md, "torch.compile").
        lses, picks = [], []
        for s in range(0, x.shape[0], chunk):
            m, sum_exp, picked = _chunk_kernel(_chunk_stats, x.is_cuda)(
                F.linear(x[s:s + chunk], w), local_t[s:s + chunk], in_range[s:s + chunk], cap, first_pad)
            if sharded:
                # Megatron's vocab-parallel softmax: rescale each shard's sum to the global max
                global_m = _all_reduce_(m.clone(), group, dist.ReduceOp.MAX)
                sum_exp = _all_reduce_(sum_exp * (m - global_m).exp(), group)
                m, picked = global_m, _all_reduce_(picked, group)
            lses.append(m + sum_exp.log())
            picks.append(picked)
        lse, ignored = torch.cat(lses), targets == IGNORE_INDEX
        ctx.save_for_backward(x, w, local_t, in_range, ignored, lse)
        ctx.chunk, ctx.cap, ctx.first_pad = chunk, cap, first_pad
        return torch.where(ignored, 0.0, lse - torch.cat(picks))

    @staticmethod
    def backward(ctx, grad_loss):
        x, w, local_t, in_range, ignored, lse = ctx.saved_tensors
        g = grad_loss.float().masked_fill(ignored, 0.0)
        want_x, want_w = ctx.needs_input_grad[:2]  # a frozen head (vision_pretrain) skips its matmul
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        for s in range(0, x.shape[0], ctx.chunk):
            x_c, rows = x[s:s + ctx.chunk], slice(s, s + ctx.chunk)
            dz = _chunk_kernel(_chunk_grad, x.is_cuda)(F.linear(x_c, w), lse[rows], local_t[rows], in_range[rows],
                                                       g[rows], ctx.cap, ctx.first_pad)
            if want_x:
                grad_x[rows] = dz @ w
            if want_w:
                grad_w += (dz.t() @ x_c).float()
        return (grad_x.to(ctx.x_dtype) if want_x else None, grad_w.to(ctx.w_dtype) if want_w else None,
                None, None, None, None, None)


def _capped_logits(z: torch.Tensor, cap: float | None, first_pad: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (soft-capped; columns from `first_pad` on are padding: -inf) and tanh(raw / cap).
    May overwrite `z` (a fresh matmul output, when already fp32): in place, so eager runs hold fewer chunk-sized
    buffers; inductor fuses in-place steps the same."""
    z = z.float()
    t = None
    if cap is not None:
        t = torch.tanh(z / cap)
        z = t * cap
    if first_pad < z.shape[-1]:
        z[:, max(first_pad, 0):] = float("-inf")
    return z, t


def _chunk_stats(z: torch.Tensor, local_t: torch.Tensor, in_range: torch.Tensor, cap: float | None,
                 first_pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of one chunk's raw logits `z`: (max, sum of exp(logit - max), the target's logit or 0 where the
    target is not in this shard). A row of only padding (a TP shard past the vocabulary) gives max -inf, sum 0."""
    z, _ = _capped_logits(z, cap, first_pad)
    m = z.amax(dim=-1)
    shift = torch.where(m == float("-inf"), 0.0, m)  # -inf - -inf would be NaN
    sum_exp = (z - shift.unsqueeze(-1)).exp_().sum(dim=-1)
    # where, not a product: the gathered logit of a padding target is -inf, and -inf * 0 is NaN
    picked = torch.where(in_range, z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1), 0.0)
    return m, sum_exp, picked


def _chunk_grad(z: torch.Tensor, lse: torch.Tensor, local_t: torch.Tensor, in_range: torch.Tensor,
                g: torch.Tensor, cap: float | None, first_pad: int) -> torch.Tensor:
    """d(Σ g·loss)/d(raw logits) of one chunk, in the logits' dtype: g·(softmax − one-hot), through the cap."""
    dtype = z.dtype
    dz, t = _capped_logits(z, cap, first_pad)
    dz = dz.sub_(lse.unsqueeze(-1)).exp_()  # softmax; padding columns are exp(-inf) = 0
    if torch.compiler.is_compiling():
        # a one-hot, pointwise: before a scatter inductor writes the whole fp32 softmax out (two kernels, not one)
        col = torch.arange(dz.shape[-1], device=dz.device)
        dz = dz - ((col == local_t.unsqueeze(-1)) & in_range.unsqueeze(-1)).float()
    else:  # eager: no chunk-sized mask
        dz.scatter_add_(-1, local_t.unsqueeze(-1), -in_range.unsqueeze(-1).float())
    dz.mul_(g.unsqueeze(-1))
    if t is not None:  # d(cap·tanh(z/cap))/dz
        dz.mul_(t.square_().neg_().add_(1.0))
    return dz.to(dtype)


class _Fused:
    """`fn` compiled (lazily, on the first call) and, where inductor cannot compile on this machine (no Triton
    for the card, no C compiler for Triton's launcher), `fn` as it is, after one warning: slower, never broken."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as err:  # inductor's own errors derive from it
                warnings.warn(f"the fused loss kernels do not compile here, so the loss runs unfused (slower, same "
                              f"values): {type(err).__name__}: {str(err).splitlines()[0][:200]}", stacklevel=2)
                self.compiled = None
        return self.fn(*args)


# Built here, not on first use: creating a torch.compile while an outer compile traces the loss fails.
_FUSED = {fn: _Fused(fn) for fn in (_chunk_stats, _chunk_grad)}


def _chunk_kernel(fn, on_gpu: bool):
    """`fn` as one fused inductor kernel on a GPU, else as it is. Eagerly, each elementwise step of a chunk reads
    and writes the whole chunk of fp32 logits (several passes of 1 GiB at the default chunk): the step's largest
    cost after the matmuls on a GPU. Fused, the chunk is read once and its gradient written once. Compiled with
    dynamic shapes, so a shorter last chunk or a new sequence length does not recompile (a one-row chunk gets a
    graph of its own: dynamo specializes sizes 0 and 1). Inside an outer compile (the traceable loss) the plain
    function is traced with the rest. On CPU (tests, the demo) compiling costs more than it saves."""
    return _FUSED[fn] if on_gpu and not torch.compiler.is_compiling() else fn


def _local_targets(targets: torch.Tensor, col_start: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets as column indices into this shard (clamped) and whether each is inside it."""
    local_t = targets - col_start
    in_range = (local_t >= 0) & (local_t < local)
    return local_t.clamp(0, local - 1), in_range


def traceable_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                   vocab_size: int, softcap: float | None = None,
                                   tp_group: dist.ProcessGroup | None = None,
                                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-token fp32 cross-entropy `[...]` (the shape of `targets`; 0 where the target is -1) of the head
    `weight` (`[padded_vocab / tp, d]`, this rank's rows) applied to hidden states `x` `[..., d]`, traceable by
    torch.compile (the model calls `linear_cross_entropy`, the same left eager, below). Columns at global index
    >= `vocab_size` (padding) never take probability. Under TP, `x` must already have passed `copy_to_tp` (the
    heads in parallel.py do it) so its gradient sums over the ranks' shards."""
    chunk = max(1, chunk_elements // weight.shape[0])
    loss = _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), tp_group,
                                     vocab_size, softcap, chunk)
    return loss.view(targets.shape)


# Eager under torch.compile (the graph breaks at the loss call; the blocks stay in one graph): inductor unrolls
# the chunk loop and keeps every chunk's fp32 logits alive at once, which undoes the chunking
# (bench/loss_memory.py, BENCHMARKS.md).
linear_cross_entropy = torch.compiler.disable(traceable_linear_cross_entropy)
