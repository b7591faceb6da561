"""Image transforms: training augmentation, evaluation geometry, and the stats view."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

# Evaluation resizes the shorter side to size / CROP_PCT, then centre-crops
# `size`: the usual ImageNet framing, recorded in timm's config.json too.
CROP_PCT = 0.875


def eval_geometry(image_size: int) -> list:
    return [
        v2.Resize(int(round(image_size / CROP_PCT)), antialias=True),
        v2.CenterCrop(image_size),
    ]


def to_normalized_tensor(mean: list[float], std: list[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(
    image_size: int, mean: list[float], std: list[float],
    min_crop_scale: float, rotation: float, color_jitter: float,
) -> v2.Compose:
    """Rotation, random resized crop, horizontal flip and colour jitter, then normalise.

    Rotating before cropping lets the crop trim most of the corners the
    rotation leaves empty.
    """
    return v2.Compose([
        v2.RandomRotation(rotation),
        v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter),
        *to_normalized_tensor(mean, std),
    ])


def eval_transform(image_size: int, mean: list[float], std: list[float]) -> v2.Compose:
    """Resize and centre crop, then normalise: what validation, test and predict see."""
    return v2.Compose([*eval_geometry(image_size), *to_normalized_tensor(mean, std)])


def stats_transform(image_size: int) -> v2.Compose:
    """The evaluation framing as uint8 pixels, for computing channel statistics."""
    return v2.Compose([*eval_geometry(image_size), v2.PILToTensor()])
