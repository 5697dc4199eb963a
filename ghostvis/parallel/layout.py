"""A model in a (tp, pp) layout, built from the plain (tp=1) model so every layout starts from the same
weights given the seed, and the way back: parameters under the plain model's names, TP shards gathered."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ghostvis.model.gpt import GPT
from ghostvis.model.parallel import shard_state_dict, tp_split_dim
from ghostvis.parallel.topology import Topology

LLM_PREFIX = "llm."


def _llm(model: nn.Module) -> GPT:
    return model.llm if hasattr(model, "llm") else model


def parallelize(model: nn.Module, topo: Topology, *, activation_checkpointing: bool | int = False,
                recompute_attention: bool = False) -> nn.Module:
    """The plain GPT/VLM `model` (full weights, same on every rank) laid out for `topo`: itself at
    tp = pp = 1, or when its LLM was built as this rank's TP shard (checkpoint_io.build_model's `tp_group`);
    its LLM swapped for a tensor-parallel GPT holding this rank's shards at tp > 1; a
    `GPTPipe` holding this stage's layers at pp > 1. The vision tower is never split: every TP rank runs
    the same tower on the same images, so its outputs and gradients are identical without communication
    (the gradient reaching the spliced vision tokens is already summed over TP by the first block's
    `copy_to_tp`). Under context parallelism the LLM splits each sequence over the CP group."""
    llm = _llm(model)
    config = llm.config
    llm.set_activation_checkpointing(activation_checkpointing, recompute_attention)  # a bad count fails now
    if topo.pp_size == 1 and llm.tp_size == topo.tp_size:  # plain, or built as this rank's TP shard already
        llm.set_context_parallel(topo.context_parallel)
        return model
    prefix = "" if llm is model else LLM_PREFIX  # a VLM's LLM names start with "llm."
    full = {name: p.detach() for name, p in canonical_named_parameters(model)}
    if topo.tp_size > 1:  # only LLM weights split; the tower's names (q_proj of the resampler!) never do
        llm_part = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        shards = shard_state_dict(llm_part, config, topo.tp_rank, topo.tp_size)
        full.update({prefix + k: v for k, v in shards.items()})
    # construction draws random init weights that the copy below overwrites: keep the global RNG as it was
    with torch.random.fork_rng(devices=[]):
        if topo.pp_size > 1:
            from ghostvis.model.pipeline import GPTPipe

            pipe = GPTPipe(config, getattr(model, "vision_config", None), topo.grid, topo.tp_group,
                           activation_checkpointing=activation_checkpointing,
                           num_vision_tokens=getattr(model, "num_vision_tokens", 0),
                           freeze_encoder=model.vision.encoder.frozen if llm is not model else True)
            pipe.load_canonical(full)
            return pipe
        tp_llm = GPT(config, tp_group=topo.tp_group)
    tp_llm.set_activation_checkpointing(activation_checkpointing, recompute_attention)
    tp_llm.set_context_parallel(topo.context_parallel)
    tp_llm.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
    if llm is model:
        return tp_llm
    model.llm = tp_llm
    return model


def canonical_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters under the plain model's names (docs/architecture.md), whatever the layout."""
    if hasattr(model, "canonical_named_parameters"):
        return model.canonical_named_parameters()
    return model.named_parameters()


def gather_tp(name: str, local: torch.Tensor, topo: Topology | None) -> torch.Tensor:
    """The full tensor of LLM parameter `name` (file-relative) from this rank's TP shard. Every TP rank
    of the stage calls it for the same names in the same order (an all-gather)."""
    dim = tp_split_dim(name)
    if topo is None or topo.tp_size == 1 or dim is None:
        return local
    parts = [torch.empty_like(local) for _ in range(topo.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=topo.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)
