"""The one training loop. Every stage runs through `run(args)` = `train(build(args))`: `build` returns a
typed `Run`, `train` steps it. What differs between stages is data: the `Stage` spec (stages.py), its
resolved `Settings` (settings.py) and the data builder and loss registered for its kinds below.

Seams: `DATA_BUILDERS[kind]` and `LOSSES[kind]`; a new data kind or loss plugs in by writing its function
in its own module and registering it there:

- data builder `f(req: DataRequest) -> batches` (ghostvis/data/request.py: plain values, no model): an
  iterable with `state_dict()` / `load_state_dict()` yielding `(idx, targets)` tuples or dicts with
  `input_ids`, `targets`, optionally `pixel_values` / `image_features` (passed to the model) and
  `num_tokens`; with `req.eval_mode` it is finite and restarts at each `iter()`.
- loss builder `f(req: LossRequest) -> loss`, called once before the engine exists (it may refuse a
  setting, or build what the loss keeps, e.g. GRPO's frozen reference model); the loss
  `loss(engine, batch)` returns a scalar tensor (mean over the micro-batch's counted tokens), or
  `(scalar, {name: float})` whose extra metrics are averaged over micro-batches and ranks and logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ghostvis import checkpoint_io, lora
from ghostvis.cli import Diverged
from ghostvis.config import ModelConfig, VisionConfig, get_preset
from ghostvis.data.features import encoder_spec
from ghostvis.data.loader import WorkerBatches, local_world_size
from ghostvis.data.manifest import MANIFEST_NAME, DataError, split_dir
from ghostvis.data.multimodal import IMAGE_EXTS, caption_batches, conversation_batches, mixture_entries
from ghostvis.data.packing import PACK_HINT_STEPS, check_packing, pack_hint, pack_refusal
from ghostvis.data.request import DataRequest
from ghostvis.data.rl import prompt_batches
from ghostvis.data.shards import corrupt_summary
from ghostvis.data.text import bpb_sums, text_batches, token_bytes
from ghostvis.model.attention import select_attention
from ghostvis.model.gpt import flops_per_token
from ghostvis.parallel import Topology
from ghostvis.plan import GIB, Layout, Plan, fewest_checkpointed_blocks, plan, zero_bucket_settings
from ghostvis.parallel.layout import parallelize
from ghostvis.tokenizer import Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer
from ghostvis.train import checkpoint, engine as ds_engine
from ghostvis.train.divergence import DivergenceGuard
from ghostvis.train.grpo import make_grpo_loss
from ghostvis.train.logging import RunLogger, mfu
from ghostvis.train.schedule import apply_lr, lr_multiplier
from ghostvis.train.settings import DEFAULT_INIT_PERTURB, Settings, resolve_settings
from ghostvis.train.stages import ALL_LAYERS, Stage, get_stage
from ghostvis.vision.transforms import image_transform


@dataclass
class LossRequest:
    """What a loss builder is given: the resolved stage settings and how to rebuild the starting model."""

    stage: Stage
    settings: Settings
    tokenizer: Tokenizer
    device: torch.device
    dtype: str  # resolved: bf16 | fp32
    ds_config: dict[str, Any]
    initial_model: Callable[..., torch.nn.Module]  # a fresh copy of the weights training starts from


MODEL_INPUTS = ("pixel_values", "image_features", "document_ids")  # batch keys forwarded to the model


def split_batch(batch: tuple | dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(idx, targets, model kwargs) of either batch form."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["targets"], {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return batch[0], batch[1], {}


def batch_tokens(batch: tuple | dict) -> int:
    """Real input tokens of a micro-batch (padding excluded where the batch says so)."""
    return int(batch["num_tokens"]) if isinstance(batch, dict) and "num_tokens" in batch else split_batch(batch)[0].numel()


def lm_loss(engine: Any, batch: tuple | dict) -> torch.Tensor:
    idx, targets, kwargs = split_batch(batch)
    return engine(idx, targets, **kwargs)


def make_lm_loss(req: LossRequest) -> Callable:
    return lm_loss


# the builders of each stage's data kind and loss (stages.DATA_KINDS, stages.LOSS_KINDS)
DATA_BUILDERS: dict[str, Callable[[DataRequest], Any]] = {
    "text-tokens": text_batches,
    "image-text": caption_batches,
    "conversation": conversation_batches,
    "prompts": prompt_batches,
}
LOSSES: dict[str, Callable[[LossRequest], Callable]] = {"lm": make_lm_loss, "grpo": make_grpo_loss}


def data_inputs(model: torch.nn.Module, cached_features: bool = False) -> dict[str, Any]:
    """The DataRequest fields read off the model: vision tokens per image and their frame, the encoder's preprocessing,
    whether any LLM weight trains, and with --cached-features what the cache must match (a collective
    under ZeRO-3: every rank calls this at the same point)."""
    vision_cfg = getattr(model, "vision_config", None)
    return {"num_vision_tokens": model.num_vision_tokens if vision_cfg is not None else 0,
            "image_frame": vision_cfg.image_frame if vision_cfg is not None else "none",
            "transform": image_transform(vision_cfg) if vision_cfg is not None else None,
            "llm_trains": any(p.requires_grad for n, p in model.named_parameters() if "vision." not in n),
            "cached_features": cached_features, "encoder": encoder_spec(model, cached_features)}


# ---- the starting model -------------------------------------------------------------------------

def starting_model(args: argparse.Namespace, stage: Stage, tokenizer: Tokenizer, settings: Settings,
                   zero3: dict[str, Any] | None = None, device: str = "cpu", tp_group: Any = None) -> torch.nn.Module:
    """The preset (or the `--init-from` export) sized to this tokenizer and to `--seq-len`, with its weights
    loaded. A vision stage on a text export grows a new tower from the `--model` preset; a new tower's
    encoder weights come from `--encoder-weights`. A trained encoder (not in `settings.freeze`) is built
    unfrozen: a frozen one runs under no_grad. `--init-shrink` then shrinks and perturbs the LLM's blocks
    (GPT.shrink_perturb). `zero3`: the ZeRO-3 DeepSpeed config to build this rank's partitions with
    (checkpoint_io.build_model); `device` "meta": the shape only, no weights; `tp_group`: the LLM as this rank's
    tensor-parallel shard."""
    shrink, perturb = init_shrink_perturb(args)
    model = _loaded_model(args, stage, tokenizer, settings, zero3, device, tp_group)
    if shrink is not None:
        llm = getattr(model, "llm", model)
        check_blocks_train(args, settings, llm.config.n_layer)
        llm.shrink_perturb(shrink, perturb)
    return model


def init_shrink_perturb(args: argparse.Namespace) -> tuple[float | None, float]:
    """(`--init-shrink`, `--init-perturb`), or (None, 0) when off; refuses the flags where they cannot apply."""
    shrink, perturb = getattr(args, "init_shrink", None), getattr(args, "init_perturb", None)
    if shrink is None:
        if perturb is not None:
            raise ds_engine.ConfigError("--init-perturb adds fresh weights to shrunk ones: give --init-shrink S too")
        return None, 0.0
    if not args.init_from:
        raise ds_engine.ConfigError("--init-shrink shrinks the weights of --init-from: give the export to start from "
                                    "(a model from random weights has nothing to shrink)")
    perturb = DEFAULT_INIT_PERTURB if perturb is None else perturb
    if shrink == perturb == 0:
        raise ds_engine.ConfigError("--init-shrink 0 --init-perturb 0 would zero every block weight, norms "
                                    "included, and nothing could train them back: give a factor above 0")
    if (shrink, perturb) == (1, 0):
        raise ds_engine.ConfigError("--init-shrink 1 --init-perturb 0 changes nothing: drop both flags")
    return shrink, perturb


def check_blocks_train(args: argparse.Namespace, settings: Settings, n_layer: int) -> None:
    """Shrunk blocks must train, or the run keeps them damaged: refuse the settings that freeze some."""
    if "llm" in settings.freeze:
        raise ds_engine.ConfigError("--init-shrink: --freeze llm keeps the shrunk blocks as they are; drop llm "
                                    "from --freeze, or drop --init-shrink")
    if settings.train_llm_layers != ALL_LAYERS and settings.train_llm_layers < n_layer:
        raise ds_engine.ConfigError(f"--init-shrink: only the last {settings.train_llm_layers} of {n_layer} blocks "
                                    "train (--train-llm-layers; vision_pretrain trains none by default), the rest "
                                    "would stay shrunk: pass --train-llm-layers all")
    if getattr(args, "lora_rank", 0):
        raise ds_engine.ConfigError("--init-shrink with --lora-rank: LoRA freezes the shrunk blocks; drop one")


def _loaded_model(args: argparse.Namespace, stage: Stage, tokenizer: Tokenizer, settings: Settings,
                  zero3: dict[str, Any] | None, device: str, tp_group: Any) -> torch.nn.Module:
    vision_cfg = None
    if args.init_from:
        model_cfg, vision_cfg, raw = checkpoint_io.read_config(args.init_from)
        if raw["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
            raise ds_engine.ConfigError(f"--init-from {args.init_from} was trained with another tokenizer than "
                                        f"--tokenizer {args.tokenizer}; use its tokenizer/ directory")
    else:
        model_cfg, vision_cfg = get_preset(args.model, args.depth, vocab_size=tokenizer.vocab_size)
    # the model's context covers the sequences it trains on (the export declares it)
    model_cfg = dataclasses.replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, args.seq_len))
    encoder_weights = args.encoder_weights
    if not stage.needs_vision:
        if encoder_weights:
            raise ds_engine.ConfigError(f"--encoder-weights: --stage {stage.name} trains no vision tower; drop it")
        return checkpoint_io.build_model(model_cfg, None, args.init_from, seed=args.seed, zero3=zero3, device=device,
                                         tp_group=tp_group)
    if vision_cfg is None and args.init_from:  # a text export grows a new tower from the preset
        vision_cfg = get_preset(args.model, args.depth)[1]
        if vision_cfg is None:
            raise ds_engine.ConfigError(f"--init-from {args.init_from} is a text-only model: pick a vlm_* --model "
                                        "for the vision tower (e.g. vlm_tiny)")
    if vision_cfg is None:
        raise ds_engine.ConfigError(f"--stage {stage.name} needs a vision model; pick a vlm_* --model")
    if args.vision:
        if tower_saved(args):
            raise ds_engine.ConfigError(f"--vision: --init-from {args.init_from} already holds a trained vision tower, "
                                        "whose configuration is fixed; drop --vision")
        try:
            vision_cfg = dataclasses.replace(vision_cfg, **dict(args.vision))
        except (TypeError, ValueError) as e:
            raise ds_engine.ConfigError(f"--vision: {e}") from e
    try:  # a framed prompt needs the frame's special tokens, which tokenizers trained before them lack
        tokenizer.image_ids(1, vision_cfg.image_frame)
    except ValueError as e:
        raise ds_engine.ConfigError(str(e)) from e
    try:  # the widths the tower takes from this LLM (a preset's tower grown on another: --init-from, --depth)
        vision_cfg.for_llm(model_cfg)
    except ValueError as e:
        raise ds_engine.ConfigError(f"--model {args.model}'s vision tower on this LLM: {e}") from e
    if encoder_weights:
        if tower_saved(args):
            raise ds_engine.ConfigError(f"--encoder-weights: --init-from {args.init_from} already holds the vision "
                                        f"tower ({checkpoint_io.VISION_FILE}); drop --encoder-weights")
        if not Path(encoder_weights).exists():
            raise ds_engine.ConfigError(f"--encoder-weights {encoder_weights} does not exist: give a local timm "
                                        ".safetensors file or a Hugging Face SigLIP/CLIP folder")
        if Path(encoder_weights).is_file() and Path(encoder_weights).suffix != ".safetensors":
            raise ds_engine.ConfigError(f"--encoder-weights {encoder_weights}: only .safetensors weights are read "
                                        "(pickled .bin/.pt/.pth files are never loaded); convert it with "
                                        "safetensors.torch.save_file, or give a Hugging Face SigLIP/CLIP folder")
    model_cfg = dataclasses.replace(model_cfg, image_token_id=tokenizer.image_token_id)
    return checkpoint_io.build_model(model_cfg, vision_cfg, args.init_from, encoder_weights=encoder_weights,
                                     freeze_encoder="encoder" in settings.freeze, seed=args.seed, zero3=zero3,
                                     device=device, tp_group=tp_group)


def trainable_parts(groups: list[dict[str, Any]]) -> str:
    """What trains, by part (--freeze and --train-llm-layers choose it): "llm 1,234, connector 56 parameters".
    Read from the groups as built_param_groups made them, before DeepSpeed replaces their params."""
    parts: dict[str, int] = {}
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            part = ("lora adapters" if ".lora_" in name else "encoder" if name.startswith("vision.encoder.")
                    else "connector" if name.startswith("vision.") else "llm")
            parts[part] = parts.get(part, 0) + getattr(param, "ds_numel", param.numel())  # ZeRO-3: whole size
    return ", ".join(f"{part} {n:,}" for part, n in parts.items()) + " parameters (rank 0's)"


def tower_saved(args: argparse.Namespace) -> bool:
    """Whether the `--init-from` export holds a trained vision tower (vision.safetensors)."""
    return bool(args.init_from) and (Path(args.init_from) / checkpoint_io.VISION_FILE).is_file()


def random_encoder_warning(args: argparse.Namespace, stage: Stage, settings: Settings,
                           model: torch.nn.Module) -> str | None:
    """The warning for a vision stage whose frozen encoder starts from random weights (it would never
    learn to see), or None."""
    vision_cfg = getattr(model, "vision_config", None)
    if (vision_cfg is None or "encoder" not in settings.freeze or args.encoder_weights
            or tower_saved(args)):
        return None
    return (f"WARNING: --stage {stage.name} starts with a randomly initialised, frozen vision encoder "
            f"({vision_cfg.encoder}): its features carry little about the images and will not improve. Pass "
            "--encoder-weights (a timm .safetensors file or a Hugging Face SigLIP/CLIP folder), or --encoder-lr "
            "to train it")


# ---- one optimizer step --------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float
    tokens: int  # this rank's input tokens
    grad_norm: float | None
    applied: bool  # False when DeepSpeed skipped the update (inf/NaN gradients in bf16/fp16)
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)  # a loss's own metrics, mean over micro-batches and ranks


def loss_token_weights(engine: Any, micro_batches: list) -> list[float]:
    """Per-micro-batch loss weights that turn DeepSpeed's plain average over micro-batches and data-parallel
    ranks into a mean over every loss token of the step, so a short conversation's tokens don't weigh more
    than a long one's. Only batches that count their loss tokens (`num_loss_tokens`: padded conversation and
    caption batches) are reweighted; fixed-size text rows and RL prompt batches keep weight 1."""
    counts = [b.get("num_loss_tokens") if isinstance(b, dict) else None for b in micro_batches]
    if any(c is None for c in counts):
        return [1.0] * len(micro_batches)
    total = torch.tensor(float(sum(counts)), dtype=torch.float64, device=engine.device)
    dist.all_reduce(total, group=engine.data_parallel_group)
    scale = len(counts) * engine.dp_world_size / max(total.item(), 1.0)
    return [c * scale for c in counts]


def train_step(engine: Any, batches: Iterator, loss_fn: Callable, grad_accum: int) -> StepResult:
    """grad_accum micro-batches (forward → engine.backward → engine.step); DeepSpeed applies the update
    on the last one and scales the loss by 1/grad_accum itself."""
    t0 = time.perf_counter()
    micro_batches = [next(batches) for _ in range(grad_accum)]
    weights = loss_token_weights(engine, micro_batches)
    total = torch.zeros((), device=engine.device)
    tokens = 0
    extra: dict[str, float] = {}
    for batch, weight in zip(micro_batches, weights):
        loss = loss_fn(engine, batch)
        if isinstance(loss, tuple):
            loss, metrics = loss
            for key, value in metrics.items():
                extra[key] = extra.get(key, 0.0) + value / grad_accum
        engine.backward(loss * weight if weight != 1.0 else loss)
        engine.step()
        total += loss.detach() * weight
        tokens += batch_tokens(batch)  # after the loss: a batch may learn its size there (RL rollouts)
    # with weights: this rank's term of the step's token mean (the mean of it over ranks is exact)
    loss_value = total.item() / grad_accum  # .item() waits for the GPU, so the timing below is real
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    return StepResult(loss_value, tokens, norm, engine.was_step_applied(), time.perf_counter() - t0,
                      _mean_over_ranks(extra, engine.device))


def _mean_over_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every rank runs the same loss, so every rank has the same keys: one all-reduce averages them."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist()))


def pipeline_step(engine: Any, batches: Iterator, loss_fn: Callable, grad_accum: int) -> StepResult:
    """`train_step` under pipeline parallelism: DeepSpeed's `train_batch` pulls grad_accum micro-batches
    (the first stage takes the inputs, the last the targets), interleaves forward and backward across the
    stages and steps the optimizer. The loss is the model's own last layer (`loss_fn` is not used); it comes
    back averaged over micro-batches and data-parallel replicas and broadcast to every stage."""
    t0 = time.perf_counter()
    tokens = 0

    def micro_batches() -> Iterator[tuple[Any, torch.Tensor]]:
        nonlocal tokens
        while True:
            batch = next(batches)
            tokens += batch_tokens(batch)
            idx, targets, kwargs = split_batch(batch)
            yield ((idx, *kwargs.values()) if kwargs else idx), targets

    loss = engine.train_batch(data_iter=micro_batches())
    norm = engine.get_global_grad_norm()
    return StepResult(float(loss), tokens, None if norm is None else float(norm), engine.was_step_applied(),
                      time.perf_counter() - t0)


def check_pipeline(stage: Stage, args: argparse.Namespace, ds_config: dict[str, Any]) -> None:
    """What `--pp > 1` can't do (yet), said before anything starts."""
    ds_engine.check_pipeline_zero(ds_config, args.pp, args.ds_config)
    if stage.loss != "lm":
        raise ds_engine.ConfigError(f"--stage {stage.name} (loss {stage.loss!r}) runs its own forwards outside the "
                                    "pipeline schedule; run it with --pp 1")
    if args.eval_every > 0:
        raise ds_engine.ConfigError(f"--pp {args.pp}: validation bits-per-byte needs per-token losses, which the "
                                    "pipeline engine does not return; pass --eval-every 0 (or evaluate the export)")


@torch.no_grad()
def evaluate_bpb(engine: Any, batches: Any, byte_counts: torch.Tensor, max_batches: int) -> float:
    """Bits per byte of the validation split (every rank runs the same number of forwards: ZeRO-3
    gathers parameters collectively, so we stop as soon as any rank runs out)."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # nats, bytes
    it = iter(batches)
    for _ in range(max_batches):
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1], device=engine.device)
        dist.all_reduce(more, op=dist.ReduceOp.MIN)
        if more.item() == 0:
            break
        idx, targets, kwargs = split_batch(batch)
        sums += bpb_sums(engine(idx, targets, reduction="none", **kwargs), targets, byte_counts)
    dist.all_reduce(sums)
    engine.train()
    return (sums[0] / (math.log(2) * sums[1].clamp(min=1))).item()


def check_data(data: Path) -> None:
    """Refuse a --data that cannot be a training set, naming what the user gave and how to make one: a missing
    directory, a mixture.json entry that is missing, a folder of raw images or of several datasets."""
    if not data.is_dir():
        raise DataError(f"--data {data}: no such directory")
    entries = mixture_entries(data)
    for i, (d, _) in enumerate(entries or []):
        if not d.is_dir():
            raise DataError(f"{data / 'mixture.json'}: datasets[{i}].dir {d} does not exist (dirs are relative to "
                            "the mixture.json)")
    for d in [d for d, _ in entries] if entries else [data]:
        if (split_dir(d, "train") / MANIFEST_NAME).is_file():
            continue
        what = f"--data {d}" if entries is None else f"{data / 'mixture.json'}'s {d}"
        images = [f for f in d.iterdir() if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
        datasets = sorted(c.name for c in d.iterdir() if (split_dir(c, "train") / MANIFEST_NAME).is_file())
        if images:
            how = (f"it holds images ({len(images)}): make shards with python -m data_prep.image_shards folder "
                   f"--images {d} --captions CAPTIONS --out OUT --val-fraction 0.05")
        elif datasets:
            how = f"it holds datasets: pick one ({', '.join(datasets)}), e.g. --data {d / datasets[0]}"
        else:
            how = ("make shards with data_prep (image_shards, text_shards or synth; docs/datasets.md), or point "
                   "to a directory with train/ or manifest.json")
        raise DataError(f"{what} is not a shard directory (no {MANIFEST_NAME}, no train/{MANIFEST_NAME}): {how}")


def resolve_eval_every(args: argparse.Namespace) -> tuple[int, str | None]:
    """(--eval-every, note): unset, validation runs every 250 steps where every dataset of --data has a val/
    split and not at all otherwise (the note says so); set > 0 without val/, a DataError with the fix."""
    data = Path(args.data)
    no_val = [d for d, _ in mixture_entries(data) or [(data, 1.0)]
              if not (split_dir(d, "val") / MANIFEST_NAME).is_file()]
    if not no_val:
        return (250 if args.eval_every is None else args.eval_every), None
    if args.eval_every:
        raise DataError(f"--eval-every {args.eval_every}: {no_val[0]} has no val/ split to validate on; write one "
                        "(data_prep.image_shards --val-fraction 0.05) or pass --eval-every 0")
    return 0, None if args.eval_every == 0 else f"{no_val[0]} has no val/ split: no validation runs"


class TimedBatches:
    """The training batches, timing how long the loop waits for each and counting their images."""

    def __init__(self, batches: Iterator) -> None:
        self.batches, self.wait_s, self.images = batches, 0.0, 0
        self.slots = self.real = 0  # row positions and real tokens among them: the padding fraction

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - t0
        if isinstance(batch, dict):
            images = batch.get("pixel_values", batch.get("image_features"))
            if images is None and "images" in batch:  # rl's prompt batches: each prompt's list of images
                images = [im for prompt in batch["images"] for im in prompt]
            self.images += 0 if images is None else len(images)
            if "input_ids" in batch:  # token rows (rl's prompt batches have none)
                self.slots, self.real = self.slots + batch["input_ids"].numel(), self.real + batch_tokens(batch)
        return batch

    def padding_frac(self) -> float | None:
        """The fraction of row positions that held padding since the last call (None: no batches of rows)."""
        out = 1 - self.real / self.slots if self.slots else None
        self.slots = self.real = 0
        return out

    def take(self) -> tuple[float, int]:
        """(seconds waited, images) since the last call."""
        out, self.wait_s, self.images = (self.wait_s, self.images), 0.0, 0
        return out


# ---- the run: build, then train ------------------------------------------------------------------

class TrainState:
    """What a checkpoint restores besides DeepSpeed's own state (model, optimizer): the step, the tokens
    seen, the bad updates so far and the training data's position. `checkpoint.save` / `checkpoint.load`
    write and restore it through `state_dict` / `load_state_dict`, with each rank's RNG states beside it."""

    def __init__(self, data: WorkerBatches) -> None:
        self.step, self.tokens_seen, self.skipped, self.data = 0, 0, 0, data

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped, "tokens_seen": self.tokens_seen,
                "data": self.data.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.skipped, self.tokens_seen = state["step"], state["skipped_steps"], state["tokens_seen"]
        self.data.load_state_dict(state["data"])


@dataclass
class Run:
    """Everything `train` needs, built once by `build`."""

    args: argparse.Namespace
    stage: Stage
    settings: Settings
    topo: Topology
    rank: int
    world: int
    device: torch.device
    tokenizer: Tokenizer
    model: torch.nn.Module
    engine: Any
    groups: list[dict[str, Any]]
    loss_fn: Callable
    step_fn: Callable
    grad_accum: int
    state: TrainState
    val_data: Any  # finite validation batches, or None
    byte_counts: torch.Tensor | None  # bytes of each token id, for validation bits per byte
    log: RunLogger
    meta: dict[str, Any]  # saved with every checkpoint: what run wrote it (resume checks read it)
    flops: int  # per token, for MFU

    @property
    def out(self) -> Path:
        return Path(self.args.out)


def check_length_group(stage: Stage, args: argparse.Namespace) -> None:
    """Refuse --length-group where nothing is grouped, before anything is built."""
    group = getattr(args, "length_group", 1)
    if group > 1 and stage.data_kind != "conversation":
        raise ds_engine.ConfigError(f"--length-group {group}: --stage {stage.name} has no conversations to group "
                                    "(length grouping applies to sft without --pack): drop --length-group")
    if group > 1 and getattr(args, "pack", False):
        raise ds_engine.ConfigError(f"--length-group {group}: --pack fills rows from its own window, not from length "
                                    "groups: drop one of them")


def check_stop_at(args: argparse.Namespace) -> None:
    """Refuse a --stop-at before the first step (one past --steps just ends the run at --steps: a job array's last
    chunk)."""
    stop_at = getattr(args, "stop_at", None)
    if stop_at is not None and stop_at < 1:
        raise ds_engine.ConfigError(f"--stop-at {stop_at}: give a step from 1 (the run ends at --steps {args.steps} "
                                    "anyway), or drop --stop-at")


def check_packed_attention(args: argparse.Namespace) -> None:
    """Refuse --packed-attention without --pack, before anything is built."""
    kernel = getattr(args, "packed_attention", "auto")
    if kernel != "auto" and not getattr(args, "pack", False):
        raise ds_engine.ConfigError(f"--packed-attention {kernel} chooses the kernel of --pack rows: add --pack, or "
                                    "drop --packed-attention")


def default_tokenizer(data: Path) -> Path:
    """The tokenizer a run without --tokenizer reads: `tokenizer/` beside --data (where the demo and the README
    put it); a DataError naming the flag where there is none."""
    path = data.resolve().parent / "tokenizer"
    if not path.is_dir():
        raise DataError(f"no --tokenizer given, and {path} (the default: tokenizer/ beside --data) does not exist: "
                        "pass --tokenizer DIR, the directory launch/tok_train.py or launch/import_hf.py wrote")
    return path


def build(args: argparse.Namespace) -> Run:
    """Settings, process groups, the model in its (tp, pp) layout, parameter groups, the DeepSpeed engine,
    the loss, the data, the resumed state and the logger of `args.stage` (launch/train.py)."""
    stage = get_stage(args.stage)
    settings = resolve_settings(stage, args)
    check_length_group(stage, args)
    check_packed_attention(args)
    check_stop_at(args)
    rank, world, device = ds_engine.init_distributed()
    topo = Topology(args.tp, args.pp, args.cp)  # a layout mistake is reported before the data's
    check_data(Path(args.data))
    args.eval_every, note = resolve_eval_every(args)
    if note and rank == 0:
        print(note, flush=True)
    dp = topo.dp_size  # batches, data shards and tokens count data-parallel replicas, not ranks
    out = Path(args.out)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer(Path(args.data)))

    grad_accum, global_batch = ds_engine.batch_sizes(args.micro_batch, args.grad_accum, args.global_batch, dp)
    dtype = ds_engine.resolve_dtype(args.dtype, device.type)
    layout = {"tp": topo.tp_size, "pp": topo.pp_size, "dp": dp, **({"cp": topo.cp_size} if topo.cp_size > 1 else {})}
    # the model's shape (meta device, no weights): what the layout, the model or the card cannot take fails
    # before any weight exists
    shape = starting_model(args, stage, tokenizer, settings, device="meta")
    vision_cfg = getattr(shape, "vision_config", None)
    if settings.train_llm_layers > shape.config.n_layer:
        raise ds_engine.ConfigError(f"--train-llm-layers {settings.train_llm_layers}: the LLM has "
                                    f"{shape.config.n_layer} blocks; give 0..{shape.config.n_layer}, or all")
    if args.resume == "auto":
        check_resumable(out, stage.name, shape.config, vision_cfg)
    # a checkpoint saved with another data-parallel size resumes through DeepSpeed's universal format
    universal = args.universal or (args.resume == "auto" and checkpoint.prepare_universal(out, layout))
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(args.ds_config), micro_batch=args.micro_batch,
                                          grad_accum=grad_accum, world_size=dp * topo.cp_size,  # DeepSpeed's DP: CP × DP
                                          grad_clip=args.grad_clip, dtype=dtype,
                                          universal=universal)

    if topo.pp_size > 1:
        check_pipeline(stage, args, ds_config)
    pack = getattr(args, "pack", False)
    if pack:
        check_packing(stage.name, stage.data_kind, topo.pp_size, args.pack_images, topo.cp_size)
    ds_engine.check_context_parallel(topo.cp_size, args.seq_len, stage, args.compile)
    if args.lora_rank and (topo.tp_size > 1 or topo.pp_size > 1):
        raise ds_engine.ConfigError("--lora-rank: LoRA runs with --tp 1 --pp 1 (ZeRO-1/2/3 shard the rest)")
    ds_engine.check_compile(ds_config, args.compile, vision_cfg is not None,
                            args.ds_config, args.tp, args.pp)
    card_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    ds_engine.check_layout(shape, topo, args)
    if args.activation_checkpointing == "auto":
        args.activation_checkpointing, note = choose_activation_checkpointing(
            shape, topo, ds_config, args, stage.name, settings.freeze, settings.train_llm_layers, card_gib)
        if rank == 0:
            print(note, flush=True)
    check_fits_card(shape, topo, ds_config, args, stage.name, settings.freeze, settings.train_llm_layers, card_gib)

    def initial_model(zero3: dict[str, Any] | None = None, tp_group: Any = None) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # same initial weights on every rank (and for every copy)
            return starting_model(args, stage, tokenizer, settings, zero3, tp_group=tp_group)

    # every layout starts from the same weights, each rank building only its part: ZeRO-3 partitions
    # (zero.Init), TP shards; pipeline stages take theirs from the full (tp=1) model
    zero_init = ds_engine.builds_partitioned(ds_config, topo.tp_size, topo.pp_size, args.lora_rank)
    model = parallelize(initial_model(ds_config if zero_init else None, topo.tp_group if topo.pp_size == 1 else None),
                        topo, activation_checkpointing=args.activation_checkpointing,
                        recompute_attention=getattr(args, "recompute_attention", False))
    torch.manual_seed(args.seed)
    if args.lora_rank:
        lora.add_lora(model, args.lora_rank, args.lora_alpha or args.lora_rank, args.lora_targets)
        stage, settings = lora.lora_stage(stage, settings)
    model_cfg: ModelConfig = model.config
    groups = ds_engine.build_param_groups(model, stage, settings, model_cfg.n_layer)
    parts = trainable_parts(groups)  # before DeepSpeed flattens each group's params in place
    loss_fn = LOSSES[stage.loss](LossRequest(stage, settings, tokenizer, device, dtype, ds_config, initial_model))
    packed_kernel = getattr(args, "packed_attention", "auto") if pack else None
    attention = select_attention(args.attention, device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                                 model_cfg.head_dim, packed=packed_kernel,
                                 seq_len=args.seq_len // topo.cp_size)  # a CP rank attends chunks
    engine = ds_engine.initialize(model, groups, ds_config, device.type,
                                  mpu=topo if topo.model_parallel and topo.pp_size == 1 else None)
    if args.compile:
        engine.compile()  # compiles inside the engine: parameter and checkpoint names stay the same

    inputs = data_inputs(model, getattr(args, "cached_features", False))

    def request(split: str, eval_mode: bool) -> DataRequest:
        # every TP rank and pipeline stage of a replica reads the same batches
        return DataRequest(Path(args.data), split, args.seq_len, args.micro_batch, topo.dp_rank, dp, args.seed,
                           tokenizer, device, eval_mode, **inputs, max_corrupt_fraction=args.max_corrupt_fraction,
                           pack=pack, pack_images=getattr(args, "pack_images", 0),
                           length_group=getattr(args, "length_group", 1))

    data_builder = DATA_BUILDERS[stage.data_kind]
    state = TrainState(WorkerBatches(data_builder, request("train", False), getattr(args, "data_workers", None),
                                     device))
    val_data = data_builder(request("val", True)) if args.eval_every > 0 else None
    if args.resume == "auto" and checkpoint.load(engine, out, state, universal=universal):
        set_base_lrs(engine, groups, 1.0)

    n_train = sum(p.numel() for g in groups for p in g["params"])
    log = RunLogger(out_dir=out, total_steps=args.steps, start_step=state.step, enabled=rank == 0,
                    wandb_mode=args.wandb, run_config=_jsonable(vars(args)),
                    header=f"stage `{stage.name}`, {world} rank(s) as {topo}, {dtype}, "
                           f"{n_train:,} trainable parameters (rank 0's), "
                           f"{global_batch} sequences of {args.seq_len} tokens per step, resumed at step {state.step}")
    log.note(f"attention: {attention.describe()}")
    log.note(f"training: {parts}")
    warning = random_encoder_warning(args, stage, settings, model)
    if warning:
        log.note(warning)  # rank 0 only, like every note
    meta = {"stage": stage.name, "model": model_cfg.to_dict(), "args": _jsonable(vars(args)), "layout": layout,
            **({"vision": vision_cfg.to_dict()} if vision_cfg is not None else {})}
    return Run(args, stage, settings, topo, rank, world, device, tokenizer, model, engine, groups, loss_fn,
               pipeline_step if topo.pp_size > 1 else train_step, grad_accum, state, val_data,
               token_bytes(tokenizer).to(device) if val_data is not None else None, log, meta,
               flops_per_token(model_cfg, args.seq_len))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train `args.stage` as launch/train.py describes; returns the final metrics (rank 0's view)."""
    return train(build(args))


def train(run: Run) -> dict[str, Any]:
    """Optimizer steps up to --steps (or --stop-at): each one logged, validated and checkpointed on its
    interval; a diverging run rolls back or stops. Then the export. Returns the last step's metrics."""
    args, state = run.args, run.state
    batches = TimedBatches(iter(state.data))
    guard = DivergenceGuard(args.max_skipped_updates, args.max_skipped_fraction)
    guard.reset(state.step if state.step else None)  # the checkpoint resumed from is confirmed by its next step
    rollbacks, metrics = 0, {}
    end = min(args.steps, args.stop_at or args.steps)
    # an unpacked run of a stage that packs collects its first steps' padding: mostly padding, a note suggests --pack
    could_pack = not getattr(args, "pack", False) and pack_refusal(run.stage.name, run.stage.data_kind,
                                                                    run.topo.pp_size, run.topo.cp_size) is None
    paddings: list[float] | None = [] if could_pack else None
    while state.step < end:
        mult = lr_multiplier(state.step, total=args.steps, warmup=run.settings.warmup,
                             schedule=run.settings.schedule, warmdown=run.settings.warmdown)
        apply_lr(run.engine.optimizer.param_groups, mult)
        result = run.step_fn(run.engine, batches, run.loss_fn, run.grad_accum)
        stop = account(run, result, guard)
        metrics = step_metrics(run, result, mult, batches, validate=run.val_data is not None and (
            state.step % args.eval_every == 0 or state.step == end))
        if paddings is not None and metrics.get("padding_frac") is not None:
            paddings.append(metrics["padding_frac"])
            if len(paddings) == PACK_HINT_STEPS:
                hint, paddings = pack_hint(paddings), None
                if hint:
                    run.log.note(f"step {state.step}: {hint}")
        if stop:
            kept = checkpoint.discard(run.out, guard.unconfirmed)
            if rollbacks < args.rollbacks and kept is not None:
                rollbacks += 1
                batches = roll_back(run, batches, guard, f"{stop}; rolled back to {kept}", rollbacks)
                continue
            diverged(run, stop, kept)
        if args.save_every > 0 and (state.step % args.save_every == 0 or state.step == end):
            path = checkpoint.save(run.engine, run.out, state.step, state, args.keep, run.meta)
            guard.saved(state.step)
            run.log.note(f"step {state.step}: checkpoint {path}")
    finish(run)
    return metrics


def account(run: Run, result: StepResult, guard: DivergenceGuard) -> str | None:
    """Count the step, its tokens and a bad update; the divergence guard's verdict (None = go on)."""
    state = run.state
    state.step += 1
    state.tokens_seen += result.tokens * run.topo.dp_size  # replicas see equal shapes for text; close for padded
    stop = guard.check(result.applied, result.loss, result.grad_norm, run.engine.device)
    if guard.consecutive:  # this step was bad on some rank
        state.skipped += 1
        run.log.note(f"step {state.step}: bad update (skipped, or non-finite loss or gradients), "
                     f"{state.skipped} so far")
    return stop


def step_metrics(run: Run, result: StepResult, mult: float, batches: TimedBatches, validate: bool) -> dict[str, Any]:
    """The step's metrics, with validation bits per byte when `validate`; logged."""
    dp, step = run.topo.dp_size, run.state.step
    tps = result.tokens * dp / result.seconds
    peak = run.args.peak_flops if run.device.type == "cuda" else None
    wait_s, images = batches.take()
    metrics = {"loss": result.loss, "lr_mult": mult, "grad_norm": result.grad_norm, "tokens_per_s": tps,
               "mfu": mfu(run.flops, tps / run.world, peak), "skipped_steps": run.state.skipped,
               "step_s": result.seconds, "data_wait_frac": min(1.0, wait_s / result.seconds),
               "images_per_s": images * dp / result.seconds, "padding_frac": batches.padding_frac(),
               **result.extra, **corrupt_metrics(run.state.data.state_dict())}
    if run.device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    if validate:
        metrics["val_bpb"] = evaluate_bpb(run.engine, run.val_data, run.byte_counts, run.args.eval_batches)
    run.log.step(step, metrics)
    if "val_bpb" in metrics:
        run.log.row(step, metrics)
    return metrics


def roll_back(run: Run, batches: TimedBatches, guard: DivergenceGuard, why: str, rollbacks: int) -> TimedBatches:
    """Reload the last trusted checkpoint and go on with learning rates x --rollback-lr-factor per rollback;
    the training batches from the restored position."""
    stopped_at = run.state.step
    batches.batches.close()  # stops the data workers before the position is rewound
    checkpoint.load(run.engine, run.out, run.state)
    factor = run.args.rollback_lr_factor ** rollbacks
    set_base_lrs(run.engine, run.groups, factor)
    guard.reset(run.state.step)
    run.log.note(f"step {stopped_at}: {why} with learning rates x{factor:g} (rollback {rollbacks} of "
                 f"{run.args.rollbacks})")
    return TimedBatches(iter(run.state.data))


def diverged(run: Run, why: str, kept: str | None) -> None:
    """Stop the run: no export; the message names the checkpoint kept and what to change."""
    state = run.state
    message = (f"training diverged at step {state.step}: {why}; {state.skipped} bad updates in all. Kept "
               f"checkpoint: {run.out / 'ckpt' / kept if kept else 'none'}; no export was written. Lower --lr "
               "(or --rollbacks N --rollback-lr-factor F) or check the data, then run again to resume")
    run.log.note(message)
    run.log.close()
    raise Diverged(message)


def finish(run: Run) -> None:
    """The export (with LoRA: the adapter alone, then the merged model) and the run log's last note."""
    args, state = run.args, run.state
    if args.lora_rank:
        lora.save_adapter(run.model, run.out, {"rank": args.lora_rank, "alpha": args.lora_alpha or args.lora_rank,
                                               "targets": args.lora_targets, "base": args.init_from}, run.rank == 0)
        lora.merge(run.model)
    checkpoint_io.export(run.model, run.out, tokenizer=run.tokenizer, extra={"stage": run.stage.name,
                         "step": state.step}, is_writer=run.rank == 0, topology=run.topo)
    run.log.note(f"done: {state.step} steps, {state.tokens_seen:,} tokens, {state.skipped} skipped updates; "
                 f"exported to {run.out}")
    if args.stop_at and state.step < args.steps:  # a time-limited job's part, not the run's end
        kept = ("" if args.save_every > 0 else "; --save-every 0 kept no checkpoint, so a next run starts over")
        run.log.note(f"stopped at step {state.step} (--stop-at {args.stop_at} of --steps {args.steps}): to go on, "
                     f"run the same command with a later --stop-at, or without it{kept}")
    run.log.close()


def card_plan(model: torch.nn.Module, topo: Any, ds_config: dict[str, Any], args: Any, stage: str,
              freeze: tuple[str, ...], train_llm_layers: int, activation_checkpointing: bool | int) -> Plan | None:
    """The planner's plan (ghostvis/plan.py) of this run from the model's shape (meta device), or None for a model
    it cannot size (`planner_sizes`)."""
    if not planner_sizes(model):
        return None
    zero_cfg = ds_config.get("zero_optimization", {})
    zero = int(zero_cfg.get("stage", 0))
    layout = Layout(gpus=topo.tp_size * topo.pp_size * topo.cp_size * topo.dp_size, tp=topo.tp_size,
                    pp=topo.pp_size, cp=topo.cp_size, zero=zero,
                    micro_batch=args.micro_batch, seq_len=args.seq_len,
                    dtype="bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32",
                    offload=offload_device(ds_config) != "none",
                    offload_weights=offload_device(ds_config, "offload_param") != "none",
                    activation_checkpointing=activation_checkpointing,
                    recompute_attention=getattr(args, "recompute_attention", False),
                    **zero_bucket_settings(zero, zero_cfg))
    return plan(args.model, layout, stage=stage, freeze=freeze, model=model, lora_rank=args.lora_rank,
                lora_targets=args.lora_targets, train_llm_layers=train_llm_layers)


def planner_sizes(model: torch.nn.Module) -> bool:
    """False for a CNN tower: plan.vision_activation_bytes models ViTs only."""
    vision = getattr(model, "vision", None)
    return vision is None or vision.encoder.is_vit


def offload_device(ds_config: dict[str, Any], part: str = "offload_optimizer") -> str:
    """Where the DeepSpeed config sends the optimizer's state (or, with part="offload_param", ZeRO-3's weights)."""
    return (ds_config.get("zero_optimization", {}).get(part) or {}).get("device") or "none"


def choose_activation_checkpointing(model: torch.nn.Module, topo: Any, ds_config: dict[str, Any], args: Any,
                                    stage: str, freeze: tuple[str, ...], train_llm_layers: int,
                                    card_gib: float | None) -> tuple[bool | int, str]:
    """--activation-checkpointing auto (plan.fewest_checkpointed_blocks; qwen25_1.5b at 32k, ZeRO-2 as shipped,
    micro-batch 1, is planned at 35.6 GiB with every block and 108.2 with none, so an H200 needs none and an 80 GB
    card 15 of 28). Returns (the flag's value, a line for the log). Off the GPU, or where the planner cannot size
    the model (a CNN tower), every block: the safe end."""
    if card_gib is None or not planner_sizes(model):
        return True, "activation checkpointing: auto → every block (no card, or a model the planner cannot size)"
    chosen = fewest_checkpointed_blocks(
        lambda value: card_plan(model, topo, ds_config, args, stage, freeze, train_llm_layers, value),
        model.config.n_layer, topo.pp_size > 1, card_gib)
    return chosen.value, chosen.line()  # over the card itself, check_fits_card refuses it next


def check_fits_card(model: torch.nn.Module, topo: Any, ds_config: dict[str, Any], args: Any, stage: str,
                    freeze: tuple[str, ...], train_llm_layers: int, card_gib: float | None) -> None:
    """Refuse a run the planner (ghostvis/plan.py) says does not fit a card of `card_gib` GiB, or whose state
    offloaded to the CPU does not fit this host's memory, from the model's shape (meta device) before any weight
    exists. None: not on a GPU; --no-plan-check skips both; a CNN tower, which the planner does not estimate,
    skips both too."""
    if card_gib is None or getattr(args, "no_plan_check", False):
        return
    result = card_plan(model, topo, ds_config, args, stage, freeze, train_llm_layers, args.activation_checkpointing)
    if result is None:
        return
    if not result.fits(card_gib):
        raise ds_engine.ConfigError(
            f"the planner puts this run at {result.gpu_total / GIB:.1f} GiB per GPU, more than the card's "
            f"{card_gib:.1f} GiB: lower --micro-batch, add --activation-checkpointing, use ZeRO-3 or more GPUs "
            "(launch/plan.py prints the plan; --no-plan-check runs anyway)")
    # state offloaded to "cpu" lives in this host's memory, once per local rank ("nvme" goes to disk): past it
    # the kernel kills the run (or the machine) mid-build, long after the launch
    local_ranks = local_world_size()
    optimizer_to, weights_to = offload_device(ds_config), offload_device(ds_config, "offload_param")
    host_need = result.host_bytes(optimizer=optimizer_to == "cpu", weights=weights_to == "cpu") * local_ranks
    host_have = host_memory_bytes()
    if host_need > host_have:
        raise ds_engine.ConfigError(
            f"the planner puts this run's offloaded state at {host_need / GIB:.1f} GiB of host memory "
            f"({local_ranks} rank(s) on this host), more than its {host_have / GIB:.1f} GiB: train fewer parameters "
            "(--lora-rank, --train-llm-layers, --freeze), offload to more hosts, or drop the offload "
            "(launch/plan.py --host-mem-gib prints the plan; --no-plan-check runs anyway)")


def host_memory_bytes() -> int:
    """This machine's physical memory, or less where a cgroup v2 `memory.max` on this process's cgroup path (a
    container's, a Slurm or systemd job's) sets a lower limit. cgroup v1 limits are not read."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    root = Path("/sys/fs/cgroup")
    try:
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        own = "/"
    path = root / own.strip("/")
    for d in [path, *path.parents]:
        if not d.is_relative_to(root):
            break
        try:
            text = (d / "memory.max").read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits)


def check_resumable(out: Path, stage_name: str, model_cfg: ModelConfig,
                    vision_cfg: VisionConfig | None = None) -> None:
    """Refuse a checkpoint in `out` of another stage, model shape or vision tower, from its client state, before
    DeepSpeed loads anything (its own loader fails on a shape mismatch with a traceback). Checkpoints written
    before the tower's config was saved are compared on the LLM only."""
    saved = checkpoint.saved_state(out)
    if saved is None:
        return
    # the saved config read as a config: fields of older versions that were run settings drop out
    def differences(now: dict[str, Any], then: dict[str, Any], prefix: str = "") -> list[str]:
        return [f"{prefix}{k} {then.get(k)} vs {now[k]}" for k in sorted(now) if then.get(k) != now[k]]

    saved_llm = ModelConfig.from_dict(saved["model"])
    differ = differences(model_cfg.to_dict(), saved_llm.to_dict())
    if vision_cfg is not None and "vision" in saved:  # each tower on its own LLM: a width taken from it = the width
        differ += differences(vision_cfg.for_llm(model_cfg).to_dict(),
                              VisionConfig.from_dict(saved["vision"]).for_llm(saved_llm).to_dict(), "vision ")
    if saved["stage"] != stage_name:
        differ.insert(0, f"stage {saved['stage']} vs {stage_name}")
    if differ:
        raise checkpoint.CheckpointError(f"{out / 'ckpt'} holds a {saved['stage']} run of another model (saved vs "
                                         f"now: {', '.join(differ[:4])}); use a new --out (or --resume none to "
                                         "start over there)")


def set_base_lrs(engine: Any, groups: list[dict[str, Any]], factor: float) -> None:
    """Learning rates come from the flags (times `factor` after rollbacks), never from a loaded checkpoint,
    whose optimizer state carries the saved run's own."""
    for group, ours in zip(engine.optimizer.param_groups, groups):
        group["base_lr"] = ours["base_lr"] * factor


def corrupt_metrics(data_state: dict[str, Any]) -> dict[str, Any]:
    """This rank's corrupt-sample counts from the training data's state (all its shard streams)."""
    summary = corrupt_summary(data_state)
    if not summary["corrupt"]:
        return {"corrupt_samples": 0}
    return {"corrupt_samples": summary["corrupt"], "corrupt_by_reason": summary["by_reason"],
            "corrupt_by_shard": summary["by_shard"]}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
