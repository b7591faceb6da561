"""Fetching the 10 Monkey Species dataset from Kaggle into the default data folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from monkeytrain.data import layout
from monkeytrain.errors import UserError
from monkeytrain.storage import check_writable_dir

KAGGLE_DATASET = "slothkong/10-monkey-species"
CLASS_FOLDERS = [f"n{index}" for index in range(10)]


def download_monkey_species(destination: Path) -> Path:
    """Download with kagglehub (it caches) and copy the Kaggle layout to `destination`, whole or not at all: a
    copy cut short (Ctrl-C, a full disk) would be a data set that trains on fewer images without a word."""
    check_destination(destination)
    try:
        import kagglehub

        fetched = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as error:  # kagglehub raises network, auth and HTTP errors of many types
        raise UserError(
            f"could not download {KAGGLE_DATASET} from Kaggle ({error.__class__.__name__}); check the "
            "network and Kaggle credentials, or download it by hand and pass --data ROOT."
        ) from None
    copy_whole(fetched, destination)
    return destination


def copy_whole(source: Path, destination: Path) -> None:
    """Copy the folder `source` to `destination` (new or an empty folder) through a hidden folder beside it,
    renamed into place once every file is there; on any failure, nothing is left."""
    copying = Path(tempfile.mkdtemp(prefix=f".{destination.name}.copying-", dir=destination.parent))
    try:
        shutil.copytree(source, copying, dirs_exist_ok=True)
        put_in_place(copying, destination)
    except shutil.Error as error:  # copytree goes on past each file it cannot copy, then lists them all
        failed = error.args[0]  # (source, target, why) for each file
        raise UserError(f"could not copy the data set to {destination} ({len(failed)} file(s) failed, the first: "
                        f"{failed[0][2]}); nothing was left there: check that folder's disk and run again.") from None
    finally:
        shutil.rmtree(copying, ignore_errors=True)  # gone once renamed


def check_destination(destination: Path) -> None:
    """A --dest to copy the data set to: a new or empty folder, whose parent can be written; told before the
    download (minutes), not after it."""
    if destination.exists() and not destination.is_dir():
        raise UserError(f"{destination} is a file, not a folder; pass --dest a new or empty folder.")
    if destination.is_dir() and any(destination.iterdir()):
        raise UserError(f"{destination} is not empty, and does not hold the data set in Kaggle's layout; pass "
                        "--dest a new or empty folder.")
    check_writable_dir(destination.parent, "--dest")


def holds_monkey_species(destination: Path) -> bool:
    """Whether `destination` holds 10 Monkey Species as Kaggle lays it out (training/ and validation/, each with
    the class folders n0 to n9, none empty), as a download leaves it."""
    if not destination.is_dir():
        return False
    try:
        folders = layout.folders_from_root(destination)
        classes = layout.check_same_classes(folders)
    except UserError:  # no layout, or not the same classes in both splits
        return False
    return (folders.layout in ("kaggle", "kaggle-flattened") and classes == CLASS_FOLDERS
            and all(any((split / name).iterdir()) for split in (folders.train, folders.test) for name in classes))


def put_in_place(copied: Path, destination: Path) -> None:
    """Rename the folder `copied` to `destination`, new or an empty folder; an empty folder that cannot be
    replaced so (a link to a folder on another disk, a mount point) gets `copied`'s entries moved into it."""
    try:
        copied.replace(destination)
    except OSError:
        if not destination.is_dir():
            raise
        for entry in copied.iterdir():
            shutil.move(entry, destination / entry.name)
