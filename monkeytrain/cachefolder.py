"""The cache folder: what runs keep there, how big it is, and clearing it (`monkeytrain cache`).

Everything in it only saves time, and a run makes again whatever is missing: stored views, channel
statistics, what scans of split folders found, the built-in synthetic data set, torch.compile's
kernels, and temporary files that a killed write left behind. Runs mark each file or folder they
use (its modification time, `storage.mark_used`), so that `--unused-days` can spare what recent
runs still use. Only these known entries are ever listed or deleted: a --cache-dir pointed at a
folder of other things loses none of them. A cache folder that can be read but not written (prepared once
by an admin on a cluster's shared file system, mounted read-only) serves what it holds: runs only read
from it, and make in memory, every time, whatever it lacks (the synthetic data set, which the data code reads
as files, in a temporary folder that is removed at exit).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from monkeytrain.errors import UserError, to_stderr
from monkeytrain.storage import check_writable_dir, folder_size, told_read_only

DAY = 24 * 3600
# kind: the patterns of its entries under the cache folder (pathlib's glob also matches dot files)
KINDS = {
    "views": ["views/*.pt"],  # decoded images, one file per data set split and resolution
    "stats": ["stats/*.json"],  # channel mean and std of a training split
    "scans": ["scans/*.json"],  # what scanning a split folder found
    "synthetic": ["synthetic-v*"],  # the built-in synthetic data set (older versions too)
    "compiled": ["inductor"],  # torch.compile's kernels (TORCHINDUCTOR_CACHE_DIR)
    "unfinished": ["views/.*.tmp*", "stats/.*.tmp*", "scans/.*.tmp*", ".synthetic-v*.*"],  # killed writes
}


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    size: int  # bytes, the files inside for a folder
    last_used: float  # seconds since the epoch: the modification time, which runs renew on use


def cache_folder(chosen: str | os.PathLike | None = None) -> Path:
    """--cache-dir when given, else $MONKEYTRAIN_CACHE, else ~/.cache/monkeytrain. A leading ~ is the home
    folder (a shell expands it only where a word starts: not in --cache-dir=~/x, nor in a quoted value)."""
    if chosen == "":  # what `--cache-dir "$DIR"` passes with DIR unset: not a wish for the default
        raise UserError("--cache-dir is empty (an unset shell variable?); give a folder, or leave the flag out "
                        "for the default.")
    chosen = chosen or os.environ.get("MONKEYTRAIN_CACHE")
    if chosen == "":
        raise UserError("MONKEYTRAIN_CACHE is set but empty; set it to a folder, or unset it for the default "
                        "(~/.cache/monkeytrain).")
    try:
        return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "monkeytrain"
    except RuntimeError:  # ~someone unknown, or no $HOME and no passwd entry (a container's odd user id)
        where = f"the home folder of {chosen}" if chosen else "a home folder for the default cache folder"
        raise UserError(f"cannot find {where}; give --cache-dir (or MONKEYTRAIN_CACHE) a folder path.") from None


def usable_cache_folder(chosen: str | os.PathLike | None = None, warn: bool = True) -> Path:
    """`cache_folder(chosen)` for a run, created and checked writable up front (on every rank: the probe
    file is per process), so that a bad --cache-dir ends in one sentence rather than a traceback. A folder
    that exists and can be read but not written is used as it is, after one warning (when `warn`: from one
    process): a cache only saves time, its files are only read, and each write to it is best effort
    (`storage.write_cache`)."""
    folder = cache_folder(chosen)
    try:
        check_writable_dir(folder, "--cache-dir")
    except UserError:
        if not (folder.is_dir() and os.access(folder, os.R_OK | os.X_OK)):  # missing, or not even readable
            raise
        told_read_only(folder)  # on every process: the one warning stands for each write that fails
        if warn:
            to_stderr("warning", f"the cache folder {folder} is read-only: this run reads what it holds and "
                                 "makes anything it lacks in memory (the synthetic data set in a temporary folder), "
                                 "again each run (give a writable --cache-dir to keep it).")
    return folder


def listed_cache_folder(chosen: str | None) -> Path:
    """`cache_folder(chosen)` for `monkeytrain cache` to list or clear. A --cache-dir given that does not exist
    is an error, as any path given that does not exist is: a mistyped one would read as an empty cache. The
    default folder, or $MONKEYTRAIN_CACHE, is the one runs use, and only made when one first caches something."""
    folder = cache_folder(chosen)
    if chosen and not os.path.lexists(folder):
        raise UserError(f"the cache folder {folder} does not exist; check --cache-dir (a run makes its cache folder "
                        "when it first caches something).")
    return folder


def cache_entries(cache_dir: Path) -> list[Entry]:
    """Every known entry of the cache folder, oldest use first (none if the folder does not exist)."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"the cache folder {cache_dir} is a file; give --cache-dir a folder.")
    found = [entry_of(kind, path) for kind, patterns in KINDS.items()
             for pattern in patterns for path in cache_dir.glob(pattern)]
    return sorted((entry for entry in found if entry is not None), key=lambda entry: entry.last_used)


def entry_of(kind: str, path: Path) -> Entry | None:
    """The entry at `path`; None if it went away meanwhile (a run or another clear removed it)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    size = folder_size(path) if path.is_dir() else stat.st_size
    return Entry(kind, path, size, stat.st_mtime)


def unused_for(entries: list[Entry], days: float) -> list[Entry]:
    """The entries that no run has used for at least `days` days."""
    if not days >= 0:  # NaN too
        raise UserError(f"--unused-days must be 0 or more, got {days:g}.")
    cutoff = time.time() - days * DAY
    return [entry for entry in entries if entry.last_used <= cutoff]


def delete_entries(entries: list[Entry]) -> None:
    """Delete each entry; one that is already gone is fine, one that cannot be deleted is an error."""
    for entry in entries:
        try:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            raise UserError(f"cannot delete {error.filename or entry.path} from the cache "
                            f"({error.strerror or error}); check its permissions and run again.") from None
