"""Training throughput with batches built in a background thread (`--prefetch 2`) beside built between
steps (`--prefetch 0`), side by side on one machine: the trainer itself, alternating the two settings.

    python bench/prefetch.py --data runs/demo/data/captions --tokenizer runs/demo/tokenizer   # after make demo

Each run is `launch/train.py --stage vision_pretrain --model vlm_tiny` (images decoded and resized from
real webdataset tars) for --steps steps; the number is the median of the logged per-step tokens/s after
the first --skip steps. Appends a block with the machine's description to --out (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace, prefetch: int, out: Path) -> float:
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--stage", "vision_pretrain", "--model", "vlm_tiny",
           "--data", args.data, "--tokenizer", args.tokenizer, "--out", str(out), "--ds_config",
           str(REPO / "ds_configs" / "zero1.json"), "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
           "--seq-len", "64", "--save-every", "0", "--eval-every", "0", "--prefetch", str(prefetch)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode:
        sys.exit(f"launch/train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[args.skip:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an image-text shard directory (train/ and val/)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the median")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = p.parse_args()
    results: dict[int, list[float]] = {0: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for prefetch in (0, 2):
                rate = run(args, prefetch, Path(tmp) / f"p{prefetch}-{r}")
                results[prefetch].append(rate)
                print(f"--prefetch {prefetch}, run {r + 1}: {rate:,.0f} tokens/s", flush=True)
    off, on = (statistics.median(results[k]) for k in (0, 2))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU training"
    line = f"--prefetch 2: {on:,.0f} tokens/s vs --prefetch 0: {off:,.0f} tokens/s = {on / off:.2f}×"
    print(line)
    with Path(args.out).open("a") as f:
        f.write(f"\n### prefetch, {time.strftime('%Y-%m-%d')}, {machine}\n\n"
                f"`python bench/prefetch.py --data {args.data} --tokenizer {args.tokenizer}` (vision_pretrain, "
                f"vlm_tiny, micro-batch {args.micro_batch}, seq 64, {args.steps} steps, median per-step tokens/s "
                f"after {args.skip}, {args.repeats} alternating runs each: {results})\n\n**{line}**\n")


if __name__ == "__main__":
    main()
