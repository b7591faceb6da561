"""From a config to checked train / validation / test file lists."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from monkeytrain.cachefolder import cache_folder, usable_cache_folder
from monkeytrain.config import TrainConfig
from monkeytrain.data import layout
from monkeytrain.data.imagefiles import (
    ImageFile, SkippedFile, candidate_files, oversized_warning, scan_labelled_files,
)
from monkeytrain.data.splits import CONTENT_HASH, HELD_OUT_BY, find_conflicts, find_leaks, stratified_holdout
from monkeytrain.data.synthetic import DATA_NAME, ensure_synthetic_dataset, names_synthetic_set
from monkeytrain.errors import UserError

DEFAULT_DATA_ROOT = layout.DEFAULT_DATA_ROOT
# The test split held out of one folder of class subfolders is the same for every --seed, so that
# runs with different seeds are scored on the same images and their spread is the training's alone.
TEST_HOLDOUT_SEED = 0
# Skipped files, and images under two classes, are warned about one line each up to this many, then in one
# line for the rest (a scraped set may hold hundreds of saved HTML pages; data_manifest.json lists them all).
MAX_LISTED = 5
HELD_OUT_NAMES = {"val": "validation", "test": "test"}  # the held-out splits, as messages name them
# Images whose longer side is over this many times the shorter (a spectrogram, a line of text, a panorama)
# lose most of their content to the centre square crop that every image is framed by (views.py).
ELONGATED = 3.0


@dataclass
class DatasetSplits:
    """Checked file lists for each split, and everything a run reports about them."""

    class_folders: list[str]
    class_names: list[str]
    train: list[ImageFile]
    val: list[ImageFile]
    test: list[ImageFile]
    # True when the best epoch is chosen on the test split itself (--val-fraction 0).
    selection_on_test: bool
    layout: str
    root: str
    synthetic: bool = False
    skipped: list[SkippedFile] = field(default_factory=list)
    leaks: list[tuple[Path, Path]] = field(default_factory=list)
    conflicts: list[tuple[ImageFile, ImageFile]] = field(default_factory=list)  # one image under two classes
    held_out_by: str = CONTENT_HASH  # the order the held-out splits are taken from (splits.stratified_holdout)

    def manifest(self) -> dict:
        """A JSON-ready account of the data a run used."""
        return {
            "root": self.root,
            "layout": self.layout,
            "synthetic": self.synthetic,
            "selection_on_test": self.selection_on_test,
            HELD_OUT_BY: self.held_out_by,
            "class_folders": self.class_folders,
            "class_names": self.class_names,
            "counts": {name: len(files) for name, files in self.named_splits().items()},
            "per_class_counts": {name: self.per_class_counts(files) for name, files in self.named_splits().items()},
            "skipped_count": len(self.skipped),
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "leaks": [[str(a), str(b)] for a, b in self.leaks],
            "conflicts": [[str(a.path), str(b.path)] for a, b in self.conflicts],
            "files": {name: [str(f.path) for f in files] for name, files in self.named_splits().items()},
        }

    def per_class_counts(self, files: list[ImageFile]) -> dict[str, int]:
        """How many of `files` each class folder has, in label order."""
        counts = [0] * len(self.class_folders)
        for f in files:
            counts[f.label] += 1
        return dict(zip(self.class_folders, counts))

    def classes_missing_from(self, split: str) -> list[str]:
        """The class folders without an image in a held-out split: a class whose images are one (or
        all identical) keeps it for training."""
        present = {f.label for f in self.named_splits()[split]}
        return [name for label, name in enumerate(self.class_folders) if label not in present]

    def named_splits(self) -> dict[str, list[ImageFile]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def distinct_splits(self) -> dict[str, list[ImageFile]]:
        """The splits that must not share files (validation is the test split with --val-fraction 0)."""
        splits = self.named_splits()
        if self.selection_on_test:
            del splits["val"]
        return splits


def usable_cache_dir(config: TrainConfig, warn: bool = True) -> Path:
    """The cache folder, checked up front (see `usable_cache_folder`: a read-only one is read from, after
    a warning when `warn`), so a bad --cache-dir ends in one sentence rather than a traceback."""
    return usable_cache_folder(config.cache_dir, warn)


def user_data_root(config: TrainConfig) -> Optional[Path]:
    """The dataset root the user asked for, or found at the default place; None means synthetic."""
    if names_synthetic_set(config.data):
        return None
    if config.data:
        return Path(config.data)
    if explicit_dirs(config):
        return None
    from_environment = os.environ.get("MONKEYTRAIN_DATA")
    if from_environment == "":  # set from an unset variable, as an empty --data is: not the default
        raise UserError("MONKEYTRAIN_DATA is set but empty; set it to a dataset root, or "
                        "`unset MONKEYTRAIN_DATA` for the default.")
    if from_environment:
        return Path(from_environment)
    return DEFAULT_DATA_ROOT if DEFAULT_DATA_ROOT.is_dir() else None


def explicit_dirs(config: TrainConfig) -> bool:
    """True when the splits are named one by one (--train-dir, --val-dir, --test-dir)."""
    return bool(config.train_dir or config.val_dir or config.test_dir)


def find_split_folders(config: TrainConfig, root: Optional[Path]) -> layout.SplitFolders:
    if explicit_dirs(config):
        return layout.folders_from_explicit(config.train_dir, config.val_dir, config.test_dir)
    assert root is not None
    return layout.folders_from_root(root)


def discover_splits(
    folders: layout.SplitFolders, val_fraction: float, seed: int, strict: bool,
    test_fraction: float = TrainConfig.test_fraction, cache_dir: Optional[Path] = None,
) -> DatasetSplits:
    """Scan every split (reusing what earlier scans kept in `cache_dir`), hold out test and validation
    splits where needed, by content hash, and check the result."""
    return splits_held_out(scan_splits(folders, strict, cache_dir), val_fraction, seed, test_fraction)


@dataclass
class ScannedSplits:
    """The readable images of each split folder, before any is held out, and the files skipped."""

    folders: layout.SplitFolders
    class_folders: list[str]
    files: dict[str, list[ImageFile]]  # "train", and "selection" and "test" where a folder holds them
    skipped: list[SkippedFile]


def scan_splits(folders: layout.SplitFolders, strict: bool, cache_dir: Optional[Path]) -> ScannedSplits:
    class_folders = layout.check_same_classes(folders)
    scanned = {}
    skipped: list[SkippedFile] = []
    for name, folder in (("train", folders.train), ("selection", folders.selection), ("test", folders.test)):
        if folder is not None:
            scanned[name], split_skipped = scan_split(folder, class_folders, cache_dir)
            skipped += split_skipped
    if skipped and strict:
        first = skipped[0]
        raise UserError(
            f"{first.path} is {first.reason} ({len(skipped)} bad file(s) in all); "
            "remove or replace it, or drop --strict-data to skip such files."
        )
    return ScannedSplits(folders, class_folders, scanned, skipped)


def splits_held_out(scan: ScannedSplits, val_fraction: float, seed: int, test_fraction: float,
                    held_out_by: str = CONTENT_HASH) -> DatasetSplits:
    """The checked splits of `scan`, test and validation held out where no folder holds them, in the order
    `held_out_by`: by content hash, but where a run begun before it resumes (see `held_out_by_for`)."""
    folders, scanned = scan.folders, dict(scan.files)
    if folders.test is None:
        scanned["train"], scanned["test"] = stratified_holdout(scanned["train"], test_fraction, TEST_HOLDOUT_SEED,
                                                               held_out_by)
    train, val, selection_on_test = choose_validation(scanned, val_fraction, seed, held_out_by)
    splits = DatasetSplits(
        class_folders=scan.class_folders,
        class_names=layout.display_names(scan.class_folders, folders.labels_file),
        train=train, val=val, test=scanned["test"],
        selection_on_test=selection_on_test, layout=folders.layout,
        root=str(folders.train), skipped=scan.skipped, held_out_by=held_out_by,
    )
    check_no_empty_class(splits, folders)
    check_held_out_splits(splits)
    splits.leaks = find_leaks(splits.distinct_splits())
    splits.conflicts = find_conflicts(splits.distinct_splits())
    return splits


def scan_split(folder: Path, class_folders: list[str],
               cache_dir: Optional[Path]) -> tuple[list[ImageFile], list[SkippedFile]]:
    labelled = [
        (path, label)
        for label, name in enumerate(class_folders)
        for path in candidate_files(folder / name)
    ]
    return scan_labelled_files(labelled, scans_file(folder, cache_dir) if cache_dir else None)


def scans_file(folder: Path, cache_dir: Path) -> Path:
    """Where what scanning a split folder found is kept: one file per folder, named by its path."""
    return cache_dir / "scans" / f"{hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:24]}.json"


def choose_validation(
    scanned: dict[str, list[ImageFile]], val_fraction: float, seed: int, held_out_by: str = CONTENT_HASH,
) -> tuple[list[ImageFile], list[ImageFile], bool]:
    """(train, validation, selection_on_test) for the layout at hand."""
    if "selection" in scanned:
        return scanned["train"], scanned["selection"], False
    if val_fraction == 0:
        return scanned["train"], scanned["test"], True
    train, held_out = stratified_holdout(scanned["train"], val_fraction, seed, held_out_by)
    return train, held_out, False


def check_no_empty_class(splits: DatasetSplits, folders: layout.SplitFolders) -> None:
    """Every class needs images in every split that comes from its own folder."""
    checked = [(folders.train, splits.train)]
    if folders.test is not None:  # a held-out test split may lack a class of one image: a warning says so
        checked.append((folders.test, splits.test))
    if folders.selection is not None:
        checked.append((folders.selection, splits.val))
    for folder, files in checked:
        present = {f.label for f in files}
        for label, folder_name in enumerate(splits.class_folders):
            if label not in present:
                raise UserError(empty_class_problem(splits, folder / folder_name, label))


def empty_class_problem(splits: DatasetSplits, class_folder: Path, label: int) -> str:
    """Why a class folder has no image in its split: none is readable, or (a split held out of it) all its
    images are copies of an earlier class's that were held out, and its copies went with them."""
    held_out = [(split, f) for split, files in splits.distinct_splits().items() for f in files
                if f.label == label and class_folder in f.path.parents]
    if not held_out:
        unread = [bad for bad in splits.skipped if class_folder in bad.path.parents]
        why = f" ({len(unread)} file(s) skipped, such as {unread[0].path}: {unread[0].reason})" if unread else ""
        return (f"class folder {class_folder} has no readable images{why}; "
                "add images or remove the folder from every split.")
    split, copy = held_out[0]
    twin = next(f for f in splits.named_splits()[split] if f.digest == copy.digest and f.label != label)
    return (f"class folder {class_folder} has no image left for training: its {len(held_out)} image(s) are all "
            f"copies of images of other classes, held out to the {HELD_OUT_NAMES[split]} split with them "
            f"({copy.path} = {twin.path}); remove the copies with the wrong label, or add images of its own to it.")


def check_held_out_splits(splits: DatasetSplits) -> None:
    """A split held out of too few images can end up empty: its accuracy would read 0% of nothing."""
    for name, files in (("test", splits.test), ("validation", splits.val)):
        if not files:  # nothing was held out, so every image of the folder is in training
            raise UserError(f"no image is left for the {name} split: {why_none_held_out(splits.train)}")


def why_none_held_out(files: list[ImageFile]) -> str:
    """Why no class could hold an image out of `files`, and what to add. Identical files stay together on one
    side, so a class of copies is one image: "add images" would mislead where it already has a dozen files."""
    copies = len(files) - len({f.digest for f in files})
    if not copies:
        return f"each class is too small to hold one out ({len(files)} images in all); add images to the classes."
    distinct = [len({f.digest for f in files if f.label == label}) for label in {f.label for f in files}]
    held = "each class holds only 1 distinct image" if set(distinct) == {1} else \
        f"the classes hold only {sum(distinct)} distinct images"
    return (f"{held} ({len(files)} files, {copies} of them copies): copies stay together on one side, so none "
            "can be held out; add different images to the classes.")


def resolve_dataset(config: TrainConfig, accelerator, log) -> DatasetSplits:
    """The run's checked splits: the user's dataset, or the synthetic one as a loud fallback."""
    from monkeytrain.distributed import local_main_first  # here: it imports torch, which inspect-data needs not

    root = user_data_root(config)
    synthetic = root is None and not explicit_dirs(config)
    if synthetic:
        with local_main_first(accelerator, everywhere=True):  # one rank generates, the others then reuse it
            root = ensure_synthetic_dataset(cache_folder(config.cache_dir))
        given = f"--data {DATA_NAME}" if config.data else f"NO DATASET GIVEN and none at {DEFAULT_DATA_ROOT}"
        log.warn(f"{given}: training on a generated SYNTHETIC dataset in {root}. Pass --data ROOT or set "
                 "MONKEYTRAIN_DATA for real training.")
    held_out_by = held_out_by_for(config)
    with local_main_first(accelerator):  # one decode of every file per node; the others read its scans
        scan = scan_splits(find_split_folders(config, root), config.strict_data, cache_folder(config.cache_dir))
        splits = splits_held_out(scan, config.val_fraction, config.seed, config.test_fraction, held_out_by)
    splits.synthetic = synthetic
    report_data_problems(splits, log)
    return splits


def held_out_by_for(config: TrainConfig) -> str:
    """The order a run takes its held-out files from: a new run's, by content hash; a resumed one's, that of the
    state it resumes from (`runrecords.held_out_by_of`), so that a state saved before content hashes resumes on
    the very files it trained on (a resume on other files is refused). Called once the run folder is named."""
    from monkeytrain.distributed import broadcast_from_main  # here: they import torch, which inspect-data needs not
    from monkeytrain.runrecords import held_out_by_of
    from monkeytrain.statestore import resolve_resume

    if not (config.resume and config.run_name):
        return CONTENT_HASH
    run_dir = Path(config.output_dir) / config.run_name
    return broadcast_from_main(held_out_by_of(resolve_resume(config.resume, run_dir), run_dir))  # as Trainer.resume


def report_data_problems(splits: DatasetSplits, log) -> None:
    for line in skipped_warnings(splits.skipped):
        log.warn(line)
    for large in (f for files in splits.distinct_splits().values() for f in files if f.oversized):
        log.warn(oversized_warning(large))
    elongated = elongated_warning(splits)
    if elongated:
        log.warn(elongated)
    if splits.leaks:
        pairs = "; ".join(f"{a} = {b}" for a, b in splits.leaks)
        log.warn(f"{len(splits.leaks)} file(s) with identical content sit in two splits (leakage): {pairs}")
    for line in conflict_warnings(splits):
        log.warn(line)
    for split, consequence in (("val", "the best epoch is chosen"), ("test", "the test figure is")):
        missing = splits.classes_missing_from(split)
        if missing:
            more = "different images" if copied_classes(splits, missing) else "images"
            log.warn(f"class folder(s) {', '.join(missing)} have no held-out {HELD_OUT_NAMES[split]} image "
                     f"({why_no_held_out_image(splits, missing)}), so {consequence} without them; add {more} to them.")
    if splits.selection_on_test:
        log.warn("--val-fraction 0: the best epoch is chosen on the test split, so the test figure "
                 "will be selection-biased.")


def why_no_held_out_image(splits: DatasetSplits, missing: list[str]) -> str:
    """Why the class folders `missing` have no image in a held-out split, as training warns and inspect-data
    shows it: each keeps its one distinct image for training, which may be many identical files."""
    copied = copied_classes(splits, missing)
    if not copied:
        return "one distinct training image stays in training"
    files = (f"its {copied[0]} training files are copies of one image" if len(missing) == 1 else
             f"the {sum(copied)} training files of {len(copied)} of them are copies of one image each")
    return f"one distinct training image stays in training: {files}, and copies stay together on one side"


def copied_classes(splits: DatasetSplits, folders: list[str]) -> list[int]:
    """How many training files each of these class folders has, for those whose several are all one image."""
    counts = []
    for label in (splits.class_folders.index(folder) for folder in folders):
        digests = [f.digest for f in splits.train if f.label == label]
        if len(digests) > 1 and len(set(digests)) == 1:
            counts.append(len(digests))
    return counts


def elongated_warning(splits: DatasetSplits) -> Optional[str]:
    """One line for the images far from square, if any: framed as a centre square, each loses most of
    itself, silently (the run trains, on a strip from the middle of every image)."""
    images = [f for files in splits.distinct_splits().values() for f in files]
    elongated = [f for f in images if (f.elongation or 1.0) > ELONGATED]
    if not elongated:
        return None
    first = elongated[0]
    return (f"{len(elongated)} of {len(images)} images are far from square (one side over {ELONGATED:g} times the "
            f"other), such as {first.path} ({first.elongation:.1f} to 1): each is framed by the square at its "
            f"centre, which leaves out {1 - 1 / ELONGATED:.0%} or more of it; pad such images to nearer square "
            "(or tile them) if what tells their classes apart lies away from their middle.")


def skipped_warnings(skipped: list[SkippedFile]) -> list[str]:
    """One line for each skipped file, up to MAX_LISTED; then one for the rest."""
    lines = [f"skipping {bad.path}: {bad.reason}." for bad in skipped[:MAX_LISTED]]
    rest = len(skipped) - MAX_LISTED
    if rest > 0:
        lines.append(f"skipping {rest} more file(s) that are not readable images ({len(skipped)} in all); "
                     "data_manifest.json lists each with its reason, as does `monkeytrain inspect-data`.")
    return lines


def conflict_warnings(splits: DatasetSplits) -> list[str]:
    """One line for each image that sits under two classes, or one for them all where there are many."""
    def classes(a: ImageFile, b: ImageFile) -> str:
        return f"{splits.class_folders[a.label]} and {splits.class_folders[b.label]}"

    if len(splits.conflicts) > MAX_LISTED:
        a, b = splits.conflicts[0]
        return [f"{len(splits.conflicts)} images sit under two classes each (conflicting labels), such as {a.path} "
                f"and {b.path} ({classes(a, b)}); remove the copies with the wrong label "
                "(`monkeytrain inspect-data` lists them all)."]
    return [f"{a.path} and {b.path} are the same image under two classes ({classes(a, b)}); "
            "remove the copy with the wrong label." for a, b in splits.conflicts]
