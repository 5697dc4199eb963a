"""Plan GPU memory for a training layout before renting the GPUs (docs/planner.md).

    python launch/plan.py --model vlm_7b --gpus 8 --zero 3 --tp 1 --pp 1 --micro-batch 1 --seq 4096
    python launch/plan.py --model qwen25_7b --gpus 8 --nodes 2 --zero 1 --tp 2 --pp 2 --activation-checkpointing
    python launch/plan.py --model vlm_7b --stage vision_pretrain --gpus 4 --zero 2 --json
    python launch/plan.py --model vlm_7b --stage sft --freeze none --gpus 8 --zero 3   # the encoder trains too
    python launch/plan.py --model qwen25_1.5b --zero 2 --seq max --activation-checkpointing --gpu-mem-gib 139.8

Prints per-GPU bytes of weights, fp32 master weights, gradients, Adam states, ZeRO buffers, activations and
a fixed CUDA overhead, then "fits / does not fit on a <N> GiB card" with the headroom. Exit status 0 when
it fits, 1 when it does not (scripts can test it), 2 on a bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ghostvis.cli import console_script
from ghostvis.config import PRESETS, activation_checkpointing_arg, get_preset, int_or
from ghostvis.plan import (AUTO_SHARE, GIB, LONGEST_SHARE, SEQ_STEP, Layout, Plan, PlanError, build_meta_model,
                           ds_bucket_settings, fewest_checkpointed_blocks, format_plan, longest_sequence,
                           measure_activations, plan)
from ghostvis.train.stages import FREEZE_GROUPS, STAGES, parse_freeze, parse_layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=PRESETS, help="preset name (ghostvis/config.py)")
    p.add_argument("--depth", type=int, default=None, help="depth of the small / vlm_small family")
    p.add_argument("--vocab-size", type=int, default=None, help="your tokenizer's vocabulary (default: the preset's)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (world = gpus × nodes = tp × pp × cp × dp)")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel size: each sequence split over cp GPUs (--pp 1; --seq a multiple of 2·cp)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per forward")
    p.add_argument("--seq", type=int_or("max", "give a token count (e.g. 32768) or max"), default=2048, metavar="N|max",
                   help="tokens per sequence (image tokens included); max: the longest (in steps of "
                        f"{SEQ_STEP} × 2·--cp) whose plan fits {100 * LONGEST_SHARE:.0f}%% of --gpu-mem-gib (and "
                        "--host-mem-gib)")
    p.add_argument("--images-per-sample", type=int, default=1, help="images per sequence (VLM presets)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="training precision")
    p.add_argument("--offload", action="store_true",
                   help="ZeRO-Offload: optimizer state (and with --zero 3 the weights) in host memory")
    p.add_argument("--activation-checkpointing", nargs="?", const=True, default=False,
                   type=activation_checkpointing_arg, metavar="N|auto",
                   help="recompute each block in backward; with N, only the first N blocks; auto: the fewest whose "
                        f"plan fits {100 * AUTO_SHARE:.0f}%% of --gpu-mem-gib, as launch/train.py's auto picks on a "
                        "card of that size as CUDA reports it (79.2 GiB for an 80 GB H100)")
    p.add_argument("--recompute-attention", action="store_true", help="as launch/train.py's: checkpointed blocks "
                   "keep only their input, not their attention output")
    p.add_argument("--stage", default=None, choices=sorted(STAGES),
                   help="what trains, by the trainer's own rules (default: everything but a frozen encoder)")
    p.add_argument("--freeze", type=parse_freeze, default=None, metavar="GROUPS",
                   help=f"as launch/train.py's: comma list among {','.join(FREEZE_GROUPS)} to freeze ('none' = "
                        "nothing; default: the stage's, encoder for vision stages); needs --stage")
    p.add_argument("--train-llm-layers", type=parse_layers, default=None, metavar="K|all",
                   help="as launch/train.py's: only the LLM's last K blocks train (default: the stage's); needs "
                        "--stage")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="as launch/train.py's: rank-R adapters train instead of the LLM's weights; needs --stage")
    p.add_argument("--lora-targets", default=None, metavar="REGEX,...",
                   help="as launch/train.py's (default: every attention and MLP projection)")
    p.add_argument("--ds-config", default=None,
                   help="DeepSpeed JSON for bucket sizes (default: ds_configs/zero{N}[_offload].json)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one card in GiB")
    p.add_argument("--host-mem-gib", type=float, default=None,
                   help="host memory of one node in GiB: with --offload, check the offloaded state fits it")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--measure", action="store_true",
                   help="also run one bf16 forward+backward of the (text) model on this GPU and print its measured "
                        "activation peak beside the plan's (tp = pp = 1; pick the LLM preset of a VLM)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    try:
        if args.stage and args.freeze is not None:  # the trainer's refusal (a ConfigError, hence a ValueError)
            from ghostvis.train.settings import refuse_flags_on_frozen
            from ghostvis.train.stages import get_stage

            refuse_flags_on_frozen(get_stage(args.stage), args, args.freeze)
        auto, longest = args.activation_checkpointing == "auto", args.seq == "max"
        if longest and auto:
            raise PlanError("--seq max with --activation-checkpointing auto: the longest sequence is found for a "
                            "fixed checkpointing; give --activation-checkpointing (every block, the least memory) or N")
        layout = Layout(gpus=args.gpus, nodes=args.nodes, tp=args.tp, pp=args.pp, cp=args.cp, zero=args.zero,
                        micro_batch=args.micro_batch, seq_len=2 * args.cp if longest else args.seq,
                        dtype=args.dtype, offload=args.offload,
                        activation_checkpointing=False if auto else args.activation_checkpointing,
                        recompute_attention=args.recompute_attention, images_per_sample=args.images_per_sample,
                        **ds_bucket_settings(args.zero, args.offload, args.ds_config))
        model = build_meta_model(*get_preset(args.model, args.depth, **overrides))  # once, for every plan below

        def plan_for(activation_checkpointing: bool | int, seq_len: int | None = None) -> Plan:
            return plan(args.model, dataclasses.replace(layout, activation_checkpointing=activation_checkpointing,
                                                        seq_len=seq_len or layout.seq_len),
                        stage=args.stage, freeze=args.freeze, model=model, lora_rank=args.lora_rank,
                        lora_targets=args.lora_targets, train_llm_layers=args.train_llm_layers)

        found = None
        if longest:
            found = longest_sequence(lambda seq: plan_for(layout.activation_checkpointing, seq), args.gpu_mem_gib,
                                     args.host_mem_gib, SEQ_STEP * 2 * args.cp)
            layout = dataclasses.replace(layout, seq_len=found.plan.layout.seq_len)
        chosen = (fewest_checkpointed_blocks(plan_for, model.config.n_layer, args.pp > 1, args.gpu_mem_gib)
                  if auto else None)
        if chosen:
            layout = dataclasses.replace(layout, activation_checkpointing=chosen.value)
        result = chosen.plan if chosen else found.plan if found else plan_for(layout.activation_checkpointing)
        measured = None
        if args.measure:
            model_cfg, vision_cfg = get_preset(args.model, args.depth, **overrides)
            if vision_cfg is not None or layout.tp > 1 or layout.pp > 1 or layout.cp > 1:
                raise PlanError("--measure runs the text model whole on one GPU: use a text preset, --tp 1, --pp 1, "
                                "--cp 1")
            measured = measure_activations(model_cfg, layout)
    except (PlanError, ValueError) as err:
        print(f"plan.py: {err}", file=sys.stderr)
        return 2
    if args.json:
        auto_json = {"value": chosen.value, "fits_share": chosen.within, "share": AUTO_SHARE} if chosen else None
        print(json.dumps({**result.to_dict(args.gpu_mem_gib, args.host_mem_gib),
                          "measured_activation_bytes": measured, "activation_checkpointing_auto": auto_json,
                          "seq_max": {"seq_len": found.seq_len, "share": LONGEST_SHARE, "capped": found.capped}
                          if found else None},
                         indent=1))
    else:
        if found:
            print(found.line())
        if chosen:
            print(chosen.line())
        print(format_plan(result, args.gpu_mem_gib, args.host_mem_gib))
        if measured is not None:
            print(f"measured activations on this GPU: {measured / GIB:.2f} GiB "
                  f"(planned {result.gpu['activations'] / GIB:.2f} GiB)")
    if found is not None and not found.seq_len:
        return 1
    return 0 if result.fits(args.gpu_mem_gib, args.host_mem_gib) else 1


cli = console_script(main)

if __name__ == "__main__":
    cli()
