"""The folders among a data set's that hold no class: hidden and system folders, passed over without a word, and
monkeytrain's own (runs, a tune study), passed over with one warning naming each.

`--data .` with the default --output-dir puts runs/ beside the class folders, the run's own folder made before the
data is read; taken for a class, it stopped that run as one with no images, and a later one trained on its plots.
Imports nothing of Pillow at import time: every CLI command reads the layout, few need Pillow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monkeytrain.config import warn_from_the_first_process

# Folders that tools make beside a user's own, in any letter case: the __MACOSX folder of metadata a zip made
# on a Mac unpacks beside its contents; the @eaDir a Synology NAS puts in every folder of images, holding
# JPEG thumbnails of them (taken for images, they would train on and test with copies of the same pictures);
# what Windows puts at the top of every drive, a USB stick's too; the lost+found of a Linux file system's top
# folder (a data set on a disk of its own); and the recycle bins a Synology (#recycle) or QNAP (@Recycle) NAS
# keeps at the top of a shared folder, holding deleted files in the folders they were deleted from.
SYSTEM_FOLDERS = {"__macosx", "@eadir", "$recycle.bin", "system volume information", "lost+found", "#recycle",
                  "@recycle"}

# The files that mark one of monkeytrain's own folders, a folder holding all those of one mark (holds_runs): a run's
# while it trains (rundir.LOCK_NAME), its config and manifest, both written before it trains (rundir.CONFIG_NAME,
# runrecords.DATA_RECORD; a run stopped before them leaves no folder), and a tune study's journal
# (tune_study.STORAGE_NAME). Not one of a run's files alone: a data_manifest.json or best.safetensors copied
# into a class folder made the class vanish; nor a user's own config.yaml and data_manifest.json (is_run_folder
# reads the manifest).
MANIFEST_MARK = ("data_manifest.json", "config.yaml")
RUN_MARKS = ((".in-use",), MANIFEST_MARK, ("study.journal",))
# The images monkeytrain writes into its folders (plots.CURVES_NAME, plots.CONFUSION_NAME, tune_report.SEARCH_NAME):
# a folder with any other image of its own is a class, whatever else it holds.
RUN_PLOTS = ("curves.png", "confusion_matrix.png", "search.png")
# Names that say a file is an image without reading it; other files are judged by their content (is_an_image).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}


def is_hidden_folder(name: str) -> bool:
    """A dot folder, or one of the SYSTEM_FOLDERS, which hold no class and none of a class's images."""
    return name.startswith(".") or name.casefold() in SYSTEM_FOLDERS


def holds_runs(folder: Path, seen: frozenset = frozenset()) -> bool:
    """Whether `folder` is one of monkeytrain's own (is_run_folder), or holds them, at any depth, and no image:
    `--data .` in a folder of classes puts runs/ (the default --output-dir) beside them, the run's own folder made
    before the data is read (with --output-dir ., that folder itself; with runs/exp1, two deep). As a class, it
    stopped that run as one with no images, and a later one trained on its plots (PNG images). Every subfolder must
    hold runs (but empty ones), so that one stray run file in a class does not take a split of classes for runs;
    files other than images (a SLURM job's log, a README) may sit beside them. `seen`: the folders on the way
    here, as (device, inode), so that linked folders leading back round end the walk."""
    if is_run_folder(folder):
        return True
    try:
        here = os.stat(folder)
    except OSError:  # one that cannot be read is a class that the scan reports
        return False
    if (here.st_dev, here.st_ino) in seen:
        return False
    seen |= {(here.st_dev, here.st_ino)}
    runs, others = False, []
    try:
        with os.scandir(folder) as entries:  # a class folder ends at its first image: no listing of all of them
            for entry in entries:
                if entry.is_dir():
                    if is_hidden_folder(entry.name):
                        continue
                    if holds_runs(Path(entry.path), seen):
                        runs = True
                    elif not looks_empty(entry.path):
                        return False
                elif named_as_an_image(entry.name):
                    return False
                else:
                    others.append(entry)
    except OSError:  # one that cannot be listed is a class that the scan reports
        return False
    # Other files are read only beside runs: a class's subfolder of 20,000 annotation files (.xml) is no run's,
    # and reading each of them at every run cost seconds.
    return runs and not any(is_an_image(entry) for entry in others)


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds all the files of one of the RUN_MARKS, a data_manifest.json being monkeytrain's, and
    no image but RUN_PLOTS (a class folder of images is a class, whatever file was copied into it)."""
    marks = [mark for mark in RUN_MARKS if all(os.path.lexists(folder / name) for name in mark)]
    if not marks or marks == [MANIFEST_MARK] and not monkeytrains_manifest(folder / MANIFEST_MARK[0]):
        return False
    try:
        with os.scandir(folder) as entries:
            return not any(entry.name not in RUN_PLOTS and not entry.is_dir() and is_an_image(entry)
                           for entry in entries)
    except OSError:  # one that cannot be listed is a class that the scan reports
        return False


def monkeytrains_manifest(path: Path) -> bool:
    """Whether `path` is a data manifest that monkeytrain wrote (dataset.DatasetSplits.manifest), not a user's
    own file of that name beside a config.yaml of theirs: one small read, of folders that hold both names only."""
    try:
        return "class_folders" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):  # unreadable, not JSON, not an object
        return False


def looks_empty(folder: str) -> bool:
    """Whether `folder` holds nothing but hidden files and folders (.DS_Store, Thumbs.db)."""
    from monkeytrain.data.imagefiles import is_hidden_file  # here: see the module's docstring

    try:
        with os.scandir(folder) as entries:
            return all(is_hidden_file(entry.name) or is_hidden_folder(entry.name) for entry in entries)
    except OSError:  # one that cannot be listed may hold a class's images: the scan reports it
        return False


def is_an_image(entry: os.DirEntry) -> bool:
    """Whether the file `entry` is an image, by its name (named_as_an_image) or else by its content."""
    from monkeytrain.data.imagefiles import is_hidden_file, is_image_file  # here: see the module's docstring

    return named_as_an_image(entry.name) or not is_hidden_file(entry.name) and is_image_file(Path(entry.path))


def named_as_an_image(name: str) -> bool:
    """Whether a file's name says it is an image, without reading it; hidden and system files (.DS_Store,
    Thumbs.db, desktop.ini: what a system writes into any folder) are none."""
    from monkeytrain.data.imagefiles import is_hidden_file  # here: see the module's docstring

    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not is_hidden_file(name)


def passed_over_as_runs(folder: Path) -> bool:
    """Whether `folder`, among the class folders or below one, holds monkeytrain's runs (holds_runs), said in one
    warning: a class really named runs, with `--data .` and the default --output-dir, holds the run's folder, whose
    plots the next run's scan took for images of that class."""
    if not holds_runs(folder):
        return False
    warn_passed_over(folder)
    return True


_PASSED_OVER: set[str] = set()  # the folders warn_passed_over named: the layout is read many times a run


def warn_passed_over(folder: Path) -> None:
    """Say once that `folder`, among the class folders or below one, is taken for monkeytrain's runs, not for a
    class's images."""
    if str(folder) in _PASSED_OVER:
        return
    _PASSED_OVER.add(str(folder))
    warn_from_the_first_process(f"{folder} is passed over: it holds monkeytrain's runs (or is one), whose plots are "
                                "no images of the data; if it holds images you meant, move the run files out of it.")
