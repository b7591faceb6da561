"""Finding and decoding image files, judged by their content, never their names."""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL raises these for files that are not images or are damaged; all mean "skip".
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class ImageFile:
    """One readable image: where it is, its class index and a digest of its bytes."""

    path: Path
    label: int
    digest: str


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, 16-bit, ...) as 8-bit RGB; alpha over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips instead of scaling: scale by hand.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file, apply its EXIF orientation and return it as RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def check_image_bytes(data: bytes) -> Optional[str]:
    """None if `data` decodes completely as an image, else why it does not."""
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode, so truncated files are caught here
    except UnidentifiedImageError:
        return "not an image in any format Pillow reads"
    except DECODE_ERRORS as error:
        return f"a damaged or truncated image ({error})"
    return None


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def candidate_files(folder: Path) -> list[Path]:
    """Every non-hidden regular file below `folder`, sorted for a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not is_hidden(p, folder))


def inspect(path: Path, label: int) -> ImageFile | SkippedFile:
    data = path.read_bytes()
    problem = check_image_bytes(data)
    if problem:
        return SkippedFile(path, problem)
    return ImageFile(path, label, hashlib.sha1(data).hexdigest())


def scan_labelled_files(
    labelled_paths: Iterable[tuple[Path, int]],
) -> tuple[list[ImageFile], list[SkippedFile]]:
    """Decode every file once (threads: PIL releases the GIL while decoding)."""
    labelled_paths = list(labelled_paths)
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda item: inspect(*item), labelled_paths))
    images = [r for r in results if isinstance(r, ImageFile)]
    skipped = [r for r in results if isinstance(r, SkippedFile)]
    return images, skipped
