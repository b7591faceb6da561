"""monkeytrain.data.stats: channel mean/std against an independent numpy pass, and the cache."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.imagefiles import ImageFile
from monkeytrain.data.pipeline import ResidentPipeline
from monkeytrain.data.stats import ChannelStats, cache_key, channel_stats, stats_from_sums
from monkeytrain.data.views import view_dataset


def training_files(root):
    return discover_splits(layout.folders_from_root(root), 0.0, 0, False).train


def view_batches(files, image_size: int, batch_size: int = 4) -> DataLoader:
    """The training split's stored views, as the streaming pipeline makes them."""
    return DataLoader(view_dataset(files, image_size), batch_size=batch_size)


def compute(files, image_size, accelerator, tmp_path, batch_size: int = 4) -> ChannelStats:
    """Fresh statistics (an empty cache folder of their own)."""
    cache = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    stats, cached = channel_stats(files, view_batches(files, image_size, batch_size), image_size, cache, accelerator)
    assert not cached
    return stats


def read_back(path) -> ChannelStats:
    saved = json.loads(path.read_text())
    return ChannelStats(saved["mean"], saved["std"])


class Unreadable:
    """Train views that must not be read (a cache hit needs no pixels)."""

    def __iter__(self):
        raise AssertionError("the training views were read despite a cached result")


def numpy_reference(files, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std in 0..1 units, in float64, of the evaluation framing, done here
    with PIL and numpy alone: shorter side resized to S = size / 0.875 with PIL's (antialiased)
    bilinear filter, a centre S x S crop (the stored view), then its centre size x size crop."""
    side = math.floor(image_size / 0.875)  # as timm frames it
    pixels = []
    for f in files:
        with Image.open(f.path) as image:
            rgb = image.convert("RGB")
        width, height = rgb.size
        # torchvision keeps the shorter side at `side` and truncates the longer: int(side * long / short)
        if width <= height:
            new_size = (side, int(side * height / width))
        else:
            new_size = (int(side * width / height), side)
        resized = rgb.resize(new_size, Image.BILINEAR)
        left, top = int(round((resized.width - side) / 2.0)), int(round((resized.height - side) / 2.0))
        view = resized.crop((left, top, left + side, top + side))
        offset = int(round((side - image_size) / 2.0))
        crop = view.crop((offset, offset, offset + image_size, offset + image_size))
        pixels.append(np.asarray(crop, dtype=np.float64).reshape(-1, 3))
    everything = np.concatenate(pixels) / 255.0
    return everything.mean(axis=0), everything.std(axis=0)


@pytest.fixture
def files(tmp_path, make_image_folder):
    return training_files(make_image_folder(tmp_path / "d", layout="train-val", classes=3, per_class=5, size=20))


def test_stats_equal_a_numpy_reference_of_the_same_resized_images(files, tmp_path, cpu_accelerator):
    stats = compute(files, 16, cpu_accelerator, tmp_path, batch_size=4)  # a partly filled last batch
    mean, std = numpy_reference(files, 16)
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=0, atol=1e-12)


def test_stats_from_resident_views_equal_the_reference(tmp_path, make_image_folder, cpu_accelerator):
    # The way train.py calls it: the pipeline's own unpadded shard of the training split.
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=5, size=20)
    splits = discover_splits(layout.folders_from_root(root), 0.0, 0, False)
    pipeline = ResidentPipeline(splits, 16, 4, 0, tmp_path / "cache", cpu_accelerator)
    stats, cached = channel_stats(splits.train, pipeline.eval_batches("train"), 16, tmp_path / "cache",
                                  cpu_accelerator)
    mean, std = numpy_reference(splits.train, 16)
    assert not cached
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=0, atol=1e-12)


def test_stats_of_mixed_sizes_and_modes_equal_the_reference(tmp_path, cpu_accelerator):
    rng = np.random.default_rng(5)
    files = []
    shapes = [(30, 20, "RGB"), (21, 33, "RGB"), (25, 25, "L"), (40, 17, "RGB"), (19, 47, "RGB")]
    for i, (width, height, mode) in enumerate(shapes):
        channels = (height, width) if mode == "L" else (height, width, 3)
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode=mode).save(path)
        files.append(ImageFile(path, 0, str(i)))
    stats = compute(files, 16, cpu_accelerator, tmp_path, batch_size=1)
    mean, std = numpy_reference(files, 16)
    np.testing.assert_allclose(stats.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.std, std, rtol=0, atol=1e-12)


def test_stats_do_not_depend_on_batch_size(files, tmp_path, cpu_accelerator):
    assert compute(files, 16, cpu_accelerator, tmp_path, batch_size=1) == \
        compute(files, 16, cpu_accelerator, tmp_path, batch_size=64)


def test_stats_of_non_square_images_use_the_centre_crop(tmp_path, cpu_accelerator):
    # A wide image: red centre, blue borders left and right that the crop must cut away.
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    pixels[:, 18:42] = (255, 0, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    stats = compute([ImageFile(path, 0, "x")], 16, cpu_accelerator, tmp_path)
    assert stats.mean[0] == pytest.approx(1.0) and stats.mean[2] == pytest.approx(0.0)
    assert stats.std == pytest.approx([1.0, 1.0, 1.0])  # no spread in the crop: each channel left unscaled


def test_stats_count_only_the_centre_crop_of_each_view(tmp_path, cpu_accelerator):
    # Views handed in directly: a 1-pixel frame of 255 around a zero centre is cut away.
    views = torch.zeros(2, 3, 18, 18, dtype=torch.uint8)
    views[:, :, :1], views[:, :, -1:], views[:, :, :, :1], views[:, :, :, -1:] = 255, 255, 255, 255
    views[1, 0, 1:17, 1:17] = 51  # second view: red 0.2 inside
    stats, _ = channel_stats([], [(views, torch.zeros(2))], 16, tmp_path / "c", cpu_accelerator)
    np.testing.assert_allclose(stats.mean, [0.1, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(stats.std, [0.1, 1.0, 1.0], atol=1e-12)  # 1: no spread, left unscaled


def test_stats_from_sums_is_the_population_formula():
    values = np.array([[0, 10, 255], [4, 20, 255], [8, 60, 0]], dtype=np.float64)  # 3 pixels, RGB
    totals = torch.tensor([3, *values.sum(axis=0), *(values ** 2).sum(axis=0)], dtype=torch.float64)
    stats = stats_from_sums(totals)
    np.testing.assert_allclose(stats.mean, values.mean(axis=0) / 255, atol=1e-15)
    np.testing.assert_allclose(stats.std, values.std(axis=0) / 255, atol=1e-15)


def test_a_channel_that_never_varies_is_left_unscaled_not_divided_by_zero():
    """Two-colour images saved as RGB: blue is always 0 (a std of 0 made every input and loss NaN)."""
    values = np.array([[0, 10, 0], [4, 20, 0], [8, 60, 0.5]], dtype=np.float64)  # blue: under one grey level
    totals = torch.tensor([3, *values.sum(axis=0), *(values ** 2).sum(axis=0)], dtype=torch.float64)
    stats = stats_from_sums(totals)
    np.testing.assert_allclose(stats.std[:2], values.std(axis=0)[:2] / 255, atol=1e-15)
    assert stats.std[2] == 1.0


def test_second_call_comes_from_the_cache_without_reading_pixels(files, tmp_path, cpu_accelerator):
    cache = tmp_path / "cache"
    first, first_cached = channel_stats(files, view_batches(files, 16), 16, cache, cpu_accelerator)
    second, second_cached = channel_stats(files, Unreadable(), 16, cache, cpu_accelerator)
    assert (first_cached, second_cached) == (False, True)
    assert second == first
    assert len(list((cache / "stats").glob("*.json"))) == 1
    assert not list((cache / "stats").glob("*.tmp*"))


def test_cache_is_what_the_second_call_returns(files, tmp_path, cpu_accelerator):
    # Overwrite the cached values: a cache hit must return them, not recompute.
    cache = tmp_path / "cache"
    channel_stats(files, view_batches(files, 16), 16, cache, cpu_accelerator)
    (cached_file,) = (cache / "stats").glob("*.json")
    cached_file.write_text('{"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}')
    stats, from_cache = channel_stats(files, Unreadable(), 16, cache, cpu_accelerator)
    assert from_cache and stats == ChannelStats([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_unreadable_cache_file_is_recomputed(files, tmp_path, cpu_accelerator):
    cache = tmp_path / "cache"
    expected, _ = channel_stats(files, view_batches(files, 16), 16, cache, cpu_accelerator)
    (cached_file,) = (cache / "stats").glob("*.json")
    cached_file.write_text("{not json")
    stats, from_cache = channel_stats(files, view_batches(files, 16), 16, cache, cpu_accelerator)
    assert not from_cache and stats == expected
    assert read_back(cached_file) == expected  # and the cache file is repaired


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
    channel_stats(files, view_batches(files, 16), 16, cache, cpu_accelerator)
    assert channel_stats(files, view_batches(files, 32), 32, cache, cpu_accelerator)[1] is False
    assert channel_stats(files[:-1], view_batches(files[:-1], 16), 16, cache, cpu_accelerator)[1] is False
    assert len(list((cache / "stats").glob("*.json"))) == 3


def test_cache_key_changes_with_the_stored_views_side(files, monkeypatch):
    """The figures are of the centre crop of each stored view: a view framed otherwise (37 px at 32 px before views
    were rounded down as timm rounds them, 36 now) holds other pixels, so a cached figure of the other must not
    be read."""
    from monkeytrain.data import stats

    key = cache_key(files, 16)
    monkeypatch.setattr(stats, "stored_size", lambda image_size: 19)
    assert cache_key(files, 16) != key


FLAT = "every training image decodes to one flat colour"


def flat_files(tmp_path, colour=(0, 0, 0)) -> list[ImageFile]:
    """Training images that all decode to one colour, each a file of its own."""
    files = []
    for i in range(3):
        path = tmp_path / f"flat-{i}.png"
        Image.new("RGB", (20, 20 + i), colour).save(path)
        files.append(ImageFile(path, i, f"flat-{i}"))
    return files


def test_a_training_set_of_one_flat_colour_gets_one_warning_cached_or_not(tmp_path, cpu_accelerator, capsys):
    """Black frames, or 16-bit files misread as black, trained a model on nothing with no word."""
    files, cache = flat_files(tmp_path, (0, 0, 0)), tmp_path / "cache"
    for expect_cached in (False, True):
        stats, cached = channel_stats(files, view_batches(files, 16), 16, cache, cpu_accelerator)
        assert cached is expect_cached and stats.one_flat_colour
        warnings = [line for line in capsys.readouterr().err.splitlines() if FLAT in line]
        assert warnings == [f"monkeytrain: warning: {FLAT} (RGB 0, 0, 0), so the model can learn nothing from them; "
                            "check the image files' content and bit depth, and what `monkeytrain inspect-data` "
                            "finds in them."]


def test_a_flat_colour_is_named_by_its_value(tmp_path, cpu_accelerator, capsys):
    files = flat_files(tmp_path, (200, 10, 30))
    channel_stats(files, view_batches(files, 16), 16, tmp_path / "cache", cpu_accelerator)
    assert f"{FLAT} (RGB 200, 10, 30)" in capsys.readouterr().err


def test_varied_images_or_one_flat_channel_get_no_flat_colour_warning(files, tmp_path, cpu_accelerator, capsys):
    stats, _ = channel_stats(files, view_batches(files, 16), 16, tmp_path / "cache", cpu_accelerator)
    views = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    views[1, 0] = 255  # red varies, green and blue never do
    one_flat_channel, _ = channel_stats([], [(views, torch.zeros(2))], 16, tmp_path / "c", cpu_accelerator)
    assert not stats.one_flat_colour and not one_flat_channel.one_flat_colour
    assert FLAT not in capsys.readouterr().err
