"""Context parallelism (`--cp N`, docs/parallelism.md): one sequence spread over the N ranks of a CP group.

The sequence is cut into 2N equal chunks and rank r holds chunks r and 2N-1-r, so every rank does the same
causal attention work (an early chunk sees few keys, a late one many). Each layer all-gathers the K/V heads
of the whole sequence over the group (the all-gather context parallelism Llama 3 trained with):
with grouped-query attention K/V are a fraction of the activations (Qwen2.5-1.5B: 2 KV heads of 12), no
online-softmax merge is needed, and each local query chunk attends to a prefix of the gathered keys with
the ordinary bottom-right-aligned causal kernel. Backward sums the K/V gradients of every rank's queries.

Everything before the first block happens on the whole sequence's terms: the vision tower encodes each
image on one rank (images are dealt out in order) and the embeddings are all-gathered, the image splice
picks, for each local `<|image|>` position, the vision token of its global ordinal, and RoPE takes the
global positions. The loss of each rank's tokens is divided by the counted tokens of the whole sequence
and summed over the group, so the loss is exactly the one-rank mean.

Gradients: each CP rank back-propagates N times its share of the loss. DeepSpeed averages gradients over
its data-parallel group, which `Topology` makes the CP × DP ranks (CP ranks hold the same parameters), so
that average is the sum over CP of the shares, averaged over replicas: the gradient without CP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ghostvis.model.attention import attend, attention_backend
from ghostvis.model.linear_ce import IGNORE_INDEX


def attend_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of queries that are the last Tq of Tk positions (bottom-right aligned). The selected
    FlashAttention kernel takes it natively; otherwise SDPA gets torch's lower-right causal bias, which runs
    the flash or memory-efficient kernel on CUDA instead of materializing a Tq × Tk mask (at 128k tokens
    and cp 2, 4 GiB a layer), and the explicit mask on CPU."""
    if q.shape[2] == k.shape[2] or attention_backend(q, q.shape[2], k.shape[2]) != "expand":
        return attend(q, k, v)
    from torch.nn.attention.bias import causal_lower_right

    groups = q.shape[1] // k.shape[1]  # the lower-right kernels take no grouped K/V
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


class _GatherSeq(torch.autograd.Function):
    """All-gather equal-shaped tensors along `dim` in rank order; backward sums the gradient over the
    group and keeps this rank's slice (reduce-scatter where the backend has it; gloo has not)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(size, dim=ctx.dim)]
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty_like(parts[rank])
            dist.reduce_scatter(out, parts, group=ctx.group)
            return out, None, None
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


class _SumLoss(torch.autograd.Function):
    """The sum of every CP rank's loss share forward; backward hands each rank cp × the gradient (the
    module docstring says why)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.size = dist.get_world_size(group)
        x = x.detach().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.size, None


class ContextParallel:
    """This rank's place (`rank`) in the CP group `group` of `size` ranks, and what CP does on it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def pad(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows padded at the end to a multiple of 2·cp positions (padded conversation batches vary in
        length): causal attention keeps the padding out of every real token's view, and its targets are
        ignored."""
        extra = -idx.shape[1] % (2 * self.size)
        if not extra:
            return idx, targets
        return F.pad(idx, (0, extra)), F.pad(targets, (0, extra), value=IGNORE_INDEX)

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """The global positions this rank holds: chunk r then chunk 2·cp-1-r, each seq_len / (2·cp) long."""
        if seq_len % (2 * self.size):
            raise ValueError(f"sequence of {seq_len} positions does not split into 2 × --cp {self.size} equal chunks")
        chunk = seq_len // (2 * self.size)
        first, second = self.rank * chunk, (2 * self.size - 1 - self.rank) * chunk
        return torch.cat([torch.arange(first, first + chunk, device=device),
                          torch.arange(second, second + chunk, device=device)])

    def _global_order(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Index into the rank-ordered concatenation of every rank's local tokens that sorts it globally."""
        chunk = local_len // 2
        order = []
        for j in range(2 * self.size):  # global chunk j lives on rank j (first half) or 2cp-1-j (second)
            r, half = (j, 0) if j < self.size else (2 * self.size - 1 - j, 1)
            start = r * local_len + half * chunk
            order.append(torch.arange(start, start + chunk, device=device))
        return torch.cat(order)

    def gather_tokens(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's local tokens along `dim`, all-gathered and put in global order (differentiable)."""
        full = _GatherSeq.apply(x, dim, self.group)
        return full.index_select(dim, self._global_order(x.shape[dim], x.device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's two query chunks q [B, Hq, 2C, D] over the whole sequence's keys:
        chunk r sees the first (r+1)·C keys, chunk 2cp-1-r the first (2cp-r)·C, bottom-right aligned."""
        k, v = self.gather_tokens(torch.cat([k, v], dim=1), 2).split(k.shape[1], dim=1)  # one collective
        chunk = q.shape[2] // 2
        ends = ((self.rank + 1) * chunk, (2 * self.size - self.rank) * chunk)
        return torch.cat([attend_prefix(q[:, :, i * chunk:(i + 1) * chunk], k[:, :, :end], v[:, :, :end])
                          for i, end in enumerate(ends)], dim=2)

    def sum_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The group's sum of per-rank loss shares (same value on every rank); see the module docstring."""
        return _SumLoss.apply(loss, self.group)

    def image_share(self, n_images: int) -> slice:
        """The images this rank encodes: ceil(N / cp) consecutive ones (fewer, or none, on the last ranks)."""
        per_rank = math.ceil(n_images / self.size)
        return slice(min(self.rank * per_rank, n_images), min((self.rank + 1) * per_rank, n_images))

    def gather_images(self, local: torch.Tensor, n_images: int) -> torch.Tensor:
        """Every image's embeddings [N, tokens, d] from each rank's share (padded to equal size for the
        all-gather); the gradient of each image returns, summed over the group, to the rank that encoded it."""
        per_rank = math.ceil(n_images / self.size)
        if per_rank == 0:
            return local
        pad = local.new_zeros(per_rank - local.shape[0], *local.shape[1:])
        # rank r's share starts at image r·per_rank, so the padded gather holds image i at row i
        return _GatherSeq.apply(torch.cat([local, pad]), 0, self.group)[:n_images]
