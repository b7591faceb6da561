"""monkeytrain.storage: atomic writes, a clear error on a full disk, caches that may fail.

The `full_disk` tests mount a real 2 MiB tmpfs (root only) so that writes fail
with a genuine ENOSPC from the kernel, through torch, safetensors and Accelerate.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from torch.utils.data import DataLoader

from monkeytrain import storage
from monkeytrain.checkpoint import BEST_NAME, CheckpointInfo, plain_state_dict, read_checkpoint, save_checkpoint
from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.stats import channel_stats
from monkeytrain.data.views import cached_views, decode_views, view_dataset
from monkeytrain.errors import UserError
from monkeytrain.statestore import StateStore, state_dirs
from monkeytrain.storage import (
    DiskFull, WriteFailed, check_writable_dir, human_size, is_disk_full, write_atomically, write_cache,
)
from monkeytrain.tracking import METRICS_NAME, RunLog

TMPFS_BYTES = 2 * 1024 * 1024


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def writes_then_fails(size: int, error: Exception):
    """A writer that gets `size` bytes out, then hits `error`."""
    def write(handle):
        handle.write(b"x" * size)
        handle.flush()
        raise error
    return write


def test_write_replaces_the_old_file_whole(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old content that is longer than the new one")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    write_atomically(path, lambda handle: handle.write(b"from a writer"), durable=False)
    assert path.read_bytes() == b"from a writer"
    assert names_in(tmp_path) == ["file.bin"]  # no temporary file left


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="broken"):
        write_atomically(path, writes_then_fails(5000, ValueError("broken")))
    assert path.read_bytes() == b"old"
    assert names_in(tmp_path) == ["file.bin"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def failing_replace(source, destination):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteFailed) as raised:
        write_atomically(path, b"new and much longer")
    assert not isinstance(raised.value, DiskFull)
    assert str(raised.value) == (f"cannot write file.bin in {tmp_path} (input/output error); make that folder "
                                 "writable or pick another --output-dir.")
    assert path.read_bytes() == b"old"
    assert names_in(tmp_path) == ["file.bin"]


def test_a_folder_gone_read_only_is_one_line_naming_the_first_cause(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(storage, "_write_file", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # the clean-up fails as well, and must not hide why
    with pytest.raises(WriteFailed, match=r"cannot write best.safetensors in .* \(Read-only file system\); "):
        write_atomically(tmp_path / "best.safetensors", b"weights")


def test_a_full_disk_before_the_first_byte_does_not_claim_0_bytes_were_needed(tmp_path):
    error = DiskFull(tmp_path / "state", 0, at_least=True, flag="--output-dir")
    assert str(error) == f"no space left on the device of {tmp_path} to write state; free some space or pick " \
                         "another --output-dir."
    assert error.reason == "no space left on the device"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_in_a_writer_is_disk_full_with_at_least_the_bytes_written(tmp_path, code):
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(DiskFull) as raised:
        write_atomically(path, writes_then_fails(3 * 1024 * 1024, OSError(code, os.strerror(code))))
    message = str(raised.value)
    assert isinstance(raised.value, UserError)  # the entry point prints it on one line, exit 2
    # a quota says so: on a cluster, `df` would show the device with terabytes free
    assert message.startswith("your disk quota is used up on the device" if code == errno.EDQUOT
                              else "no space left on the device")
    assert f"of {tmp_path} to write best.safetensors (at least 3.0 MiB needed)" in message
    assert message.endswith("free some space or pick another --output-dir.")
    assert path.read_bytes() == b"previous"
    assert names_in(tmp_path) == ["best.safetensors"]


def test_no_space_for_a_payload_names_its_exact_size(tmp_path, monkeypatch):
    def no_space(descriptor):  # fsync is where a network file system reports a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    path = tmp_path / "cache.json"
    with pytest.raises(DiskFull, match=r"cache\.json \(45\.2 MiB needed\).*pick another --cache-dir\.$"):
        write_atomically(path, b"\0" * int(45.2 * 1024 * 1024), flag="--cache-dir")
    assert names_in(tmp_path) == []


@pytest.mark.parametrize("error, failure, reason", [
    (OSError(errno.EIO, "Input/output error"), WriteFailed, "Input/output error"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), DiskFull, "your disk quota is used up on the device, {} B needed"),
    (PermissionError(errno.EACCES, "Permission denied"), WriteFailed, "Permission denied"),
])
def test_a_metrics_line_that_fails_halfway_is_taken_back(tmp_path, monkeypatch, error, failure, reason):
    log = RunLog(tmp_path)
    log.epoch(epoch_line(1))
    write = os.write

    def half_then_fail(descriptor, data):  # the disk takes part of the line, then refuses the rest
        if len(data) < 20:
            raise error
        return write(descriptor, bytes(data)[:len(data) // 2])

    monkeypatch.setattr(os, "write", half_then_fail)
    with pytest.raises(failure) as raised:
        log.epoch(epoch_line(2))
    assert raised.value.reason == reason.format(len(json.dumps(epoch_line(2))) + 1)  # the line's exact size
    assert raised.value.path == tmp_path / METRICS_NAME  # the message names it
    assert epochs_logged(tmp_path / METRICS_NAME) == [1]  # every line whole: no half of epoch 2


def epoch_line(epoch: int) -> dict:
    return dict(epoch=epoch, epochs=3, train_loss=1.0, train_accuracy=0.5, val_loss=1.0, val_accuracy=0.5, lr=0.1,
                images_per_second=10.0, epoch_seconds=1.0, train_size=32, is_best=False)


def epochs_logged(metrics: Path) -> list[int]:
    """The epoch of each line of metrics.jsonl, read as pandas.read_json(lines=True) would: all or nothing."""
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]


@pytest.mark.parametrize("size, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                        (int(45.2 * 2**20), "45.2 MiB"), (3 * 2**30, "3.0 GiB")])
def test_human_size(size, text):
    assert human_size(size) == text


def test_disk_full_is_recognised_inside_library_errors():
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")  # torch.save to a file object
    assert is_disk_full(wrapped)
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))


def test_a_bare_torch_error_counts_as_disk_full_only_on_a_nearly_full_device(tmp_path, monkeypatch):
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save(path)
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 100 * 1024)
    assert storage.out_of_space(error, tmp_path)
    monkeypatch.setattr(storage, "free_bytes", lambda folder: 10 * 2**30)
    assert not storage.out_of_space(error, tmp_path)
    assert storage.out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)  # a quota, not the disk


def test_an_unusable_folder_is_one_user_error_naming_the_flag():
    path = Path("/proc/nope/runs")
    with pytest.raises(UserError) as raised:
        check_writable_dir(path, "--output-dir")
    message = str(raised.value)
    assert message.startswith(f"cannot create or write the folder {path} (")
    assert message.endswith("pick a writable --output-dir.") and "\n" not in message


@pytest.mark.parametrize("below", ["", "runs", "runs/2026"])  # mkdir: "File exists", "Not a directory"
def test_a_folder_asked_for_at_or_under_a_file_names_that_file(tmp_path, below):
    path = _regular_file(tmp_path) / below if below else _regular_file(tmp_path)
    with pytest.raises(UserError) as raised:
        check_writable_dir(path, "--output")
    within = f"cannot create the folder {path}: " if below else ""
    assert str(raised.value) == f"{within}{tmp_path / 'a-file'} is a file, not a folder; pick a writable --output."


def _regular_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_folder_is_a_user_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match="Permission denied.*--cache-dir"):
            check_writable_dir(tmp_path / "cache", "--cache-dir")
    finally:
        tmp_path.chmod(0o700)


def test_a_writable_folder_is_created_and_left_empty(tmp_path):
    check_writable_dir(tmp_path / "a" / "b", "--output-dir")
    assert names_in(tmp_path / "a" / "b") == []  # the probe file is gone


def test_a_cache_that_cannot_be_written_warns_once_and_goes_on(tmp_path, capsys):
    path = tmp_path / "views" / "key.pt"
    assert not write_cache(path, writes_then_fails(2048, OSError(errno.ENOSPC, "No space left on device")))
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"monkeytrain: warning: cannot write the cache file {path} (no space left on the "
                        "device, at least 2.0 KiB needed); going on without it."]
    assert names_in(path.parent) == []
    _regular_file(tmp_path)
    assert not write_cache(tmp_path / "a-file" / "key.json", b"{}")  # its folder cannot be made
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert write_cache(path, b"fine") and path.read_bytes() == b"fine"
    assert capsys.readouterr().err == ""


# --- a real full disk ------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs: writes past that fail with a real ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    gc.collect()  # tensors read back from a checkpoint may still map its file
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # detaches even if something still does


def make_info(epoch: int) -> CheckpointInfo:
    return CheckpointInfo(architecture="linear", class_names=["a", "b"], class_folders=["a", "b"],
                          mean=[0.5] * 3, std=[0.25] * 3, image_size=32, epoch=epoch, val_accuracy=0.5, config={})


def test_a_checkpoint_too_big_for_the_disk_keeps_the_previous_one(full_disk):
    torch.manual_seed(0)
    small, big = torch.nn.Linear(8, 2), torch.nn.Linear(1024, 1024)  # 4 MiB: twice the disk
    save_checkpoint(full_disk, small, make_info(epoch=1))
    needed = len(save(plain_state_dict(big), metadata=make_info(epoch=2).to_metadata()))
    with pytest.raises(DiskFull) as raised:
        save_checkpoint(full_disk, big, make_info(epoch=2))
    assert str(raised.value) == (f"no space left on the device of {full_disk} to write {BEST_NAME} "
                                 f"({human_size(needed)} needed); free some space or pick another --output-dir.")
    assert names_in(full_disk) == [BEST_NAME, "class_map.txt", "config.json"]  # no temporary file
    weights, info = read_checkpoint(full_disk / BEST_NAME)
    assert info.epoch == 1
    assert all(torch.equal(weights[k], v) for k, v in small.state_dict().items())


def test_caches_on_a_full_disk_return_the_values_and_warn_once(full_disk, tmp_path, make_image_folder,
                                                               cpu_accelerator, capsys):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=3, size=20)
    files = discover_splits(layout.folders_from_root(root), 0.0, 0, False).train
    expected_stats, _ = channel_stats(files, view_batches(files), 16, tmp_path / "roomy", cpu_accelerator)
    (full_disk / "filler").write_bytes(b"\0" * (storage.free_bytes(full_disk) - 4096))  # less than the views
    capsys.readouterr()

    images, labels = cached_views(files, 16, full_disk)
    expected_images, expected_labels = decode_views(files, 16)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    assert one_warning(capsys, full_disk / "views")
    # the statistics' cache file takes a few bytes, so fill the disk to the brim first
    fill_to_the_brim(full_disk)
    stats, cached = channel_stats(files, view_batches(files), 16, full_disk, cpu_accelerator)
    assert stats == expected_stats and not cached
    assert one_warning(capsys, full_disk / "stats")
    assert not [p for p in full_disk.rglob(".*")]  # no temporary files


def one_warning(capsys, folder: Path) -> bool:
    lines = capsys.readouterr().err.splitlines()
    return (len(lines) == 1 and lines[0].startswith(f"monkeytrain: warning: cannot write the cache file {folder}/")
            and lines[0].endswith("going on without it."))


def view_batches(files) -> DataLoader:
    return DataLoader(view_dataset(files, 16), batch_size=4)


def fill_to_the_brim(folder: Path) -> None:
    try:
        with open(folder / "brim", "wb") as handle:  # even creating it may find no room
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
    except OSError as error:
        assert error.errno == errno.ENOSPC


def test_a_metrics_line_the_disk_has_room_for_half_of_leaves_no_half_line(full_disk):
    """A buffered append writes what fits and then fails: half a line, which breaks metrics.jsonl for
    pandas, `monkeytrain` tools and the next resume's reading of it."""
    log = RunLog(full_disk)
    log.epoch(epoch_line(1) | {"note": "x" * 2900})  # most of a 4 KiB page: the next line fits only in part
    fill_to_the_brim(full_disk)
    with pytest.raises(DiskFull, match=f"no space left on the device of {full_disk} to write metrics.jsonl "
                                       r"\(1\.[0-9] KiB needed\)"):
        log.epoch(epoch_line(2) | {"note": "y" * 1500})
    assert epochs_logged(full_disk / METRICS_NAME) == [1]


def test_a_state_that_does_not_fit_is_removed_and_the_older_one_still_loads(full_disk, cpu_accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)  # 64 KiB of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = cpu_accelerator.prepare(model, optimizer)
    store = StateStore(full_disk, cpu_accelerator, keep=3)
    first = store.save(2, {"progress": {"epoch": 1, "batch": 2}}, shared={})
    # room for half of what the first state took
    (full_disk / "filler").write_bytes(b"\0" * (storage.free_bytes(full_disk) - storage.folder_size(first) // 2))
    saved_weights = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    with pytest.raises(DiskFull) as raised:
        store.save(4, {"progress": {"epoch": 1, "batch": 4}}, shared={})
    message = str(raised.value)
    assert f"of {full_disk / 'state'} to write step-00000004 (at least " in message
    assert message.endswith("free some space or pick another --output-dir.")
    assert names_in(full_disk / "state") == [first.name]  # no staging folder left
    assert state_dirs(full_disk) == [first]
    mine, main = store.load(first)
    assert mine == main == {"progress": {"epoch": 1, "batch": 2}}
    assert torch.equal(model.weight.detach(), saved_weights)


def test_a_state_save_over_quota_is_disk_full_not_a_traceback(tmp_path, cpu_accelerator, monkeypatch):
    """torch.save to a path says only "unexpected pos" when a write fails, and a full quota leaves the device
    with room to spare: the folder's refusal of a small write for lack of quota tells what happened."""
    model = torch.nn.Linear(8, 2)
    cpu_accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    store = StateStore(tmp_path, cpu_accelerator, keep=2)
    first = store.save(2, {"progress": {"epoch": 1, "batch": 2}}, shared={})

    def torch_save_over_quota(obj, path, *args, **kwargs):  # what torch's zip writer does on a failed write
        Path(path).write_bytes(b"written before the quota ran out")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def quota_full(path, write, durable):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(torch, "save", torch_save_over_quota)
    monkeypatch.setattr(storage, "_write_file", quota_full)
    with pytest.raises(DiskFull, match=f"of {tmp_path / 'state'} to write step-00000004 \\(at least "):
        store.save(4, {"progress": {"epoch": 1, "batch": 4}}, shared={})
    assert names_in(tmp_path / "state") == [first.name]  # the half-written state went
