"""Megatron-style tensor parallelism (docs/model.md, docs/parallelism.md).

Column-parallel layers split the output dim across ranks, row-parallel ones the input dim; a
column -> row pair costs one all-reduce forward (in the row layer) and one backward (in the
copy before the column layer). `tp_group=None` (or a group of size 1) means plain layers with no
communication at all, so the single-GPU path stays torch.compile friendly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ghostvis.config import ModelConfig
from ghostvis.model.linear_ce import linear_cross_entropy


def tp_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    x = x.contiguous().clone()  # never reduce into a tensor autograd saved
    dist.all_reduce(x, op=op, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    """Identity forward; sums the input gradient over the group backward (each rank's partial)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Sums partial outputs over the group forward; the gradient is already replicated backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """Concatenates the ranks' last-dim shards forward; keeps this rank's slice backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size, _ = tp_size_rank(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        size, rank = tp_size_rank(ctx.group)
        return grad.chunk(size, dim=-1)[rank].contiguous(), None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if tp_size_rank(group)[0] == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if tp_size_rank(group)[0] == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    return x if tp_size_rank(group)[0] == 1 else _GatherFromTP.apply(x, group)


def _shard_size(full: int, tp_size: int, what: str) -> int:
    if full % tp_size:
        raise ValueError(f"{what}={full} is not divisible by the tensor-parallel size {tp_size}")
    return full // tp_size


def _mark_parallel(param: nn.Parameter, dim: int, tp_size: int) -> None:
    # DeepSpeed counts such parameters on every TP rank when it computes the gradient norm
    if tp_size > 1:
        param.tensor_model_parallel = True
        param.partition_dim = dim


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split by output rows. `copy_input=False` when the caller already ran
    `copy_to_tp` once for several projections of the same input (q/k/v, gate/up)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_group: dist.ProcessGroup | None = None, *, gather_output: bool = False,
                 copy_input: bool = True) -> None:
        super().__init__()
        self.tp_group = tp_group
        tp_size, _ = tp_size_rank(tp_group)
        local = _shard_size(out_features, tp_size, "output features")
        self.gather_output, self.copy_input = gather_output, copy_input
        self.weight = nn.Parameter(torch.empty(local, in_features))
        _mark_parallel(self.weight, 0, tp_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(local))
            _mark_parallel(self.bias, 0, tp_size)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.tp_group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split by input columns; the input arrives already split (the output of a
    column-parallel layer), partial products are summed over the group, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.tp_group = tp_group
        tp_size, _ = tp_size_rank(tp_group)
        local = _shard_size(in_features, tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        _mark_parallel(self.weight, 1, tp_size)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
        return y + self.bias if self.bias is not None else y


class ParallelLMHead(ColumnParallelLinear):
    """The untied output head, split by vocabulary rows: `forward(x)` gives this rank's logits shard,
    `forward(x, targets, ...)` the per-token loss (`output_head`). The loss is computed inside forward so
    ZeRO-3 has gathered the weight."""

    def __init__(self, in_features: int, vocab_rows: int, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(in_features, vocab_rows, tp_group=tp_group)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, *, vocab_size: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        return output_head(x, self.weight, self.tp_group, targets, vocab_size, softcap)


def output_head(x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup | None,
                targets: torch.Tensor | None = None, vocab_size: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
    """Raw logits of this rank's vocabulary rows `weight` without targets; with targets (-1 = ignored) the
    per-token fp32 cross-entropy of the soft-capped logits over the first `vocab_size` global columns (all
    by default), computed chunk by chunk without holding the logits (`linear_cross_entropy`)."""
    x = copy_to_tp(x, group)
    if targets is None:
        return F.linear(x, weight)
    vocab_size = weight.shape[0] * tp_size_rank(group)[0] if vocab_size is None else vocab_size
    return linear_cross_entropy(x, weight, targets, vocab_size=vocab_size, softcap=softcap, tp_group=group)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows. `forward(x, as_head=True, ...)` uses the same table as
    the output head (tied embeddings; arguments as `output_head`); going through forward lets ZeRO-3
    gather it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.tp_group = tp_group
        tp_size, tp_rank = tp_size_rank(tp_group)
        self.local_rows = _shard_size(num_embeddings, tp_size, "padded vocabulary")
        self.row_start = tp_rank * self.local_rows
        self.weight = nn.Parameter(torch.empty(self.local_rows, embedding_dim))
        _mark_parallel(self.weight, 0, tp_size)

    def forward(self, x: torch.Tensor, *, as_head: bool = False, targets: torch.Tensor | None = None,
                vocab_size: int | None = None, softcap: float | None = None) -> torch.Tensor:
        if as_head:
            return output_head(x, self.weight, self.tp_group, targets, vocab_size, softcap)
        if tp_size_rank(self.tp_group)[0] == 1:
            return F.embedding(x, self.weight)
        outside = (x < self.row_start) | (x >= self.row_start + self.local_rows)
        local_ids = (x - self.row_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.tp_group)


# How each parameter is split for TP: name suffix -> dim (0 = column-parallel rows, 1 = row-parallel
# columns); everything else (norms, the row-parallel bias) is replicated.
_SPLIT_DIMS = {
    "wte.weight": 0, "lm_head.weight": 0,
    "q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0,
    "v_proj.weight": 0, "v_proj.bias": 0, "o_proj.weight": 1,
    "gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1,
}


def tp_split_dim(name: str) -> int | None:
    """The dim along which parameter `name` is sharded under TP, or None when replicated."""
    return _SPLIT_DIMS.get(".".join(name.split(".")[-2:]))


def check_tp(config: ModelConfig, tp_size: int) -> None:
    """Refuse layouts where heads, KV groups, the FFN or the vocabulary don't split evenly."""
    if tp_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp_size}")
    for name, value in (("n_head", config.n_head), ("n_kv_head", config.n_kv_head),
                        ("ffn_dim", config.ffn_dim), ("padded_vocab_size", config.padded_vocab_size)):
        if value % tp_size:
            raise ValueError(
                f"tensor parallelism: ModelConfig.{name}={value} is not divisible by tp={tp_size} "
                f"(each rank must hold whole query heads and whole KV groups); choose a tp that divides it"
            )


def shard_state_dict(full_sd: dict[str, torch.Tensor], config: ModelConfig, tp_rank: int,
                     tp_size: int) -> dict[str, torch.Tensor]:
    """Cut a full (tp=1) state dict into rank `tp_rank`'s shard. Query heads, KV heads and FFN
    rows split contiguously, so rank r's query heads use exactly rank r's KV heads."""
    check_tp(config, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} outside [0, {tp_size})")
    out = {}
    for name, tensor in full_sd.items():
        dim = tp_split_dim(name)
        out[name] = tensor if dim is None else tensor.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def gather_state_dict(shards: Sequence[dict[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `shard_state_dict`: the ranks' shards, in rank order, back to one full state dict."""
    check_tp(config, len(shards))
    out = {}
    for name, tensor in shards[0].items():
        dim = tp_split_dim(name)
        out[name] = tensor if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out
