"""monkeytrain.data.views: decoding stored views, and their one-file cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from monkeytrain.data import layout, views
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.imagefiles import ImageFile
from monkeytrain.data.views import (
    CROP_PCT, cached_views, centre_crop, decode_views, stored_size, stored_view_transform, view_bytes, view_dataset,
    views_cache_key,
)

IMAGE, SIDE = 16, 18  # 16 / 0.875, rounded down
FRAMED, FRAMED_SIDE = 24, 27  # 24 / 0.875, rounded down


@pytest.fixture
def files(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=3, per_class=3, size=20)
    return discover_splits(layout.folders_from_root(root), 0.0, 0, False).train


def cache_files(cache_dir):
    return sorted((cache_dir / "views").glob("*"))


def refuse_to_decode(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again although the views were cached")

    monkeypatch.setattr(views, "decode_views", fail)


def test_decode_views_gives_uint8_views_and_the_files_labels(files):
    images, labels = decode_views(files, IMAGE)
    assert images.dtype == torch.uint8 and images.shape == (9, 3, SIDE, SIDE)
    assert labels.dtype == torch.int64 and labels.tolist() == [f.label for f in files]
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    # row i is file i's view (threads must not reorder them)
    for i in (0, 4, 8):
        assert torch.equal(images[i], view_dataset(files, IMAGE)[i][0])


def test_views_keep_the_class_colour(files):
    # conftest colours each class; the view's mean colour is the class colour (+- noise)
    images, labels = decode_views(files, IMAGE)
    means = images.double().mean(dim=(2, 3))
    for label in range(3):
        rows = means[labels == label]
        assert (rows - rows[0]).abs().max() < 6  # same class, same colour
    assert (means[labels == 0][0] - means[labels == 1][0]).abs().max() > 50


def test_decode_views_of_no_files_is_an_empty_batch():
    images, labels = decode_views([], IMAGE)
    assert images.shape == (0, 3, SIDE, SIDE) and images.dtype == torch.uint8
    assert labels.shape == (0,) and labels.dtype == torch.int64


def test_decode_views_of_odd_shapes_and_modes(tmp_path):
    rng = np.random.default_rng(1)
    files = []
    for i, (width, height, mode) in enumerate([(40, 17, "RGB"), (13, 31, "L"), (20, 20, "RGBA")]):
        channels = {"L": (height, width), "RGB": (height, width, 3), "RGBA": (height, width, 4)}[mode]
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode=mode).save(path)
        files.append(ImageFile(path, i, str(i)))
    images, labels = decode_views(files, IMAGE)
    assert images.shape == (3, 3, SIDE, SIDE) and labels.tolist() == [0, 1, 2]
    assert torch.equal(images[1, 0], images[1, 1]) and torch.equal(images[1, 1], images[1, 2])  # grey stays grey


def test_cached_views_writes_one_file_and_a_second_call_loads_it(files, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    images, labels = cached_views(files, IMAGE, cache)
    written = cache_files(cache)
    assert len(written) == 1 and written[0].suffix == ".pt"  # no temporary left behind
    refuse_to_decode(monkeypatch)
    again_images, again_labels = cached_views(files, IMAGE, cache)
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    assert cache_files(cache) == written


def test_cached_views_equal_freshly_decoded_ones(files, tmp_path):
    cached_views(files, IMAGE, tmp_path / "cache")
    loaded, labels = cached_views(files, IMAGE, tmp_path / "cache")
    fresh, fresh_labels = decode_views(files, IMAGE)
    assert torch.equal(loaded, fresh) and torch.equal(labels, fresh_labels)


def test_another_image_size_or_file_list_gets_its_own_cache_file(files, tmp_path, monkeypatch):
    key = views_cache_key(files, IMAGE)
    assert views_cache_key(files, IMAGE) == key
    assert views_cache_key(files, 32) != key
    assert views_cache_key(files[:-1], IMAGE) != key
    assert views_cache_key(list(reversed(files)), IMAGE) != key  # rows follow the list's order
    assert views_cache_key([dataclasses.replace(files[0], digest="0" * 40), *files[1:]], IMAGE) != key
    cache = tmp_path / "cache"
    cached_views(files, IMAGE, cache)
    bigger, _ = cached_views(files, 32, cache)
    fewer, fewer_labels = cached_views(files[:-1], IMAGE, cache)
    reordered, reordered_labels = cached_views(list(reversed(files)), IMAGE, cache)
    assert bigger.shape[-1] == stored_size(32) == 36 and fewer.shape[0] == 8
    assert torch.equal(reordered, decode_views(files, IMAGE)[0].flip(0))
    assert reordered_labels.tolist() == [f.label for f in reversed(files)]
    assert len(cache_files(cache)) == 4


def test_cached_views_take_the_labels_of_the_files_now_not_of_the_run_that_cached_them(files, tmp_path, monkeypatch):
    """The same files, renumbered: a class was added in front of theirs elsewhere in the data set."""
    cache = tmp_path / "cache"
    cached_views(files, IMAGE, cache)
    refuse_to_decode(monkeypatch)
    renumbered = [dataclasses.replace(f, label=f.label + 1) for f in files]
    images, labels = cached_views(renumbered, IMAGE, cache)
    assert labels.tolist() == [f.label + 1 for f in files] and len(images) == len(files)

@pytest.mark.parametrize("damage", ["truncated", "wrong keys"])
def test_a_damaged_cache_file_is_rebuilt(files, tmp_path, damage):
    cache = tmp_path / "cache"
    expected, expected_labels = cached_views(files, IMAGE, cache)
    (path,) = cache_files(cache)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"pictures": expected}, path)
    images, labels = cached_views(files, IMAGE, cache)
    assert torch.equal(images, expected) and torch.equal(labels, expected_labels)
    saved = torch.load(path, weights_only=True)  # and the file is whole again
    assert torch.equal(saved["images"], expected)


@pytest.mark.parametrize("content", [b"", b"this is not a torch file"])
def test_a_cache_file_of_garbage_is_rebuilt(files, tmp_path, content):
    cache = tmp_path / "cache"
    expected, _ = cached_views(files, IMAGE, cache)
    (path,) = cache_files(cache)
    path.write_bytes(content)
    images, _ = cached_views(files, IMAGE, cache)
    assert torch.equal(images, expected)


@pytest.mark.parametrize("image_size", [16, 24, 64])
def test_view_bytes_is_the_size_of_the_decoded_views(files, image_size):
    images, _ = decode_views(files[:4], image_size)
    assert view_bytes(4, image_size) == images.nbytes
    assert view_bytes(0, image_size) == 0
    assert view_bytes(1000, image_size) == 1000 * images[0].nbytes


# --- the framing: stored views and their centre crop ------------------------------------------

def test_stored_size_is_the_image_size_over_crop_pct():
    assert stored_size(24) == 27 and stored_size(224) == 256 and stored_size(64) == 73


def test_the_stored_view_side_is_the_side_timms_eval_transform_resizes_to():
    """timm's validate.py and inference.py, given a run's config.json (crop_pct CROP_PCT), resize the shorter
    side to image_size / crop_pct rounded down: rounded to the nearest, 432 of these sizes (32, 96, 160...)
    were framed a pixel larger by predict than by timm."""
    from timm.data import create_transform

    for image_size in range(16, 1025):
        timm_side = create_transform(image_size, crop_pct=CROP_PCT, interpolation="bilinear").transforms[0].size
        assert stored_size(image_size) == timm_side, image_size


@pytest.mark.parametrize("image_size", [32, 96])
def test_a_square_images_centre_crop_is_the_pixels_timms_eval_transform_gives(image_size):
    from timm.data import create_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8))
    timm_view = create_transform(image_size, crop_pct=CROP_PCT, interpolation="bilinear", use_prefetcher=True)
    assert torch.equal(centre_crop(stored_view_transform(image_size)(image), image_size), timm_view(image))


@pytest.mark.parametrize("height, width, size", [(9, 14, 4), (10, 7, 5), (27, 27, 24), (8, 13, 8), (6, 6, 3)])
def test_centre_crop_matches_torchvision_center_crop(height, width, size):
    images = torch.arange(2 * 3 * height * width).reshape(2, 3, height, width)
    assert torch.equal(centre_crop(images, size), TF.center_crop(images, [size, size]))


def test_stored_view_transform_gives_a_uint8_square_view():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    view = stored_view_transform(FRAMED)(image)
    assert isinstance(view, torch.Tensor)
    assert view.dtype == torch.uint8 and view.shape == (3, FRAMED_SIDE, FRAMED_SIDE)


def test_stored_view_keeps_the_centre_of_a_wide_image():
    # 64x32: red left quarter, green middle half, blue right quarter. Shorter side to 27 and a
    # centre square keeps the middle; its centre 24 crop is green alone.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:48] = (0, 255, 0)
    pixels[:, 48:] = (0, 0, 255)
    view = stored_view_transform(FRAMED)(Image.fromarray(pixels))
    assert view.shape == (3, FRAMED_SIDE, FRAMED_SIDE)
    centre = centre_crop(view, FRAMED)
    assert (centre[1] == 255).all() and (centre[0] == 0).all() and (centre[2] == 0).all()


def test_one_folder_named_relative_or_absolute_is_one_cache_entry(tmp_path, monkeypatch, make_image_folder):
    """The README runs data/x locally and $PWD/data/x from a job script: one set of views and statistics, not
    two (21 MiB each at 64 px for the monkey set, 257 MiB at 224 px) and no second decode."""
    from monkeytrain.data.stats import cache_key

    make_image_folder(tmp_path / "data" / "x", classes=2, per_class=3)
    monkeypatch.chdir(tmp_path)
    relative, absolute = (discover_splits(layout.folders_from_root(root), 0.2, 0, False).train
                          for root in (Path("data/x"), tmp_path / "data" / "x"))
    assert not relative[0].path.is_absolute() and absolute[0].path.is_absolute()
    assert views.views_cache_key(relative, 32) == views.views_cache_key(absolute, 32)
    assert cache_key(relative, 32) == cache_key(absolute, 32)
