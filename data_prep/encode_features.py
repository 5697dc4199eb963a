"""Cache a frozen vision encoder's features beside the images (docs/datasets.md, "Cached encoder features").

    python -m data_prep.encode_features --data data/synth/captions --ckpt runs/base_vlm --out data/captions_feat
    python -m data_prep.encode_features --data DIR --model vlm_1.5b --encoder-weights siglip.safetensors --out OUT

--data is a shard directory (with manifest.json) or a dataset directory whose subdirectories are
(train/, val/, ...); OUT mirrors it. Every sample is copied with all its members, plus the encoder's patch
features per image as float16 `.npy`: `<key>.feat.npy` (image-text) or `<key>.<i>.feat.npy`
(conversations). Images go through exactly the tower's preprocessing (`image_transform`) and
`VisionTower.encode` (bf16 autocast on GPU). The manifest's `features` entry records the encoder, its
settings, the feature shape and a fingerprint of its weights, which `launch/train.py --cached-features`
checks against the model it trains.

A sample with a corrupt image (or a conversation the batchers would refuse) is skipped and listed in OUT/<split>/skipped.jsonl. Resumable: a finished
shard is recorded in .progress/ and kept by a re-run with the same input shard and encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from data_prep.image_shards import _finish, _load_record, _save_record, tar_samples
from ghostvis import checkpoint_io
from ghostvis.cli import console_script
from ghostvis.config import get_preset
from ghostvis.data.features import FEATURES_KEY, feature_meta
from ghostvis.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from ghostvis.data.multimodal import IMAGE_EXTS, Unusable, read_conversation
from ghostvis.vision.tower import VisionTower
from ghostvis.vision.transforms import BadImage, image_transform, load_image

Sample = dict[str, Any]


def load_tower(model: str | None, ckpt: str | None, encoder_weights: str | None) -> VisionTower:
    """The frozen vision tower of a preset (weights from --encoder-weights) or of an export (--ckpt)."""
    if ckpt:
        model_cfg, vision_cfg, _ = checkpoint_io.read_config(ckpt)
        weights = Path(ckpt) / checkpoint_io.VISION_FILE
        if vision_cfg is None or not weights.is_file():
            raise SystemExit(f"--ckpt {ckpt}: not a VLM export (no vision config or {checkpoint_io.VISION_FILE}); "
                             "use --model <vlm preset> --encoder-weights <file>")
    else:
        model_cfg, vision_cfg = get_preset(model or "")
        if vision_cfg is None:
            raise SystemExit(f"--model {model}: not a VLM preset; pick a vlm_* preset")
        if not encoder_weights:
            print("warning: no --encoder-weights: caching a randomly initialised encoder (useful for timing only)")
    tower = VisionTower(vision_cfg, model_cfg)
    if ckpt:
        checkpoint_io.load_weights(tower, weights)
    elif encoder_weights:
        checkpoint_io.load_encoder_weights(tower.encoder, encoder_weights)
    return tower.eval()


def image_stems(sample: Sample, kind: str) -> list[tuple[str, str]]:
    """(features member, image member) per image of a sample, in image order."""
    if kind == "image-text":
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        return [] if ext is None else [("feat.npy", ext)]
    _, keys = read_conversation(sample)  # Unusable for what the batchers would skip anyway
    return [(f"{i}.feat.npy", k) for i, k in enumerate(keys)]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class ShardEncoder:
    """Copies one shard's samples, adding features; images are encoded `batch_size` at a time."""

    def __init__(self, tower: VisionTower, transform: Callable, kind: str, batch_size: int, device: torch.device):
        self.tower, self.transform, self.kind = tower, transform, kind
        self.batch_size, self.device = batch_size, device

    def __call__(self, src: Path, dst: Path, bar: tqdm) -> dict[str, Any]:
        record: dict[str, Any] = {"samples": 0, "skipped": []}
        pending: list[tuple[Sample, list[str]]] = []  # samples waiting for their images' features
        images: list[torch.Tensor] = []
        tmp = dst.with_name(f".{dst.name}.tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=0, user="ghostvis", group="ghostvis") as w:
            for key, members in tar_samples(src):
                bar.update(1)
                # features cached for another encoder are replaced, never kept beside the new ones
                sample = {"__key__": key, **{k: v for k, v in members.items() if not k.endswith("feat.npy")}}
                try:
                    stems = image_stems(sample, self.kind)
                    tensors = [self.transform(load_image(sample[img])) for _, img in stems]
                except (BadImage, Unusable) as e:
                    reason = f"bad image: {e.reason}" if isinstance(e, BadImage) else str(e)
                    record["skipped"].append({"key": key, "source": src.name, "reason": reason})
                    continue
                pending.append((sample, [f for f, _ in stems]))
                images += tensors
                if len(images) >= self.batch_size:
                    record["samples"] += self._flush(w, pending, images)
                    pending, images = [], []
            record["samples"] += self._flush(w, pending, images)
        os.replace(tmp, dst)
        return record

    @torch.no_grad()
    def _flush(self, w: wds.TarWriter, pending: list[tuple[Sample, list[str]]], images: list[torch.Tensor]) -> int:
        feats = iter([])
        if images:
            pixels = torch.stack(images).to(self.device, non_blocking=True)
            out = torch.cat([self.tower.encode(chunk) for chunk in pixels.split(self.batch_size)])
            feats = iter(out.to(torch.float16).cpu().numpy())
        for sample, names in pending:
            w.write({**sample, **{name: _npy(next(feats)) for name in names}})
        return len(pending)


def shard_dirs(data: Path) -> list[Path]:
    """Shard directories under --data (relative): itself, or its subdirectories holding a manifest."""
    if (data / MANIFEST_NAME).is_file():
        return [Path(".")]
    found = sorted(d.relative_to(data) for d in data.iterdir() if (d / MANIFEST_NAME).is_file())
    if not found:
        raise SystemExit(f"--data {data}: no {MANIFEST_NAME} there or in its subdirectories; point it at a shard "
                         "directory (or a dataset with train/, val/) made by data_prep (a mixture.json: encode "
                         "each of its datasets)")
    return found


def encode_dir(src: Path, out: Path, tower: VisionTower, *, batch_size: int, device: torch.device) -> Manifest:
    """Encode one shard directory into `out` (resumable), and write its manifest with the features entry."""
    manifest = read_manifest(src)
    if manifest.kind not in ("image-text", "conversation"):
        raise SystemExit(f"{src}: kind {manifest.kind!r} has no images; cached features need image-text or "
                         "conversation shards")
    out.mkdir(parents=True, exist_ok=True)
    meta = feature_meta(tower.config, tower.encoder)
    encode = ShardEncoder(tower, image_transform(tower.config), manifest.kind, batch_size, device)
    records = []
    with tqdm(total=manifest.num_samples, desc=f"encoding -> {out}", unit="sample") as bar:
        for shard in manifest.shards:
            stamp = json.dumps([meta, shard.name, (src / shard.name).stat().st_size], sort_keys=True)
            fingerprint = hashlib.sha256(stamp.encode()).hexdigest()
            record = _load_record(out, shard.name, fingerprint)
            if record is None:
                record = {"fingerprint": fingerprint, **encode(src / shard.name, out / shard.name, bar)}
                _save_record(out, shard.name, record)  # last: a shard without its record is redone
            else:
                bar.update(shard.samples)
            records.append((shard.name, record))
    extra = {k: v for k, v in manifest.extra.items() if k != "skipped"}
    return _finish(out, manifest.kind, records, {**extra, FEATURES_KEY: meta})


def main(argv: list[str] | None = None) -> list[Manifest]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="shard directory, or a dataset with train/, val/, ...")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="VLM preset whose encoder to run (ghostvis/config.py), e.g. vlm_1.5b")
    src.add_argument("--ckpt", help="VLM export directory (the --init-from of the run that will read the features)")
    p.add_argument("--encoder-weights", default=None,
                   help="with --model: local timm .safetensors or Hugging Face SigLIP/CLIP folder")
    p.add_argument("--out", type=Path, required=True, help="output directory (mirrors --data)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.ckpt and a.encoder_weights:
        p.error("--encoder-weights goes with --model; an export (--ckpt) brings its own encoder weights")
    if a.batch_size < 1:
        p.error(f"--batch-size {a.batch_size}: must be >= 1")
    if not a.data.is_dir():
        p.error(f"--data {a.data}: no such directory")
    if a.out.resolve() == a.data.resolve():
        p.error("--out must differ from --data (the input shards are read while the new ones are written)")
    device = torch.device(a.device)
    tower = load_tower(a.model, a.ckpt, a.encoder_weights).to(device)
    return [encode_dir(a.data / d, a.out / d, tower, batch_size=a.batch_size, device=device)
            for d in shard_dirs(a.data)]


cli = console_script(main, exit_status=False)

if __name__ == "__main__":
    cli()
