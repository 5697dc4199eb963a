"""Memory of one training step, eager against torch.compile, at a large vocabulary and a long sequence.

    python bench/loss_memory.py                          # CPU: 2 blocks, 152k vocabulary, 8192 tokens (~2 min)
    python bench/loss_memory.py --device cuda --seq 32768 --depth 20 --append

Why: the fused head + loss (ghostvis/model/linear_ce.py) holds one chunk of logits at a time; inductor unrolled
its chunk loop and kept every chunk alive, so a compiled step needed far more memory than an eager one (an
80 GB GPU ran out at 32k tokens; a candidate cause, not yet rerun there). The loss now runs eagerly inside a
compiled model; this bench shows a step's memory either way. Each mode runs in a fresh process: a `small` GPT of
`--depth` blocks with checkpointing, fp32 on CPU (bf16 autocast on CUDA), one forward + backward at `--seq` tokens
after one untimed step of the same length (compilation happens there, not in the measured step). Memory: the
step's peak over what was held just before it (CPU: VmHWM, reset through /proc/self/clear_refs, against VmRSS;
CUDA: max_memory_allocated against memory_allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import subprocess
import sys

from pipeline import append_to_benchmarks, child_env

MODES = {"eager": "eager", "compiled": "compiled (the loss left eager, as the trainer runs it)",
         "compiled_traced_loss": "compiled with the loss traced into the graph (before the fix)"}


def step_memory(mode: str, depth: int, vocab: int, seq: int, device: str) -> tuple[float, float]:
    """(GiB the step added to what was held before it, the step's loss), in this process."""
    import torch

    from ghostvis.config import get_preset
    from ghostvis.model import linear_ce, parallel
    from ghostvis.model.gpt import GPT

    torch.manual_seed(0)
    cfg, _ = get_preset("small", depth)
    model = GPT(dataclasses.replace(cfg, max_seq_len=seq, vocab_size=vocab)).to(device)
    model.set_activation_checkpointing(True)
    if mode == "compiled_traced_loss":  # the head + loss as the compiler saw it before it was left eager
        parallel.linear_cross_entropy = linear_ce.traceable_linear_cross_entropy
    fwd = model if mode == "eager" else torch.compile(model)
    idx = torch.randint(0, vocab, (1, seq), device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    for _ in range(2):  # the first step compiles (and warms the allocator); the second is measured
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            before = _status_kib("VmRSS") * 1024
        with autocast:
            loss = fwd(idx, idx)
        loss.backward()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024
    return (peak - before) / 2**30, loss.item()


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--depth", type=int, default=2, help="blocks of the `small` GPT (width 64 x depth)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen2.5's by default)")
    p.add_argument("--seq", type=int, default=8192, help="tokens in the step")
    p.add_argument("--append", action="store_true", help="append the result to BENCHMARKS.md")
    p.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one child process's mode
    args = p.parse_args(argv)
    if args.mode:
        grew, loss = step_memory(args.mode, args.depth, args.vocab, args.seq, args.device)
        print(f"RESULT {grew:.3f} {loss:.5f}")
        return
    rows = []
    for mode, label in MODES.items():
        cmd = [sys.executable, __file__, "--mode", mode, "--device", args.device, "--depth", str(args.depth),
               "--vocab", str(args.vocab), "--seq", str(args.seq)]
        proc = subprocess.run(cmd, env=child_env(cuda=args.device == "cuda"), capture_output=True, text=True)
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
            rows.append(f"| {label} | failed: {why} | - |")
        else:
            grew, loss = proc.stdout.split("RESULT")[-1].split()
            rows.append(f"| {label} | {float(grew):.2f} GiB | {float(loss):.4f} |")
        print(rows[-1], flush=True)
    text = (f"`small` depth {args.depth}, vocabulary {args.vocab:,}, {args.seq:,} tokens, checkpointing, "
            f"{args.device}:\n\n| mode | step memory | loss |\n|---|---:|---:|\n" + "\n".join(rows))
    print(text)
    if args.append:
        append_to_benchmarks("loss_memory", argv, text)


if __name__ == "__main__":
    main()
