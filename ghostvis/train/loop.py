"""The one training loop. Every stage runs through `run(args)`; what differs between stages is data:
the `Stage` spec (stages.py) and the data builder and loss registered for its kinds below.

Seams for stages to come: `DATA_BUILDERS[kind]` and `LOSSES[kind]` are "module:function" paths resolved
on use, so a new data kind or loss plugs in by writing that function in its own module:

- data builder `f(req: DataRequest) -> batches`: an iterable with `state_dict()` / `load_state_dict()`
  yielding `(idx, targets)` tuples or dicts with `input_ids`, `targets`, optionally `pixel_values` /
  `image_features` (passed to the model) and `num_tokens`; with `req.eval_mode` it is finite and
  restarts at each `iter()`.
- loss `f(engine, batch) -> scalar tensor` (mean over the micro-batch's counted tokens).
A stage whose builder or loss can't be imported yet fails at start with a "not available yet" error.
"""

from __future__ import annotations

import argparse
import importlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ghostvis import checkpoint_io
from ghostvis.config import ModelConfig, get_preset
from ghostvis.data.text import TokenRowLoader, token_bytes
from ghostvis.tokenizer import Tokenizer
from ghostvis.train import checkpoint, engine as ds_engine
from ghostvis.train.logging import RunLogger, mfu
from ghostvis.train.schedule import apply_lr, lr_multiplier
from ghostvis.train.stages import Stage, get_stage

DATA_BUILDERS = {
    "text-tokens": "ghostvis.train.loop:text_batches",
    "image-text": "ghostvis.data.multimodal:caption_batches",
    "conversation": "ghostvis.data.multimodal:conversation_batches",
}
LOSSES = {
    "lm": "ghostvis.train.loop:lm_loss",
    "grpo": "ghostvis.train.grpo:grpo_loss",
}


@dataclass
class DataRequest:
    """What a data builder is asked for: `split` is "train" or "val" (subdirectories of `data_dir`)."""

    data_dir: Path
    split: str
    seq_len: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    tokenizer: Tokenizer
    device: torch.device
    eval_mode: bool
    model: torch.nn.Module  # VLM builders read num_vision_tokens / image size from it


def text_batches(req: DataRequest) -> TokenRowLoader:
    return TokenRowLoader(req.data_dir / req.split, seq_len=req.seq_len, batch_size=req.batch_size, rank=req.rank,
                          world_size=req.world_size, seed=req.seed, tokenizer=req.tokenizer, device=req.device,
                          eval_mode=req.eval_mode)


MODEL_INPUTS = ("pixel_values", "image_features")  # batch keys forwarded to the model


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


def _resolve(table: dict[str, str], kind: str, stage: Stage) -> Callable:
    module_name, attr = table[kind].split(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise NotImplementedError(f"--stage {stage.name} is not available yet: it needs {table[kind]} for "
                                  f"'{kind}' ({err})") from err


def check_available(stage: Stage) -> tuple[Callable, Callable]:
    """(data builder, loss) of a stage, or NotImplementedError naming the missing piece."""
    return _resolve(DATA_BUILDERS, stage.data_kind, stage), _resolve(LOSSES, stage.loss, stage)


# ---- settings ------------------------------------------------------------------------------------

def stage_settings(stage: Stage, args: argparse.Namespace) -> dict[str, Any]:
    """Stage defaults overridden by every flag the user gave (flags default to None = "stage default";
    `--lr` sets every learning rate the stage uses that has no flag of its own)."""
    settings = dict(stage.defaults)
    for name in stage.lr_names:
        given = getattr(args, name, None)
        if given is None:
            given = args.lr
        if given is not None:
            settings[name] = given
        if name not in settings:
            raise ds_engine.ConfigError(f"--stage {stage.name}: no learning rate for '{name}'; pass --{name.replace('_', '-')}")
    for key in ("weight_decay", "warmup", "schedule", "warmdown", "sft_layers"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    return settings


def build_model(args: argparse.Namespace, stage: Stage, tokenizer: Tokenizer) -> torch.nn.Module:
    """The preset (or the `--init-from` export) sized to this tokenizer, with its weights loaded."""
    vision_cfg = None
    if args.init_from:
        model_cfg, vision_cfg, raw = checkpoint_io.read_config(args.init_from)
        if raw["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
            raise ds_engine.ConfigError(f"--init-from {args.init_from} was trained with another tokenizer than "
                                        f"--tokenizer {args.tokenizer}; use its tokenizer/ directory")
    else:
        model_cfg, vision_cfg = get_preset(args.model, args.depth, vocab_size=tokenizer.vocab_size)
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, args.seq_len)
    if stage.needs_vision:
        if vision_cfg is None and not args.init_from:
            raise ds_engine.ConfigError(f"--stage {stage.name} needs a vision model; pick a vlm_* --model")
        if vision_cfg is None:  # a text export grows a fresh tower from the preset
            _, vision_cfg = get_preset(args.model, args.depth)
        from ghostvis.model.vlm import VLM

        model_cfg.image_token_id = tokenizer.image_token_id
        model: torch.nn.Module = VLM(model_cfg, vision_cfg)
    else:
        from ghostvis.model.gpt import GPT

        model = GPT(model_cfg)
    if args.init_from:
        for file_name, module in checkpoint_io.module_files(model).items():
            path = Path(args.init_from) / file_name
            if path.is_file():
                checkpoint_io.load_weights(module, path)
    return model


# ---- one optimizer step --------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float
    tokens: int  # this rank's input tokens
    grad_norm: float | None
    applied: bool  # False when DeepSpeed skipped the update (inf/NaN gradients in bf16/fp16)
    seconds: float


def train_step(engine: Any, batches: Iterator, loss_fn: Callable, grad_accum: int) -> StepResult:
    """grad_accum micro-batches (forward → engine.backward → engine.step); DeepSpeed applies the update
    on the last one and scales the loss by 1/grad_accum itself."""
    t0 = time.perf_counter()
    total = torch.zeros((), device=engine.device)
    tokens = 0
    for _ in range(grad_accum):
        batch = next(batches)
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        engine.step()
        total += loss.detach()
        tokens += batch_tokens(batch)
    loss_value = total.item() / grad_accum  # .item() waits for the GPU, so the timing below is real
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    return StepResult(loss_value, tokens, norm, engine.was_step_applied(), time.perf_counter() - t0)


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
        losses = engine(idx, targets, reduction="none", **kwargs)
        counted = targets >= 0
        sums[0] += losses[counted].double().sum()
        sums[1] += byte_counts.to(targets.device)[targets[counted]].double().sum()
    dist.all_reduce(sums)
    engine.train()
    return (sums[0] / (math.log(2) * sums[1].clamp(min=1))).item()


# ---- the run ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train `args.stage` as launch/train.py describes; returns the final metrics (rank 0's view)."""
    stage = get_stage(args.stage)
    data_builder, loss_fn = check_available(stage)
    settings = stage_settings(stage, args)
    rank, world, device = ds_engine.init_distributed()
    out = Path(args.out)
    tokenizer = Tokenizer.load(args.tokenizer or Path(args.data).resolve().parent / "tokenizer")

    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = build_model(args, stage, tokenizer)
    model_cfg: ModelConfig = model.config
    groups = ds_engine.build_param_groups(model, stage, {k: settings[k] for k in stage.lr_names},
                                          settings["weight_decay"], settings, model_cfg.n_layer)
    grad_accum, global_batch = ds_engine.batch_sizes(args.micro_batch, args.grad_accum, args.global_batch, world)
    dtype = ds_engine.resolve_dtype(args.dtype, device.type)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(args.ds_config), micro_batch=args.micro_batch,
                                          grad_accum=grad_accum, world_size=world, grad_clip=args.grad_clip,
                                          dtype=dtype, universal=args.universal)
    engine = ds_engine.initialize(model, groups, ds_config, device.type)
    if args.compile:
        engine.compile()  # compiles inside the engine: parameter and checkpoint names stay the same

    def request(split: str, eval_mode: bool) -> DataRequest:
        return DataRequest(Path(args.data), split, args.seq_len, args.micro_batch, rank, world, args.seed,
                           tokenizer, device, eval_mode, model)

    train_data = data_builder(request("train", False))
    val_data = data_builder(request("val", True)) if args.eval_every > 0 else None

    start_step, skipped, tokens_seen = 0, 0, 0
    if args.resume == "auto":
        state = checkpoint.load(engine, out, universal=args.universal)
        if state is not None:
            if state["stage"] != stage.name or state["model"] != model_cfg.to_dict():
                raise checkpoint.CheckpointError(f"{out / 'ckpt'} holds a {state['stage']} run of another model "
                                                 "shape; use a new --out (or --resume none to start over there)")
            start_step, skipped, tokens_seen = state["step"], state["skipped_steps"], state["tokens_seen"]
            train_data.load_state_dict(state["data"])

    flops = model.llm.flops_per_token(args.seq_len) if hasattr(model, "llm") else model.flops_per_token(args.seq_len)
    peak = args.peak_flops if device.type == "cuda" else None
    n_train = sum(p.numel() for g in groups for p in g["params"])
    log = RunLogger(out_dir=out, total_steps=args.steps, start_step=start_step, enabled=rank == 0,
                    wandb_mode=args.wandb, run_config=_jsonable(vars(args)),
                    header=f"stage `{stage.name}`, {world} rank(s), {dtype}, {n_train:,} trainable parameters, "
                           f"{global_batch} sequences of {args.seq_len} tokens per step, resumed at step {start_step}")

    def client_state(step: int) -> dict[str, Any]:
        return {"step": step, "data": train_data.state_dict(), "stage": stage.name, "model": model_cfg.to_dict(),
                "skipped_steps": skipped, "tokens_seen": tokens_seen, "args": _jsonable(vars(args))}

    byte_counts = token_bytes(tokenizer)
    batches = iter(train_data)
    metrics: dict[str, Any] = {}
    step = start_step
    end = min(args.steps, args.stop_at or args.steps)
    while step < end:
        mult = lr_multiplier(step, total=args.steps, warmup=settings["warmup"], schedule=settings["schedule"],
                             warmdown=settings.get("warmdown", 0.2))
        apply_lr(engine.optimizer.param_groups, mult)
        result = train_step(engine, batches, loss_fn, grad_accum)
        step += 1
        step_tokens = result.tokens * world  # ranks see equal shapes for text; close enough for padded batches
        tokens_seen += step_tokens
        if not result.applied:
            skipped += 1
            log.note(f"step {step}: update skipped (non-finite gradients), {skipped} so far")
        tps = step_tokens / result.seconds
        metrics = {"loss": result.loss, "lr_mult": mult, "grad_norm": result.grad_norm, "tokens_per_s": tps,
                   "mfu": mfu(flops, tps / world, peak), "skipped_steps": skipped}
        if val_data is not None and (step % args.eval_every == 0 or step == end):
            metrics["val_bpb"] = evaluate_bpb(engine, val_data, byte_counts, args.eval_batches)
        log.step(step, metrics)
        if "val_bpb" in metrics:
            log.row(step, metrics)
        if args.save_every > 0 and (step % args.save_every == 0 or step == end):
            path = checkpoint.save(engine, out, step, client_state(step), args.keep)
            log.note(f"step {step}: checkpoint {path}")
    checkpoint_io.export(model, out, tokenizer=tokenizer, extra={"stage": stage.name, "step": step},
                         is_writer=rank == 0)
    log.note(f"done: {step} steps, {tokens_seen:,} tokens, {skipped} skipped updates; exported to {out}")
    log.close()
    return metrics


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
