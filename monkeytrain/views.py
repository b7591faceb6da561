"""Stored views: every image decoded once to a uint8 square, cached on disk.

A stored view is the image resized (shorter side) and centre-cropped to
`stored_size(image_size)` pixels. The GPU-resident pipeline decodes a whole
dataset's views once, saves them in one file keyed by the file list (paths
and content digests) and the resolution, and later runs just load that file.
The streaming pipeline makes the same views on the fly in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from monkeytrain.augment import stored_size, stored_view_transform
from monkeytrain.data import ImageListDataset
from monkeytrain.imagefiles import ImageFile
from monkeytrain.storage import write_cache

VIEWS_VERSION = 2  # 2: large JPEGs decoded in draft mode


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
    digest = hashlib.sha256(f"views v{VIEWS_VERSION} {stored_size(image_size)}\n".encode())
    for f in files:  # in order: the cached tensor's rows follow this list
        digest.update(f"{f.path}\t{f.digest}\n".encode())
    return digest.hexdigest()[:24]


def cached_views(files: list[ImageFile], image_size: int, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored views of `files`, from the cache file when there is one, else decoded and cached.

    Call it on one process per node first (others then find the file). When the
    cache cannot be written, the views are still returned, after one warning.
    """
    path = cache_dir / "views" / f"{views_cache_key(files, image_size)}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if len(saved["images"]) == len(saved["labels"]) == len(files):
                return saved["images"], saved["labels"]
        except Exception:  # torch.load raises many types for damaged files; rebuild below
            pass
    images, labels = decode_views(files, image_size)
    # a full disk only costs the next run a decode: write_cache warns and we go on
    write_cache(path, lambda handle: torch.save({"images": images, "labels": labels}, handle))
    return images, labels
