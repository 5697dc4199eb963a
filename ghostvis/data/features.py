"""Cached encoder features: what `data_prep/encode_features.py` records, and the check that they belong
to the model a run trains (docs/datasets.md, "Cached encoder features").

A shard directory with cached features carries, in its manifest.json, a `features` entry:

    {"encoder": "vit_so400m_patch14_siglip_384", "image_size": 384, "feature_layer": -2,
     "encoder_kwargs": {...}, "pad_to_square": true, "feature_shape": [729, 1152], "dtype": "float16",
     "weights": "<sha256 of the encoder weights>"}

and each sample `<key>.feat.npy` (image-text) or `<key>.<i>.feat.npy` (conversations) beside its images.
The weights fingerprint hashes the encoder's tensors rounded to bf16, so an fp32 encoder (data_prep) and
the same weights cast to bf16 by the training engine give the same fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
from torch import nn

from ghostvis.config import VisionConfig
from ghostvis.data.manifest import DataError
from ghostvis.data.request import EncoderSpec
from ghostvis.vision.encoder import VisionEncoder

FEATURES_KEY = "features"  # the manifest entry
FEATURE_DTYPE = "float16"
# settings that change the features: the same weights under another preprocessing give other features
_CONFIG_FIELDS = ("encoder", "image_size", "feature_layer", "encoder_kwargs", "pad_to_square")


def encoder_fingerprint(encoder: VisionEncoder) -> str:
    """sha256 over the encoder's tensor names, shapes and values (rounded to bf16). Gathers ZeRO-3
    partitioned parameters first (a collective: every data-parallel rank must call it)."""
    params = list(encoder.parameters())
    gather: Any = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    h = hashlib.sha256()
    with gather:
        for name, t in sorted(encoder.model.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}\n".encode())
            h.update(t.detach().to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def feature_config(vision_cfg: VisionConfig) -> dict[str, Any]:
    """The VisionConfig fields that change the features (what a cache is checked against)."""
    return {k: getattr(vision_cfg, k) for k in _CONFIG_FIELDS}


def feature_meta(vision_cfg: VisionConfig, encoder: VisionEncoder) -> dict[str, Any]:
    """The manifest's `features` entry for features made by `encoder` under `vision_cfg`."""
    return {**feature_config(vision_cfg),
            "feature_shape": [encoder.num_patches, encoder.dim], "dtype": FEATURE_DTYPE,
            "weights": encoder_fingerprint(encoder)}


def find_encoder(model: nn.Module) -> VisionEncoder | None:
    """The model's vision encoder (a VLM's `vision.encoder`, or a pipeline stage's); None on a pipeline
    stage that holds no vision tower."""
    return next((m for m in model.modules() if isinstance(m, VisionEncoder)), None)


def encoder_spec(model: nn.Module, cached_features: bool) -> EncoderSpec | None:
    """What `check_features` compares the cache with, read off the model (None without --cached-features).
    Refuses a text model and an encoder that trains. The fingerprint is a collective under ZeRO-3: every
    data-parallel rank calls this at the same point."""
    if not cached_features:
        return None
    vision_cfg = getattr(model, "vision_config", None)
    if vision_cfg is None:
        raise DataError("--cached-features needs a VLM (a vlm_* --model or a VLM --init-from)")
    encoder = find_encoder(model)
    if encoder is not None and not encoder.frozen:
        raise DataError("--cached-features stands for a frozen encoder, but this run trains it (--encoder-lr "
                        "given, or a --freeze list without 'encoder'): drop --encoder-lr / freeze the encoder, "
                        "or drop --cached-features")
    return EncoderSpec(feature_config(vision_cfg),
                       None if encoder is None else (encoder.num_patches, encoder.dim),
                       None if encoder is None else encoder_fingerprint(encoder))


def check_features(metas: dict[str, Any], spec: EncoderSpec) -> tuple[int, int]:
    """Refuse cached features that the model's encoder (`spec`) would not have produced (`metas`: shard
    directory -> its manifest's `features` entry); returns the feature shape (P, D)."""
    redo = ("re-encode with python -m data_prep.encode_features --ckpt <the --init-from export> (or --model "
            "<preset> --encoder-weights <file>), or drop --cached-features to read pixels")
    shapes = set()
    for where, meta in metas.items():
        if not isinstance(meta, dict) or "weights" not in meta:
            raise DataError(f"--cached-features: {where}/manifest.json has no '{FEATURES_KEY}' entry (no cached "
                            f"features there); {redo}")
        for k in _CONFIG_FIELDS:
            if meta.get(k) != spec.config[k]:
                raise DataError(f"--cached-features: {where} holds features for {k}={meta.get(k)!r}, the "
                                f"model's encoder has {k}={spec.config[k]!r}; {redo}")
        shape = tuple(meta.get("feature_shape", ()))
        if spec.feature_shape is not None and shape != spec.feature_shape:
            raise DataError(f"--cached-features: {where} holds features of shape {list(shape)}, the model's "
                            f"encoder makes {list(spec.feature_shape)}; {redo}")
        if spec.weights is not None and meta["weights"] != spec.weights:
            raise DataError(f"--cached-features: {where} was encoded with other encoder weights (fingerprint "
                            f"{meta['weights'][:12]}, the model's {spec.weights[:12]}); {redo}")
        shapes.add(shape)
    if len(shapes) != 1:
        raise DataError(f"--cached-features: the datasets hold features of different shapes {sorted(shapes)}")
    p, d = shapes.pop()
    return int(p), int(d)
