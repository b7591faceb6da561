"""monkeytrain.augment: training augmentation and the deterministic evaluation framing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monkeytrain.augment import eval_transform, stats_transform, train_transform

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def noise_image(width=40, height=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def augment(**changes):
    args = dict(image_size=24, mean=MEAN, std=STD, min_crop_scale=0.35, rotation=15.0, color_jitter=0.3)
    args.update(changes)
    return train_transform(**args)


@pytest.mark.parametrize("width, height", [(40, 30), (30, 40), (24, 24), (100, 17)])
def test_train_transform_gives_a_float_tensor_of_the_image_size(width, height):
    out = augment()(noise_image(width, height))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32 and out.shape == (3, 24, 24)
    assert torch.isfinite(out).all()


def test_train_transform_is_random_but_seedable():
    image, transform = noise_image(), augment()
    torch.manual_seed(3)
    first = transform(image)
    second = transform(image)
    torch.manual_seed(3)
    again = transform(image)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_train_transform_normalises_with_the_given_statistics():
    # No rotation, no jitter, a constant image: every crop and flip gives the same pixel.
    colour = (200, 100, 50)
    out = augment(rotation=0.0, color_jitter=0.0)(Image.new("RGB", (30, 30), colour))
    expected = (torch.tensor(colour) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out, expected[:, None, None].expand(3, 24, 24), atol=1e-5)


def test_eval_transform_is_deterministic():
    image, transform = noise_image(), eval_transform(24, MEAN, STD)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))
    assert first.dtype == torch.float32 and first.shape == (3, 24, 24)


def test_eval_transform_centre_crops_after_resizing_the_shorter_side():
    # 64x32 image: left quarter red, right quarter blue, centre green. Resizing the shorter
    # side to 24 / 0.875 ~ 27 and cropping 24 keeps only the green centre.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:48] = (0, 255, 0)
    pixels[:, 48:] = (0, 0, 255)
    out = eval_transform(24, [0, 0, 0], [1, 1, 1])(Image.fromarray(pixels))
    assert out.shape == (3, 24, 24)
    assert torch.allclose(out[1], torch.ones(24, 24), atol=1e-6)
    assert out[0].max() < 1e-6 and out[2].max() < 1e-6


def test_eval_and_stats_transforms_frame_images_alike():
    image = noise_image(50, 35, seed=4)
    pixels = stats_transform(24)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
    normalised = eval_transform(24, [0, 0, 0], [1, 1, 1])(image)
    assert torch.allclose(normalised, pixels.float() / 255, atol=1e-6)
