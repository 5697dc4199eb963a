"""Vision tower: timm encoder, resampler, projector, and image preprocessing."""

from ghostvis.vision.encoder import VisionEncoder
from ghostvis.vision.projector import MLPProjector
from ghostvis.vision.resampler import AvgPoolResampler, PerceiverResampler, PixelShuffleResampler, build_resampler
from ghostvis.vision.tower import VisionTower
from ghostvis.vision.transforms import BadImage, image_transform, load_image, preprocess

__all__ = [
    "AvgPoolResampler", "BadImage", "MLPProjector", "PerceiverResampler", "PixelShuffleResampler", "VisionEncoder",
    "VisionTower", "build_resampler", "image_transform", "load_image", "preprocess",
]
