"""The cache folder: its entries, what runs mark as used, and `monkeytrain cache` listing and clearing."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch

from monkeytrain import cli, storage
from monkeytrain.cachefolder import DAY, cache_entries, delete_entries, unused_for, usable_cache_folder
from monkeytrain.data import imagefiles
from monkeytrain.data.imagefiles import scan_labelled_files
from monkeytrain.data.stats import ChannelStats, read_cached, write_cached
from monkeytrain.data.synthetic import ensure_synthetic_dataset
from monkeytrain.data.views import cached_views
from monkeytrain.errors import UserError
from monkeytrain.model import compiled

LONG_AGO = time.time() - 90 * DAY


def put(path: Path, size: int, used: float = LONG_AGO) -> Path:
    """A file of `size` bytes at `path`, last used at `used`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (used, used))
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    """A cache folder with an entry of each kind (all but one used long ago), and files of the user's."""
    root = tmp_path / "cache"
    put(root / "views" / "a.pt", 1000)
    put(root / "views" / "b.pt", 3000, used=time.time())  # a recent run's
    put(root / "stats" / "c.json", 40)
    put(root / "scans" / "d.json", 200)
    put(root / "synthetic-v2" / "train" / "circle" / "0.png", 500)
    put(root / "synthetic-v1" / "train" / "circle" / "0.png", 300)  # an older version's
    put(root / "inductor" / "fxgraph" / "k", 700)
    put(root / "views" / ".e.pt.tmp4242", 60)  # a write killed half-way
    for folder in ("synthetic-v2", "synthetic-v1", "inductor"):
        os.utime(root / folder, (LONG_AGO, LONG_AGO))
    put(root / "notes.txt", 5)  # not ours: a --cache-dir pointed at a folder of other things
    put(root / "views" / "keep.txt", 5)
    return root


def listed(entries) -> dict[str, tuple[str, int]]:
    return {entry.path.name: (entry.kind, entry.size) for entry in entries}


def test_entries_are_the_known_kinds_with_their_sizes_oldest_use_first(cache):
    entries = cache_entries(cache)
    assert listed(entries) == {
        "a.pt": ("views", 1000), "b.pt": ("views", 3000), "c.json": ("stats", 40), "d.json": ("scans", 200),
        "synthetic-v2": ("synthetic", 500), "synthetic-v1": ("synthetic", 300), "inductor": ("compiled", 700),
        ".e.pt.tmp4242": ("unfinished", 60)}
    assert entries[-1].path.name == "b.pt"
    assert cache_entries(cache / "not-yet") == []


def test_unused_for_keeps_what_recent_runs_used(cache):
    entries = cache_entries(cache)
    assert "b.pt" not in listed(unused_for(entries, 30))
    assert len(unused_for(entries, 30)) == len(entries) - 1
    assert unused_for(entries, 100) == []
    assert len(unused_for(entries, 0)) == len(entries)


def test_deleting_removes_files_and_folders_and_nothing_else(cache):
    entries = cache_entries(cache)
    (cache / "views" / "a.pt").unlink()  # gone meanwhile (another clear, say): fine
    delete_entries(entries)
    assert cache_entries(cache) == []
    assert (cache / "notes.txt").is_file() and (cache / "views" / "keep.txt").is_file()


def test_a_run_marks_each_cache_entry_it_uses(tmp_path, make_image_folder, monkeypatch):
    """Every place a run reads a cache entry renews its modification time, which --unused-days reads."""
    monkeypatch.setattr(imagefiles, "RACY_NS", 0)  # the images were just written: trust their scan anyway
    cache = tmp_path / "cache"
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    labelled = [(path, 0) for path in sorted((root / "training" / "training").rglob("*.png"))]
    scans = cache / "scans" / "s.json"
    files, _ = scan_labelled_files(labelled, scans)
    stats = cache / "stats" / "t.json"
    write_cached(stats, ChannelStats([0.5] * 3, [0.2] * 3))
    cached_views(files, 32, cache)
    synthetic = ensure_synthetic_dataset(cache)
    (cache / "inductor").mkdir()  # as torch.compile leaves it
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what compiled() sets there is undone
    entries = cache_entries(cache)
    assert {entry.kind for entry in entries} == {"scans", "stats", "views", "synthetic", "compiled"}
    for entry in entries:
        os.utime(entry.path, (LONG_AGO, LONG_AGO))

    scan_labelled_files(labelled, scans)  # unchanged files: the scans file is read, not rewritten
    assert read_cached(stats) is not None
    cached_views(files, 32, cache)
    assert ensure_synthetic_dataset(cache) == synthetic
    compiled(torch.nn.Linear(2, 2), True, cache)  # compiles at its first call, not here
    assert unused_for(cache_entries(cache), 1) == []


def run_cache_command(argv: list[str], capsys) -> list[str]:
    cli.main(["cache", *argv])
    return capsys.readouterr().out.splitlines()


def test_the_command_lists_and_clears_what_it_was_asked_to(cache, capsys, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(cache))
    summary, *kinds = run_cache_command([], capsys)
    assert summary == f"{cache}: 8 entries (everything), 5.7 KiB"
    assert [line.split()[:3] for line in kinds] == [
        ["views", "2", "3.9"], ["stats", "1", "40"], ["scans", "1", "200"], ["synthetic", "2", "800"],
        ["compiled", "1", "700"], ["unfinished", "1", "60"]]

    assert run_cache_command(["--unused-days", "30", "--clear"], capsys) == [
        f"{cache}: deleted 7 entries (unused for 30 days), 2.7 KiB"]
    assert listed(cache_entries(cache)) == {"b.pt": ("views", 3000)}
    other = cache.parent / "elsewhere"
    other.mkdir()
    assert run_cache_command(["--cache-dir", str(other)], capsys) == [f"{other}: 0 entries (everything), 0 B"]
    assert run_cache_command(["--clear"], capsys) == [f"{cache}: deleted 1 entry (everything), 2.9 KiB"]
    assert (cache / "notes.txt").is_file()


def test_command_errors_are_one_line(tmp_path, capsys):
    from test_cli import error_of

    assert "--unused-days must be 0 or more" in error_of(cli.main, ["cache", "--unused-days", "-1"], capsys)
    assert "--unused-days must be 0 or more" in error_of(cli.main, ["cache", "--unused-days", "nan"], capsys)
    put(tmp_path / "a-file", 1)
    assert "is a file" in error_of(cli.main, ["cache", "--cache-dir", str(tmp_path / "a-file")], capsys)
    assert "cannot find the home folder of ~no-such-user-here/x; give --cache-dir" in error_of(
        cli.main, ["cache", "--cache-dir", "~no-such-user-here/x"], capsys)
    assert "--cache-dir is empty" in error_of(cli.main, ["cache", "--cache-dir", ""], capsys)  # not the cwd


@pytest.mark.parametrize("clear", [[], ["--clear"]])
def test_a_cache_dir_given_that_does_not_exist_is_told_not_listed_as_empty(tmp_path, capsys, monkeypatch, clear):
    """A mistyped --cache-dir printed `0 entries (everything), 0 B`, as an empty cache; the folder that runs use
    ($MONKEYTRAIN_CACHE or the default) is only made when a run first caches something, so it is listed, with a
    note."""
    from test_cli import error_of

    typo = tmp_path / "cahce"
    assert error_of(cli.main, ["cache", "--cache-dir", str(typo), *clear], capsys) == (
        f"monkeytrain: error: the cache folder {typo} does not exist; check --cache-dir (a run makes its cache "
        "folder when it first caches something).")
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(typo))
    done = "deleted 0 entries" if clear else "0 entries"
    assert run_cache_command(clear, capsys) == [
        f"{typo}: {done} (everything), 0 B; the folder does not exist yet (no run has cached anything in it)"]


def test_an_entry_that_cannot_be_deleted_is_one_line_naming_it(cache, capsys, monkeypatch):
    from test_cli import error_of

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "unlink", refuse)
    error = error_of(cli.main, ["cache", "--cache-dir", str(cache), "--clear"], capsys)
    assert "cannot delete" in error and "Permission denied" in error and str(cache) in error



def read_only(folder: Path, monkeypatch) -> None:
    """Writes under `folder` fail as on a read-only mount (which root, unlike a chmod, cannot write into)."""
    def refused_under_folder(original):
        def refuse(path, *args, **kwargs):
            if Path(path).is_relative_to(folder):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return original(path, *args, **kwargs)
        return refuse

    monkeypatch.setattr(Path, "touch", refused_under_folder(Path.touch))
    monkeypatch.setattr(Path, "mkdir", refused_under_folder(Path.mkdir))
    monkeypatch.setattr(storage, "_write_file", refused_under_folder(storage._write_file))
    monkeypatch.setattr(storage, "FOLDERS_TOLD_READ_ONLY", set())  # what this test's runs are told, only


READ_ONLY_WARNING = ("monkeytrain: warning: the cache folder {} is read-only: this run reads what it holds and makes "
                     "anything it lacks in memory (the synthetic data set in a temporary folder), again each run "
                     "(give a writable --cache-dir to keep it).")


def test_a_read_only_cache_folder_is_read_from_after_one_warning(tmp_path, make_image_folder, monkeypatch, capsys):
    """A cache an admin prepared once, mounted read-only: was refused ('pick a writable --cache-dir')."""
    cache = tmp_path / "cache"
    root = make_image_folder(tmp_path / "data", classes=2, per_class=3)
    files, _ = scan_labelled_files([(path, 0) for path in sorted(root.rglob("*.png"))], None)
    prepared, _ = cached_views(files, 32, cache)
    read_only(cache, monkeypatch)

    assert usable_cache_folder(str(cache)) == cache
    assert capsys.readouterr().err.splitlines() == [READ_ONLY_WARNING.format(cache)]
    assert usable_cache_folder(str(cache), warn=False) == cache  # the other processes of the run
    assert capsys.readouterr().err == ""
    assert torch.equal(cached_views(files, 32, cache)[0], prepared)  # what it holds, read without a word
    assert capsys.readouterr().err == ""
    assert len(cached_views(files, 48, cache)[0]) == len(files)  # what it lacks: made in memory
    assert capsys.readouterr().err == ""  # as the warning said: not a warning more for each file (4 a run)


def test_only_writes_under_the_folder_told_read_only_are_quiet(tmp_path, monkeypatch, capsys):
    """Another folder (a cache folder of another run in this process, a disk that fills up) still warns."""
    told = tmp_path / "told"
    told.mkdir()
    read_only(tmp_path, monkeypatch)
    assert usable_cache_folder(str(told)) == told
    capsys.readouterr()
    assert not storage.write_cache(told / "stats" / "a.json", b"{}") and capsys.readouterr().err == ""
    assert not storage.write_cache(tmp_path / "told-too" / "stats" / "a.json", b"{}")
    assert "cannot write the cache file" in capsys.readouterr().err


def test_a_cache_folder_that_cannot_be_made_or_read_is_still_refused(tmp_path, monkeypatch):
    read_only(tmp_path, monkeypatch)
    with pytest.raises(UserError, match=r"cannot create or write the folder .*/missing \(Read-only file system\); "
                                        r"pick a writable --cache-dir\."):
        usable_cache_folder(str(tmp_path / "missing"))
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(UserError, match=r"pick a writable --cache-dir"):
        usable_cache_folder(str(tmp_path / "a-file"))


def test_a_writable_cache_folder_is_made_without_a_word(tmp_path, capsys):
    assert usable_cache_folder(str(tmp_path / "new" / "cache")) == tmp_path / "new" / "cache"
    assert (tmp_path / "new" / "cache").is_dir() and capsys.readouterr().err == ""
    assert os.listdir(tmp_path / "new" / "cache") == []  # the probe file is gone


def test_a_run_trains_from_a_read_only_cache_that_holds_what_it_needs(tmp_path, make_image_folder, monkeypatch):
    from conftest import train_here

    monkeypatch.setattr(imagefiles, "RACY_NS", 0)  # the images were just written: trust their scan anyway
    data, cache = make_image_folder(tmp_path / "data", classes=2, per_class=6), tmp_path / "cache"
    flags = ["--data", str(data), "--cpu", "--model", "resnet10t", "--image-size", "32", "--epochs", "1",
             "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--cache-dir", str(cache)]
    train_here([*flags, "--run-name", "first"], tmp_path)  # fills the cache
    read_only(cache, monkeypatch)
    again = train_here([*flags, "--run-name", "again"], tmp_path)
    said = [line for line in again.stderr.splitlines() if line.startswith("monkeytrain:")]  # not progress bars
    assert said == [READ_ONLY_WARNING.format(cache)]  # nothing to write: no other word
    assert "(cached)" in again.stdout and again.results["test_accuracy"] is not None


def test_a_run_without_data_trains_on_the_synthetic_set_despite_a_read_only_cache(tmp_path, monkeypatch):
    """The default command with a read-only --cache-dir that lacks the synthetic set: was refused ('cannot
    write synthetic-v2 ...; pick another --cache-dir') right after the warning promised to make it."""
    from conftest import train_here

    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(cache, monkeypatch)
    run = train_here(["--cpu", "--model", "resnet10t", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                      "--num-workers", "0", "--report-to", "none", "--cache-dir", str(cache)], tmp_path)
    said = [line for line in run.stderr.splitlines() if line.startswith("monkeytrain:")]
    assert said[0] == READ_ONLY_WARNING.format(cache) and "SYNTHETIC dataset in" in said[1], said
    assert run.results["test_accuracy"] is not None and os.listdir(cache) == []
