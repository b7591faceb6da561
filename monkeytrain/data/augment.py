"""Batched augmentation on uint8 image tensors, on whatever device they sit.

Both data pipelines hand the training loop *stored views*: each image resized
(shorter side) and centre-cropped to a square of `stored_size(image_size)`
pixels, as uint8. Everything random happens here, batched, on the device:

- training: one affine warp per sample (random resized crop, rotation and a
  horizontal flip with chance `hflip`, composed into a single `affine_grid` + `grid_sample`), then
  brightness, contrast and saturation jitter, then normalisation, then (with
  `random_erasing`) timm's random erasing in its per-pixel noise mode;
- evaluation: the centre `image_size` crop, normalised; with test-time views
  (`EvalViews`), its mirror image and crops shifted a few pixels too.

So the GPU-resident and the streaming pipelines draw from exactly the same
augmentation distribution, and the same code is unit-tested on CPU tensors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from monkeytrain.data.views import CROP_PCT, centre_crop, stored_size
from monkeytrain.config import warn_from_the_first_process
from monkeytrain.errors import UserError

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
SIZE_STEP = 16  # progressive resizing moves in steps of this many pixels: few distinct shapes
ASPECT_RANGE = (3 / 4, 4 / 3)
# timm's RandomErasing defaults: a rectangle's area as a fraction of the image, its height / width (log-uniform),
# and how many (area, aspect) draws it tries, taking the first that fits inside the image, before erasing nothing.
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10


@dataclass(frozen=True)
class AugmentSettings:
    min_crop_scale: float = 0.35  # smallest crop area, as a fraction of the stored view
    rotation: float = 15.0        # degrees, either way
    color_jitter: float = 0.3     # brightness, contrast and saturation factors in 1 +- this
    hflip: float = 0.5            # the chance that an image is mirrored left to right; 0: none drawn
    random_erasing: float = 0.0   # the chance that an image gets one rectangle of noise; 0: none drawn


def random_affine(batch: int, settings: AugmentSettings, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """[batch, 2, 3] matrices mapping output to input coordinates (affine_grid's convention).

    Crop: area fraction uniform in [min_crop_scale, 1], aspect ratio log-uniform in
    [3/4, 4/3] (narrowed where a side would leave the view), position uniform where
    it fits. Rotation: uniform in +-rotation degrees, positive is counter-clockwise.
    Flip: with probability hflip (at 0 no number is drawn for it).
    """
    def uniform(low, high):
        return torch.rand(batch, generator=generator, device=device) * (high - low) + low

    area = uniform(settings.min_crop_scale, 1.0)
    aspect = torch.exp(uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    # Keep both sides within the view, so the crop keeps exactly the area drawn.
    aspect = torch.minimum(torch.maximum(aspect, area), 1 / area)
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()
    centre_x, centre_y = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
    # The same draw and comparison at 0.5 as before --hflip existed: a run's crops are bit for bit as they were.
    flip = torch.where(uniform(0, 1) < settings.hflip, -1.0, 1.0) if settings.hflip > 0 else torch.ones_like(area)
    angle = uniform(-1, 1) * math.radians(settings.rotation)
    cos, sin = angle.cos(), angle.sin()
    # theta = R @ [[f*w, 0, cx], [0, h, cy]]: crop (and flip) the output square, then
    # rotate about the image centre; with y pointing down, this R turns content anticlockwise.
    return torch.stack([
        torch.stack([cos * flip * width, -sin * height, cos * centre_x - sin * centre_y], dim=1),
        torch.stack([sin * flip * width, cos * height, sin * centre_x + cos * centre_y], dim=1),
    ], dim=1)


def warp(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample float images [B, 3, H, W] through per-sample affine maps to [B, 3, size, size]."""
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=None)
def per_channel(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a [1, C, 1, 1] tensor on `device`, made once: while a CUDA graph is being
    captured, nothing may be copied from the host, so the training step's constants must exist before."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def gray(images: torch.Tensor) -> torch.Tensor:
    weights = per_channel(GRAY_WEIGHTS, images.device, images.dtype)
    return (images * weights).sum(dim=1, keepdim=True)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, then saturation, each a per-sample factor in 1 +- strength."""
    factors = 1 + (torch.rand(3, images.shape[0], 1, 1, 1, generator=generator,
                              device=images.device) * 2 - 1) * strength
    images = (images * factors[0]).clamp(0, 1)
    mean_gray = gray(images).mean(dim=(2, 3), keepdim=True)
    images = ((images - mean_gray) * factors[1] + mean_gray).clamp(0, 1)
    per_pixel_gray = gray(images)
    return ((images - per_pixel_gray) * factors[2] + per_pixel_gray).clamp(0, 1)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    mean_t = per_channel(tuple(mean), images.device, images.dtype)
    std_t = per_channel(tuple(std), images.device, images.dtype)
    return ((images - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


def erasing_mask(batch: int, height: int, width: int, probability: float, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """[batch, 1, height, width], True inside each image's rectangle: timm's RandomErasing draws, batched.

    timm tries (area, aspect) pairs one by one, on the host, until one fits (sides shorter than the image's),
    at most ERASE_ATTEMPTS times. Here every image draws all its attempts at once and takes the first that fits
    (argmax returns the first of equal maxima); an image with none that fits, or not chosen (1 - probability),
    gets no rectangle, as in timm. So the distribution is timm's, with static shapes, no host sync and no loop
    over samples: what a CUDA graph can capture."""
    def uniform(low, high, *size):
        return torch.rand(*size, generator=generator, device=device) * (high - low) + low

    area = uniform(*ERASE_AREA, batch, ERASE_ATTEMPTS) * (height * width)
    aspect = torch.exp(uniform(math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]), batch, ERASE_ATTEMPTS))
    heights, widths = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # pixels, as timm rounds
    fits = (heights < height) & (widths < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    box_height, box_width = heights.gather(1, first), widths.gather(1, first)  # [batch, 1]
    chosen = (uniform(0, 1, batch, 1) < probability) & fits.any(dim=1, keepdim=True)
    # Top and left uniform over the positions that keep the rectangle inside (randint's inclusive range);
    # the clamp guards the float product's rounding up to the excluded end.
    top = torch.minimum((uniform(0, 1, batch, 1) * (height - box_height + 1)).floor(), height - box_height)
    left = torch.minimum((uniform(0, 1, batch, 1) * (width - box_width + 1)).floor(), width - box_width)
    rows = torch.arange(height, device=device, dtype=area.dtype).view(1, height, 1)
    columns = torch.arange(width, device=device, dtype=area.dtype).view(1, 1, width)
    inside = ((rows >= top.unsqueeze(2)) & (rows < (top + box_height).unsqueeze(2))
              & (columns >= left.unsqueeze(2)) & (columns < (left + box_width).unsqueeze(2)))
    return (inside & chosen.unsqueeze(2)).unsqueeze(1)


def random_erasing(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """timm's RandomErasing(probability, mode="pixel") of normalised images [B, C, H, W]: each image, with
    `probability`, gets one rectangle (see erasing_mask) of per-pixel standard normal noise. The noise is
    drawn for the whole batch (static shapes) and kept where the mask is set."""
    batch, _, height, width = images.shape
    mask = erasing_mask(batch, height, width, probability, generator, images.device)
    noise = torch.empty_like(images).normal_(generator=generator)  # empty_like keeps channels_last
    return torch.where(mask, noise, images)


def train_resolution(epoch: int, epochs: int, low: int, high: int, full_size_fraction: float) -> int:
    """The side of epoch `epoch`'s training crops (of `epochs`) under progressive resizing, as in
    MosaicML's and FFCV's ResNet recipes: `low` pixels at the start, growing linearly in steps of
    SIZE_STEP to `high` (the evaluation size), which the last `full_size_fraction` of the epochs train
    at. Early epochs then cost a fraction of the compute, and the model is tested at a size at least
    as large as its last training one. `low` 0 (or >= high): `high` throughout."""
    if not 0 < low < high:
        return high
    ramp_epochs = epochs * (1 - full_size_fraction)
    progress = min(1.0, (epoch - 1) / ramp_epochs) if ramp_epochs > 0 else 1.0
    size = low + (high - low) * progress
    return min(high, max(low, int(size // SIZE_STEP) * SIZE_STEP)) if progress < 1 else high


class Augmenter:
    """Turns uint8 stored-view batches into normalised model inputs, for training or evaluation.

    Training crops are `train_size` pixels square (the image size, unless the trainer sets a
    smaller one for progressive resizing); evaluation crops are always `image_size`."""

    def __init__(self, settings: AugmentSettings, image_size: int, mean: list[float], std: list[float],
                 generator: torch.Generator):
        self.settings, self.image_size, self.train_size = settings, image_size, image_size
        self.mean, self.std = mean, std
        self.generator = generator

    def train(self, views: torch.Tensor) -> torch.Tensor:
        images = views.float() / 255
        theta = random_affine(images.shape[0], self.settings, self.generator, images.device)
        images = warp(images, theta, self.train_size)
        images = color_jitter(images, self.settings.color_jitter, self.generator)
        images = normalize(images, self.mean, self.std)
        if self.settings.random_erasing > 0:  # off draws nothing: a run without it keeps its random numbers
            images = random_erasing(images, self.settings.random_erasing, self.generator)
        return images

    def eval(self, views: torch.Tensor) -> torch.Tensor:
        return normalize(centre_crop(views, self.image_size).float() / 255, self.mean, self.std)


class EvalViews:
    """The views of each image whose logits evaluation averages: the centre crop of its stored view;
    with `shift`, the crops `shift` pixels left, right, up and down of it (the stored view has a
    margin around the centre crop, so these are real pixels, not padding); with `flip`, the mirror
    image of each. `prepare` stacks them into one batch, so they take one forward pass; `averaged`
    wraps a model to give each image's mean logits over its views."""

    def __init__(self, image_size: int, mean: list[float], std: list[float], flip: bool, shift: int = 0):
        self.image_size, self.mean, self.std, self.flip = image_size, mean, std, flip
        margin = (stored_size(image_size) - image_size) // 2
        if shift > margin:
            raise UserError(f"--tta-shift {shift} reaches beyond the {margin}-pixel margin that "
                            f"{image_size}-pixel crops leave in their stored views; use at most {margin}.")
        self.offsets = [(0, 0)] + ([(0, -shift), (0, shift), (-shift, 0), (shift, 0)] if shift else [])
        self.count = len(self.offsets) * (2 if flip else 1)

    @classmethod
    def of_config(cls, config: dict, image_size: int, mean: list[float], std: list[float]) -> "EvalViews":
        """The views a run's config asks for (a checkpoint's config from before --tta-shift: no shifts)."""
        shift = shift_within_todays_margin(config.get("tta_shift", 0), image_size)
        return cls(image_size, mean, std, flip=bool(config.get("tta_flip")), shift=shift)

    def prepare(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 stored views [B, 3, S, S] -> normalised views [count * B, 3, size, size], view-major."""
        crops = [centre_crop(views, self.image_size, offset) for offset in self.offsets]
        crops += [crop.flip(dims=[3]) for crop in crops] if self.flip else []
        return normalize(torch.cat(crops).float() / 255, self.mean, self.std)

    def averaged(self, model: Callable) -> Callable:
        return lambda images: model(images).unflatten(0, (self.count, -1)).mean(dim=0)


def shift_within_todays_margin(shift: int, image_size: int) -> int:
    """A run or checkpoint made while stored views were rounded to the nearest pixel, not down as timm rounds
    them, may have the largest shift of its day, one pixel beyond today's margin (7 at 96 px, now 6): it gets
    today's margin, with a warning, rather than a refusal it has no flag to act on."""
    margin = (stored_size(image_size) - image_size) // 2
    margin_of_its_day = (int(round(image_size / CROP_PCT)) - image_size) // 2
    if margin < shift <= margin_of_its_day:
        warn_from_the_first_process(
            f"--tta-shift {shift}, the largest for {image_size}-pixel crops when this run began, is beyond the "
            f"{margin}-pixel margin their stored views now leave (framed as timm frames them): its test-time views "
            f"move {margin} pixels instead.")
        return margin
    return shift
