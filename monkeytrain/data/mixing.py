"""Per-sample MixUp and CutMix on a batch already on the training device.

- MixUp blends two images pixel by pixel, lam * x_i + (1 - lam) * x_j, and their targets alike.
- CutMix pastes a box of x_j into x_i and weighs the targets by the area each image keeps.

Each sample i is paired with sample B-1-i (the batch flipped) and draws its own "mixed or not",
"CutMix or MixUp" and ratio lam, as timm's `Mixup` (timm.data.Mixup) does in its "elem" mode: a
batch carries every mixing strength at once, and no permutation is needed. The semantics are
timm's, including CutMix's box and its lam correction to the clipped box area.

The difference is where the randomness lives. timm draws on the host with numpy and loops over
samples; here every number comes from the run's `torch.Generator`, on the device, in tensors of
fixed shape, with no `.item()` and no Python branch on a tensor value. So a seeded run is
reproducible, the global RNG is untouched, and `mix` can later sit inside a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Gamma candidates per draw. Marsaglia-Tsang accepts at least 95% of candidates for every shape
# >= 1 (the worst is shape 1), so all CANDIDATES are rejected with probability < 0.05 ** 8 ~ 4e-11.
CANDIDATES = 8


@dataclass(frozen=True)
class MixSettings:
    """What to mix (config.py checks the ranges, as for every flag)."""

    mixup_alpha: float = 0.0         # Beta(alpha, alpha) for the MixUp ratio; 0 disables MixUp
    cutmix_alpha: float = 0.0        # Beta(alpha, alpha) for the CutMix ratio; 0 disables CutMix
    probability: float = 1.0         # chance that a sample is mixed at all
    switch_probability: float = 0.5  # with both on: chance a mixed sample uses CutMix rather than MixUp

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.probability > 0


def sample_log_gamma(shape: float, size: tuple[int, ...], generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """log of Gamma(shape, 1) draws of this size, by Marsaglia-Tsang with a fixed candidate count.

    Logs, because for shape < 1 the boost u ** (1 / shape) underflows float32 (shape 0.05: u ** 20),
    and a Beta from two zero Gammas would be 0 / 0.
    """
    boosted = shape + 1 if shape < 1 else shape  # Gamma(a) = Gamma(a + 1) * u ** (1 / a)
    d = boosted - 1 / 3
    c = (9 * d) ** -0.5
    x = torch.randn((CANDIDATES, *size), generator=generator, device=device)
    # 1 - rand lies in (0, 1]: its log is finite
    log_u = torch.log1p(-torch.rand((CANDIDATES, *size), generator=generator, device=device))
    v = (1 + c * x) ** 3
    log_v = v.clamp_min(torch.finfo(v.dtype).tiny).log()
    accepted = (v > 0) & (log_u < x * x / 2 + d - d * v + d * log_v)
    first = accepted.to(torch.uint8).argmax(dim=0, keepdim=True)  # the first accepted candidate
    log_gamma = (math.log(d) + log_v).gather(0, first).squeeze(0)
    # All rejected (see CANDIDATES): fall back to the mean, log(boosted).
    log_gamma = torch.where(accepted.any(dim=0), log_gamma, torch.full_like(log_gamma, math.log(boosted)))
    if shape < 1:
        log_gamma = log_gamma + torch.log1p(-torch.rand(size, generator=generator, device=device)) / shape
    return log_gamma


def sample_beta(alpha: float, count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """count draws of Beta(alpha, alpha), float32, from generator only.

    Beta(a, a) = G1 / (G1 + G2) for independent Gamma(a) draws, computed as sigmoid(log G1 - log G2)
    so that tiny Gammas (small alpha) neither underflow nor divide 0 by 0.
    """
    if alpha <= 0:
        raise ValueError(f"Beta needs alpha > 0, got {alpha}")
    log_gamma = sample_log_gamma(alpha, (2, count), generator, device)
    return torch.sigmoid(log_gamma[0] - log_gamma[1])


def draw_ratios(batch: int, settings: MixSettings, generator: torch.Generator,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: lam (1 where the sample is not mixed) and whether it uses CutMix.

    The branches read settings only, never tensors, so the draws have the same shapes every step.
    """
    if settings.mixup_alpha > 0 and settings.cutmix_alpha > 0:
        use_cutmix = torch.rand(batch, generator=generator, device=device) < settings.switch_probability
        lam = torch.where(use_cutmix, sample_beta(settings.cutmix_alpha, batch, generator, device),
                          sample_beta(settings.mixup_alpha, batch, generator, device))
    else:
        alpha = max(settings.mixup_alpha, settings.cutmix_alpha)
        use_cutmix = torch.full((batch,), settings.cutmix_alpha > 0, device=device)
        lam = sample_beta(alpha, batch, generator, device)
    mixed = torch.rand(batch, generator=generator, device=device) < settings.probability
    return torch.where(mixed, lam, torch.ones_like(lam)), use_cutmix


def cutmix_box(lam: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor,
               height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample boxes [B, 1, H, W] (True inside) and lam corrected to the clipped box area.

    timm's `rand_bbox`: sides int(H * sqrt(1 - lam)) and int(W * sqrt(1 - lam)) about an integer
    centre, clipped to the image; then lam = 1 - box area / (H * W), so targets match the pixels.
    """
    ratio = (1 - lam).sqrt()
    cut_h, cut_w = (height * ratio).floor(), (width * ratio).floor()
    top = (centre_y - (cut_h / 2).floor()).clamp(0, height)
    bottom = (centre_y + ((cut_h + 1) / 2).floor()).clamp(0, height)
    left = (centre_x - (cut_w / 2).floor()).clamp(0, width)
    right = (centre_x + ((cut_w + 1) / 2).floor()).clamp(0, width)
    rows = torch.arange(height, device=lam.device, dtype=lam.dtype)
    cols = torch.arange(width, device=lam.device, dtype=lam.dtype)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
    return box, 1 - (bottom - top) * (right - left) / (height * width)


def random_centres(batch: int, height: int, width: int, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer box centres (as floats), uniform over the pixels, like timm's np.random.randint."""
    draws = torch.rand(2, batch, generator=generator, device=device)
    # rand * size can round up to size in float32; clamp keeps the centre a pixel of the image
    return (draws[0] * height).floor().clamp(max=height - 1), (draws[1] * width).floor().clamp(max=width - 1)


def mixed_targets(labels: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """lam * one_hot(y_i) + (1 - lam) * one_hot(y_{B-1-i}), float32 [B, num_classes].

    No label smoothing: CrossEntropyLoss(label_smoothing=...) smooths probability targets itself.
    """
    one_hot = one_hot_targets(labels, num_classes)
    return lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot.flip(0)


def one_hot_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float32 [B, num_classes], 1 at each label. A scatter, not F.one_hot: that reads the labels'
    range on the host on the CPU, a sync that a CUDA graph's capture (and its CPU emulation) refuses."""
    return torch.zeros(labels.shape[0], num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: MixSettings,
        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """images float [B, C, H, W] (augmented, normalised), labels int64 [B] -> (mixed images of the
    same shape, dtype and memory format; soft targets float32 [B, num_classes], rows summing to 1).

    The targets carry no label smoothing: the caller's CrossEntropyLoss(label_smoothing=...) applies
    it to probability targets. With settings not enabled, the images come back as they are (the same
    tensor) with one-hot targets, and nothing is drawn. In an odd batch the middle sample pairs with
    itself: its target stays one-hot and its pixels stay as they are, up to rounding.
    """
    if not settings.enabled:
        return images, one_hot_targets(labels, num_classes)
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    lam, use_cutmix = draw_ratios(batch, settings, generator, images.device)
    box, cut_lam = cutmix_box(lam, *random_centres(batch, height, width, generator, images.device),
                              height, width)
    lam = torch.where(use_cutmix, cut_lam, lam)
    partner = images.flip(0)
    # CutMix samples keep weight 1 (x * 1 + partner * 0 is exactly x), then take the box from the partner.
    weight = torch.where(use_cutmix, torch.ones_like(lam), lam).to(images.dtype).view(-1, 1, 1, 1)
    blended = images * weight + partner * (1 - weight)
    mixed = torch.where(box & use_cutmix.view(-1, 1, 1, 1), partner, blended)
    return mixed, mixed_targets(labels, lam, num_classes)


def batch_mixer(settings: MixSettings, num_classes: int, generator: torch.Generator) -> Callable:
    """What the training loop applies to every (images, labels) batch: `mix`, or with mixing off,
    the batch as it is, its integer labels kept (the loss is then exactly the unmixed one)."""
    if not settings.enabled:
        return keep_labels
    return lambda images, labels: mix(images, labels, num_classes, settings, generator)


def keep_labels(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images, labels
