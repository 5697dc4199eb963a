"""The output head and its cross-entropy in one step, chunked over tokens (docs/model.md, "Loss").

A large vocabulary's logits dominate training memory: 32k tokens × 152k vocabulary is 20 GB in fp32,
and the log-softmax and its gradient each hold as much again. Here one chunk of tokens' logits exists at
a time: forward keeps only the log-sum-exp per token, and backward recomputes each chunk's logits (one
extra head matmul, about 2% of a 7B model's step) to form the gradient. The weight may be this rank's
vocabulary shard under tensor parallelism: the max, sum-exp and target logit of every chunk are
all-reduced over the TP group (Megatron's vocab-parallel cross-entropy), so no rank holds full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


IGNORE_INDEX = -1
CHUNK_ELEMENTS = 2**28  # fp32 logits per chunk (1 GiB): large enough for full-speed matmuls


def _tp_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce_(x: torch.Tensor, group: dist.ProcessGroup | None, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
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
        # Built out of place (a list of chunks, then cat + where): under torch.compile (torch 2.11) an
        # autograd.Function whose output was written in place aliases a pre-mutation intermediate, and the
        # gradient reaches that phantom instead of x and the weight: every gradient upstream comes back 0
        # (docs/training.md, "torch.compile").
        losses, lses = [], []
        for s in range(0, x.shape[0], chunk):
            z, _ = _chunk_logits(x[s:s + chunk], w, cap, col_start, vocab_size)
            local_t, in_range = _local_targets(targets[s:s + chunk], col_start, w.shape[0])
            m = _all_reduce_(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
            sum_exp = _all_reduce_((z - m.unsqueeze(-1)).exp_().sum(dim=-1), group)
            lse = m + sum_exp.log()
            # where, not a product: a shard of only padding gathers -inf, and -inf * 0 is NaN
            picked = _all_reduce_(torch.where(in_range.bool(), z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1), 0.0),
                                  group)
            lses.append(lse)
            losses.append(lse - picked)
        lse = torch.cat(lses)
        ctx.save_for_backward(x, w, targets, lse)
        ctx.group, ctx.vocab_size, ctx.cap, ctx.chunk, ctx.col_start = group, vocab_size, cap, chunk, col_start
        return torch.where(targets == IGNORE_INDEX, 0.0, torch.cat(losses))

    @staticmethod
    def backward(ctx, grad_loss):
        x, w, targets, lse = ctx.saved_tensors
        g = grad_loss.float().masked_fill(targets == IGNORE_INDEX, 0.0)
        want_x, want_w = ctx.needs_input_grad[:2]  # a frozen head (vision_pretrain) skips its matmul
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        for s in range(0, x.shape[0], ctx.chunk):
            x_c = x[s:s + ctx.chunk]
            z, t = _chunk_logits(x_c, w, ctx.cap, ctx.col_start, ctx.vocab_size)
            local_t, in_range = _local_targets(targets[s:s + ctx.chunk], ctx.col_start, w.shape[0])
            dz = z.sub_(lse[s:s + ctx.chunk].unsqueeze(-1)).exp_()  # softmax; padding columns are exp(-inf) = 0
            dz.scatter_add_(-1, local_t.unsqueeze(-1), -in_range.unsqueeze(-1))
            dz.mul_(g[s:s + ctx.chunk].unsqueeze(-1))
            if t is not None:  # d(cap·tanh(z/cap))/dz, in place: no extra chunk-sized buffers
                dz.mul_(t.square_().neg_().add_(1.0))
            dz = dz.to(w.dtype)
            if want_x:
                grad_x[s:s + ctx.chunk] = dz @ w
            if want_w:
                grad_w += (dz.t() @ x_c).float()
        return (grad_x.to(ctx.x_dtype) if want_x else None, grad_w.to(ctx.w_dtype) if want_w else None,
                None, None, None, None, None)


def _chunk_logits(x: torch.Tensor, w: torch.Tensor, cap: float | None, col_start: int,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (padding columns -inf) and, with a soft-cap, tanh(raw / cap)."""
    z = F.linear(x, w).float()
    t = None
    if cap is not None:
        t = torch.tanh(z / cap)
        z = t * cap
    first_pad = vocab_size - col_start
    if first_pad < z.shape[-1]:
        z[:, max(first_pad, 0):] = float("-inf")
    return z, t


def _local_targets(targets: torch.Tensor, col_start: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets as column indices into this shard (clamped) and a 0/1 mask of those inside it."""
    local_t = targets - col_start
    in_range = (local_t >= 0) & (local_t < local)
    return local_t.clamp(0, local - 1), in_range.float()


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
