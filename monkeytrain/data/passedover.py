"""The folders among a data set's that hold no class: hidden and system folders, passed over without a word, and
monkeytrain's own (runs, a tune study), passed over with one warning naming each.

`--data .` with the default --output-dir puts runs/ beside the class folders, the run's own folder made before the
data is read; taken for a class, it stopped that run as one with no images, and a later one trained on its plots.
Imports nothing of Pillow at import time: every CLI command reads the layout, few need Pillow.
"""

from __future__ import annotations

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
# into a class folder made the class vanish.
RUN_MARKS = ((".in-use",), ("data_manifest.json", "config.yaml"), ("study.journal",))
# The images monkeytrain writes into its folders (plots.CURVES_NAME, plots.CONFUSION_NAME, tune_report.SEARCH_NAME):
# a folder with any other image of its own is a class, whatever else it holds.
RUN_PLOTS = ("curves.png", "confusion_matrix.png", "search.png")
# How many folders deep runs may lie below a folder of runs: --output-dir runs/exp1 puts each at runs/exp1/<run>/.
# A bound, too, on the walk through linked folders that lead back round to each other.
RUN_NESTING = 3
# Names that say a file is an image without reading it; other files are judged by their content (is_an_image).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}


def is_hidden_folder(name: str) -> bool:
    """A dot folder, or one of the SYSTEM_FOLDERS, which hold no class and none of a class's images."""
    return name.startswith(".") or name.casefold() in SYSTEM_FOLDERS


def holds_runs(folder: Path, depth: int = RUN_NESTING) -> bool:
    """Whether `folder` is one of monkeytrain's own (is_run_folder), or holds them and no image, up to `depth`
    folders deep: `--data .` in a folder of classes puts runs/ (the default --output-dir) beside them, the run's own
    folder made before the data is read (with --output-dir ., that folder itself; with runs/exp1, two deep). As a
    class, it stopped that run as one with no images, and a later one trained on its plots (PNG images). Every
    subfolder must hold runs (but empty ones), so that one stray run file in a class does not take a split of
    classes for runs; files other than images (a SLURM job's log, a README) may sit beside them."""
    if is_run_folder(folder):
        return True
    if depth == 0:
        return False
    runs = False
    try:
        with os.scandir(folder) as entries:  # a class folder ends at its first image: no listing of all of them
            for entry in entries:
                if entry.is_dir():
                    if is_hidden_folder(entry.name):
                        continue
                    if holds_runs(Path(entry.path), depth - 1):
                        runs = True
                    elif not looks_empty(entry.path):
                        return False
                elif is_an_image(entry):
                    return False
    except OSError:  # one that cannot be listed is a class that the scan reports
        return False
    return runs


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds all the files of one of the RUN_MARKS, and no image but RUN_PLOTS (a class folder
    of images is a class, whatever file was copied into it)."""
    if not any(all(os.path.lexists(folder / name) for name in mark) for mark in RUN_MARKS):
        return False
    try:
        with os.scandir(folder) as entries:
            return not any(entry.name not in RUN_PLOTS and not entry.is_dir() and is_an_image(entry)
                           for entry in entries)
    except OSError:  # one that cannot be listed is a class that the scan reports
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
    """Whether the file `entry` is an image, by its extension (no read: a class folder of images ends its
    holds_runs at the first) or else by its content; hidden and system files are none."""
    from monkeytrain.data.imagefiles import is_hidden_file, is_image_file  # here: see the module's docstring

    if is_hidden_file(entry.name):  # .DS_Store, Thumbs.db, desktop.ini: what a system writes into any folder
        return False
    return Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS or is_image_file(Path(entry.path))


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
    warn_from_the_first_process(f"{folder} is passed over: it holds monkeytrain's runs (or is one), not a class's "
                                "images; if it is a class, move the run files out of it.")
