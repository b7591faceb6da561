"""monkeytrain.stats: channel mean/std against an independent numpy pass, and the cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from monkeytrain import layout
from monkeytrain.data import discover_splits
from monkeytrain.stats import ChannelStats, cache_key, channel_stats, compute_channel_stats, stats_from_sums


def training_files(root):
    return discover_splits(layout.folders_from_root(root), 0.0, 0, False).train


def numpy_reference(files, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std in 0..1 units, in float64, of the evaluation framing (shorter
    side resized to size / 0.875 with PIL's bilinear filter, then a centre crop), done here
    with PIL and numpy alone."""
    resize_to = int(round(image_size / 0.875))
    pixels = []
    for f in files:
        with Image.open(f.path) as image:
            rgb = image.convert("RGB")
        width, height = rgb.size
        scale = resize_to / min(width, height)
        # torchvision truncates the longer side: int(size * long / short)
        new_size = (resize_to, int(height * scale)) if width <= height else (int(width * scale), resize_to)
        resized = rgb.resize(new_size, Image.BILINEAR, reducing_gap=None)
        left = int(round((resized.width - image_size) / 2.0))
        top = int(round((resized.height - image_size) / 2.0))
        crop = np.asarray(resized.crop((left, top, left + image_size, top + image_size)), dtype=np.float64)
        pixels.append(crop.reshape(-1, 3))
    everything = np.concatenate(pixels) / 255.0
    return everything.mean(axis=0), everything.std(axis=0)


@pytest.fixture
def files(tmp_path, make_image_folder):
    return training_files(make_image_folder(tmp_path / "d", layout="train-val", classes=3, per_class=5, size=20))


def test_stats_equal_a_numpy_reference_of_the_same_resized_images(files, cpu_accelerator):
    stats = compute_channel_stats(files, 16, cpu_accelerator, batch_size=4)  # a partly filled last batch
    mean, std = numpy_reference(files, 16)
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=0, atol=1e-12)


def test_stats_of_mixed_sizes_and_modes_equal_the_reference(tmp_path, cpu_accelerator):
    from monkeytrain.imagefiles import ImageFile

    rng = np.random.default_rng(5)
    files = []
    for i, (width, height, mode) in enumerate([(30, 20, "RGB"), (21, 33, "RGB"), (25, 25, "L"), (40, 17, "RGB")]):
        channels = (height, width) if mode == "L" else (height, width, 3)
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode=mode).save(path)
        files.append(ImageFile(path, 0, str(i)))
    stats = compute_channel_stats(files, 16, cpu_accelerator, batch_size=1)
    mean, std = numpy_reference(files, 16)
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=0, atol=1e-12)


def test_stats_do_not_depend_on_batch_size(files, cpu_accelerator):
    assert compute_channel_stats(files, 16, cpu_accelerator, batch_size=1) == \
        compute_channel_stats(files, 16, cpu_accelerator, batch_size=64)


def test_stats_of_non_square_images_use_the_centre_crop(tmp_path, cpu_accelerator):
    # A wide image: red centre, blue borders left and right that the crop must cut away.
    from monkeytrain.imagefiles import ImageFile

    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 18:42] = (255, 0, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    stats = compute_channel_stats([ImageFile(path, 0, "x")], 16, cpu_accelerator)
    assert stats.mean[0] == pytest.approx(1.0) and stats.mean[2] == pytest.approx(0.0)
    assert stats.std == pytest.approx([0.0, 0.0, 0.0])


def test_stats_from_sums_is_the_population_formula():
    values = np.array([[0, 10, 255], [4, 20, 255], [8, 60, 0]], dtype=np.float64)  # 3 pixels, RGB
    totals = torch.tensor([3, *values.sum(axis=0), *(values ** 2).sum(axis=0)], dtype=torch.float64)
    stats = stats_from_sums(totals)
    np.testing.assert_allclose(stats.mean, values.mean(axis=0) / 255, atol=1e-15)
    np.testing.assert_allclose(stats.std, values.std(axis=0) / 255, atol=1e-15)


def test_second_call_comes_from_the_cache(files, tmp_path, cpu_accelerator):
    cache = tmp_path / "cache"
    first, first_cached = channel_stats(files, 16, cache, cpu_accelerator)
    second, second_cached = channel_stats(files, 16, cache, cpu_accelerator)
    assert (first_cached, second_cached) == (False, True)
    assert second == first
    assert len(list((cache / "stats").glob("*.json"))) == 1
    assert not list((cache / "stats").glob("*.tmp*"))


def test_cache_is_what_the_second_call_returns(files, tmp_path, cpu_accelerator):
    # Overwrite the cached values: a cache hit must return them, not recompute.
    cache = tmp_path / "cache"
    channel_stats(files, 16, cache, cpu_accelerator)
    (cached_file,) = (cache / "stats").glob("*.json")
    cached_file.write_text('{"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}')
    stats, from_cache = channel_stats(files, 16, cache, cpu_accelerator)
    assert from_cache and stats == ChannelStats([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_unreadable_cache_file_is_recomputed(files, tmp_path, cpu_accelerator):
    cache = tmp_path / "cache"
    expected, _ = channel_stats(files, 16, cache, cpu_accelerator)
    (cached_file,) = (cache / "stats").glob("*.json")
    cached_file.write_text("{not json")
    stats, from_cache = channel_stats(files, 16, cache, cpu_accelerator)
    assert not from_cache and stats == expected


def test_cache_key_changes_with_image_size_and_file_list(files, tmp_path, cpu_accelerator):
    key = cache_key(files, 16)
    assert cache_key(files, 16) == key
    assert cache_key(list(reversed(files)), 16) == key  # order does not matter
    assert cache_key(files, 32) != key
    assert cache_key(files[:-1], 16) != key
    changed = [dataclasses.replace(files[0], digest="0" * 40), *files[1:]]
    assert cache_key(changed, 16) != key  # same paths, different content
    # and the cache honours it: another size or list is computed afresh
    cache = tmp_path / "cache"
    channel_stats(files, 16, cache, cpu_accelerator)
    assert channel_stats(files, 32, cache, cpu_accelerator)[1] is False
    assert channel_stats(files[:-1], 16, cache, cpu_accelerator)[1] is False
    assert len(list((cache / "stats").glob("*.json"))) == 3
