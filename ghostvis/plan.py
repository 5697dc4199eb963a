"""Memory planner: bytes per GPU of weights, master copies, gradients, optimizer states, ZeRO buffers and
activations for a preset under a (ZeRO, TP, PP, CP, DP) layout, and whether it fits a card (docs/planner.md).

Parameters are counted exactly from the model built on the meta device (no memory, no formulas), each
one's TP share from the same sharding table the model uses (`tp_split_dim`), its trainability from the
same stage rules and `--freeze` groups the trainer uses (`build_param_groups`). Activations come from formulas over the shapes
(what autograd keeps for backward in our blocks); fixed costs (CUDA context, NCCL, allocator slack) are
one stated constant.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ghostvis.cli import UserError
from ghostvis.config import ModelConfig, VisionConfig, checkpointed_blocks, get_preset
from ghostvis.model.linear_ce import CHUNK_ELEMENTS
from ghostvis.model.parallel import check_tp, tp_split_dim
from ghostvis.shipped import shipped_dir, shipped_ds_config
from ghostvis.train.stages import FREEZE_GROUPS, LLM_BLOCK

GIB = 1024**3
# CUDA context (~0.5 GiB on H100), cuBLAS/cuDNN workspaces, NCCL communicator buffers and caching-allocator
# slack: memory the process holds that no tensor accounts for.
CUDA_OVERHEAD_BYTES = 2 * GIB
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


class PlanError(UserError, ValueError):
    """A layout that can't run; the message names the flag to change."""


@dataclass(frozen=True)
class Layout:
    """How a run is laid out. `gpus` counts GPUs per node; the world is gpus × nodes = tp × pp × cp × dp."""

    gpus: int = 1
    nodes: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0
    micro_batch: int = 1
    seq_len: int = 2048
    dtype: str = "bf16"
    offload: bool = False
    offload_weights: bool | None = None  # ZeRO-3 weights in host memory (offload_param); None: as `offload`
    activation_checkpointing: bool | int = False  # True: every block; N: the first N
    recompute_attention: bool = False  # checkpointed blocks recompute attention too (keep only their input)
    images_per_sample: int = 1
    reduce_bucket_size: int = 0  # elements; 0 = no gradient buckets (as without DeepSpeed)
    overlap_comm: bool = False
    prefetch_bucket_size: int = 0  # ZeRO-3 elements gathered ahead of use

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def zero_ranks(self) -> int:
        """The ranks ZeRO partitions over: the replicas and their CP ranks (ghostvis/parallel/topology.py)."""
        return self.dp * self.cp

    def check(self) -> None:
        for name in ("gpus", "nodes", "tp", "pp", "cp", "micro_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"--zero {self.zero}: choose 0, 1, 2 or 3")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype {self.dtype!r}: choose one of {sorted(DTYPE_BYTES)}")
        if self.world % (self.tp * self.pp * self.cp):
            cp = f" × --cp {self.cp}" if self.cp > 1 else ""
            raise PlanError(f"--gpus {self.gpus} × --nodes {self.nodes} = {self.world} GPUs is not divisible by "
                            f"--tp {self.tp} × --pp {self.pp}{cp}; the rest of the world is the data-parallel size")
        if self.cp > 1 and self.pp > 1:
            raise PlanError(f"--cp {self.cp} with --pp {self.pp}: context parallelism runs with --pp 1")
        if self.seq_len % (2 * self.cp):
            raise PlanError(f"--seq {self.seq_len} does not split into 2 × --cp {self.cp} = {2 * self.cp} equal "
                            f"chunks; use a multiple of {2 * self.cp}")
        if self.pp > 1 and self.zero > 1:
            raise PlanError(f"--pp {self.pp} with --zero {self.zero}: DeepSpeed's pipeline engine allows ZeRO stage "
                            "0 or 1 only; use --zero 1")
        if self.offload and self.zero == 0:
            raise PlanError("--offload needs ZeRO (--zero 1, 2 or 3): DeepSpeed offloads the ZeRO optimizer's state")


@dataclass(frozen=True)
class Param:
    name: str
    numel: int  # on one TP rank
    full: int  # the whole tensor
    part: str  # "embedding", "head", "block", "final_norm", "encoder", "connector"
    block: int | None
    trainable: bool


@dataclass
class Plan:
    """Bytes per GPU (for the heaviest pipeline stage) and per-GPU host memory for offloaded state."""

    model: str
    layout: Layout
    stage_index: int
    params_total: int
    params_trainable: int
    params_on_gpu: int  # this stage's TP share, before ZeRO-3 sharding
    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    def host_bytes(self, optimizer: bool = True, weights: bool = True) -> int:
        """Offloaded bytes per GPU: the optimizer's share (master weights, gradients, Adam states) and/or the
        ZeRO-3 weights."""
        line = weights_line(self.layout.dtype)
        return sum(v for k, v in self.host.items() if (weights if k == line else optimizer))

    @property
    def host_per_node(self) -> int:
        """Offloaded bytes on one node's host: every GPU of the node holds its share there."""
        return self.host_bytes() * self.layout.gpus

    def fits_host(self, host_mem_gib: float | None) -> bool:
        return host_mem_gib is None or self.host_per_node <= host_mem_gib * GIB

    def fits_card(self, gpu_mem_gib: float) -> bool:
        return self.gpu_total <= gpu_mem_gib * GIB

    def fits(self, gpu_mem_gib: float, host_mem_gib: float | None = None) -> bool:
        return self.fits_card(gpu_mem_gib) and self.fits_host(host_mem_gib)

    def to_dict(self, gpu_mem_gib: float, host_mem_gib: float | None = None) -> dict[str, Any]:
        return {"model": self.model, "layout": {**asdict(self.layout), "dp": self.layout.dp},
                "pipeline_stage": self.stage_index, "params_total": self.params_total,
                "params_trainable": self.params_trainable, "params_on_gpu": self.params_on_gpu,
                "gpu_bytes": self.gpu, "gpu_total_bytes": self.gpu_total, "host_bytes_per_gpu": self.host,
                "host_bytes_per_node": self.host_per_node, "host_mem_gib": host_mem_gib,
                "gpu_mem_gib": gpu_mem_gib, "fits": self.fits(gpu_mem_gib, host_mem_gib),
                "headroom_bytes": int(gpu_mem_gib * GIB) - self.gpu_total, "notes": self.notes}


# ---- the model on the meta device ---------------------------------------------------------------

def build_meta_model(model_cfg: ModelConfig, vision_cfg: VisionConfig | None) -> torch.nn.Module:
    """The real model class on the meta device: exact shapes, no memory."""
    with torch.device("meta"):
        if vision_cfg is None:
            from ghostvis.model.gpt import GPT

            return GPT(model_cfg)
        from ghostvis.model.vlm import VLM

        if model_cfg.image_token_id is None:  # any id works for counting; the tokenizer sets the real one
            model_cfg = replace(model_cfg, image_token_id=model_cfg.vocab_size - 1)
        return VLM(model_cfg, vision_cfg)


def classify(name: str) -> tuple[str, int | None]:
    """(part, block index) of a parameter name of a GPT or VLM: what decides its pipeline stage."""
    if name.startswith("vision."):
        return ("encoder" if name.startswith("vision.encoder.") else "connector"), None
    block = re.match(LLM_BLOCK, name)
    if block:
        return "block", int(block.group(1))
    name = name.removeprefix("llm.")
    if name.startswith("wte."):
        return "embedding", None
    if name.startswith("lm_head."):
        return "head", None
    return "final_norm", None


def parameters(model: torch.nn.Module, tp: int, stage: str | None = None,
               freeze: tuple[str, ...] | None = None, lora_rank: int = 0, lora_targets: str | None = None,
               train_llm_layers: int | None = None) -> list[Param]:
    """Every parameter with its per-TP-rank size and whether it trains. Trainability: the stage's rules
    with `freeze` (the trainer's `--freeze` groups; None = the stage's default) and `train_llm_layers` (its
    `--train-llm-layers`; None = the stage's default) exactly as the trainer builds its groups when `stage` is
    given, else the model's own requires_grad (the vision encoder is frozen by default). `lora_rank` > 0 adds
    the trainer's adapters and trains them instead of the LLM."""
    if stage is None and freeze is not None:
        raise PlanError("--freeze needs --stage: the groups it freezes are those of the stage's rules")
    if stage is None and train_llm_layers is not None:
        raise PlanError("--train-llm-layers needs --stage: the blocks it trains are those of the stage's rules")
    if stage is None and lora_rank:
        raise PlanError("--lora-rank needs --stage: the adapters replace the stage's LLM rules")
    if stage is not None:
        from ghostvis.train.engine import ConfigError, build_param_groups
        from ghostvis.train.settings import Settings
        from ghostvis.train.stages import get_stage

        spec = get_stage(stage)
        if spec.needs_vision and not hasattr(model, "vision"):
            raise PlanError(f"--stage {stage} trains a vision model; pick a vlm_* --model")
        settings = Settings.of(spec, spec.defaults)
        if train_llm_layers is not None:  # before LoRA, which trains adapters in place of every block
            settings = replace(settings, train_llm_layers=train_llm_layers)
        if lora_rank:
            from ghostvis import lora

            if tp > 1:
                raise PlanError("--lora-rank: LoRA runs with --tp 1 --pp 1")
            try:
                lora.add_lora(model, lora_rank, lora_rank, lora_targets or lora.DEFAULT_TARGETS)
            except lora.LoRAError as err:
                raise PlanError(str(err)) from err
            spec, settings = lora.lora_stage(spec, settings)
        if freeze is not None:
            unknown = sorted(set(freeze) - set(FREEZE_GROUPS))
            if unknown:
                raise PlanError(f"--freeze {','.join(unknown)}: choose among {','.join(FREEZE_GROUPS)}")
            settings = replace(settings, freeze=tuple(freeze))
        try:  # sets requires_grad from the stage's rules
            build_param_groups(model, spec, settings, model.config.n_layer)
        except ConfigError as err:
            raise PlanError(f"--stage {stage} --freeze {','.join(settings.freeze) or 'none'}: {err}") from err
    out = []
    for name, p in model.named_parameters():
        part, block = classify(name)
        # the vision tower is replicated on every TP rank; LLM weights split as the model splits them
        split = part not in ("encoder", "connector") and tp_split_dim(name.removeprefix("llm.")) is not None
        out.append(Param(name, p.numel() // tp if split else p.numel(), p.numel(), part, block, p.requires_grad))
    return out


# ---- pipeline stages ----------------------------------------------------------------------------

def stage_blocks(n_layer: int, pp: int) -> list[range]:
    """Blocks per pipeline stage, partitioned by layer count (the first stages take the remainder)."""
    if pp > n_layer:
        raise PlanError(f"--pp {pp} is more than the model's {n_layer} blocks")
    base, extra = divmod(n_layer, pp)
    bounds = [0]
    for s in range(pp):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def on_stage(p: Param, s: int, pp: int, blocks: range, tied: bool) -> bool:
    """Front (embedding, vision tower) on stage 0, head and final norm on the last; a tied embedding is
    held by both (DeepSpeed's TiedLayerSpec keeps a copy on each and all-reduces their gradients)."""
    if p.part == "block":
        return p.block in blocks
    if p.part in ("encoder", "connector"):
        return s == 0
    if p.part == "embedding":
        return s == 0 or (tied and s == pp - 1)
    return s == pp - 1  # head, final_norm


# ---- activations ---------------------------------------------------------------------------------

def llm_layer_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, weights_train: bool, act_bytes: int) -> int:
    """Bytes one block keeps for backward over `tokens` (= micro-batch × seq) tokens on one TP rank.

    Attention: the norm's input; q, k (after RoPE), v and the output (flash/SDPA keeps them) plus its fp32
    log-sum-exp; the q/k/v projections' input. MLP: the norm's input; gate (for SiLU), SiLU(gate) and up
    (for the product); the down projection's input. A linear layer keeps its input only when its weight
    trains, so a frozen LLM (vision alignment) keeps less. Without sequence parallelism the width-d
    tensors are whole on every TP rank; head and FFN tensors split by tp."""
    d, hq, hkv, f = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_dim
    replicated = 2 * d + (2 * d if weights_train else 0)  # the norms' inputs (+ outputs, the projections' input)
    split = 2 * hq + 2 * hkv + 3 * f + (f if weights_train else 0)  # (+ down_proj's input; o_proj's is attn out)
    lse = 4 * cfg.n_head // tp  # fp32 per token and head
    return tokens * (act_bytes * (replicated + split // tp) + lse)


def loss_bytes(cfg: ModelConfig, tokens: int, tp: int, act_bytes: int) -> int:
    """Peak of the fused head + cross-entropy (ghostvis/model/linear_ce.py): one chunk's logits and their gradient
    in the compute dtype (on a GPU the fp32 softmax between them stays inside one fused kernel; with a soft-cap the
    forward kernel keeps an fp32 copy of the capped chunk, seen in inductor's CPU code), the head's fp32 gradient
    accumulator with one chunk's product (10 bytes a weight), and the hidden states' gradient."""
    vocab = cfg.padded_vocab_size // tp
    chunk_logits = min(tokens, max(1, CHUNK_ELEMENTS // vocab)) * vocab
    per_logit = max(2 * act_bytes, act_bytes + 4 if cfg.logit_softcap else 0)
    return chunk_logits * per_logit + vocab * cfg.n_embd * 10 + tokens * cfg.n_embd * 2


def vision_activation_bytes(model: torch.nn.Module, images: int, encoder_trains: bool, connector_trains: bool,
                            act_bytes: int) -> int:
    """Estimate for the vision tower over `images` images. A frozen encoder runs under no_grad (only one
    block's transient tensors); a training encoder keeps per block its two norms' inputs, q/k/v, the
    attention output and the MLP hidden twice. A perceiver keeps per layer the normed patches and their K/V."""
    enc = model.vision.encoder
    if not enc.is_vit:
        raise ValueError(f"the planner estimates ViT encoders only; {model.vision.config.encoder!r} is a CNN")
    patches, dim = enc.num_patches, enc.dim
    hidden = enc.model.blocks[0].mlp.fc1.out_features
    per_block = patches * (7 * dim + 2 * hidden)
    n_blocks = len(enc.model.blocks)
    enc_bytes = images * act_bytes * (per_block * n_blocks if encoder_trains else per_block)
    conn = 0
    if connector_trains:
        res, proj = model.vision.resampler, model.vision.projector
        n_tok, depth, width = res.num_tokens, len(getattr(res, "layers", ())), res.out_dim
        # the perceiver (after the projector, at the LLM's width): normed patches and their K/V, the latents' layer
        conn = depth * (patches * 3 * width + n_tok * 14 * width)
        rows = patches if model.vision.project_first else n_tok
        if hasattr(proj, "gate_proj"):  # SwiGLU: its input, gate, up and their product
            conn += rows * (proj.gate_proj.in_features + 3 * proj.gate_proj.out_features)
        elif hasattr(proj, "fc1"):  # MLP: its input and its hidden (twice)
            conn += rows * (proj.fc1.in_features + 2 * proj.fc1.out_features)
        else:  # linear: its input
            conn += rows * proj.proj.in_features
    return enc_bytes + images * act_bytes * conn


# ---- the plan ------------------------------------------------------------------------------------

def _largest_module_params(model: torch.nn.Module, params: list[Param]) -> int:
    """Per-TP-rank elements of the largest module that owns parameters directly (what ZeRO-3 gathers at once)."""
    size = {p.name: p.numel for p in params}
    best = 0
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        best = max(best, sum(size.get(n, 0) for n in own))
    return best


def weights_line(dtype: str) -> str:
    """The plan's line of the model's own weights (ZeRO-3 puts them in host memory under offload_param)."""
    return f"weights ({dtype})"


def stage_plan(model: torch.nn.Module, params: list[Param], layout: Layout, s: int, blocks: range) -> tuple[dict, dict]:
    """(gpu bytes, host bytes) by line for pipeline stage `s`."""
    cfg: ModelConfig = model.config
    lay, dp, zero = layout, layout.zero_ranks, layout.zero  # ZeRO shards over CP × DP ranks
    wbytes = DTYPE_BYTES[lay.dtype]
    held = [p for p in params if on_stage(p, s, lay.pp, blocks, cfg.tie_embeddings)]
    n_all = sum(p.numel for p in held)
    n_train = sum(p.numel for p in held if p.trainable)
    gpu: dict[str, int] = {}
    host: dict[str, int] = {}

    def place(line: str, nbytes: float, offloaded: bool) -> None:
        (host if offloaded else gpu)[line] = math.ceil(nbytes)

    weights_offloaded = lay.offload if lay.offload_weights is None else lay.offload_weights
    place(weights_line(lay.dtype), n_all * wbytes / (dp if zero >= 3 else 1), weights_offloaded and zero >= 3)
    if lay.dtype != "fp32":
        place("master weights (fp32)", n_train * 4 / (dp if zero >= 1 else 1), lay.offload)
    # DeepSpeed reduces gradients into each rank's partition during backward at stage 1 as well as 2
    # (bf16 accumulation, our default), so both hold 1/dp of them; offloaded, they land on the host in fp32
    place(f"gradients ({'fp32' if lay.offload else lay.dtype})", n_train * (4 if lay.offload else wbytes) /
          (dp if zero >= 1 else 1), lay.offload)
    place("optimizer states (Adam m, v fp32)", n_train * 8 / (dp if zero >= 1 else 1), lay.offload)
    if zero >= 1 and lay.reduce_bucket_size:
        gpu["gradient buckets"] = lay.reduce_bucket_size * wbytes * (2 if lay.overlap_comm and zero < 3 else 1)
    if zero >= 3:
        gpu["ZeRO-3 gathered weights"] = (_largest_module_params(model, held) + lay.prefetch_bucket_size) * wbytes

    act_bytes = wbytes
    in_flight = lay.pp - s  # 1F1B: stage s holds pp - s micro-batches between their forward and backward
    tokens = lay.micro_batch * lay.seq_len // lay.cp  # this CP rank's share of each sequence
    train_blocks = {p.block for p in held if p.part == "block" and p.trainable}
    # under CP attention keeps the K/V all-gathered over the whole sequence, not only this rank's tokens
    gathered_kv = (lay.micro_batch * lay.seq_len - tokens) * 2 * cfg.n_kv_head * cfg.head_dim // lay.tp * act_bytes
    if lay.cp > 1:
        # the prefix attention (a chunk's queries against all earlier keys) repeats the gathered K/V to every
        # query head under fa4/cuDNN, Hopper's defaults (only FA2/FA3 take the shorter query block natively),
        # and keeps the copies for backward; the busiest rank (cp-1) repeats (2cp+1) chunks' keys
        chunk = lay.seq_len // (2 * lay.cp)
        gathered_kv += lay.micro_batch * (2 * lay.cp + 1) * chunk * 2 * cfg.n_head * cfg.head_dim // lay.tp * act_bytes
    per_layer = [llm_layer_activation_bytes(cfg, tokens, lay.tp, b in train_blocks, act_bytes) + gathered_kv
                 for b in blocks]
    # kept until backward, plus the largest transient: a block recomputed (checkpointing) or the loss
    n_ckpt = checkpointed_blocks(lay.activation_checkpointing, cfg.n_layer)
    ckpt = [b < n_ckpt for b in blocks]
    # checkpointed: the block's input, and unless recomputed its attention kernel's output and log-sum-exp (under PP
    # DeepSpeed's checkpoint recomputes the whole block, and under CP GPT.forward does)
    kept_attention = (0 if lay.recompute_attention or lay.pp > 1 or lay.cp > 1
                      else (cfg.n_head * cfg.head_dim * act_bytes + 4 * cfg.n_head) // lay.tp)
    ckpt_kept = tokens * (cfg.n_embd * act_bytes + kept_attention)
    kept = [ckpt_kept if c else a for c, a in zip(ckpt, per_layer)]
    act = sum(kept) * in_flight
    transient = max((a for c, a in zip(ckpt, per_layer) if c), default=0)
    if s == lay.pp - 1:  # final norm's input and output, then the loss
        act += 2 * tokens * cfg.n_embd * act_bytes
        transient = max(transient, loss_bytes(cfg, tokens, lay.tp, act_bytes))
    act += transient
    if s == 0 and hasattr(model, "vision"):
        trains = {p.part for p in held if p.trainable}
        images = math.ceil(lay.micro_batch * lay.images_per_sample / lay.cp) * in_flight  # CP ranks share them
        act += vision_activation_bytes(model, images, "encoder" in trains, "connector" in trains, act_bytes)
    gpu["activations"] = act
    gpu["CUDA context + workspaces (constant)"] = CUDA_OVERHEAD_BYTES
    return gpu, host


def ds_bucket_settings(zero: int, offload: bool, ds_config: str | Path | None = None) -> dict[str, Any]:
    """Bucket sizes from a DeepSpeed config (default: the shipped ds_configs/zero{N}[_offload].json when this
    is a checkout; DeepSpeed's own defaults otherwise)."""
    if zero == 0:
        return {}
    shipped = shipped_dir("ds_configs") / f"zero{zero}{'_offload' if offload and zero == 3 else ''}.json"
    path = shipped_ds_config(ds_config) if ds_config else shipped
    if ds_config and not path.is_file():
        raise PlanError(f"--ds-config {path}: no such file")
    return zero_bucket_settings(zero, json.loads(path.read_text()).get("zero_optimization", {})
                                if path.is_file() else {})


def zero_bucket_settings(zero: int, z: dict[str, Any]) -> dict[str, Any]:
    """Bucket sizes from a DeepSpeed config's parsed `zero_optimization` section (DeepSpeed's defaults for
    what it leaves out)."""
    if zero == 0:
        return {}
    return {"reduce_bucket_size": int(z.get("reduce_bucket_size", 5e8)),
            "overlap_comm": bool(z.get("overlap_comm", zero >= 3)),  # DeepSpeed turns it on for stage 3 only
            "prefetch_bucket_size": int(z.get("stage3_prefetch_bucket_size", 5e7)) if zero >= 3 else 0}


def plan(model_name: str, layout: Layout, *, depth: int | None = None, stage: str | None = None,
         freeze: tuple[str, ...] | None = None, model: torch.nn.Module | None = None, lora_rank: int = 0,
         lora_targets: str | None = None, train_llm_layers: int | None = None, **overrides: Any) -> Plan:
    """The plan for the heaviest pipeline stage. `stage`, `freeze` and `train_llm_layers` decide what trains as
    the trainer's `--stage`, `--freeze` and `--train-llm-layers` do; `model` (a meta or real model) skips building
    the preset."""
    layout.check()
    if model is None:
        model = build_meta_model(*get_preset(model_name, depth, **overrides))
    cfg: ModelConfig = model.config
    try:
        check_tp(cfg, layout.tp)
    except ValueError as err:
        raise PlanError(f"--tp {layout.tp}: {err}") from err
    try:
        checkpointed_blocks(layout.activation_checkpointing, cfg.n_layer)
    except ValueError:
        raise PlanError(f"--activation-checkpointing {layout.activation_checkpointing}: {model_name} has "
                        f"{cfg.n_layer} blocks; give 0..{cfg.n_layer}") from None
    if lora_rank and layout.pp > 1:
        raise PlanError("--lora-rank: LoRA runs with --tp 1 --pp 1")
    params = parameters(model, layout.tp, stage, freeze, lora_rank, lora_targets, train_llm_layers)
    best: Plan | None = None
    for s, blocks in enumerate(stage_blocks(cfg.n_layer, layout.pp)):
        gpu, host = stage_plan(model, params, layout, s, blocks)
        held = sum(p.numel for p in params if on_stage(p, s, layout.pp, blocks, cfg.tie_embeddings))
        candidate = Plan(model_name, layout, s, sum(p.full for p in params),
                         sum(p.full for p in params if p.trainable), held, gpu, host)
        if best is None or candidate.gpu_total > best.gpu_total:
            best = candidate
    assert best is not None
    if layout.tp > layout.gpus:
        best.notes.append(f"--tp {layout.tp} spans nodes ({layout.gpus} GPUs each): TP all-reduces every sublayer, "
                          "keep it inside a node")
    if layout.tp * layout.cp > layout.gpus:
        best.notes.append(f"--tp {layout.tp} × --cp {layout.cp} spans nodes ({layout.gpus} GPUs each): CP all-gathers "
                          "K/V every layer, keep TP and CP inside a node where the model allows")
    if layout.pp > 1:
        best.notes.append(f"pipeline stage {best.stage_index} of {layout.pp} is the heaviest; activations assume "
                          f"1F1B with --grad-accum >= {layout.pp}")
    return best


# ---- --activation-checkpointing auto -------------------------------------------------------------

# auto sizes the plan to this share of the card: the planner leaves the allocator's fragmentation out, and its
# figure without checkpointing has not yet been checked against a run
AUTO_SHARE = 0.9


@dataclass(frozen=True)
class AutoCheckpointing:
    """What --activation-checkpointing auto chose: the flag's value (True every block, False none, N the first N),
    its plan, and whether that plan fits the budget (False: even every block does not)."""

    value: bool | int
    plan: Plan
    within: bool
    n_layer: int

    def line(self) -> str:
        """The one line the trainer prints at start and launch/plan.py above its table."""
        head = "activation checkpointing: auto →"
        if not self.within:
            return f"{head} every block (even so the plan exceeds {AUTO_SHARE:.0%} of the card)"
        return (f"{head} {checkpointed_blocks(self.value, self.n_layer)} of {self.n_layer} blocks (the fewest whose "
                f"plan fits {AUTO_SHARE:.0%} of the card: {self.plan.gpu_total / GIB:.1f} GiB)")


def fewest_checkpointed_blocks(plan_for: Callable[[bool | int], Plan], n_layer: int, pipeline: bool,
                               card_gib: float) -> AutoCheckpointing:
    """--activation-checkpointing auto: the fewest checkpointed blocks whose plan fits AUTO_SHARE of `card_gib`
    (under a pipeline every block or none); every block when even that does not fit. Every checkpointed block costs
    its forward again in backward, and each one more saves memory, so the search is a bisection. `plan_for(value)`
    plans the run with that flag value."""
    def value_of(n: int) -> bool | int:
        return True if n == n_layer else (n or False)

    @functools.cache  # by block count: True and 1 would collide as keys
    def plan_of(n: int) -> Plan:
        return plan_for(value_of(n))

    def fits(n: int) -> bool:
        return plan_of(n).fits_card(AUTO_SHARE * card_gib)

    if not fits(n_layer):
        return AutoCheckpointing(True, plan_of(n_layer), False, n_layer)
    candidates = [0, n_layer] if pipeline else list(range(n_layer + 1))
    n = candidates[bisect.bisect_left(candidates, True, key=fits)]
    return AutoCheckpointing(value_of(n), plan_of(n), True, n_layer)


# ---- --seq max ------------------------------------------------------------------------------------

SEQ_STEP = 1024  # --seq max answers in multiples of this (times 2 × --cp, which a sequence must split into)
SEQ_LIMIT = 1 << 22  # 4M tokens: the search stops here
# --seq max sizes the plan to this share of the card, below auto's: at long sequences the planner runs low and the
# allocator fragments. On an 80 GB H100 (qwen25_1.5b, ZeRO-2, every block checkpointed; BENCHMARKS.md, twelfth
# session) 131,072 tokens planned 47.3 GiB of allocations and peaked at 48.7 (3% more); 262,144 planned 69.6 (71.6
# with the constant 2 GiB, over 90% of the card's 79.2) and ran out of memory asking for 70.7 or more, with 7.9 GiB
# of the card reserved but unallocated.
LONGEST_SHARE = 0.85


@dataclass(frozen=True)
class LongestSequence:
    """What --seq max found: the longest sequence whose plan fits (0: not even one step does) and its plan."""

    seq_len: int
    plan: Plan
    step: int
    card_gib: float
    capped: bool = False  # the search stopped at SEQ_LIMIT: longer may fit too

    def line(self) -> str:
        """The one line launch/plan.py prints above the table."""
        if not self.seq_len:
            where = (f"{LONGEST_SHARE:.0%} of the card ({self.plan.gpu_total / GIB:.1f} GiB planned)"
                     if not self.plan.fits_card(LONGEST_SHARE * self.card_gib) else "the host memory of --host-mem-gib")
            return f"--seq max: not even {self.step:,} tokens fit {where}; the table shows that plan"
        if self.capped:
            return (f"--seq max → {self.seq_len:,} tokens, where the search stops: it fits {LONGEST_SHARE:.0%} of "
                    f"the card ({self.plan.gpu_total / GIB:.1f} GiB), and longer may too")
        return (f"--seq max → {self.seq_len:,} tokens (the longest multiple of {self.step:,} whose plan fits "
                f"{LONGEST_SHARE:.0%} of the card, {LONGEST_SHARE * self.card_gib:.1f} GiB: it plans "
                f"{self.plan.gpu_total / GIB:.1f} GiB)")


def longest_sequence(plan_for_seq: Callable[[int], Plan], card_gib: float, host_gib: float | None,
                     step: int) -> LongestSequence:
    """--seq max: the longest multiple of `step` (up to SEQ_LIMIT) whose plan fits LONGEST_SHARE of `card_gib`
    (and `host_gib`, given one). Memory only grows with the sequence, so the search is a bisection."""
    @functools.cache
    def plan_of(k: int) -> Plan:
        return plan_for_seq(k * step)

    def fits(k: int) -> bool:
        return plan_of(k).fits(LONGEST_SHARE * card_gib, host_gib)

    top = SEQ_LIMIT // step
    k = bisect.bisect_left(range(1, top + 1), True, key=lambda k: not fits(k))  # how many steps fit
    return LongestSequence(k * step, plan_of(max(k, 1)), step, card_gib, capped=k == top)


# ---- output --------------------------------------------------------------------------------------

def ac_words(activation_checkpointing: bool | int) -> str:
    """", activation checkpointing" (every block), ", activation checkpointing of N blocks", or nothing."""
    if activation_checkpointing is True:
        return ", activation checkpointing"
    return f", activation checkpointing of {activation_checkpointing} blocks" if activation_checkpointing else ""


def format_plan(p: Plan, gpu_mem_gib: float, host_mem_gib: float | None = None) -> str:
    lay = p.layout
    lines = [
        f"model {p.model}: {p.params_total:,} parameters, {p.params_trainable:,} trainable",
        f"layout: {lay.world} GPUs ({lay.nodes} node(s) × {lay.gpus}) = tp {lay.tp} × pp {lay.pp}"
        f"{f' × cp {lay.cp}' if lay.cp > 1 else ''} × dp {lay.dp}, "
        f"ZeRO-{lay.zero}{' + offload' if lay.offload else ''}, {lay.dtype}, micro-batch {lay.micro_batch} × "
        f"seq {lay.seq_len}{ac_words(lay.activation_checkpointing)}",
        f"per GPU (pipeline stage {p.stage_index}, {p.params_on_gpu:,} parameters before ZeRO-3 sharding):",
    ]
    width = max(len(k) for k in [*p.gpu, *p.host])
    lines += [f"  {k:<{width}}  {v / GIB:9.2f} GiB" for k, v in p.gpu.items()]
    lines.append(f"  {'total':<{width}}  {p.gpu_total / GIB:9.2f} GiB")
    if p.host:
        lines.append("host (CPU) memory per GPU, offloaded:")
        lines += [f"  {k:<{width}}  {v / GIB:9.2f} GiB" for k, v in p.host.items()]
        lines.append(f"  {'total per node':<{width}}  {p.host_per_node / GIB:9.2f} GiB ({p.layout.gpus} GPU(s))")
    headroom = gpu_mem_gib - p.gpu_total / GIB
    verdict = "fits" if p.fits_card(gpu_mem_gib) else "does not fit"
    lines.append(f"{verdict} on a {gpu_mem_gib:g} GiB card ({'headroom' if headroom >= 0 else 'short by'} "
                 f"{abs(headroom):.2f} GiB)")
    if p.host and host_mem_gib is not None:
        room = host_mem_gib - p.host_per_node / GIB
        lines.append(f"offloaded state {'fits' if room >= 0 else 'does not fit'} in {host_mem_gib:g} GiB of host "
                     f"memory per node ({'headroom' if room >= 0 else 'short by'} {abs(room):.2f} GiB; the "
                     "processes' own memory comes on top)")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# ---- calibration on a real GPU -------------------------------------------------------------------

def measure_activations(model_cfg: ModelConfig, layout: Layout, device: str = "cuda") -> int:
    """Peak bytes above weights and gradients during one bf16 forward + backward of the text model on
    this GPU (tp = pp = dp = 1), to set beside the planned activations. Gradients are allocated before
    the step so only activations, the loss and transient buffers show up in the peak."""
    from ghostvis.model.gpt import GPT

    if not torch.cuda.is_available():
        raise PlanError("--measure needs a CUDA GPU")
    model_cfg = replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, layout.seq_len))
    with torch.device("meta"):
        model = GPT(model_cfg)
    model.set_activation_checkpointing(layout.activation_checkpointing, layout.recompute_attention)
    model.to_empty(device=device)
    model.init_weights()
    model.to(torch.bfloat16).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    idx = torch.randint(0, model_cfg.vocab_size, (layout.micro_batch, layout.seq_len), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(idx, idx).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, idx
    torch.cuda.empty_cache()
    return peak
