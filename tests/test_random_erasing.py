"""Random erasing (--random-erasing): timm's RandomErasing in its pixel mode, batched on the device.

The rectangles are measured from the masks the batched code builds, compared with timm's own per-image
RandomErasing, and the step that erases is replayed from an emulated CUDA graph (graph_emulator.py).
"""

from __future__ import annotations

import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing

from conftest import command_error
from monkeytrain.config import parse_config
from monkeytrain.data.augment import (ERASE_AREA, ERASE_ASPECT, Augmenter, AugmentSettings, color_jitter,
                                      erasing_mask, normalize, random_affine, random_erasing, warp)
from monkeytrain.trainer import augment_settings

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
IMAGE = 64
CPU = torch.device("cpu")
TRAIN_SIZES = [16, 32, 48, 64]  # what --image-size 64 --min-train-size 16 trains at


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def views(batch: int = 8, seed: int = 0) -> torch.Tensor:
    side = 73  # the stored view of 64 px crops
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator(seed))


def augmenter(seed: int = 0, **settings) -> Augmenter:
    return Augmenter(AugmentSettings(**settings), IMAGE, MEAN, STD, generator(seed))


def rectangle_sides(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's erased rows and columns, checking that what is erased is one solid rectangle."""
    rows, columns = mask.any(dim=3), mask.any(dim=2)  # [B, C, H], [B, C, W]
    assert torch.equal(mask, rows.unsqueeze(3) & columns.unsqueeze(2)), "the erased pixels are no rectangle"
    for lines in (rows, columns):  # contiguous: the first and last erased line span exactly the count
        count = lines.sum(dim=2)
        first, last = lines.int().argmax(dim=2), lines.shape[2] - 1 - lines.flip(2).int().argmax(dim=2)
        assert torch.equal(torch.where(count > 0, last - first + 1, 0), count)
    return rows.sum(dim=2)[:, 0].double(), columns.sum(dim=2)[:, 0].double()


def assert_within_timms_bounds(heights: torch.Tensor, widths: torch.Tensor, side: int) -> None:
    """Area and height / width within timm's ranges, but for the rounding of each side to whole pixels
    (at most half a pixel either way)."""
    area = side * side
    assert ((heights + 0.5) * (widths + 0.5) >= ERASE_AREA[0] * area).all()
    assert ((heights - 0.5) * (widths - 0.5) <= ERASE_AREA[1] * area).all()
    assert ((heights + 0.5) / (widths - 0.5) >= ERASE_ASPECT[0]).all()
    assert ((heights - 0.5) / (widths + 0.5) <= ERASE_ASPECT[1]).all()
    assert (heights < side).all() and (widths < side).all()  # timm's condition for a rectangle that fits


def test_without_erasing_the_batch_and_the_generator_are_exactly_as_before():
    """0 draws nothing: the crop, jitter and normalisation of a run without erasing are unchanged."""
    batch, erasing_off = views(), augmenter(seed=5, random_erasing=0.0)
    reference = generator(5)
    theta = random_affine(batch.shape[0], AugmentSettings(), reference, CPU)
    expected = normalize(color_jitter(warp(batch.float() / 255, theta, IMAGE), 0.3, reference), MEAN, STD)
    assert torch.equal(erasing_off.train(batch), expected)
    assert torch.equal(erasing_off.generator.get_state(), reference.get_state())


@pytest.mark.parametrize("side", TRAIN_SIZES)
def test_always_erasing_gives_every_image_one_rectangle_of_noise_within_timms_bounds(side):
    images = torch.full((256, 3, side, side), 7.0).contiguous(memory_format=torch.channels_last)
    erased = random_erasing(images, 1.0, generator())
    assert erased.is_contiguous(memory_format=torch.channels_last)
    mask = erased != 7.0  # noise is never exactly 7
    assert torch.equal(mask, mask[:, :1].expand_as(mask))  # every channel erased alike
    heights, widths = rectangle_sides(mask)
    assert (heights > 0).all() and (widths > 0).all()
    assert_within_timms_bounds(heights, widths, side)
    noise = erased[mask]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05  # standard normal


def test_rectangles_span_timms_ranges_of_area_and_height_to_width():
    mask = erasing_mask(2000, 96, 96, 1.0, generator(), CPU)
    heights, widths = rectangle_sides(mask)
    fraction, aspect = heights * widths / 96**2, heights / widths
    assert fraction.min() < 0.025 and fraction.max() > 0.3
    assert aspect.min() < 0.4 and aspect.max() > 2.5


def timms_rectangles(count: int, side: int, probability: float) -> torch.Tensor:
    """timm's RandomErasing(mode="pixel") masks of `count` images, one by one, from a seeded `random`."""
    erase = RandomErasing(probability=probability, mode="pixel", device="cpu")
    before = random.getstate()
    try:
        random.seed(0)
        return torch.stack([erase(torch.zeros(3, side, side)) != 0 for _ in range(count)])
    finally:
        random.setstate(before)


def test_the_batched_rectangles_are_drawn_as_timm_draws_them():
    """Same chance of erasing, same mean area and height / width as timm's per-image loop (2,000 each)."""
    ours = erasing_mask(2000, 32, 32, 0.5, generator(), CPU).expand(-1, 3, -1, -1)
    theirs = timms_rectangles(2000, 32, 0.5)
    summaries = []
    for mask in (ours, theirs):
        heights, widths = rectangle_sides(mask)
        erased = heights > 0
        summaries.append((erased.double().mean().item(), (heights * widths)[erased].mean().item() / 32**2,
                          (heights / widths)[erased].log().mean().item()))
    (ours_erased, ours_area, ours_aspect), (timm_erased, timm_area, timm_aspect) = summaries
    assert ours_erased == pytest.approx(timm_erased, abs=0.05)
    assert ours_area == pytest.approx(timm_area, abs=0.015)
    assert ours_aspect == pytest.approx(timm_aspect, abs=0.1)


@pytest.mark.parametrize("side", TRAIN_SIZES)
def test_training_crops_of_every_progressive_size_are_erased(side):
    erasing, plain = augmenter(random_erasing=1.0), augmenter(random_erasing=0.0)
    erasing.train_size = plain.train_size = side
    batch = views()
    erased, unerased = erasing.train(batch), plain.train(batch)
    assert erased.shape == (8, 3, side, side) and erased.is_contiguous(memory_format=torch.channels_last)
    changed = (erased != unerased).all(dim=1)  # crops and jitter alike (drawn first): only the noise differs
    assert changed.flatten(1).any(dim=1).all()  # every image has its rectangle


def test_the_same_seed_erases_the_same_and_another_seed_otherwise():
    batch = views()
    first, again, other = (augmenter(seed, random_erasing=0.5).train(batch) for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_erasing_draws_only_from_the_run_generator():
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    erasing = augmenter(random_erasing=1.0)
    before = erasing.generator.get_state()
    erasing.train(views())
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert not torch.equal(erasing.generator.get_state(), before)


def test_the_flag_reaches_the_augmentation_and_is_off_by_default():
    assert augment_settings(parse_config([])).random_erasing == 0.0
    assert augment_settings(parse_config(["--random-erasing", "0.25"])).random_erasing == 0.25


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_a_probability_outside_0_to_1_is_one_line_and_exit_2(value, capsys):
    line = command_error(["train", "--random-erasing", value], capsys)
    assert "--random-erasing must" in line and "fix the flag or the config file" in line


def test_timms_erasing_flags_point_to_ours(capsys):
    assert "(did you mean --random-erasing?)" in command_error(["train", "--reprob", "0.25"], capsys)
    assert "--random-erasing always fills one rectangle" in command_error(["train", "--recount", "2"], capsys)
