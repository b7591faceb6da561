"""Holding out a validation split, and finding files shared between splits or classes."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from pathlib import Path
from typing import Callable

from monkeytrain.data.imagefiles import ImageFile

# How a run chose its held-out files, as its data_manifest.json records it ("held_out_by"). New runs hold out
# by CONTENT_HASH. SEEDED_SHUFFLE is the order of runs begun before it (their manifests name no order): a resume
# of such a run's state holds out the very files it trained without, or its resume would be refused.
HELD_OUT_BY = "held_out_by"
CONTENT_HASH = "content-hash"
SEEDED_SHUFFLE = "seeded-shuffle"


def stratified_holdout(
    files: list[ImageFile], fraction: float, seed: int, held_out_by: str = CONTENT_HASH,
) -> tuple[list[ImageFile], list[ImageFile]]:
    """Split `files` into (kept, held out), holding out `fraction` of each class.

    Each class's files, grouped by content, are put in an order (`held_out_by`: one of ORDERS) and the first
    round(fraction * n) images of it held out, at least one. New runs order by a hash of the seed and each
    file's content, so that a version of the data set with more images, or renamed ones, holds out nearly the
    same files (see `in_content_hash_order`). Files with identical content stay together, so
    a duplicate can never sit on both sides (the real monkey set has dozens of such pairs), also when its
    copies sit in two classes: the first class decides for the others. A class keeps an image of its own for
    training unless all of its images are copies that an earlier class held out. The split depends only on
    the file list, the fraction, the seed and the order.
    """
    order = ORDERS[held_out_by](seed)
    kept, held_out = [], []
    held: dict[str, bool] = {}  # the side of each content decided so far, by digest
    for label in sorted({f.label for f in files}):
        groups = order(_groups_by_content([f for f in files if f.label == label]))
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


Groups = list[list[ImageFile]]


def in_content_hash_order(seed: int) -> Callable[[Groups], Groups]:
    """Groups ordered by a hash of the seed and their content: a file's place depends on nothing else, so
    adding m images to a class moves at most about m images across (each new one takes a place among the held
    out, or not), and renaming or moving a file moves none. hashlib, not hash(): that is salted per process."""
    def rank(group: list[ImageFile]) -> str:
        return hashlib.blake2b(f"{seed}:{group[0].digest}".encode(), digest_size=16).hexdigest()

    return lambda groups: sorted(groups, key=rank)


def in_seeded_shuffle_order(seed: int) -> Callable[[Groups], Groups]:
    """The order of runs begun before content hashes, for their resume alone: one random.Random(seed) shuffles
    the groups of each class in turn (listed by path), so one image added reshuffles its class and those after."""
    rng = random.Random(seed)

    def shuffled(groups: Groups) -> Groups:
        rng.shuffle(groups)
        return groups

    return shuffled


ORDERS = {CONTENT_HASH: in_content_hash_order, SEEDED_SHUFFLE: in_seeded_shuffle_order}


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
