"""Writing files safely: atomic replacement, a clear error on a full disk, caches that may fail.

Every file monkeytrain writes for later (the checkpoint, its config.json, the
caches) goes through `write_atomically`: a reader sees the old file or the new
one, never half of one, and a failed write leaves no temporary file behind.
A log that grows a line at a time (metrics.jsonl) goes through `append_line`:
each line whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

from monkeytrain.errors import UserError, to_stderr

# Out of space, or out of this user's quota: either way the fix is to free space or write elsewhere.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What libraries that wrap the error in their own type (torch's zip writer, safetensors) still say.
QUOTA_WORDS = ("Disk quota exceeded", "QuotaExceeded")
DISK_FULL_WORDS = ("No space left on device", "StorageFull", *QUOTA_WORDS)
NEARLY_FULL = 1024 * 1024  # free bytes below which a failed write is taken for a full disk
SPACE_PROBE_BYTES = 64 * 1024  # a few blocks: a write that must find new space on any file system

Payload = Union[bytes, Callable[[BinaryIO], None]]


class WriteFailed(UserError):
    """A file that could not be written (a read-only or failing disk); `reason` says why in a few words."""

    def __init__(self, path: Path, reason: str, flag: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path.name} in {path.parent} ({reason}); {or_elsewhere(MAKE_WRITABLE, flag)}")


class DiskFull(WriteFailed):
    """A write that failed for lack of space, or of quota; the message says how much it needed, when known.
    A quota is named as such: on a cluster `df` shows terabytes free, which "no space left" would contradict."""

    def __init__(self, path: Path, needed: int, at_least: bool, flag: str, quota: bool = False):
        self.path, self.needed = path, needed
        amount = ("" if at_least and not needed  # "at least 0 B" would tell nothing
                  else f"{'at least ' if at_least else ''}{human_size(needed)} needed")
        what = "your disk quota is used up" if quota else "no space left"
        self.reason = f"{what} on the device" + (f", {amount}" if amount else "")
        UserError.__init__(self, f"{what} on the device of {path.parent} to write {path.name}"
                           + (f" ({amount})" if amount else "") + f"; {or_elsewhere(FREE_SPACE, flag)}")


FREE_SPACE, MAKE_WRITABLE = "free some space", "make that folder writable"  # the first fix a line names


def or_elsewhere(fix: str, flag: str) -> str:
    """How a WriteFailed's (or DiskFull's) line ends: its first fix, or another folder (`flag`)."""
    return f"{fix} or pick another {flag}."


def first_fix(message: str, flag: str) -> str | None:
    """What a DiskFull's (FREE_SPACE) or WriteFailed's (MAKE_WRITABLE) line `message` says to do before "or pick
    another `flag`"; None for any other line."""
    return next((fix for fix in (FREE_SPACE, MAKE_WRITABLE) if message.endswith(f"; {or_elsewhere(fix, flag)}")), None)


def with_way_out(message: str, flag: str, way_out: str | Callable[[str], str]) -> str | None:
    """A DiskFull's or WriteFailed's line `message` ending in `way_out` (or `way_out(its first fix)`) instead of
    its own (another `flag`), None for any other line. Read from the text, as every rank of a run has the line
    (the rank that failed alone has the error itself)."""
    fix = first_fix(message, flag)
    if fix is None:
        return None
    return message[:-len(or_elsewhere(fix, flag))] + (way_out(fix) if callable(way_out) else way_out)


def human_size(n: int) -> str:
    """Bytes as a person reads them: 512 B, 3.0 KiB, 45.2 MiB, 1.5 GiB."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library re-raised it as its own error type."""
    return any((isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS)
               or any(words in str(seen) for words in DISK_FULL_WORDS) for seen in causes(error))


def over_quota(error: BaseException) -> bool:
    """True when the space that ran out is this user's quota (EDQUOT), not the device's."""
    return any((isinstance(seen, OSError) and seen.errno == errno.EDQUOT)
               or any(words in str(seen) for words in QUOTA_WORDS) for seen in causes(error))


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the error it was raised from (or while handling), and so on."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed write into `folder` failed for lack of space. torch.save to a path
    reports a full disk only as a RuntimeError ("unexpected pos"), so a nearly full device
    counts too: writes fill it to the brim before they fail; and so does a folder that refuses
    a small write for lack of space: a full quota, on a device that may have terabytes free."""
    return is_disk_full(error) or free_bytes(folder) < NEARLY_FULL or space_refusal(folder) is not None


def space_refusal(folder: Path) -> int | None:
    """ENOSPC or EDQUOT, where a small file written into `folder` now fails for lack of space or of quota
    (it goes again); None where it is written, or fails otherwise."""
    probe = folder / f".space-probe-{os.getpid()}"
    try:
        _write_file(probe, b"\0" * SPACE_PROBE_BYTES, durable=True)  # a network file system says so at fsync
    except OSError as error:
        return error.errno if error.errno in DISK_FULL_ERRNOS else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return None


def free_bytes(folder: Path) -> int:
    """Space this user may still write on `folder`'s device (a large number if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return sys.maxsize


def write_atomically(path: Path, write: Payload, durable: bool = True, *, flag: str = "--output-dir") -> None:
    """Write `path` via a temporary file in the same folder and a rename.

    `write` is the file's bytes, or a function that writes them to an open binary file.
    `durable` fsyncs the file and the folder, so the new file survives a power cut
    (caches can skip that). On a full disk this raises `DiskFull`, whose message
    names `flag` as the way out; on another OSError (read-only, no permission, an
    I/O error) `WriteFailed`, both UserErrors; any other error is re-raised. Either
    way the temporary file is gone and the previous `path`, if any, is untouched.
    """
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_file(temporary, write, durable)
        os.replace(temporary, path)
    except Exception as error:  # a writer such as torch.save may wrap ENOSPC in its own type
        written = _size_or_zero(temporary)  # measured before the file goes
        with contextlib.suppress(OSError):  # a folder gone read-only refuses this too: keep the first cause
            temporary.unlink(missing_ok=True)
        needed, at_least = (len(write), False) if isinstance(write, bytes) else (written, True)
        raise write_failure(path, error, needed, at_least, flag) from error
    if durable:
        fsync_folder(path.parent)  # make the rename itself durable


def write_failure(path: Path, error: Exception, needed: int, at_least: bool, flag: str) -> Exception:
    """What a failed write of `path` raises: `DiskFull` (saying how much it needed), `WriteFailed` for any
    other OSError (read-only, no permission, an I/O error of the disk), else the error itself."""
    if is_disk_full(error):
        return DiskFull(path, needed, at_least, flag, quota=over_quota(error))
    if isinstance(error, OSError):
        return WriteFailed(path, error.strerror or str(error), flag)
    return error


def append_line(path: Path, line: str, *, flag: str = "--output-dir", durable: bool = False) -> None:
    """Append `line` (ending in a newline) to `path` in one write, so that a reader, a resume or
    pandas.read_json(lines=True) sees it whole or not at all. A disk that fills up mid-line would
    leave half of it (a buffered file writes what fits, then fails), which breaks the file for every
    reader: the file is cut back to where it was. `durable` waits until the disk has it (fsync), for a
    file that other hosts read. Fails as `write_atomically` does."""
    data = line.encode()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_failure(path, error, len(data), False, flag) from error
    try:
        start = os.fstat(descriptor).st_size
        try:
            _write_all(descriptor, data)
            if durable:
                os.fsync(descriptor)
        except OSError as error:
            with contextlib.suppress(OSError):  # a disk that fails writes may fail this too: keep the cause
                os.ftruncate(descriptor, start)
            raise write_failure(path, error, len(data), False, flag) from error
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    """os.write until all of `data` is out: a write may take only part of it (a disk nearly full)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def _write_file(path: Path, write: Payload, durable: bool) -> None:
    with open(path, "wb") as handle:
        if isinstance(write, bytes):
            handle.write(write)
        else:
            write(handle)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def folder_size(folder: Path) -> int:
    """Bytes in the files under `folder` (0 if it is gone)."""
    return sum(_size_or_zero(p) for p in folder.rglob("*") if p.is_file())


@contextmanager
def writable_dir_for(path: Path, flag: str) -> Iterator[None]:
    """`check_writable_dir(path)` for the work inside the block: should that work fail, the folders
    the check created go again, where they are still empty (the failure wrote nothing)."""
    created = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    check_writable_dir(path, flag)
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # something was written in it after all
                break
        raise


def check_writable_dir(path: Path, flag: str) -> None:
    """Create `path` (and its parents) and make sure a file can be created in it, so that an
    unusable folder fails now, in one sentence, not as a traceback hours into training."""
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        blocking = file_in_the_way(path)
        if blocking:  # mkdir says "File exists" or "Not a directory", naming neither the file nor the folder
            within = "" if blocking == path else f"cannot create the folder {path}: "
            raise UserError(f"{within}{blocking} is a file, not a folder; pick a writable {flag}.") from None
        raise UserError(f"cannot create or write the folder {path} ({error.strerror or error}); "
                        f"pick a writable {flag}.") from None


def file_in_the_way(path: Path) -> Path | None:
    """The file (anything but a folder) at `path` or at the first of its parents that is one, if any."""
    for step in (*reversed(path.parents), path):
        if step.exists() and not step.is_dir():
            return step
    return None


def mark_used(path: Path) -> None:
    """Renew a cache entry's modification time, which `monkeytrain cache --unused-days` reads as
    its last use (access times are not kept on noatime mounts). Best effort: a read-only cache
    folder still serves its files."""
    try:
        os.utime(path)
    except OSError:
        pass


# Cache folders this process has told the user are read-only (cachefolder.usable_cache_folder): a write that
# fails under one fails as that warning said, so it goes without a word of its own.
FOLDERS_TOLD_READ_ONLY: set[str] = set()


def told_read_only(folder: Path) -> None:
    """Note that the user was told `folder` is read-only: write_cache's failures under it are quiet from now."""
    FOLDERS_TOLD_READ_ONLY.add(os.path.abspath(folder))


def write_cache(path: Path, write: Payload) -> bool:
    """Write a cache file; on any failure (a full disk, a read-only folder) warn once and
    return False: a cache only saves time, so the run goes on without it. Under a folder the
    user was told is read-only it is still tried (a subfolder may take it) but fails quietly."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write, durable=False, flag="--cache-dir")
        return True
    except (OSError, WriteFailed) as error:
        if not is_told_read_only(path):
            to_stderr("warning", f"cannot write the cache file {path} ({why_not_written(error)}); going on "
                                 "without it.")
        return False


def is_told_read_only(path: Path) -> bool:
    """Whether `path` lies under a folder the user was told is read-only (told_read_only)."""
    return any(is_within_folder(path, folder) for folder in FOLDERS_TOLD_READ_ONLY)


def is_within_folder(path: Path, folder: str) -> bool:
    """Whether `path` lies below `folder` (an absolute path), as written: no links are followed."""
    return Path(os.path.abspath(path)).is_relative_to(folder)


def why_not_written(error: OSError | WriteFailed) -> str:
    """A failed write's cause in a few words: no space (and how much was needed), or the system's reason."""
    return error.reason if isinstance(error, WriteFailed) else (error.strerror or str(error))
