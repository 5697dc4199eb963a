"""The decoder-only GPT (docs/architecture.md, "Model"): pre-norm blocks of GQA attention and a
SwiGLU MLP, RoPE, RMSNorm, optional tied head and logit soft-cap, vision tokens spliced in at
`<|image|>` positions, every projection tensor-parallel capable."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from ghostvis.config import ModelConfig, checkpointed_blocks
import ghostvis.model.seeded as seeded
from ghostvis.model.attention import CausalSelfAttention, Documents, document_positions, documents, is_attention_kernel
from ghostvis.model.kv_cache import KVCache
from ghostvis.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from ghostvis.model.linear_ce import IGNORE_INDEX
from ghostvis.model.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_tp,
    gather_from_tp,
    tp_size_rank,
    tp_split_dim,
)

if TYPE_CHECKING:
    from ghostvis.parallel.context import ContextParallel


def _attention_saved(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if is_attention_kernel(op) else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention() -> tuple[Any, Any]:
    """A checkpointed block keeps its attention kernel's outputs (out and log-sum-exp, about one more block input
    a token) and recomputes the rest: at 32k the attention forward is about half of a block's recompute."""
    return create_selective_checkpoint_contexts(_attention_saved)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx, tp_group)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.ffn_dim, tp_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None = None, docs: Documents | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, docs)
        return x + self.mlp(self.mlp_norm(x))


def count_params(config: ModelConfig, non_embedding: bool = True) -> int:
    """Full-model parameter count from the shape alone (so it is right under TP and ZeRO-3, where
    local tensors are shards). Non-embedding leaves out the input embedding table only."""
    d, hd, nh, nkv = config.n_embd, config.head_dim, config.n_head, config.n_kv_head
    attn = d * hd * (2 * nh + 2 * nkv) + (hd * (nh + 2 * nkv) if config.qkv_bias else 0)
    attn += 2 * hd if config.qk_norm else 0
    block = attn + 3 * d * config.ffn_dim + 2 * d
    embedding = config.padded_vocab_size * d
    head = 0 if config.tie_embeddings else embedding
    non_emb = config.n_layer * block + d + head
    return non_emb if non_embedding else non_emb + embedding


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6·N + 12·L·n_head·head_dim·T (docs/model.md), where N counts every
    matmul weight, i.e. the non-embedding parameters plus the output head even when it is tied."""
    n = count_params(config, non_embedding=True)
    if config.tie_embeddings:
        n += config.padded_vocab_size * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else cap * torch.tanh(logits / cap)


def lm_targets(targets: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Targets with image placeholders ignored: predicting a placeholder teaches nothing."""
    if config.image_token_id is None:
        return targets
    return targets.masked_fill(targets == config.image_token_id, IGNORE_INDEX)


def reduce_loss(loss: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-token losses `[B, T]` ("none"), their sum ("sum"), or the mean over counted tokens ("mean")."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, tp_group: dist.ProcessGroup | None = None, *,
                 seed: int | None = None) -> None:
        """`seed` fixes the initial weights (ghostvis/model/seeded.py); None draws one from torch's global RNG."""
        super().__init__()
        self.tp_size, self.tp_rank = tp_size_rank(tp_group)
        check_tp(config, self.tp_size)
        self.config, self.tp_group = config, tp_group
        d = config.n_embd
        # the two vocabulary tables first: under deepspeed.zero.Init each exists whole for a moment before it is
        # partitioned, best while no block is held yet. Registered in the usual order (parameter names/order).
        # Tied: the head is wte's table, used through wte.forward(as_head=True).
        head = None if config.tie_embeddings else ParallelLMHead(d, config.padded_vocab_size, tp_group)
        self.wte = VocabParallelEmbedding(config.padded_vocab_size, d, tp_group)
        self.blocks = nn.ModuleList(Block(config, i, tp_group) for i in range(config.n_layer))
        self.norm_f = RMSNorm(d, config.norm_eps)
        self.lm_head = head
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.checkpointed_blocks = 0  # training settings: `set_activation_checkpointing`
        self.recompute_attention = False
        self.cp: ContextParallel | None = None
        # an explicit CPU draw: also right under a meta-device context or deepspeed.zero.Init
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu")) if seed is None else seed
        self.init_weights()

    def set_activation_checkpointing(self, activation_checkpointing: bool | int,
                                     recompute_attention: bool = False) -> None:
        """Recompute the activations of every block (True), none (False) or the first N in backward
        (less memory, more compute; docs/parallelism.md). A checkpointed block keeps its attention kernel's
        output unless `recompute_attention`. A count outside 0..n_layer fails now."""
        self.checkpointed_blocks = checkpointed_blocks(activation_checkpointing, self.config.n_layer)
        self.recompute_attention = recompute_attention

    def set_context_parallel(self, cp: ContextParallel | None) -> None:
        """Train with the sequence split over a CP group (ghostvis/parallel/context.py); None = whole."""
        self.cp = cp
        for block in self.blocks:
            block.attn.cp = cp

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for embeddings and projections; the residual-branch outputs (o_proj,
        down_proj) get init_std/sqrt(2·n_layer) (GPT-2) so the residual stream's variance does not
        grow with depth; norms 1, biases 0. The values depend only on `init_seed` and each parameter's
        name and full shape (ghostvis/model/seeded.py): a TP shard, a ZeRO-3 partition (under
        `deepspeed.zero.Init`) or a full model of the same seed hold the same numbers. Also rebuilds the
        RoPE tables, so after `to_empty(device=...)` from the meta device this makes a usable model."""
        for name, module, param in self._named_weights():
            seeded.fill(param, self._initial_values(name, module, param))
        self.rotary.reset_parameters()

    @torch.no_grad()
    def shrink_perturb(self, shrink: float, perturb: float, pattern: str = r"^blocks\.") -> list[str]:
        """Each parameter whose name matches `pattern` (default: every transformer block) becomes
        shrink · itself + perturb · its initial value (`init_weights`' for this `init_seed`): "shrink and
        perturb" (Ash & Adams, 2020, "On warm-starting neural network training"), which gives trained
        weights back the plasticity of fresh ones while keeping part of what they learned. Works on a TP shard
        or a ZeRO-3 partition like `init_weights`. Returns the names it changed."""
        changed = []
        for name, module, param in self._named_weights():
            if re.search(pattern, name):
                seeded.shrink_perturb(param, self._initial_values(name, module, param), shrink, perturb)
                changed.append(name)
        return changed

    def _named_weights(self) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                yield f"{module_name}.{param_name}", module, param

    def _initial_values(self, name: str, module: nn.Module, param: nn.Parameter) -> seeded.Values:
        if isinstance(module, RMSNorm):
            return seeded.constant(1.0)
        if name.endswith(".bias"):
            return seeded.constant(0.0)
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
            scale = 1 / math.sqrt(2 * self.config.n_layer) if isinstance(module, RowParallelLinear) else 1.0
            local = seeded.full_shape(param)
            dim = tp_split_dim(name) if self.tp_size > 1 else None
            shape = seeded.tp_full_shape(local, dim, self.tp_size)
            return seeded.local_rows(partial(seeded.normal_rows, self.init_seed, name, shape,
                                             self.config.init_std * scale), local, dim, self.tp_rank)
        raise TypeError(f"GPT: no initial value for {name} ({type(module).__name__})")

    def num_params(self, non_embedding: bool = True) -> int:
        return count_params(self.config, non_embedding)

    def flops_per_token(self, seq_len: int) -> int:
        return flops_per_token(self.config, seq_len)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                image_embeds: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                reduction: str = "mean", document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, T, vocab_size]` without targets; with targets (-1 = ignored) the mean loss over
        counted tokens, their sum (`reduction="sum"`), or per-token losses `[B, T]` (`"none"`).
        `document_ids` [B, T] marks packed rows (ghostvis/data/packing.py): each document attends only to
        itself and its RoPE positions start at 0."""
        T = idx.shape[1]
        offset = kv_cache.pos if kv_cache is not None else 0
        if offset + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {offset + T} positions exceeds max_seq_len={self.config.max_seq_len}")
        if document_ids is not None and kv_cache is not None:
            raise ValueError("document_ids (packed rows) are for training and scoring, not with a KV cache")
        cp = self.cp if kv_cache is None else None
        if cp is not None and document_ids is not None:
            raise ValueError("packed rows (--pack) and context parallelism (--cp) do not combine yet")
        rows = getattr(kv_cache, "positions", None)  # a RaggedKVCache: each row at its own position
        docs = None if document_ids is None else documents(document_ids)
        if cp is not None:
            if targets is None:
                raise ValueError("context parallelism computes losses, not logits: run with --cp 1 for logits")
            full_targets = targets
            idx, targets = cp.pad(idx, targets)  # to whole chunks; padding is causal-invisible and uncounted
            positions = cp.positions(idx.shape[1], idx.device)
            x = self.embed(idx, image_embeds, positions)
            targets = targets[:, positions]
            cos, sin = self.rotary.cos[positions], self.rotary.sin[positions]  # RoPE at global positions
        else:
            x = self.embed(idx, image_embeds)
            if docs is not None:
                cos, sin = self.rotary.at(document_positions(document_ids))
            elif rows is None:
                cos, sin = self.rotary(offset, T)
            else:
                cos, sin = self.rotary.at(rows + torch.arange(T, device=idx.device))
        training = self.training and kv_cache is None and torch.is_grad_enabled()
        n_ckpt = self.checkpointed_blocks if training else 0
        # under CP the prefix attention builds a CausalBias tensor subclass, which a selective-checkpoint region
        # refuses to create: its blocks are checkpointed whole
        context = noop_context_fn if self.recompute_attention or cp is not None else _keep_attention
        for i, block in enumerate(self.blocks):
            x = (checkpoint(block, x, cos, sin, None, docs, use_reentrant=False, context_fn=context)
                 if i < n_ckpt else block(x, cos, sin, kv_cache, docs))
        if kv_cache is not None:
            kv_cache.advance(T)
        if cp is None:
            return self.head(x, targets, reduction)
        per_token = self.head(x, targets, "none")
        if reduction == "none":
            return cp.gather_tokens(per_token, 1)[:, :T]
        total = cp.sum_loss(per_token.sum())
        return reduce_loss(total, lm_targets(full_targets, self.config), reduction) if reduction == "mean" else total

    def embed(self, idx: torch.Tensor, image_embeds: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image tokens spliced in (the front of the model). With `positions`
        (context parallelism) only those columns of `idx` are embedded, each image token taking the vision
        token of its place in the whole sequence."""
        local = idx if positions is None else idx[:, positions]
        return splice_images(self.config, idx, self.wte(local), image_embeds, positions)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Final norm, output head and loss (the back of the model): logits or loss as in `forward`."""
        x, cfg = self.norm_f(x), self.config
        head = partial(self.wte, as_head=True) if self.lm_head is None else self.lm_head
        if targets is None:  # this rank's vocabulary shard, gathered
            return softcap(gather_from_tp(head(x), self.tp_group)[..., :cfg.vocab_size], cfg.logit_softcap)
        targets = lm_targets(targets, cfg)
        # the loss without materializing the logits (ghostvis/model/linear_ce.py)
        loss = head(x, targets=targets, vocab_size=cfg.vocab_size, softcap=cfg.logit_softcap)
        return reduce_loss(loss, targets, reduction)


def splice_images(config: ModelConfig, idx: torch.Tensor, x: torch.Tensor, image_embeds: torch.Tensor | None,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Overwrite, in order (row-major over batch then time), the embeddings `x` at image-token positions
    of `idx` with `image_embeds` [N, n_vision_tokens, d]; masked_scatter keeps the gradient. With
    `positions`, `x` holds only those columns of `idx`. The front of the model: `GPT.embed` and the
    pipeline's first stage both call it."""
    token = config.image_token_id
    if image_embeds is None:
        if token is not None:
            n_pos = int((idx == token).sum())
            if n_pos:
                raise ValueError(f"idx holds {n_pos} image-token positions but no image_embeds were given")
        return x
    if token is None:
        raise ValueError("image_embeds given but ModelConfig.image_token_id is None (set it from the tokenizer)")
    if image_embeds.dim() != 3 or image_embeds.shape[-1] != x.shape[-1]:
        raise ValueError(f"image_embeds must be [N, n_vision_tokens, {x.shape[-1]}], got {tuple(image_embeds.shape)}")
    mask = idx == token
    n_pos, (n_img, n_tok) = int(mask.sum()), image_embeds.shape[:2]
    if n_pos != n_img * n_tok:
        raise ValueError(
            f"image splice: idx holds {n_pos} image-token positions but image_embeds holds "
            f"{n_img} images x {n_tok} tokens = {n_img * n_tok}"
        )
    embeds = image_embeds.to(x.dtype).flatten(0, 1)
    if positions is not None:  # the local image positions take the vision tokens of their global ordinals
        ordinal = (mask.flatten().cumsum(0) - 1).view(mask.shape)[:, positions]
        mask = mask[:, positions]
        embeds = embeds[ordinal[mask]]
    return x.masked_scatter(mask.unsqueeze(-1), embeds)
