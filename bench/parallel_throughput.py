"""Training throughput of one (tp, pp, cp, dp) layout through the trainer's own pieces (docs/parallelism.md).

    # 2 × H100: tensor parallel, then pipeline parallel (d20 shape, seq 2048, bf16)
    TORCH_CUDA_ARCH_LIST=9.0 torchrun --nproc_per_node 2 bench/parallel_throughput.py --tp 2
    TORCH_CUDA_ARCH_LIST=9.0 torchrun --nproc_per_node 2 bench/parallel_throughput.py --pp 2 --grad-accum 8
    # 4 × H100: one 7B VLM ZeRO-3 configuration
    TORCH_CUDA_ARCH_LIST=9.0 torchrun --nproc_per_node 4 bench/parallel_throughput.py --model vlm_7b \\
        --ds_config ds_configs/zero3.json --seq-len 4096 --micro-batch 1 --activation-checkpointing
    # context parallelism: one 32k sequence over 2 GPUs (beside --cp 1 on one GPU, same card)
    TORCH_CUDA_ARCH_LIST=9.0 torchrun --nproc_per_node 2 bench/parallel_throughput.py --model qwen25_1.5b \
        --cp 2 --seq-len 32768 --micro-batch 1 --activation-checkpointing
    # LoRA's memory: a VLM line with --lora-rank 16 beside the one without. The LoRA side's check: it must end below
    # a control whose adapters stay at zero (docs/training.md, LoRA), run first with the same flags:
    #   ... --lora-rank 16 --lora-control --save-losses /tmp/ctl.json; ... --lora-rank 16 --control-losses /tmp/ctl.json
    # CPU check of the script (tiny model; add torchrun --nproc_per_node 2 and --tp 2 / --pp 2)
    DS_ACCELERATOR=cpu python bench/parallel_throughput.py --smoke --out /tmp/bench.md

The model is built as launch/train.py builds it (full init, `parallelize`, the stage's parameter groups,
`deepspeed.initialize` with the topology as mpu) and stepped by the loop's own `train_step` / `pipeline_step` on
learnable batches (bench/learning.py; a VLM also gets one random image per sequence). Every step's loss is kept: the
run must learn (loss falls), and with `--reference-losses FILE` (a run of the same batches saved by `--save-losses`,
e.g. another layout or the old code) it must track it, or it prints FAILED (with its peak memory, for information)
and writes no row. Prints tokens/s, MFU (LLM FLOPs only: the vision tower's are not counted) and peak memory (max
over ranks of torch.cuda.max_memory_allocated); rank 0 appends a block with the card's name to --out
(BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from ghostvis import lora
from ghostvis.config import get_preset
from ghostvis.model.attention import ATTENTION_CHOICES, select_attention
from ghostvis.model.gpt import GPT, count_params, flops_per_token
from ghostvis.parallel import Topology
from ghostvis.parallel.layout import parallelize
from ghostvis.plan import ac_words
from ghostvis.train import engine as ds_engine
from ghostvis.train.logging import H100_BF16_PEAK, mfu
from ghostvis.train.loop import lm_loss, pipeline_step, train_step
from ghostvis.train.schedule import apply_lr
from ghostvis.train.settings import Settings
from ghostvis.train.stages import STAGES
from learning import check_beats_control, check_learning, learnable_batches, loss_series, tail_mean

REPO = Path(__file__).resolve().parent.parent


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The plain model (full weights, seed 0) and the stage whose trainable rules it takes."""
    torch.manual_seed(0)
    model_cfg, vision_cfg = get_preset(args.model, args.depth)
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, args.seq_len)
    if vision_cfg is None:
        return GPT(model_cfg), "base"
    from ghostvis.model.vlm import VLM

    model_cfg.image_token_id = model_cfg.vocab_size - 1
    return VLM(model_cfg, vision_cfg), "sft"  # sft: connector + whole LLM train, the encoder is frozen


def batches(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> Iterator[dict | tuple]:
    """Learnable token rows (bench/learning.py); a VLM's rows start with one image's placeholder tokens
    (no loss on them) and come with its pixels."""
    cfg = model.config
    n_img = getattr(model, "num_vision_tokens", 0)
    g = torch.Generator(device=device).manual_seed(0)
    for idx, targets in learnable_batches(cfg.vocab_size - 1, args.micro_batch, args.seq_len, device):
        if not n_img:
            yield idx, targets
            continue
        idx, targets = idx.clone(), targets.clone()
        idx[:, 1:1 + n_img] = cfg.image_token_id
        targets[:, :1 + n_img] = -1
        size = model.vision_config.image_size
        pixels = torch.randn(args.micro_batch, 3, size, size, device=device, generator=g)
        yield {"input_ids": idx, "targets": targets, "pixel_values": pixels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, seq 64, few steps (CPU check of the script)")
    p.add_argument("--model", default="small")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (as launch/train.py's --cp)")
    p.add_argument("--ds_config", default=None, help="default: zero1.json with --pp > 1, else zero2.json")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per data-parallel replica per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (= pipeline micro-batches)")
    p.add_argument("--activation-checkpointing", nargs="?", const=True, default=False, type=int, metavar="N",
                   help="recompute every block in backward; with N, only the first N blocks")
    p.add_argument("--compile", action="store_true", help="torch.compile inside the engine, as train.py --compile")
    p.add_argument("--recompute-attention", action="store_true", help="as train.py's: checkpointed blocks keep "
                   "only their input")
    p.add_argument("--lora-rank", type=int, default=0, help="as launch/train.py's: adapters train, not the LLM")
    p.add_argument("--lora-control", action="store_true",
                   help="with --lora-rank: the adapters stay at zero (lr 0), so only the rest of the stage (a VLM's "
                        "connector) learns; save its losses (--save-losses) for the LoRA side's --control-losses")
    p.add_argument("--control-losses", default=None,
                   help="losses of the --lora-control run: this LoRA run must end below them (its adapters learn)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of every group (constant; train_throughput's too)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES, help="attention kernel (train.py's flag)")
    p.add_argument("--save-losses", default=None, help="write every step's loss here (JSON), for --reference-losses")
    p.add_argument("--reference-losses", default=None,
                   help="losses of a run over the same batches (--save-losses): this run must track them")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file rank 0 appends to")
    args = p.parse_args()
    if (args.lora_control or args.control_losses) and not args.lora_rank:
        p.error("--lora-control and --control-losses are for a LoRA run: add --lora-rank R")
    if args.lora_control and args.control_losses:
        p.error("--lora-control is the control itself; give --control-losses to the LoRA side only")
    if args.lora_control and not args.save_losses:
        p.error("--lora-control: add --save-losses FILE, for the LoRA side's --control-losses FILE")
    if (args.control_losses or args.lora_control) and args.reference_losses:
        p.error("--reference-losses with a LoRA control pair: the LoRA side is checked against its control "
                "(--control-losses), the control against nothing; drop --reference-losses")
    if args.smoke:
        args.model, args.depth, args.seq_len, args.micro_batch, args.steps, args.warmup = "tiny", None, 64, 2, 6, 2
        args.lr = 3e-3
    if args.model not in ("small", "vlm_small"):
        args.depth = None  # fixed-shape presets
    args.ds_config = args.ds_config or str(REPO / "ds_configs" / ("zero1.json" if args.pp > 1 else "zero2.json"))

    rank, world, device = ds_engine.init_distributed()
    on_gpu = device.type == "cuda"
    topo = Topology(args.tp, args.pp, args.cp)
    plain, stage_name = build(args)
    choice = select_attention(args.attention, device, torch.bfloat16 if on_gpu else torch.float32,
                              plain.config.head_dim, seq_len=args.seq_len // args.cp)
    data = batches(plain, args, device)
    model = parallelize(plain, topo, activation_checkpointing=args.activation_checkpointing,
                        recompute_attention=args.recompute_attention)  # deepspeed moves it
    del plain
    stage, dtype = STAGES[stage_name], "bf16" if on_gpu else "fp32"
    settings = Settings.of(stage, {**stage.defaults, **{name: args.lr for name in stage.lr_names}, "weight_decay": 0.1})
    if args.lora_rank:
        lora.add_lora(model, args.lora_rank, args.lora_rank)
        stage, settings = lora.lora_stage(stage, settings)
        if args.lora_control:
            settings = dataclasses.replace(settings, lrs={**settings.lrs, lora.LORA_RULE.lr: 0.0})
    groups = ds_engine.build_param_groups(model, stage, settings, model.config.n_layer)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(args.ds_config), micro_batch=args.micro_batch,
                                          grad_accum=args.grad_accum, world_size=topo.dp_size * topo.cp_size,
                                          grad_clip=1.0,
                                          dtype=dtype)
    ds_engine.check_pipeline_zero(ds_config, topo.pp_size, args.ds_config)
    ds_engine.check_context_parallel(topo.cp_size, args.seq_len, stage, args.compile)
    engine = ds_engine.initialize(model, groups, ds_config, device.type,
                                  mpu=topo if topo.model_parallel and topo.pp_size == 1 else None)
    if args.compile:
        engine.compile()
    step_fn = pipeline_step if topo.pp_size > 1 else train_step

    def step() -> float:
        apply_lr(engine.optimizer.param_groups, 1.0)
        return step_fn(engine, data, lm_loss, args.grad_accum).loss  # read back: the step has finished

    losses = [step() for _ in range(args.warmup)]
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    seconds = (time.perf_counter() - t0) / args.steps
    reference = json.loads(Path(args.reference_losses).read_text()) if args.reference_losses else None
    verdict = None  # a control is not judged: the LoRA side is judged against it
    if args.control_losses:
        verdict = check_beats_control(losses, json.loads(Path(args.control_losses).read_text()))
    elif not args.lora_control:
        verdict = check_learning(losses, reference)
    if rank == 0 and args.save_losses:
        Path(args.save_losses).write_text(json.dumps(losses))
    if on_gpu:
        torch.cuda.empty_cache()  # a run at the card's edge leaves NCCL no room for the reduction below
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = args.micro_batch * args.grad_accum * topo.dp_size * args.seq_len
    tps = tokens / seconds
    m = mfu(flops_per_token(model.config, args.seq_len), tps / world, args.peak_flops if on_gpu else None)
    card = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    line = (f"{tps:,.0f} tokens/s, MFU {'n/a' if m is None else f'{100 * m:.1f}%'}, "
            f"peak {peak.item():.1f} GiB per GPU")
    if rank == 0 and verdict is None:
        print(f"{topo} on {world} × {card}: control (adapters frozen): loss {losses[0]:.3f} → "
              f"{tail_mean(losses):.3f} (mean of the last 3; no row: a control)", flush=True)
    elif rank == 0 and not verdict.ok:
        # memory depends on what trains, not on whether it learnt: printed, never written as a row
        memory = f"peak {peak.item():.1f} GiB per GPU, for information" if on_gpu else "no GPU memory to report"
        print(f"{topo} on {world} × {card}: FAILED learning check: {verdict.message} (no row written; {memory})",
              flush=True)
        print(loss_series(losses, reference), flush=True)
    elif rank == 0:
        print(f"{topo} on {world} × {card}: {line}; {verdict.message}", flush=True)
        shape = (f"{args.model}{'' if args.depth is None else f' --depth {args.depth}'} "
                 f"({count_params(model.config):,} non-embedding LLM parameters), seq {args.seq_len}, "
                 f"micro-batch {args.micro_batch} × grad-accum {args.grad_accum} × dp {topo.dp_size}, {dtype}, "
                 f"{Path(args.ds_config).stem}{ac_words(args.activation_checkpointing)}"
                 f"{' (attention recomputed)' if args.recompute_attention else ''}, "
                 f"{'compiled' if args.compile else 'eager'}, attention {choice.kernel}"
                 f"{f', LoRA rank {args.lora_rank}' if args.lora_rank else ''}")
        with Path(args.out).open("a") as f:
            f.write(f"\n### parallel_throughput, {time.strftime('%Y-%m-%d')}, {world} × {card}\n\n"
                    f"tp {topo.tp_size}, pp {topo.pp_size}, cp {topo.cp_size}, dp {topo.dp_size}; {shape}; "
                    f"torch {torch.__version__}, "
                    f"deepspeed {deepspeed.__version__}\n\n**{line}**; learning: {verdict.message}\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
