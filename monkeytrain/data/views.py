"""Stored views: every image decoded once to a uint8 square, cached on disk.

A stored view is the image resized (shorter side) and centre-cropped to
`stored_size(image_size)` pixels. The GPU-resident pipeline decodes a whole
dataset's views once, saves them in one file keyed by the file list (paths
and content digests) and the resolution, and later runs just load that file.
The streaming pipeline makes the same views on the fly in DataLoader workers.

The framing lives here too: evaluation, statistics and the checkpoint's
metadata all take the centre `image_size` crop of a stored view.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.transforms import v2

from monkeytrain.data.imagefiles import ImageFile, content_key
from monkeytrain.data.loaders import ImageListDataset
from monkeytrain.storage import mark_used, write_cache

# Stored views are image_size / CROP_PCT pixels square, rounded down; evaluation takes their
# centre image_size crop: the usual ImageNet framing (timm's crop_pct 0.875).
CROP_PCT = 0.875
VIEWS_VERSION = 2  # 2: large JPEGs decoded in draft mode


def stored_size(image_size: int) -> int:
    # timm's eval transform's own expression (transforms_imagenet_eval's scale_size), so that timm's
    # validate.py and inference.py, given the run's config.json, resize an image to the side predict does
    return math.floor(image_size / CROP_PCT)


def stored_view_transform(image_size: int) -> v2.Compose:
    """PIL image -> uint8 [3, S, S] stored view (shorter side to S, centre crop)."""
    side = stored_size(image_size)
    return v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(side), v2.PILToTensor()])


def centre_crop(images: torch.Tensor, size: int, shift: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The centre size x size crop, offsets rounded as torchvision's CenterCrop does; moved `shift`
    (rows, columns) pixels from the centre for the shifted test-time views."""
    top = int(round((images.shape[-2] - size) / 2.0)) + shift[0]
    left = int(round((images.shape[-1] - size) / 2.0)) + shift[1]
    return images[..., top:top + size, left:left + size]


def view_dataset(files: list[ImageFile], image_size: int) -> ImageListDataset:
    """(uint8 stored view [3, S, S], label) for each of a list of checked image files."""
    return ImageListDataset(files, stored_view_transform(image_size), min_side=stored_size(image_size))


def view_bytes(num_images: int, image_size: int) -> int:
    """Memory that `num_images` stored views take, in bytes."""
    return num_images * 3 * stored_size(image_size) ** 2


def decode_views(files: list[ImageFile], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 3, S, S], int64 labels [N]), decoding in threads (PIL releases the GIL)."""
    dataset = view_dataset(files, image_size)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        views = list(pool.map(lambda i: dataset[i][0], range(len(dataset))))
    side = stored_size(image_size)
    images = torch.stack(views) if views else torch.empty(0, 3, side, side, dtype=torch.uint8)
    return images, torch.tensor([f.label for f in files], dtype=torch.int64)


def views_cache_key(files: list[ImageFile], image_size: int) -> str:
    # in order: the cached tensor's rows follow this list
    return content_key(f"views v{VIEWS_VERSION} {stored_size(image_size)}", files)


def cached_views(files: list[ImageFile], image_size: int, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored views of `files`, from the cache file when there is one, else decoded and cached.

    Call it on one process per node first (others then find the file). When the
    cache cannot be written, the views are still returned, after one warning. Only the
    images are cached; the labels come from `files`: the key covers paths and contents,
    and a class added or renamed elsewhere in the data set renumbers the same files.
    """
    path = cache_dir / "views" / f"{views_cache_key(files, image_size)}.pt"
    if path.is_file():
        try:
            images = torch.load(path, map_location="cpu", weights_only=True)["images"]
            if len(images) == len(files):
                mark_used(path)
                return images, torch.tensor([f.label for f in files], dtype=torch.int64)
        except Exception:  # torch.load raises many types for damaged files; rebuild below
            pass
    images, labels = decode_views(files, image_size)
    # a full disk only costs the next run a decode: write_cache warns and we go on
    write_cache(path, lambda handle: torch.save({"images": images}, handle))
    return images, labels
