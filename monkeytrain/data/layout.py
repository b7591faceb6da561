"""Where the splits of a dataset live on disk, and what its classes are called.

Accepted layouts under a root folder, each split folder under any of its names (train/ or training/;
val/, valid/ or validation/; test/ or testing/), in any letter case (Train/ and TRAIN/ are train/ too):

- train + val + test: each folder used as its name says
- train + test: validation held out of train
- train + val: the val folder is the test split, validation held out of train; this is Kaggle's
  flattened layout `training/<class>/` + `validation/<class>/`, and as downloaded
  `training/training/<class>/` + `validation/validation/<class>/`: a split folder whose one subfolder
  has its own name is that subfolder, in every layout
- one folder of class subfolders (torchvision's ImageFolder): no split on
  disk, so the test split is held out of it too (`--test-fraction`)

or explicit `--train-dir` with `--val-dir` and/or `--test-dir`. A split is a
folder of class subfolders; class indices follow sorted folder names. A folder
named like a split that holds images of its own is a class. Two folders for one
split, or such a class beside split folders, are refused: no folder named like a
split is left unused.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from monkeytrain.data.passedover import is_hidden_folder, passed_over_as_runs
from monkeytrain.errors import UserError

LABELS_FILE = "monkey_labels.txt"
DEFAULT_DATA_ROOT = Path("data/10-monkey-species")  # where training looks without --data, and download puts it
# The names each split's folder may have, in any letter case. They also say a root holds splits, not
# classes: a root with train/ alone, holding class folders, is a mistake to report; a train/ folder of
# images beside bus/ and car/ is a class.
ROLE_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
SPLIT_NAMES = {name for names in ROLE_NAMES.values() for name in names}


@dataclass(frozen=True)
class SplitFolders:
    """The folders of one dataset.

    `selection` is None when the layout has no folder for picking the best
    epoch; it is then held out of `train` (or, with --val-fraction 0, the test
    folder is used and the test figure is selection-biased). `test` is None for
    one folder of class subfolders: the test split is held out of `train` first.
    """

    train: Path
    selection: Optional[Path]
    test: Optional[Path]
    labels_file: Optional[Path]
    layout: str


def folders_from_root(root: Path) -> SplitFolders:
    """Recognise one of the accepted layouts under `root`."""
    if root.exists() and not root.is_dir():
        raise UserError(f"dataset root {root} is a file, not a folder; give --data the folder that holds "
                        "the class subfolders or the split folders.")
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist; check --data or $MONKEYTRAIN_DATA.")
    labels = root / LABELS_FILE if (root / LABELS_FILE).is_file() else None
    splits = split_folders(root)
    if splits:
        return layout_of_splits(root, splits, labels)
    if class_folders(root):
        check_no_splits_inside_classes(root)
        return SplitFolders(root, None, None, labels, "image-folder")
    if holds_images(root):  # a class folder given as the root, or images not yet sorted into classes
        raise UserError(f"{root} holds images but no class subfolders; put each class's images in a subfolder "
                        f"named after the class ({root / '<class>'}), or if it is one class's folder, give "
                        "the folder that holds it and the other classes.")
    raise no_layout_error(root, [])


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders under `root` by role (train, val, test). A folder named like a split that holds
    images is a class; mixed with split folders, or two folders for one role, it is refused: a folder the
    run would not use must never be passed over silently."""
    named = [root / name for name in class_folders(root) if name.lower() in SPLIT_NAMES]
    classes = [folder for folder in named if holds_images(folder)]
    splits = [folder for folder in named if folder not in classes]
    if classes and splits:
        raise UserError(
            f"{classes[0]} is named like a split but holds images of its own, beside the split folders "
            f"{listed(splits)}; move its images into class subfolders if it is a split, move it out of {root} if "
            "it is an unlabelled test set, as Kaggle competitions give (`monkeytrain predict` labels its images), "
            "or rename it if it is a class (or name the splits with --train-dir, --val-dir and --test-dir).")
    by_role = {}
    for role, names in ROLE_NAMES.items():
        found = [folder for folder in splits if folder.name.lower() in names]
        if len(found) > 1:
            raise UserError(f"{root} has {len(found)} folders for the {role} split ({listed(found)}); "
                            "merge or remove one, or name the splits with --train-dir, --val-dir and --test-dir.")
        if found:
            by_role[role] = found[0]
    return by_role


def check_no_splits_inside_classes(root: Path) -> None:
    """Refuse class folders that each hold split folders (cat/train/, cat/test/): read as one folder of classes,
    the user's own test images would be pooled with the rest and a test split drawn at random from them all."""
    classes = class_folders(root)
    if len(classes) < 2 or not all(split_named_subfolders(root / name) for name in classes):
        return
    first = root / classes[0]
    inside = split_named_subfolders(first)
    raise UserError(
        f"the class folders of {root} hold split folders ({listed([first / name for name in inside])} in "
        f"{first.name}/); make the splits the outer folders ({' and '.join(f'{n}/{first.name}/' for n in inside)}, "
        "each split folder holding every class folder), or move each class's images out of its split folders "
        "to pool them.")


def split_named_subfolders(folder: Path) -> list[str]:
    """The subfolders of `folder` named like a split, sorted; from the listing's names, so that a class folder of
    thousands of images costs no stat of each (an image is not named like a split)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entry.name for entry in entries if entry.name.lower() in SPLIT_NAMES and entry.is_dir())
    except OSError:  # one that cannot be listed: the scan reports it
        return []


def layout_of_splits(root: Path, splits: dict[str, Path], labels: Optional[Path]) -> SplitFolders:
    """Roles from the split folders present: with a test folder, a validation folder picks the best epoch;
    without one, it is the test split (as Kaggle's validation/ is) and selection is held out of training."""
    inner = {role: unnested(folder) for role, folder in splits.items()}
    train, val, test = inner.get("train"), inner.get("val"), inner.get("test")
    if train is not None and not (val or test):
        raise UserError(
            f"no dataset layout found in {root}: it has a training folder ({splits['train'].name}/) but no "
            f"validation or test folder; give --data {train} to hold the validation and test splits out of it "
            "(--val-fraction, --test-fraction), or add a val/ or test/ folder beside it.")
    if train is None:
        raise no_training_folder_error(root, list(splits.values()))
    if val and test:
        return SplitFolders(train, val, test, labels, "train-val-test")
    if test:
        return SplitFolders(train, None, test, labels, "train-test")
    if (splits["train"].name.lower(), splits["val"].name.lower()) != ("training", "validation"):
        return SplitFolders(train, None, val, labels, "train-val")
    nested = inner != splits
    return SplitFolders(train, None, val, labels, "kaggle" if nested else "kaggle-flattened")


def unnested(split: Path) -> Path:
    """A split folder whose one subfolder has its own name is that subfolder, in any letter case: Kaggle's
    zips unpack so (training/training/<class>/), for every split they hold."""
    inside = class_folders(split)
    return split / inside[0] if len(inside) == 1 and inside[0].lower() == split.name.lower() else split


def no_training_folder_error(root: Path, splits: list[Path]) -> UserError:
    """Split folders without a training one. Class folders of images beside them are the training images: a test/
    folder of classes put into a folder of classes, as a user with a test set of their own does."""
    classes = [name for name in class_folders(root) if name.lower() not in SPLIT_NAMES and holds_images(root / name)]
    if not classes:
        return no_layout_error(root, splits)
    return UserError(f"{root} has class folders of images ({quoted(classes)}) beside the split folder(s) "
                     f"{listed(splits)} but no training folder; move the class folders into a train/ folder beside "
                     f"{listed(splits)}, so that each split is a folder of the same class folders.")


def no_layout_error(root: Path, splits: list[Path]) -> UserError:
    found = f" (split folders {listed(splits)}, not a layout)" if splits else ""
    return UserError(
        f"no dataset layout found in {root}{found}; expected a training folder (train/ or training/) with a "
        "validation folder (val/, valid/ or validation/) and/or a test folder (test/ or testing/), Kaggle's "
        "training/training/<class>/ and validation/validation/<class>/, or one folder of class subfolders."
    )


def listed(folders: list[Path]) -> str:
    return ", ".join(f"{folder.name}/" for folder in sorted(folders))


def holds_images(folder: Path) -> bool:
    """Whether `folder` has an image file of its own (judged by content), as a class folder has; a split
    folder holds class folders, and maybe a stray README or Thumbs.db."""
    from monkeytrain.data.imagefiles import is_image_file  # here: all CLI commands import this module, few need Pillow

    return any(is_image_file(entry) for entry in folder.iterdir() if not entry.name.startswith("."))


def folders_from_explicit(train: Optional[str], val: Optional[str], test: Optional[str]) -> SplitFolders:
    """Splits named one by one: the training folder and at least one other."""
    if not train:
        raise UserError("--val-dir and --test-dir need --train-dir as well.")
    if not (val or test):
        raise UserError("--train-dir alone leaves no split to report on; add --val-dir or --test-dir, or pass "
                        "the folder as --data to hold a test split out of it (--test-fraction).")
    for flag, folder in (("--train-dir", train), ("--val-dir", val), ("--test-dir", test)):
        if folder and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder} does not exist or is not a folder; check the path.")
    train_path = Path(train)
    if test:
        selection = Path(val) if val else None
        return SplitFolders(train_path, selection, Path(test), find_labels_file(train_path), "explicit")
    return SplitFolders(train_path, None, Path(val), find_labels_file(train_path), "explicit")


def find_labels_file(train_folder: Path) -> Optional[Path]:
    """monkey_labels.txt in the training folder or up to two folders above it."""
    for folder in (train_folder, *list(train_folder.resolve().parents)[:2]):
        if (folder / LABELS_FILE).is_file():
            return folder / LABELS_FILE
    return None


def class_folders(split: Path) -> list[str]:
    """Sorted names of the subfolders of a split folder, but hidden ones (is_hidden_folder) and monkeytrain's
    own (passed_over_as_runs), which are named in a warning: no folder is left out without a word."""
    names = []
    for path in split.iterdir():
        if path.is_dir() and not is_hidden_folder(path.name) and not passed_over_as_runs(path):
            names.append(path.name)
    return sorted(names)


def check_no_broken_links(split: Path) -> None:
    """A link to nothing among the class folders of a split: a class folder linked from a drive that is not
    mounted here, which class_folders would leave out without a word (one below a class is the scan's to
    report, as a skipped file). A link named like a file (notes.txt, x.jpg) is no class, linked or not."""
    for entry in split.iterdir():
        if is_hidden_folder(entry.name) or named_like_a_file(entry.name):
            continue
        if entry.is_symlink() and not entry.exists():
            raise UserError(f"{entry} is a link to {os.readlink(entry)}, which does not exist (a class folder on a "
                            "drive not mounted here?); mount it, fix the link, or remove it.")


def named_like_a_file(name: str) -> bool:
    """Whether `name` ends in a file extension: 2 to 5 letters and digits, at least one a letter (.txt, .jpeg,
    .ipynb). Class folders may hold dots too, but not so: CUB-200's 001.Black_footed_Albatross, n0.10."""
    suffix = Path(name).suffix[1:]
    return 2 <= len(suffix) <= 5 and suffix.isascii() and suffix.isalnum() and not suffix.isdigit()


def check_same_classes(folders: SplitFolders) -> list[str]:
    """The class folder names, after checking that every split has the same ones."""
    for split in (folders.train, folders.selection, folders.test):
        if split is not None:
            check_no_broken_links(split)
    train_classes = class_folders(folders.train)
    if not train_classes:
        raise UserError(f"{folders.train} has no class subfolders; put each class's images in its own folder.")
    if len(train_classes) == 1:
        only = folders.train / train_classes[0]
        hint = f"; if {only} holds the class folders, give that folder" if class_folders(only) else ""
        raise UserError(f"{folders.train} has one class subfolder ({train_classes[0]}); a classifier needs "
                        f"at least two, each class's images in its own folder{hint}.")
    others = [f for f in (folders.selection, folders.test) if f is not None]
    for other in others:
        other_classes = class_folders(other)
        for name, present, absent in _first_difference(train_classes, folders.train, other_classes, other):
            raise UserError(_difference_message(name, present, absent))
    return train_classes


def spelled_alike(name: str, names: list[str]) -> tuple[str, str] | None:
    """The one of `names` that differs from `name` only in how it is spelled, and how: in Unicode
    normalisation (the accents of one are separate code points, NFD, as a zip made on a Mac can leave them;
    of the other composed, NFC), or only in letter case. Class names stay case- and code-point-sensitive, as
    folder names are on most file systems: matching them would need the mapping from class to folder
    wherever a path is built, so the user renames instead."""
    nfc = unicodedata.normalize("NFC", name)
    for other in names:
        if other != name and unicodedata.normalize("NFC", other) == nfc:
            return other, "print alike but are spelled with different Unicode code points (NFC and NFD normalisation)"
    for other in names:
        if other != name and other.casefold() == name.casefold():
            return other, "differ only in letter case"
    return None


def _difference_message(name: str, present: Path, absent: Path) -> str:
    """A class folder missing from a split, and why when the split has one spelled alike."""
    alike = spelled_alike(name, class_folders(absent))
    if alike:
        return (f"class folder '{name}' in {present} and '{alike[0]}' in {absent} {alike[1]}; rename one of "
                "them so that every split has the same classes.")
    # A class renamed in one split shows as one missing and one extra: name both, so that one message says it.
    extra = sorted(set(class_folders(absent)) - set(class_folders(present)))
    instead = f", which has {quoted(extra)} that {present} lacks" if extra else ""
    return f"class folder '{name}' is in {present} but not in {absent}{instead}; every split needs the same classes."


def quoted(names: list[str], most: int = 3) -> str:
    """Up to `most` folder names in quotes, and how many more."""
    shown = ", ".join(f"'{name}'" for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _first_difference(a: list[str], a_dir: Path, b: list[str], b_dir: Path) -> list[tuple[str, Path, Path]]:
    """The first class folder found in one split and not the other, if any."""
    differences = [(n, a_dir, b_dir) for n in a if n not in b] + [(n, b_dir, a_dir) for n in b if n not in a]
    return differences[:1]


def display_names(class_folder_names: list[str], labels_file: Optional[Path]) -> list[str]:
    """Common names from monkey_labels.txt where it has them, else the folder names, as printable text: a
    folder name that is not UTF-8 shows its odd bytes as U+FFFD (plots, logs and JSON cannot take them)."""
    common = read_common_names(labels_file) if labels_file else {}
    names = [printable(common.get(name, name)) for name in class_folder_names]
    return distinct_names(names, [printable(name) for name in class_folder_names])


def distinct_names(names: list[str], folders: list[str]) -> list[str]:
    """The display names, a name that several classes share followed by its folder ("macaque (n0)"): a
    labels file may give two folders one common name, and names key per-class figures and predictions."""
    shared = {name for name in names if names.count(name) > 1}
    return [f"{name} ({folder})" if name in shared else name for name, folder in zip(names, folders)]


def printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_common_names(labels_file: Path) -> dict[str, str]:
    """Map folder label (n0) to common name (mantled howler) from the Kaggle labels file."""
    rows = list(csv.reader(labels_file.read_text(errors="replace").splitlines()))
    names = {}
    for row in rows[1:]:
        if len(row) >= 3 and row[0].strip():
            names[row[0].strip()] = row[2].strip().replace("_", " ")
    return names
