"""Attention kernels on this GPU: correctness against SDPA's math backend, then fwd+bwd speed.

    TORCH_CUDA_ARCH_LIST=9.0 python bench/attention.py [--append]

For every kernel of ghostvis/model/attention.py's order that imports here (fa4, cudnn, fa3, fa2,
sdpa_flash, expand): the same probe the trainer runs before choosing it (causal GQA, forward and the three
gradients against math in fp32), then causal forward + backward TFLOP/s at training shapes (bf16, D=128;
FLOPs as FlashAttention counts them: 4·B·H·T²·D/2 forward, 2.5× that backward). Then which backend SDPA
picks on its own for the same call, read from the profiler's kernel names. `--append` writes the table to
BENCHMARKS.md with the card's name; the order in attention.py should follow it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ghostvis.model import attention as A

REPO = Path(__file__).resolve().parent.parent
CASES = [(16, 2048, 16, 8), (16, 2048, 12, 2), (1, 32768, 12, 2), (2, 8192, 28, 4)]  # B, T, H, KV heads


def tflops(fn, b: int, t: int, h: int, kv: int, d: int = 128, reps: int = 10) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k, v = (torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
            for _ in range(2))
    grad = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn(q, k, v).backward(grad)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    flops = 3.5 * 4 * b * h * t * t * d / 2
    return flops / sorted(times)[len(times) // 2] / 1e12


def unpinned_backend(b: int, t: int, h: int, kv: int, d: int = 128) -> str:
    """The kernels SDPA runs for a causal GQA call when nobody pins a backend."""
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if any(w in e.name.lower() for w in ("cudnn", "flash", "fmha", "attention",
                                                                                  "sdpa"))}
    return ", ".join(sorted(n[:60] for n in names)) or "(no attention kernel seen)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    rows = []
    for name in A.AUTO_ORDER:
        try:
            fn = A.kernel_fn(name)
        except ImportError as err:
            print(f"{name}: not installed ({err.name or err})", flush=True)
            continue
        problem = A.probe_kernel(fn, device, torch.bfloat16, 128)
        speeds = []
        for case in CASES:
            try:
                speeds.append(f"{tflops(fn, *case):.0f}" if problem is None else "")
            except Exception as err:  # noqa: BLE001 - a kernel that can't run a shape says so in its cell
                speeds.append(f"failed ({type(err).__name__})")
            torch.cuda.empty_cache()
        rows.append((name, problem or "matches math (fwd, dq, dk, dv)", speeds))
        print(f"{name}: {rows[-1][1]}; TFLOP/s {speeds}", flush=True)
    picks = [unpinned_backend(*case) for case in CASES[:1]]
    header = " | ".join(f"{b}×{t} H{h}/KV{kv}" for b, t, h, kv in CASES)
    table = f"| kernel | correctness | {header} |\n| --- | --- |{' ---: |' * len(CASES)}\n"
    table += "".join(f"| {n} | {ok} | {' | '.join(s)} |\n" for n, ok, s in rows)
    text = (f"\n### attention kernels, {time.strftime('%Y-%m-%d')}, {card}\n\n`python bench/attention.py`: causal, bf16, "
            f"D=128, fwd+bwd TFLOP/s (median of 10); torch {torch.__version__}. Unpinned SDPA ran: {picks[0]}.\n\n"
            f"{table}")
    print(text)
    if args.append:
        with (REPO / "BENCHMARKS.md").open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
