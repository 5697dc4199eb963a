"""`DataRequest`: what the training loop asks a data builder for. Plain values only: the data layer never
sees the model; the loop reads what the batches depend on (vision tokens per image, the encoder's image
preprocessing, the cached-features check) off the model once and passes it down."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ghostvis.tokenizer import Tokenizer


@dataclass(frozen=True)
class EncoderSpec:
    """What cached encoder features must match (ghostvis/data/features.py): the VisionConfig fields that
    change features, and, where this rank holds the (frozen) encoder, its feature shape and weights
    fingerprint."""

    config: dict[str, Any]
    feature_shape: tuple[int, int] | None
    weights: str | None


@dataclass
class DataRequest:
    """What a data builder is asked for: `split` is "train" or "val" (subdirectories of `data_dir`)."""

    data_dir: Path
    split: str
    seq_len: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    tokenizer: Tokenizer
    device: torch.device
    eval_mode: bool
    num_vision_tokens: int = 0  # <|image|> ids each image expands to (inside image_frame's); 0 = a text-only model
    image_frame: str = "none"  # VisionConfig.image_frame: the special tokens around each image's ids
    transform: Callable[[Any], torch.Tensor] | None = None  # image -> the encoder's uint8 pixels; None: no tower
    llm_trains: bool = True  # some LLM weight trains (text-only rows in a vision mixture need one)
    cached_features: bool = False  # --cached-features: read data_prep's encoder features, not pixels
    encoder: EncoderSpec | None = None  # with cached_features: what the cache must match
    max_corrupt_fraction: float = 0.01  # --max-corrupt-fraction: corrupt samples a stream tolerates
    pack: bool = False  # --pack: several samples per row (ghostvis/data/packing.py)
    pack_images: int = 0  # --pack-images: the most images a packed row holds (0 = no bound)
    length_group: int = 1  # --length-group: sft batches cut from one length-sorted group (1 = none)
    share: int = 0  # which --data-workers share of this rank's samples (ghostvis/data/loader.py)

    @property
    def draw_seed(self) -> int | str:
        """The seed of this reader's own draws: which dataset of a mixture comes next, and the order of a
        length group's or packing window's batches. The shards' order stays `seed`'s: readers interleave one
        common order. Each worker share draws on its own, because the loop takes the shares in turn: with
        one seed, N workers picked the same kind of batch at the same time, so training saw runs of N steps
        of one kind (N text batches in a row, N packed batches of one caption length). Data-parallel ranks
        keep one draw, so every rank's batch of a step is of the same kind (a text-only batch runs no
        vision tower, which ZeRO-3 needs on every rank or none). Share 0 keeps `seed`: a run without
        workers draws as share 0 of a run with them."""
        return self.seed if self.share == 0 else f"{self.seed}:share{self.share}"
