"""Train one stage of GhostVis (docs/training.md).

    deepspeed --num_gpus 8 launch/train.py --stage base --ds_config ds_configs/zero2.json \\
        --model small --depth 20 --data runs/data --out runs/d20
    torchrun --nproc_per_node 2 launch/train.py ...      # same, with torch's launcher
    python launch/train.py ...                            # one process (CPU or one GPU)
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch.distributed as dist

from ghostvis import recipes
from ghostvis.cli import console_script
from ghostvis.config import activation_checkpointing_arg, vision_override_arg
from ghostvis.lora import DEFAULT_TARGETS
from ghostvis.model.attention import ATTENTION_CHOICES, PACKED_CHOICES
from ghostvis.shipped import shipped_dir
from ghostvis.train.logging import H100_BF16_PEAK, WANDB_MODES
from ghostvis.train.schedule import SCHEDULES
from ghostvis.train.settings import DEFAULT_INIT_PERTURB
from ghostvis.train.stages import FREEZE_GROUPS, STAGES, parse_freeze, parse_layers


def _workers(text: str) -> int:
    """--data-workers: a process count, 0 or more."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of worker processes (0 = build batches in the "
                                         "training process)")
    return int(text)


def _count(text: str) -> int:
    """--length-group: a positive count."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of batches, 1 or more (1 = no grouping)")
    return int(text)


def _factor(text: str) -> float:
    """--init-shrink / --init-perturb: a factor between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # refused below, with the same message
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a factor between 0 and 1, e.g. 0.5")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RECIPE", help="a TOML recipe of these flags' values (a file, or a shipped name "
                   "such as demo_sft); flags given here override it. OUT/run_config.toml is one (docs/training.md)")
    p.add_argument("--stage", default="base", choices=sorted(STAGES), help="what to train (ghostvis/train/stages.py)")
    p.add_argument("--ds_config", "--ds-config", default=str(shipped_dir("ds_configs") / "zero2.json"),
                   help="DeepSpeed JSON with ZeRO/precision/comm settings only (default: ds_configs/zero2.json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help="set by the deepspeed launcher")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="small", help="preset name (ghostvis/config.py), e.g. tiny, small, qwen25_0.5b")
    g.add_argument("--depth", type=int, default=None, help="depth of the `small` family (width = 64·depth)")
    g.add_argument("--init-from", default=None, help="start from an exported model directory (llm.safetensors ...)")
    g.add_argument("--init-shrink", type=_factor, default=None, metavar="S",
                   help="with --init-from: each LLM block weight starts as S x its --init-from value + --init-perturb x "
                        "its fresh initial value (shrink and perturb), so a small base trained on narrow text can "
                        "still learn to read the image (docs/demo.md, 'Why the base model does not bind')")
    g.add_argument("--init-perturb", type=_factor, default=None, metavar="P",
                   help=f"with --init-shrink: the share of fresh initial weights added (default {DEFAULT_INIT_PERTURB})")
    g.add_argument("--encoder-weights", default=None, metavar="PATH",
                   help="weights of a new vision tower's encoder: a local timm .safetensors file or Hugging Face "
                        "SigLIP/CLIP folder (not with an --init-from that has vision.safetensors; docs/vision.md)")
    g.add_argument("--vision", type=vision_override_arg, action="append", metavar="KEY=VALUE",
                   help="set a field of the new vision tower's VisionConfig (ghostvis/config.py), repeatable; e.g. "
                        "an exportable Idefics3 connector: --vision resampler=pixel_shuffle --vision "
                        "num_vision_tokens=N --vision projector_hidden=0 --vision feature_norm=true (docs/interop.md)")
    g.add_argument("--data", required=True,
                   help="data directory with train/ and val/ shard subdirectories, one shard directory (trains on "
                        "it, no validation), or a directory with a mixture.json")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: DATA/../tokenizer)")
    g.add_argument("--data-workers", type=_workers, default=None, metavar="N",
                   help="processes building training batches (decode, resize, tokenize) ahead of the step, each on "
                        "its own share of the samples; 0 = in the training process; a checkpoint resumes with the "
                        "same N (default: the checkpoint's, else min(8, CPU cores per rank - 1); docs/data.md)")
    g.add_argument("--cached-features", action="store_true",
                   help="read the frozen encoder's features cached by data_prep/encode_features.py instead of "
                        "pixels (vision stages; refused unless they match the model's encoder; docs/vision.md)")
    g.add_argument("--pack", action="store_true",
                   help="pack several samples into each row, none split, each attending only to itself with RoPE "
                        "positions from 0 (vision_pretrain, sft; docs/data.md, Packing)")
    g.add_argument("--packed-attention", default="auto", choices=PACKED_CHOICES,
                   help="with --pack on a GPU, the document-masked kernel: auto takes the first of varlen (the "
                        "chosen FlashAttention's cu_seqlens entry), flex, sdpa_mask that passes its probe; CPU and "
                        "fp32 use sdpa_mask. The run log names it")
    g.add_argument("--pack-images", type=int, default=0, metavar="N",
                   help="with --pack, the most images one row may hold (0 = no bound but --seq-len)")
    g.add_argument("--length-group", type=_count, default=1, metavar="N",
                   help="sft: read N micro-batches' worth of conversations, sort them by length and cut them into "
                        "N batches: less padding, but each batch holds one length, which can hold learning back "
                        "(1 = none, the default; not with --pack; docs/data.md, Length grouping)")
    g.add_argument("--out", required=True, help="run directory: ckpt/, run_log.md and the final export")

    g = p.add_argument_group("parallelism (docs/parallelism.md; data-parallel size = world / (tp × pp × cp))")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (splits heads, KV groups, FFN, vocabulary)")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages (ZeRO <= 1 only: ds_configs/zero1.json)")
    g.add_argument("--cp", type=int, default=1,
                   help="context-parallel size: each sequence split over cp ranks (--pp 1; --seq-len a multiple "
                        "of 2·cp)")
    g.add_argument("--activation-checkpointing", nargs="?", const=True, default=False,
                   type=activation_checkpointing_arg, metavar="N|auto",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute); with N, "
                        "only the first N blocks: the rest keep theirs (pp 1; size N with launch/plan.py); auto: "
                        "the fewest blocks whose plan fits 90%% of the GPU (every block off the GPU; under --pp, every "
                        "block or none)")
    g.add_argument("--recompute-attention", action="store_true",
                   help="checkpointed blocks recompute their attention too, keeping only their input: less memory "
                        "(one d-wide tensor a token and block), slower at long context (docs/parallelism.md)")
    g.add_argument("--no-plan-check", action="store_true",
                   help="on a GPU, run even when the planner (launch/plan.py) says the run does not fit the card, or "
                        "its CPU-offloaded state does not fit this host's memory")

    g = p.add_argument_group("batch")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per forward")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: from --global-batch, else 1)")
    g.add_argument("--global-batch", type=int, default=None, help="sequences per step = micro × accum × world size")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")

    g = p.add_argument_group("optimization (unset values take the stage's defaults)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps in total")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop (checkpoint, export) after this step; the schedule still spans --steps (time-limited jobs)")
    g.add_argument("--lr", type=float, default=None, help="every learning rate of the stage that has no flag of its own")
    g.add_argument("--llm-lr", type=float, default=None, help="LLM blocks and final norm")
    g.add_argument("--embed-lr", type=float, default=None, help="token embedding")
    g.add_argument("--head-lr", type=float, default=None, help="output head (lm_head)")
    g.add_argument("--vision-lr", type=float, default=None, help="vision connector: resampler + projector")
    g.add_argument("--encoder-lr", type=float, default=None,
                   help="vision encoder; giving it unfreezes the encoder (frozen by default in every stage)")
    g.add_argument("--train-llm-layers", type=parse_layers, default=None, metavar="K|all",
                   help="train the LLM's last K blocks; 0 = none, all = every LLM weight incl. embeddings and "
                        "head (defaults: vision_pretrain 0, others all)")
    g.add_argument("--freeze", type=parse_freeze, default=None, metavar="GROUPS",
                   help=f"comma list among {','.join(FREEZE_GROUPS)} to freeze whatever the other flags say "
                        "('none' = nothing; default: encoder for vision stages)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay for matrices")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help="lr after warmup")
    g.add_argument("--warmdown", type=float, default=None, help="fraction of --steps decaying linearly to 0 (warmdown)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    g.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model inside the engine (ZeRO 0-2; refused with --tp/--pp > 1, and with "
                        "ZeRO-3 and a vision tower)")
    g.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel for training on a GPU: auto takes the first of fa4, cudnn, fa3, fa2, "
                        "sdpa_flash, expand that is installed and passes its correctness probe; a named one that "
                        "cannot run is an error. CPU and fp32 always use expand. The run log names the kernel")
    g.add_argument("--seed", type=int, default=0, help="initial weights and data order")

    g = p.add_argument_group("lora (docs/training.md#lora; --tp 1 --pp 1)")
    g.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="train rank-R adapters on the LLM's linear layers instead of its weights (0 = off); the "
                        "export is merged, the adapter alone is OUT/adapter.safetensors")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale = alpha / rank (default: rank)")
    g.add_argument("--lora-targets", default=DEFAULT_TARGETS, metavar="REGEX,...",
                   help="comma list of regexes searched in module names, e.g. 'attn\\.' (default: every attention "
                        "and MLP projection)")

    g = p.add_argument_group("rl (GRPO, ghostvis/train/grpo.py; --micro-batch counts prompts)")
    g.add_argument("--group-size", type=int, default=None, help="completions sampled per prompt (default 8)")
    g.add_argument("--rl-max-new-tokens", type=int, default=None, help="cap on a completion's length (default 64)")
    g.add_argument("--temperature", type=float, default=None, help="rollout sampling temperature (default 1.0)")
    g.add_argument("--kl-coef", type=float, default=None,
                   help="weight of the KL penalty against the frozen starting model (default 0 = off, no copy kept)")
    g.add_argument("--clip-eps", type=float, default=None, help="PPO clip range of the per-token ratio (default 0.2)")

    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps, also at the end (0 = never)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (0 = all)")
    g.add_argument("--resume", default="auto", choices=("auto", "none"), help="auto: continue from OUT/ckpt/latest")
    g.add_argument("--universal", action="store_true",
                   help="load OUT/ckpt/<latest>_universal (made by ds_to_universal); automatic when the "
                        "data-parallel size changed (docs/parallelism.md)")
    g.add_argument("--max-corrupt-fraction", type=float, default=0.01, metavar="F",
                   help="stop when more than this fraction of the samples read so far were corrupt (counted by "
                        "shard and reason in the progress bar, metrics.jsonl and run_log.md)")

    g = p.add_argument_group("divergence (docs/training.md)")
    g.add_argument("--max-skipped-updates", type=int, default=10, metavar="K",
                   help="stop after K bad updates in a row (skipped, or non-finite loss or gradients; 0 = never)")
    g.add_argument("--max-skipped-fraction", type=float, default=0.5, metavar="F",
                   help="stop when more than this fraction of the last 100 updates were bad")
    g.add_argument("--rollbacks", type=int, default=0, metavar="N",
                   help="on a stop, reload the last trusted checkpoint and continue with lowered learning rates, "
                        "up to N times")
    g.add_argument("--rollback-lr-factor", type=float, default=0.5, metavar="F",
                   help="learning rates are multiplied by F at each rollback")
    g = p.add_argument_group("evaluation, logging")
    g.add_argument("--eval-every", type=int, default=None,
                   help="validation bits-per-byte interval (0 = never; default 250, or never when --data has no val/)")
    g.add_argument("--eval-batches", type=int, default=20, help="validation micro-batches per rank")
    g.add_argument("--wandb", default="off", choices=WANDB_MODES, help="Weights & Biases logging")
    g.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK, help="per-GPU peak FLOP/s for MFU")
    return p


def main() -> None:
    parser = build_parser()
    args, argv = recipes.parse_args(parser)
    if int(os.environ.get("RANK", "0")) == 0:
        recipes.write_resolved(parser, argv, Path(args.out))
    from ghostvis.train.loop import run

    run(args)
    # all ranks leave together, then tear gloo/nccl down explicitly (an implicit teardown at interpreter
    # exit can abort a rank). After an unexpected exception we just exit: the launcher stops the other ranks.
    dist.barrier()
    dist.destroy_process_group()


cli = console_script(main)

if __name__ == "__main__":
    cli()
