"""Peak host memory per rank of building a model as launch/train.py builds it, model only (no engine, no step).

    python bench/init_memory.py --model vlm_7b --world 2 --append    # needs ~40 GB of host memory
    python bench/init_memory.py --model vlm_7b --world 4 --append
    python bench/init_memory.py --model vlm_1.5b --layers 4 --world 2 # a small check of the same path
    python bench/init_memory.py --model vlm_7b --world 2 --eager      # the whole model on every rank, to compare

`--world` ranks are started with torch.multiprocessing on this host's CPU (DeepSpeed's CPU accelerator, gloo).
Each builds the preset through `checkpoint_io.build_model` with the DeepSpeed config the trainer makes from
`--ds-config` (ZeRO-3: under deepspeed.zero.Init, docs/parallelism.md "Model construction"), then reports its
peak resident memory (VmHWM, which includes the interpreter, torch and DeepSpeed: its RSS after the
imports is printed beside it). Target per rank: the fp32 model's bytes / world + 2 GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

from pipeline import REPO, append_to_benchmarks

sys.path.insert(0, str(REPO))
GiB = 2**30


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak resident memory since it was exec'd (VmHWM). Not getrusage's maxrss: Linux folds
    the parent's RSS at fork into a child's maxrss, so a small child of a big parent would read big."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _configs(args: argparse.Namespace):
    from ghostvis.config import get_preset

    model_cfg, vision_cfg = get_preset(args.model)
    model_cfg = dataclasses.replace(model_cfg, image_token_id=model_cfg.vocab_size - 1)
    if args.layers is not None:
        model_cfg = dataclasses.replace(model_cfg, n_layer=args.layers)
    return model_cfg, vision_cfg


def _rank(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from ghostvis import checkpoint_io
    from ghostvis.shipped import shipped_dir
    from ghostvis.train import engine as ds_engine

    ds_engine.init_distributed()
    ds_config = ds_engine.build_ds_config(ds_engine.load_ds_config(shipped_dir("ds_configs") / args.ds_config),
                                          micro_batch=1, grad_accum=1, world_size=args.world, grad_clip=1.0,
                                          dtype="fp32")
    zero3 = ds_config if ds_engine.builds_partitioned(ds_config) and not args.eager else None
    model_cfg, vision_cfg = _configs(args)
    before = _rss_now()
    t0 = time.time()
    torch.manual_seed(0)
    model = checkpoint_io.build_model(model_cfg, vision_cfg, seed=0, zero3=zero3)
    seconds = time.time() - t0
    torch.distributed.barrier()
    peak = peak_rss()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    results.put((rank, before, peak, held, seconds))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vlm_7b", help="preset (ghostvis/config.py)")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a smaller check)")
    p.add_argument("--world", type=int, default=2, help="ranks, all on this host")
    p.add_argument("--ds-config", default="zero3.json", help="a file of ds_configs/")
    p.add_argument("--eager", action="store_true", help="build the whole model on every rank (before zero.Init)")
    p.add_argument("--append", action="store_true", help="append the result to BENCHMARKS.md")
    args = p.parse_args(argv)

    from ghostvis import checkpoint_io

    model_cfg, vision_cfg = _configs(args)
    meta = checkpoint_io.build_model(model_cfg, vision_cfg, device="meta")
    model_bytes = 4 * sum(p.numel() for p in meta.parameters())
    target = model_bytes / args.world + 2 * GiB
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args, port, results), nprocs=args.world, join=True, start_method="spawn")
    rows = sorted(results.get() for _ in range(args.world))
    how = "whole on every rank" if args.eager else f"--ds_config {args.ds_config}"
    shape = args.model + (f" with {args.layers} layers" if args.layers else "")
    lines = [f"{shape}, fp32 model {model_bytes / GiB:.2f} GiB, {args.world} ranks on one host "
             f"({os.cpu_count()} cores, {_host_memory() / GiB:.0f} GiB), built {how}; target per rank "
             f"{target / GiB:.2f} GiB (model / world + 2 GiB)", "",
             "| rank | RSS after imports | peak RSS | peak / target | parameters held | build time |",
             "|---|---|---|---|---|---|"]
    for rank, before, peak, held, seconds in rows:
        lines.append(f"| {rank} | {before / GiB:.2f} GiB | {peak / GiB:.2f} GiB | {peak / target:.2f}"
                     f"{'' if peak <= target else ' (over)'} | {held / 1e6:.0f} M | {seconds:.0f} s |")
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_to_benchmarks("init_memory", argv, text)


def _host_memory() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


if __name__ == "__main__":
    main()
