"""Image decoding and preprocessing for the vision tower.

`load_image` turns raw bytes from a shard into an 8-bit RGB PIL image or raises `BadImage` (loaders
catch it and count a skip). `image_transform` builds the PIL -> uint8 tensor transform at the encoder's
resolution with its timm interpolation, optionally padding to a square first so nothing is cropped.

Normalisation (/255, mean, std from the timm data config) is not done here but by the encoder itself on
uint8 input (`normalize_pixels`): data workers then ship 1 byte per value instead of 4 and the
arithmetic runs on the accelerator. Already-normalised float pixels are taken as they are.
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable

import numpy as np
import timm.data
import timm.models
import torch
from PIL import Image, ImageOps
from timm.data.transforms import str_to_pil_interp

from ghostvis.config import VisionConfig

# Decoding a 30k x 30k image needs ~2.7 GB; 64 MP covers any real photo and bounds memory per worker.
DEFAULT_MAX_PIXELS = 64_000_000


class BadImage(ValueError):
    """An image that cannot be used; `reason` says why (loaders count skips by it)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB image: alpha is composited on white, palette/CMYK/grayscale/16-bit
    are converted, EXIF rotation applied. Raises `BadImage` for corrupt, truncated or oversized input."""
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between MAX_IMAGE_PIXELS and 2x; our explicit limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # header only: checked before any pixel is decoded
            if width <= 0 or height <= 0:
                raise BadImage(f"empty image ({width}x{height})")
            if width * height > max_pixels:
                raise BadImage(f"too large: {width}x{height} = {width * height} pixels > limit {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError, EOFError) as e:
        # PIL reports truncated/corrupt data as OSError ("image file is truncated"), SyntaxError or ValueError
        raise BadImage(f"corrupt or truncated image: {type(e).__name__}: {e}") from e
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _high_depth_to_rgb(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale -> 8-bit. PIL's own convert clips at 255 (a white image), so rescale."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    else:
        arr = arr / 257.0  # 16-bit range (PIL stores 16-bit PNGs as I;16 or I) onto 0..255
    gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")


def data_config(vision_cfg: VisionConfig) -> dict[str, Any]:
    """The encoder's preprocessing (mean, std, interpolation) from timm's pretrained config, at
    `vision_cfg.image_size`; no model is built and nothing is downloaded."""
    pretrained_cfg = timm.models.get_pretrained_cfg(vision_cfg.encoder)
    if pretrained_cfg is None:
        raise ValueError(
            f"vision encoder {vision_cfg.encoder!r} is not a timm model name (see timm.list_models()); "
            "set VisionConfig.encoder to one"
        )
    size = vision_cfg.image_size
    return timm.data.resolve_data_config({"input_size": (3, size, size)}, pretrained_cfg=pretrained_cfg.to_dict())


class PadToSquare:
    """Pad the shorter side symmetrically with `fill` (the mean colour, as LLaVA does) so resizing
    to a square keeps the aspect ratio and crops nothing."""

    def __init__(self, fill: tuple[int, int, int]):
        self.fill = fill

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = img.size
        if width == height:
            return img
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(img, ((side - width) // 2, (side - height) // 2))
        return canvas

    def __repr__(self) -> str:
        return f"PadToSquare(fill={self.fill})"


class ToPixels:
    """RGB PIL image -> uint8 tensor [3, size, size]: optional pad to square, then a squash resize (none
    when the image already has the size). Picklable, for data loader workers."""

    def __init__(self, size: int, interpolation: str, pad_fill: tuple[int, int, int] | None) -> None:
        self.size, self.interpolation = size, interpolation
        self.pad = PadToSquare(pad_fill) if pad_fill is not None else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.pad is not None:
            img = self.pad(img)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), str_to_pil_interp(self.interpolation))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"ToPixels(size={self.size}, interpolation={self.interpolation!r}, pad={self.pad})"


def image_transform(vision_cfg: VisionConfig) -> ToPixels:
    """RGB PIL image -> uint8 tensor [3, image_size, image_size] (the encoder normalises it). Never
    center-crops: a VLM must see the whole image (objects at the border count). Without `pad_to_square`
    it squashes."""
    cfg = data_config(vision_cfg)
    fill = tuple(int(round(255 * m)) for m in cfg["mean"]) if vision_cfg.pad_to_square else None
    return ToPixels(vision_cfg.image_size, cfg["interpolation"], fill)


def normalize_pixels(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 pixels [N, 3, H, W] -> float32 (x / 255 - mean) / std, on the pixels' device."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(pixels.device, non_blocking=True)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(pixels.device, non_blocking=True)
    return (pixels.float().div_(255.0) - m).div_(s)


def preprocess(data: bytes, transform: Callable[[Image.Image], torch.Tensor], *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Bytes -> model-ready tensor (uint8 pixels from `image_transform`); raises `BadImage` for unusable input."""
    return transform(load_image(data, max_pixels=max_pixels))


__all__ = ["BadImage", "DEFAULT_MAX_PIXELS", "PadToSquare", "ToPixels", "data_config", "image_transform", "load_image",
           "normalize_pixels", "preprocess"]
