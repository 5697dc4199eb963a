"""Vision-alignment throughput vs text-only training of the same LLM, in one run.

Three timed loops at the same LLM tokens per step (batch x seq_len):
  text       base training: every LLM weight trainable (AdamW), no images;
  live       vision_pretrain: frozen encoder (bf16, no_grad) -> projector -> perceiver (trainable: Idefics2's
             connector) -> frozen LLM (no weight grads; activation grads flow back to the connector);
  cached     vision_pretrain from cached encoder features (the encoder is skipped).
Each sample holds `num_vision_tokens` image positions plus text, so tokens/s compare like for like.
Inputs are tensors already on the device (learnable token rows from bench/learning.py, random pixels):
this measures the model, not the data loader (bench/pipeline.py measures the whole trainer).

Learning is checked on the same steps (bench/learning.py): every mode's loss must fall (5% for text,
1% for the connector-only modes, whose frozen LLM limits how far a caption's loss can move), the vision
modes start from the same connector weights, and cached must track live. A mode that fails prints
FAILED and its row says FAILED in place of its numbers.

    python bench/vision_throughput.py                 # H100: CLIP ViT-L/14-336 + qwen25_0.5b shape
    python bench/vision_throughput.py --smoke         # CPU: tiny shapes, checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import time
from pathlib import Path
from collections.abc import Callable

import torch
from tqdm import tqdm

from ghostvis.config import VisionConfig, get_preset
from ghostvis.model.vlm import VLM
from learning import check_learning, learnable_batches

RESULTS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", default="qwen25_0.5b", help="LLM preset (ghostvis.config.get_preset)")
    p.add_argument("--encoder", default="vit_large_patch14_clip_336", help="timm encoder name")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--vision-tokens", type=int, default=64)
    p.add_argument("--resampler-depth", type=int, default=2)
    p.add_argument("--resampler-heads", type=int, default=16)
    p.add_argument("--projector-hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64, help="images (= samples) per step")
    p.add_argument("--seq-len", type=int, default=128, help="LLM positions per sample, vision tokens included")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the text mode's LLM")
    p.add_argument("--vision-lr", type=float, default=1e-3, help="AdamW learning rate of the connector")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--no-record", action="store_true", help=f"do not append the results to {RESULTS.name}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 2 steps, nothing recorded")
    args = p.parse_args()
    if args.smoke:
        args.llm, args.encoder, args.image_size = "vlm_tiny", "vit_tiny_patch16_224", 64
        args.vision_tokens, args.resampler_heads, args.projector_hidden = 16, 4, 128
        args.batch, args.seq_len, args.steps, args.warmup, args.no_record = 4, 48, 6, 2, True
        args.lr, args.vision_lr = 3e-3, 1e-2
    if args.seq_len <= args.vision_tokens:
        p.error(f"--seq-len {args.seq_len} must exceed --vision-tokens {args.vision_tokens} (room for caption text)")
    return args


def build(args: argparse.Namespace, device: torch.device) -> VLM:
    model_cfg, _ = get_preset(args.llm)
    model_cfg = dataclasses.replace(model_cfg, image_token_id=model_cfg.vocab_size - 1,
                                    max_seq_len=max(args.seq_len, 64))
    encoder_kwargs = {"depth": 2, "patch_size": 8} if args.smoke else {}
    vision_cfg = VisionConfig(
        encoder=args.encoder, image_size=args.image_size, encoder_kwargs=encoder_kwargs, resampler="perceiver",
        num_vision_tokens=args.vision_tokens, resampler_depth=args.resampler_depth,
        resampler_heads=args.resampler_heads, projector_hidden=args.projector_hidden,
    )
    vlm = VLM(model_cfg, vision_cfg).to(device)
    if device.type == "cuda":
        vlm.vision.encoder.to(torch.bfloat16)  # frozen: no master weights needed, halves its memory traffic
    if args.compile:
        for block in [*vlm.llm.blocks, *vlm.vision.encoder.model.blocks]:
            block.compile()
    return vlm


def time_steps(name: str, step: Callable[[], float], args: argparse.Namespace) -> tuple[float, list[float]]:
    """(seconds per step averaged over the timed steps after warm-up, every step's loss). Each step
    reads its loss back, so the device has finished it."""
    losses = [step() for _ in range(args.warmup)]
    start = time.perf_counter()
    losses += [step() for _ in tqdm(range(args.steps), desc=name, leave=False)]
    return (time.perf_counter() - start) / args.steps, losses


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    vlm = build(args, device)
    cfg, n_vis = vlm.config, vlm.num_vision_tokens
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    fused = {"fused": True} if device.type == "cuda" else {}

    idx, targets = next(learnable_batches(cfg.vocab_size - 1, args.batch, args.seq_len, device))
    image_idx, image_targets = idx.clone(), targets.clone()
    image_idx[:, 1:1 + n_vis] = cfg.image_token_id  # BOS, image, caption: loss falls on the caption only
    image_targets[:, :1 + n_vis] = -1
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        features = vlm.vision.encode(pixels)  # what data_prep would have cached

    def make_step(trainable: list[torch.nn.Parameter], lr: float, forward: Callable[[], torch.Tensor]) -> Callable[[], float]:
        opt = torch.optim.AdamW(trainable, lr=lr, **fused)

        def step() -> float:
            with autocast:
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    vlm.train()
    vlm.requires_grad_(False)
    vlm.llm.requires_grad_(True)
    text_step = make_step(list(vlm.llm.parameters()), args.lr, lambda: vlm(idx, targets))
    sec, checks = {}, {}
    sec["text"], losses = time_steps("text (LLM trainable)", text_step, args)
    checks["text"] = check_learning(losses)
    del text_step  # frees the LLM's AdamW state before the vision runs

    vlm.llm.requires_grad_(False)
    vlm.vision.resampler.requires_grad_(True)
    vlm.vision.projector.requires_grad_(True)
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]  # both vision modes train from these weights
    sec["live"], live = time_steps("vision, live encoder", make_step(
        trainable, args.vision_lr, lambda: vlm(image_idx, image_targets, pixel_values=pixels)), args)
    checks["live"] = check_learning(live, min_drop=0.01)
    with torch.no_grad():
        for p, p0 in zip(trainable, start):
            p.copy_(p0)
    sec["cached"], cached = time_steps("vision, cached features", make_step(
        trainable, args.vision_lr, lambda: vlm(image_idx, image_targets, image_features=features)), args)
    checks["cached"] = check_learning(cached, live, min_drop=0.01)
    for mode, verdict in checks.items():
        print(f"{mode}: {'ok' if verdict.ok else 'FAILED learning check'}: {verdict.message}")

    tokens = args.batch * args.seq_len
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [(mode, args.batch / s if mode != "text" else None, tokens / s, tokens / s / (tokens / sec["text"]),
             checks[mode]) for mode, s in sec.items()]
    lines = [
        f"### vision_pretrain throughput — {datetime.date.today()} — {card}",
        "",
        f"LLM `{args.llm}` ({vlm.llm.num_params() / 1e6:.1f}M non-embedding), encoder `{args.encoder}` @ "
        f"{args.image_size}px ({sum(p.numel() for p in vlm.vision.encoder.parameters()) / 1e6:.1f}M, frozen, "
        f"{'bf16' if device.type == 'cuda' else 'fp32'}, no_grad), perceiver {n_vis} tokens; batch {args.batch} x seq {args.seq_len} = {tokens} tokens/step; "
        f"compile={args.compile}; torch {torch.__version__}; `python bench/vision_throughput.py`",
        "",
        "| mode | images/s | tokens/s | × text-only tokens/s | learning |",
        "| --- | ---: | ---: | ---: | --- |",
        *(f"| {mode} | {'-' if ips is None else f'{ips:,.0f}'} | {tps:,.0f} | {ratio:.2f} | {v.message} |" if v.ok
          else f"| {mode} | FAILED | | | {v.message} |" for mode, ips, tps, ratio, v in rows),
        "",
    ]
    print("\n".join(lines))
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
