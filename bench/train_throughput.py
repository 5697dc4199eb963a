"""Base-stage training throughput on one GPU: our DeepSpeed engine vs a plain PyTorch loop, same run.

    TORCH_CUDA_ARCH_LIST=9.0 python bench/train_throughput.py             # d20 shape, seq 2048, bf16
    DS_ACCELERATOR=cpu python bench/train_throughput.py --smoke           # tiny shape on CPU, no MFU

Both sides train the same GPT class on the same synthetic random tokens (throughput does not depend on
the data). Ours: ghostvis.train's param groups, ds_config (ZeRO-1 by default, bf16), engine-side
torch.compile and the loop's own `train_step`. Plain: fp32 weights + bf16 autocast, torch.compile,
fused AdamW. Prints tokens/s, MFU (flops_per_token · tokens/s / peak) and the ratio; appends a row with
the card's name to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import deepspeed
import torch

from ghostvis.config import ModelConfig, get_preset
from ghostvis.model.gpt import GPT, count_params, flops_per_token
from ghostvis.train import engine as ds_engine
from ghostvis.train.logging import H100_BF16_PEAK, mfu
from ghostvis.train.loop import lm_loss, train_step
from ghostvis.train.schedule import apply_lr
from ghostvis.train.stages import STAGES

REPO = Path(__file__).resolve().parent.parent


def synthetic(vocab: int, batch: int, seq: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)
    while True:
        rows = torch.randint(0, vocab, (batch, seq + 1), device=device, generator=g)
        yield rows[:, :-1], rows[:, 1:]


def timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` untimed steps (compilation happens there). Each step ends in
    `loss.item()`, which waits for the GPU, so wall time is device time."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def ours(args: argparse.Namespace, device: torch.device, dtype: str) -> float:
    torch.manual_seed(0)
    cfg, _ = get_preset(args.model, args.depth, max_seq_len=args.seq_len)
    model = GPT(cfg).to(device)
    lrs = {name: 3e-4 for name in STAGES["base"].lr_names}
    groups = ds_engine.build_param_groups(model, STAGES["base"], lrs, 0.1, {}, cfg.n_layer)
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(args.ds_config), micro_batch=args.batch,
                                          grad_accum=1, world_size=1, grad_clip=1.0, dtype=dtype)
    engine = ds_engine.initialize(model, groups, ds_config, device.type)
    if args.compile:
        engine.compile()
    batches = synthetic(cfg.vocab_size, args.batch, args.seq_len, device)

    def step() -> None:
        apply_lr(engine.optimizer.param_groups, 1.0)
        train_step(engine, batches, lm_loss, 1)  # ends in loss.item(): the step is finished

    return timed(step, args.warmup, args.steps)


def plain(args: argparse.Namespace, device: torch.device, dtype: str) -> float:
    torch.manual_seed(0)
    cfg, _ = get_preset(args.model, args.depth, max_seq_len=args.seq_len)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    batches = synthetic(cfg.vocab_size, args.batch, args.seq_len, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> None:
        idx, targets = next(batches)
        with amp:
            loss = fwd(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # same synchronisation as ours

    return timed(step, args.warmup, args.steps)


def record(args: argparse.Namespace, cfg: ModelConfig, card: str, dtype: str, rows: list[tuple[str, float, str]]) -> None:
    """Print the ratio and append one self-contained block to --out (never breaks someone else's table)."""
    ratio = rows[0][1] / rows[1][1]
    print(f"ratio engine/plain: {ratio:.3f}")
    shape = (f"{args.model}{'' if args.depth is None else f' --depth {args.depth}'} "
             f"({count_params(cfg):,} non-embedding parameters), seq {args.seq_len}, batch {args.batch}, {dtype}, "
             f"{'compiled' if args.compile else 'eager'}, {Path(args.ds_config).stem}")
    table = "".join(f"| {name} | {tps:,.0f} | {m} |\n" for name, tps, m in rows)
    with Path(args.out).open("a") as f:
        f.write(f"\n### train_throughput, {time.strftime('%Y-%m-%d')}, {card}\n\n{shape}; torch {torch.__version__}, "
                f"deepspeed {deepspeed.__version__}\n\n| loop | tokens/s | MFU |\n| --- | ---: | ---: |\n{table}\n"
                f"ratio engine / plain: **{ratio:.3f}**\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape, few steps (CPU check of the script)")
    p.add_argument("--model", default="small")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side (compilation)")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero1.json"))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--skip-plain", action="store_true", help="time only our engine (compare ds_configs)")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to append the result to")
    args = p.parse_args()
    if args.smoke:
        args.model, args.depth, args.seq_len, args.batch, args.steps, args.warmup = "tiny", None, 64, 4, 3, 1
        args.compile = False

    _, _, device = ds_engine.init_distributed()
    on_gpu = device.type == "cuda"
    dtype = "bf16" if on_gpu else "fp32"
    card = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    cfg, _ = get_preset(args.model, args.depth, max_seq_len=args.seq_len)
    flops = flops_per_token(cfg, args.seq_len)
    tokens = args.batch * args.seq_len
    rows = []
    sides = [("ghostvis engine", ours)] + ([] if args.skip_plain else [("plain PyTorch", plain)])
    for name, fn in sides:
        sec = fn(args, device, dtype)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        tps = tokens / sec
        m = mfu(flops, tps, args.peak_flops if on_gpu else None)
        rows.append((name, tps, "n/a" if m is None else f"{100 * m:.1f}%"))
        print(f"{name:16s} {tps:12,.0f} tokens/s  MFU {rows[-1][2]}")
    if not args.skip_plain:
        record(args, cfg, card, dtype, rows)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
