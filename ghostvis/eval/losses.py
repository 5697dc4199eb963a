"""Held-out losses: caption loss on image-text shards, bits per byte on text-token shards.

Both read one split once, in manifest order, and sum per-token losses (nats) over every counted target,
so the result does not depend on the batch size:

    caption loss = sum(nats over caption tokens) / caption tokens          (the vision_pretrain objective)
    text bpb     = sum(nats over targets) / (ln 2 * sum(bytes of targets))  (tokenizer-independent)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ghostvis.data.multimodal import CaptionBatches
from ghostvis.data.shards import ShardStream
from ghostvis.data.text import TokenRowLoader, bpb_sums, token_bytes
from ghostvis.eval.vqa import check_model
from ghostvis.infer.engine import evaluating
from ghostvis.tokenizer import Tokenizer
from ghostvis.vision.transforms import image_transform


def _batches_for(max_samples: int | None, batch_size: int) -> int | None:
    return None if max_samples is None else max(1, math.ceil(max_samples / batch_size))


def _rows_left(max_samples: int | None, seen: int, rows: int) -> int:
    """How many of a batch's `rows` to score so that exactly `max_samples` are scored in all."""
    return rows if max_samples is None else min(rows, max_samples - seen)


@torch.no_grad()
def caption_loss(model: torch.nn.Module, tokenizer: Tokenizer, data_dir: str | Path, *,
                 max_samples: int | None = None, batch_size: int = 32, device: str | torch.device = "cpu",
                 progress: bool = True) -> dict[str, Any]:
    """Mean caption-token loss (nats) of a VLM on image-text shards laid out as vision_pretrain trains:
    `<|bos|> <|image|>×n caption`. Returns {"loss", "tokens", "samples", "skipped"}."""
    check_model(model, True, f"{data_dir} (image-text shards)")
    stream = ShardStream(data_dir, seed=0, loop=False, shuffle=False, expected_kind="image-text",
                         max_corrupt_fraction=0.05)
    batches = CaptionBatches(stream, tokenizer, batch_size=batch_size, max_len=model.config.max_seq_len,
                             num_vision_tokens=model.num_vision_tokens, image_frame=model.vision_config.image_frame,
                             transform=image_transform(model.vision_config), device=device)
    nats, tokens, samples = 0.0, 0, 0
    limit = _batches_for(max_samples, batch_size)
    with evaluating(model):
        for i, batch in enumerate(tqdm(batches, total=limit, desc="caption loss", leave=False,
                                       disable=not progress)):
            if limit is not None and i >= limit:
                break
            k = _rows_left(max_samples, samples, batch["input_ids"].shape[0])  # one image a caption row
            ids, targets, pixels = batch["input_ids"][:k], batch["targets"][:k], batch["pixel_values"][:k]
            nats += model(ids, targets, pixel_values=pixels, reduction="sum").item()
            tokens += int((targets != -1).sum())
            samples += k
    if tokens == 0:
        raise ValueError(f"{data_dir}: no usable captions ({stream.stats['corrupt']} unusable samples)")
    return {"loss": nats / tokens, "tokens": tokens, "samples": samples, "skipped": stream.stats["corrupt"]}


@torch.no_grad()
def text_bpb(model: torch.nn.Module, tokenizer: Tokenizer, data_dir: str | Path, *, seq_len: int | None = None,
             max_samples: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Bits per byte of the language model on text-token shards (made with this tokenizer), in rows of
    `seq_len` tokens (default: the model's context); `max_samples` counts rows.
    Returns {"bpb", "tokens", "bytes", "rows"}."""
    llm = getattr(model, "llm", model)  # a VLM's language model reads text without images
    seq_len = seq_len or llm.config.max_seq_len
    loader = TokenRowLoader(data_dir, seq_len=seq_len, batch_size=batch_size, tokenizer=tokenizer, device=device,
                            eval_mode=True)
    byte_counts = token_bytes(tokenizer).to(device)
    nats, nbytes, tokens, rows = 0.0, 0, 0, 0
    limit = _batches_for(max_samples, batch_size)
    with evaluating(model):
        for i, (idx, targets) in enumerate(tqdm(loader, total=limit, desc="text bpb", leave=False,
                                                disable=not progress)):
            if limit is not None and i >= limit:
                break
            k = _rows_left(max_samples, i * batch_size, idx.shape[0])
            idx, targets = idx[:k], targets[:k]
            batch_nats, batch_bytes = bpb_sums(llm(idx, targets, reduction="none"), targets, byte_counts).tolist()
            nats += batch_nats
            nbytes += int(batch_bytes)
            counted = targets >= 0
            tokens += int(counted.sum())
            rows += int(counted.any(dim=1).sum())
    if nbytes == 0:
        raise ValueError(f"{data_dir}: no text to evaluate (no target tokens with bytes)")
    return {"bpb": nats / (math.log(2) * nbytes), "tokens": tokens, "bytes": nbytes, "rows": rows}
