"""Where the image batchers' time goes, per phase, on the embedded data (`--device cuda` adds the GPU side).

    python bench/data_profile.py --data runs/bench_pipeline/data --tokenizer runs/bench_pipeline/tokenizer
    python bench/data_profile.py ... --model vlm_small --workers 0 4 --device cuda

For the vision_pretrain (`CaptionBatches`) and sft (`ConversationBatches`) batchers at the model's image
size, one process, milliseconds per image:

    read        tar -> raw bytes (ShardStream)
    decode      load_image: bytes -> RGB PIL image
    transform   image_transform: uint8 pixels at the encoder's size (what workers ship today), and beside
                it, for comparison, timm's float transform (resize + ToTensor + Normalize) used before
    tokenize    caption encode / conversation render
    collate     padding, targets, stacking the images (per batch, divided by its images)

then the batcher end to end (images/s) in the training process and through `--data-workers N` for each
N of --workers, and with --device cuda the host->device copy of a pinned batch plus normalisation on the
GPU (ms per batch).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import timm.data
import torch

from ghostvis.config import get_preset
from ghostvis.data.loader import WorkerBatches
from ghostvis.data.multimodal import (IMAGE_EXTS, CaptionBatches, ConversationBatches, Row, caption_batches,
                                      conversation_batches, read_conversation)
from ghostvis.data.shards import ShardStream
from ghostvis.model.vlm import VLM
from ghostvis.tokenizer import Tokenizer
from ghostvis.tokenizer_dir import load_tokenizer
from ghostvis.data.request import DataRequest
from ghostvis.train.loop import data_inputs
from ghostvis.vision.transforms import data_config, image_transform, load_image, normalize_pixels


class Clock:
    """Seconds per phase, summed."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def time(self, phase: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.total[phase] += time.perf_counter() - t0
        return out


def profile_phases(kind: str, data_dir: Path, tok: Tokenizer, model: VLM, samples: int, batch: int,
                   seq_len: int) -> tuple[dict[str, float], int]:
    """Seconds per phase over `samples` samples, and the number of images they held."""
    vcfg = model.vision_config
    transform = image_transform(vcfg)
    norm = data_config(vcfg)
    before = timm.data.create_transform(input_size=norm["input_size"], interpolation=norm["interpolation"],
                                        mean=norm["mean"], std=norm["std"], crop_pct=1.0, crop_mode="squash")
    make = CaptionBatches if kind == "captions" else ConversationBatches
    batcher = make(ShardStream(data_dir, seed=0), tok, batch_size=batch, max_len=seq_len,
                   num_vision_tokens=model.num_vision_tokens, image_frame=vcfg.image_frame, transform=transform)
    clock, rows, n_images = Clock(), [], 0
    it = iter(batcher.source)
    for _ in range(samples):
        sample = clock.time("read", next, it)
        if kind == "captions":
            keys = [next(f"{e}" for e in IMAGE_EXTS if e in sample)]
            ids, mask = clock.time("tokenize", tok.render_caption, sample["txt"].decode(), batcher.n_vis,
                                   batcher.image_frame)
        else:
            record, keys = read_conversation(sample)
            ids, mask = clock.time("tokenize", tok.render_conversation, record, seq_len, batcher.n_vis,
                                   batcher.image_frame)
        images = []
        for key in keys:
            img = clock.time("decode", load_image, sample[key])
            images.append(clock.time("transform", transform, img))
            clock.time("transform before (timm float)", before, img)
        n_images += len(images)
        rows.append(Row(ids[:seq_len], mask[:seq_len], images))
        if len(rows) == batch:
            clock.time("collate", batcher.collate, rows)
            rows = []
    return dict(clock.total), n_images


def images_per_s(build: Any, req: DataRequest, workers: int, batches: int) -> float:
    it = iter(WorkerBatches(build, req, workers, torch.device("cpu")))
    next(it)  # start-up (worker processes, first shard) is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it)
        n += len(b.get("pixel_values", ()))
    return n / (time.perf_counter() - t0)


def gpu_side(build: Any, req: DataRequest, model: VLM, repeats: int = 20) -> dict[str, float]:
    """ms per batch: pinned host->device copy, and uint8 -> normalised float on the GPU."""
    batch = next(iter(build(req)))
    pixels = batch["pixel_values"].pin_memory()
    enc = model.vision.encoder
    out = {}
    for name, fn in (("copy", lambda: pixels.to("cuda", non_blocking=True)),
                     ("normalise", lambda: normalize_pixels(on_gpu, enc.mean, enc.std))):
        on_gpu = pixels.to("cuda")
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        out[name] = 1000 * (time.perf_counter() - t0) / repeats
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="data_prep.synth output (captions/, vqa/, ...)")
    p.add_argument("--tokenizer", required=True, type=Path)
    p.add_argument("--model", default="vlm_small", help="VLM preset: its image size and vision tokens")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="--data-workers settings to time")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads for the phase timings (a data worker has 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer)
    cfg, vcfg = get_preset(args.model, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id)
    model = VLM(cfg, vcfg)
    print(f"{args.model}: images {vcfg.image_size} px, {model.num_vision_tokens} vision tokens; "
          f"{args.samples} samples, micro-batch {args.micro_batch}, seq {args.seq_len}, torch threads "
          f"{torch.get_num_threads()}\n")
    for kind, stage, build in (("captions", "vision_pretrain", caption_batches),
                               ("vqa", "sft", conversation_batches)):
        phases, n_images = profile_phases(kind, args.data / kind / "train", tok, model, args.samples,
                                          args.micro_batch, args.seq_len)
        now = sum(v for k, v in phases.items() if "before" not in k)
        print(f"### {stage} ({kind}), {n_images} images\n\n| phase | ms / image | share |\n| --- | ---: | ---: |")
        for phase, sec in phases.items():
            share = f"{sec / now:.0%}" if "before" not in phase else "(not run)"
            print(f"| {phase} | {1000 * sec / max(n_images, 1):.3f} | {share} |")
        print(f"| **total** | {1000 * now / max(n_images, 1):.3f} | 100% |\n")
        req = DataRequest(args.data / kind, "train", args.seq_len, args.micro_batch, 0, 1, 0, tok,
                          torch.device("cpu"), False, **data_inputs(model))
        batches = max(2, args.samples // args.micro_batch)
        for workers in args.workers:
            print(f"- batcher, --data-workers {workers}: {images_per_s(build, req, workers, batches):,.0f} images/s")
        if args.device == "cuda":
            ms = gpu_side(build, req, model.cuda())
            print(f"- GPU, per batch of {args.micro_batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
        print()


if __name__ == "__main__":
    main()
