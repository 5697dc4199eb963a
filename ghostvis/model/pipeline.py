"""The model as a DeepSpeed `PipelineModule` of `LayerSpec`s (docs/parallelism.md).

Layers, in order:

    [PipeVision]        VLMs only: images (pixels or cached features) -> (idx, vision tokens)
    PipeEmbed           token embedding + the image splice (gpt.splice_images, as GPT.embed)
    PipeBlock × L       the GPT's blocks (RoPE tables shared by the blocks of a stage)
    PipeNorm            final norm
    PipeLMHead          holds the output head (the embedding table when tied: a `TiedLayerSpec`, whose
                        gradients DeepSpeed sums across the two stages) and passes the hidden states on
    loss                `PipeLoss`: the head and its cross-entropy in one step (DeepSpeed gives the
                        targets only to the loss), mean over counted tokens, without full logits

Stages are cut by layer count (`type:PipeBlock` = equal blocks per stage, or `uniform`), never by
`parameters`, which counts only trainable weights and skews with a frozen tower. Each layer keeps the
plain model's attribute names, so `canonical_named_parameters()` yields exactly the names of the GPT / VLM
(docs/architecture.md) and weights move between layouts by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import nn
from torch.utils.checkpoint import checkpoint

from ghostvis.config import ModelConfig, VisionConfig
from ghostvis.model.gpt import Block, lm_targets, reduce_loss, splice_images
from ghostvis.model.layers import RMSNorm, RotaryEmbedding
from ghostvis.model.parallel import ParallelLMHead, VocabParallelEmbedding
from ghostvis.vision.tower import VisionTower

PARTITIONS = ("type:PipeBlock", "uniform")


class PipeVision(nn.Module):
    """(idx, images) -> (idx, vision tokens); images are pixels [N, 3, S, S] or cached features [N, P, D]."""

    def __init__(self, vision_cfg: VisionConfig, model_cfg: ModelConfig, freeze_encoder: bool) -> None:
        super().__init__()
        self.vision = VisionTower(vision_cfg, model_cfg, freeze_encoder=freeze_encoder)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if torch.is_tensor(inputs) or len(inputs) == 1:  # a text-only micro-batch
            return inputs
        idx, images = inputs
        images = images.detach()  # the pipeline engine marks float inputs as requiring grad; pixels need none
        embeds = self.vision(images) if images.dim() == 4 else self.vision.forward_features(images)
        return idx, embeds


class PipeEmbed(nn.Module):
    """idx or (idx, vision tokens) -> embeddings with the vision tokens spliced in (as `GPT.embed`)."""

    def __init__(self, config: ModelConfig, tp_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.config = config
        self.wte = VocabParallelEmbedding(config.padded_vocab_size, config.n_embd, tp_group)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        idx, *images = (inputs,) if torch.is_tensor(inputs) else inputs  # (idx,): a text-only micro-batch
        return splice_images(self.config, idx, self.wte(idx), images[0] if images else None)


class PipeBlock(Block):
    def __init__(self, config: ModelConfig, layer_idx: int, tp_group: dist.ProcessGroup | None,
                 rotary: RotaryEmbedding) -> None:
        super().__init__(config, layer_idx, tp_group)
        self.rotary = rotary  # one table per stage, shared (non-persistent buffers: not in checkpoints)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(0, x.shape[1])
        return super().forward(x, cos, sin)


class PipeNorm(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_f(x)


class PipeLMHead(nn.Module):
    def __init__(self, config: ModelConfig, tp_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.lm_head = ParallelLMHead(config.n_embd, config.padded_vocab_size, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the head runs inside PipeLoss, fused with the cross-entropy


def _tied_head(module: PipeEmbed, x: torch.Tensor) -> torch.Tensor:
    return x  # as PipeLMHead


class PipeLoss:
    """Mean cross-entropy over counted targets of the last stage's head (as `GPT.head`)."""

    def __init__(self, config: ModelConfig, head: Callable[..., torch.Tensor]) -> None:
        self.config, self.head = config, head

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = lm_targets(targets, self.config)
        loss = self.head(x, targets=targets, vocab_size=self.config.vocab_size, softcap=self.config.logit_softcap)
        return reduce_loss(loss, targets, "mean")


class GPTPipe(PipelineModule):
    """The GPT (or VLM) cut into pipeline stages; this rank holds only its stage's layers."""

    def __init__(self, config: ModelConfig, vision_cfg: VisionConfig | None, topology: ProcessTopology,
                 tp_group: dist.ProcessGroup | None, *, partition: str = "type:PipeBlock",
                 activation_checkpointing: bool | int = False, num_vision_tokens: int = 0,
                 freeze_encoder: bool = True) -> None:
        if not isinstance(activation_checkpointing, bool):  # an int N (even 1) is a block count
            raise ValueError(f"--activation-checkpointing {activation_checkpointing}: a block count is for --pp 1; "
                             "with pipeline stages give the flag alone (every block is recomputed)")
        if partition not in PARTITIONS:
            raise ValueError(f"pipeline partition {partition!r}; choose one of {PARTITIONS} ("
                             "'parameters' balances trainable weights only and skews with a frozen tower)")
        llm = "llm." if vision_cfg is not None else ""
        rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        specs: list[LayerSpec] = []
        self._prefixes: list[str] = []  # layer index -> the plain model's name prefix of its parameters
        if vision_cfg is not None:
            specs.append(LayerSpec(PipeVision, vision_cfg, config, freeze_encoder))
            self._prefixes.append("")
        embed = (partial(TiedLayerSpec, "wte", tied_weight_attr=["wte.weight"]) if config.tie_embeddings
                 else LayerSpec)
        specs.append(embed(PipeEmbed, config, tp_group))
        self._prefixes.append(llm)
        for i in range(config.n_layer):
            specs.append(LayerSpec(PipeBlock, config, i, tp_group, rotary))
            self._prefixes.append(f"{llm}blocks.{i}.")
        specs.append(LayerSpec(PipeNorm, config))
        if config.tie_embeddings:
            specs.append(TiedLayerSpec("wte", PipeEmbed, config, tp_group, forward_fn=_tied_head,
                                       tied_weight_attr=["wte.weight"]))
        else:
            specs.append(LayerSpec(PipeLMHead, config, tp_group))
        self._prefixes += [llm, llm]
        super().__init__(specs, topology=topology, partition_method=partition,
                         activation_checkpoint_interval=1 if activation_checkpointing else 0,
                         activation_checkpoint_func=partial(checkpoint, use_reentrant=False),
                         checkpointable_layers=["PipeBlock"])
        self.config, self.vision_config = config, vision_cfg
        if self.stage_id == self.num_stages - 1:  # the head is built now: hand it to the loss
            head = (partial(self.tied_modules["wte"].wte, as_head=True) if config.tie_embeddings
                    else next(m for m in self.modules() if isinstance(m, ParallelLMHead)))
            self.loss_fn = PipeLoss(config, head)
        self.num_vision_tokens = num_vision_tokens  # what the data builders ask a VLM for
        self._llm_prefix = llm

    def canonical_name(self, name: str) -> str:
        """`3.attn.q_proj.weight` -> `blocks.1.attn.q_proj.weight` (`llm.`-prefixed in a VLM)."""
        tied = re.match(r"tied_modules\.wte\.(.+)", name)
        if tied:
            return self._llm_prefix + tied.group(1)
        layer, rest = name.split(".", 1)
        return self._prefixes[int(layer)] + rest

    def canonical_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This stage's parameters under the plain model's names (the tied table appears once per stage)."""
        for name, param in self.named_parameters():
            yield self.canonical_name(name), param

    def load_canonical(self, state: dict[str, torch.Tensor]) -> None:
        """Copy this stage's parameters from a plain-model state dict (already TP-sharded if tp > 1)."""
        with torch.no_grad():
            for name, param in self.canonical_named_parameters():
                if name not in state:
                    raise KeyError(f"pipeline parameter {name} is missing from the source state dict")
                param.copy_(state[name])
