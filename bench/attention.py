"""Attention kernels on this GPU: correctness against SDPA's math backend, then fwd+bwd speed.

    TORCH_CUDA_ARCH_LIST=9.0 python bench/attention.py [--append]

For every kernel of ghostvis/model/attention.py's order that imports here (fa4, cudnn, fa3, fa2,
sdpa_flash, expand): the same probe the trainer runs before choosing it (causal GQA, forward and the three
gradients against math in fp32), then causal forward + backward TFLOP/s at training shapes (bf16, D=128;
FLOPs as FlashAttention counts them: 4·B·H·T²·D/2 forward, 2.5× that backward). Then which backend SDPA
picks on its own for the same call, read from the profiler's kernel names. `--append` writes the table to
BENCHMARKS.md with the card's name; the order in attention.py should follow it.

`--packed`: the document-masked kernels of packed rows (PACKED_ORDER: varlen for each installed FlashAttention,
flex, sdpa_mask), each probed against masked SDPA math as the trainer does, then timed fwd+bwd on rows of
documents whose lengths are drawn around a mean (PACKED_CASES), beside dense causal attention over the whole
row (the chosen `auto` kernel: what a row costs when nothing is skipped). Useful TFLOP/s count the documents'
own causal work only (Σ length²), so a kernel that skips masked blocks scores higher.
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
PACKED_CASES = [(8, 2048, 16, 8, 300), (8, 4096, 12, 2, 600), (1, 32768, 12, 2, 1000)]  # B, T, H, KV, mean doc


def document_ids(b: int, t: int, mean: int, seed: int = 0) -> torch.Tensor:
    """[b, t] document ids: lengths exponential around `mean` (16 at least), the last cut at the row's end."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < t:
            lengths.append(min(t - sum(lengths), max(16, int(torch.empty(1).exponential_(1 / mean, generator=g)))))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows).cuda()


def tflops(fn, b: int, t: int, h: int, kv: int, d: int = 128, reps: int = 10, pairs: float | None = None) -> float:
    """fwd+bwd TFLOP/s of `fn` at [b, h, t, d]; `pairs`: the causal (query, key) pairs that count as useful
    work (default: a full causal row, b·t²/2)."""
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
    flops = 3.5 * 4 * h * d * (b * t * t / 2 if pairs is None else pairs)
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


def packed(card: str) -> str:
    """The --packed table: each packed kernel's probe and useful TFLOP/s per PACKED_CASES row."""
    device = torch.device("cuda")
    dense = A.select_attention("auto", device, torch.bfloat16, 128)
    probe_ids = torch.cat([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)).unsqueeze(0)
                           for d in A.PROBE_DOCUMENTS]).to(device)
    cases = [(b, t, h, kv, document_ids(b, t, mean)) for b, t, h, kv, mean in PACKED_CASES]
    candidates = [("varlen", f) for f in ("fa4", "fa3", "fa2")] + [("flex", None), ("sdpa_mask", None)]
    rows = [(f"dense causal, whole row ({dense.kernel}; not document-masked)", "-",
             [f"{tflops(A.kernel_fn(dense.kernel), b, t, h, kv, pairs=pairs(ids)):.0f}" for b, t, h, kv, ids in cases])]
    for kernel, flash in candidates:
        name = kernel if flash is None else f"{kernel} ({flash})"
        try:
            docs = A.documents(probe_ids, kernel, flash)
        except ImportError as err:
            print(f"{name}: not installed ({err.name or err})", flush=True)
            continue
        problem = A.probe_kernel(lambda q, k, v: A.attend_documents(q, k, v, docs), device, torch.bfloat16, 128,
                                 probe_ids)
        speeds = []
        for b, t, h, kv, ids in cases:
            try:
                case_docs = A.documents(ids, kernel, flash)
                fn = lambda q, k, v: A.attend_documents(q, k, v, case_docs)  # noqa: E731
                speeds.append("" if problem else f"{tflops(fn, b, t, h, kv, pairs=pairs(ids)):.0f}")
            except Exception as err:  # noqa: BLE001 - a kernel that can't run a shape says so in its cell
                speeds.append(f"failed ({type(err).__name__})")
            torch.cuda.empty_cache()
        rows.append((name, problem or "matches masked math (fwd, dq, dk, dv)", speeds))
        print(f"{name}: {rows[-1][1]}; useful TFLOP/s {speeds}", flush=True)
    header = " | ".join(f"{b}×{t} H{h}/KV{kv}, docs ~{m}" for b, t, h, kv, m in PACKED_CASES)
    table = f"| kernel | correctness | {header} |\n| --- | --- |{' ---: |' * len(cases)}\n"
    table += "".join(f"| {n} | {ok} | {' | '.join(s)} |\n" for n, ok, s in rows)
    return (f"\n### packed-row attention kernels, {time.strftime('%Y-%m-%d')}, {card}\n\n`python bench/attention.py "
            f"--packed`: document-causal, bf16, D=128, fwd+bwd useful TFLOP/s (the documents' own causal pairs, "
            f"median of 10); torch {torch.__version__}.\n\n{table}")


def pairs(ids: torch.Tensor) -> float:
    """Causal (query, key) pairs inside the documents of `ids`: Σ length²/2."""
    lengths = [torch.unique_consecutive(row, return_counts=True)[1].double() for row in ids.cpu()]
    return sum(float((n ** 2 / 2).sum()) for n in lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--packed", action="store_true", help="the document-masked kernels of packed rows instead")
    args = p.parse_args()
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    if args.packed:
        text = packed(card)
        print(text)
        if args.append:
            with (REPO / "BENCHMARKS.md").open("a") as f:
                f.write(text)
        return
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
