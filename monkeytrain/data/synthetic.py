"""A small, deterministic image-folder dataset so a fresh machine can train at once.

Ten classes, each a shape drawn in its own hue on a noisy background, at a
random position and size: easy for a person to tell apart, yet something a
network has to learn. Written as PNG files in the `train/ val/ test/` layout,
so the synthetic run goes through exactly the same data code as a real one.
"""

from __future__ import annotations

import atexit
import colorsys
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from monkeytrain.errors import UserError
from monkeytrain.storage import folder_size, is_told_read_only, mark_used, write_failure

VERSION = "synthetic-v2"
# How a run names this set where a path would name a dataset (config.yaml's `data`, --data): `--config` of that
# file then trains on this set again, not on whatever $MONKEYTRAIN_DATA or data/10-monkey-species gives there.
BUILTIN = "builtin:"
DATA_NAME = f"{BUILTIN}{VERSION}"
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hstripes", "vstripes", "checker", "star")
# Per class. Small on purpose: the default command on a 2-core CPU (the CPU
# recipe) finishes in under a minute and still learns the shapes (v1 had 40/10/10).
IMAGES_PER_SPLIT = {"train": 16, "val": 5, "test": 10}
SIDE = 64
# What the 310 PNG files take (2.9 MiB with today's zlib), rounded down: a full disk is told at least this
# much is needed, even when it refuses the very first file.
SIZE_AT_LEAST = 2_500_000


def names_synthetic_set(data: Optional[str]) -> bool:
    """Whether a --data value names the built-in synthetic set rather than a folder; one naming another built-in
    set (a later version's, or a typo) is a line naming the one this version makes."""
    if not data or not data.startswith(BUILTIN):
        return False
    if data != DATA_NAME:
        raise UserError(f"--data {data} names no data set built into this version of monkeytrain; its synthetic "
                        f"set is --data {DATA_NAME} (what a run trains on without --data, $MONKEYTRAIN_DATA or "
                        "data/10-monkey-species).")
    return True


def ensure_synthetic_dataset(cache_dir: Path) -> Path:
    """The synthetic dataset's root, generating it first if it is not there yet."""
    root = cache_dir / VERSION
    if (root / ".complete").is_file():
        mark_used(root)
        return root
    if is_told_read_only(cache_dir):  # the user was told what it lacks is made anew each run
        return generated_until_exit()
    staging = cache_dir / f".{VERSION}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_samples(staging)
    except OSError as error:  # a full disk, a read-only cache folder: nothing half made is left there
        needed = max(folder_size(staging), SIZE_AT_LEAST)  # measured before the folder goes
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failure(root, error, needed, True, "--cache-dir") from error
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    else:
        shutil.rmtree(staging)
    return root


def generated_until_exit() -> Path:
    """The data set made in a temporary folder of this process's, removed when it exits: for a read-only
    cache folder that lacks it (each process of a launch makes its own: there is no shared place to leave
    one). Made again each run, as the warning about the folder said."""
    root = Path(tempfile.gettempdir()) / f"monkeytrain-{VERSION}"  # what an error names, before mkdtemp
    try:
        root = Path(tempfile.mkdtemp(prefix=f"{root.name}-", dir=root.parent))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        write_samples(root)
    except OSError as error:  # a full or read-only temporary folder (TMPDIR)
        needed = max(folder_size(root) if root.is_dir() else 0, SIZE_AT_LEAST)
        shutil.rmtree(root, ignore_errors=True)
        raise write_failure(root, error, needed, True, "--cache-dir") from error
    return root


def write_samples(staging: Path) -> None:
    """Every split's images into `staging`, then the `.complete` mark."""
    for split_index, (split, count) in enumerate(IMAGES_PER_SPLIT.items()):
        for label, shape in enumerate(SHAPES):
            folder = staging / split / shape
            folder.mkdir(parents=True)
            for i in range(count):
                seed = (split_index * 100 + label) * 10_000 + i
                draw_sample(shape, label, np.random.default_rng(seed)).save(folder / f"{shape}_{i:03d}.png")
    (staging / ".complete").touch()


def draw_sample(shape: str, label: int, rng: np.random.Generator) -> Image.Image:
    """One image of `shape` in the class hue, jittered in place, size and shade."""
    noise = rng.integers(0, 90, size=(SIDE, SIDE, 3), dtype=np.uint8)
    image = Image.fromarray(noise + 40)
    hue = (label / len(SHAPES) + rng.uniform(-0.03, 0.03)) % 1.0
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, rng.uniform(0.7, 1.0)))
    radius = int(rng.integers(12, 22))
    cx, cy = (int(v) for v in rng.integers(radius + 2, SIDE - radius - 2, size=2))
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, colour)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, colour: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, r // 3))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape in ("hstripes", "vstripes"):
        for offset in range(-r, r, 6):
            line = (cx - r, cy + offset, cx + r, cy + offset + 2) if shape == "hstripes" else \
                (cx + offset, cy - r, cx + offset + 2, cy + r)
            draw.rectangle(line, fill=colour)
    elif shape == "checker":
        step = max(4, r // 3)
        for x in range(cx - r, cx + r, step):
            for y in range(cy - r, cy + r, step):
                if ((x - cx) // step + (y - cy) // step) % 2 == 0:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    else:  # star
        points = []
        for k in range(10):
            angle = np.pi / 2 + k * np.pi / 5
            radius = r if k % 2 == 0 else r * 0.45
            points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
        draw.polygon(points, fill=colour)
