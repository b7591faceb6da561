"""Holding out a validation split, and finding files shared between splits or classes."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from monkeytrain.data.imagefiles import ImageFile


def stratified_holdout(
    files: list[ImageFile], fraction: float, seed: int
) -> tuple[list[ImageFile], list[ImageFile]]:
    """Split `files` into (kept, held out), holding out `fraction` of each class.

    Files with identical content stay together, so a duplicate can never sit on
    both sides (the real monkey set has dozens of such pairs), also when its
    copies sit in two classes: the first class decides for the others. A class
    keeps an image of its own for training unless all of its images are copies
    that an earlier class held out. The split depends only on the file list, the
    fraction and the seed.
    """
    rng = random.Random(seed)
    kept, held_out = [], []
    held: dict[str, bool] = {}  # the side of each content decided so far, by digest
    for label in sorted({f.label for f in files}):
        groups = _groups_by_content([f for f in files if f.label == label])
        rng.shuffle(groups)
        # At least one image per class when holding out at all, so small
        # datasets never select on an empty validation split.
        target = max(1, round(fraction * sum(len(g) for g in groups))) if fraction > 0 else 0
        taken = 0
        # Keep at least one group for training whatever the fraction: the last one no earlier class decided
        # (copies of another class's images, kept in training, would not teach this class).
        kept_for_training = next((group for group in reversed(groups) if group[0].digest not in held), None)
        for group in groups:
            digest = group[0].digest
            held.setdefault(digest, taken < target and group is not kept_for_training)
            (held_out if held[digest] else kept).extend(group)
            taken += len(group) if held[digest] else 0
    return sorted(kept, key=_order), sorted(held_out, key=_order)


def _groups_by_content(files: list[ImageFile]) -> list[list[ImageFile]]:
    groups: dict[str, list[ImageFile]] = defaultdict(list)
    for f in sorted(files, key=_order):
        groups[f.digest].append(f)
    return list(groups.values())


def _order(f: ImageFile) -> str:
    return str(f.path)


def find_leaks(splits: dict[str, list[ImageFile]]) -> list[tuple[Path, Path]]:
    """Pairs of files with identical content that sit in two different splits."""
    first_seen: dict[str, tuple[str, Path]] = {}
    leaks = []
    for split_name, files in splits.items():
        for f in files:
            if f.digest in first_seen and first_seen[f.digest][0] != split_name:
                leaks.append((first_seen[f.digest][1], f.path))
            first_seen.setdefault(f.digest, (split_name, f.path))
    return leaks


def find_conflicts(splits: dict[str, list[ImageFile]]) -> list[tuple[ImageFile, ImageFile]]:
    """Files with identical content under two classes of one split (a labelling mistake; copies in two
    splits are leaks): the first copy by path, paired with each copy of another class."""
    return [(group[0], f) for files in splits.values() for group in _groups_by_content(files)
            for f in group[1:] if f.label != group[0].label]
