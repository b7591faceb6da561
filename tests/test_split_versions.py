"""Held-out splits across versions: of a data set (an image added or renamed leaves the test and selection splits
as they were, but for the image it displaces), and of monkeytrain (a state saved when the held-out files were
chosen by a seeded shuffle resumes on the very files it chose; a new run's data manifest names its order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import class_colour, noisy_image, train_here, write_image_folder
from resume_checks import interrupted
from monkeytrain import cli
from monkeytrain.data.dataset import discover_splits, scan_splits, splits_held_out
from monkeytrain.data.layout import folders_from_root
from monkeytrain.data.splits import CONTENT_HASH, SEEDED_SHUFFLE
from monkeytrain.errors import UserError
from monkeytrain.runrecords import DATA_RECORD, data_change, held_out_by_of
from monkeytrain.statestore import COMPLETE, recorded_sizes, state_dirs

TINY = ["--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--num-workers", "0",
        "--epochs", "2", "--report-to", "none", "--cpu-threads", "1"]


def splits_of(root: Path, seed: int = 1, held_out_by: str = CONTENT_HASH):
    """One folder of class subfolders: the test split held out first, then the selection split of the rest."""
    return splits_held_out(scan_splits(folders_from_root(root), False, None), 0.2, seed, 0.2, held_out_by)


def digests(files) -> set[str]:
    return {f.digest for f in files}


@pytest.fixture
def data(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", layout="image-folder", classes=3, per_class=20, size=8)


def test_an_image_added_on_disk_moves_at_most_one_image_out_of_the_test_and_selection_splits(data):
    before = splits_of(data)
    noisy_image(class_colour(0, 3), 8, [9, 9, 9]).save(data / "n0" / "n0_new.png")  # v2: one more image
    after = splits_of(data)
    for split in ("test", "val"):
        moved = digests(before.named_splits()[split]) - digests(after.named_splits()[split])
        assert len(moved) <= 1, (split, len(moved))


def test_a_renamed_image_moves_nothing_and_only_the_selection_split_changes_with_the_seed(data):
    before = splits_of(data)
    (data / "n1" / "n1_000.png").rename(data / "n1" / "zz_renamed.png")  # now last by name, not first
    after = splits_of(data)
    for split in ("train", "val", "test"):
        assert digests(before.named_splits()[split]) == digests(after.named_splits()[split]), split
    seeds = [splits_of(data, seed) for seed in range(4)]
    assert all(digests(s.test) == digests(after.test) for s in seeds)  # scored on the same images
    assert len({frozenset(digests(s.val)) for s in seeds}) > 1


def test_a_manifest_names_its_order_and_inspect_data_shows_content_hashes(data, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(tmp_path / "cache"))
    cli.main(["inspect-data", "--json", str(data)])
    assert json.loads(capsys.readouterr().out)["held_out_by"] == CONTENT_HASH
    assert splits_of(data, held_out_by=SEEDED_SHUFFLE).manifest()["held_out_by"] == SEEDED_SHUFFLE


def old_manifest(data: Path, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """A data manifest as monkeytrain wrote it before content hashes: held out by the seeded shuffle, no order named."""
    splits = splits_held_out(scan_splits(folders_from_root(data), False, None), val_fraction, seed, 0.2, SEEDED_SHUFFLE)
    return {key: value for key, value in splits.manifest().items() if key != "held_out_by"}


def test_the_order_to_resume_is_the_one_the_state_or_its_run_names(tmp_path):
    run = tmp_path / "run"
    state = run / "state" / "step-00000004"
    state.mkdir(parents=True)
    assert held_out_by_of(None, run) == CONTENT_HASH  # no state: a new run
    assert held_out_by_of(state, run) == CONTENT_HASH  # no record says otherwise (every version writes one)
    (run / DATA_RECORD).write_text(json.dumps({"class_folders": ["n0"]}))
    assert held_out_by_of(state, run) == SEEDED_SHUFFLE  # a state older than kept copies: the run's record
    (state / DATA_RECORD).write_text(json.dumps({"class_folders": ["n0"], "held_out_by": CONTENT_HASH}))
    assert held_out_by_of(state, run) == CONTENT_HASH  # the state's own copy first
    (state / DATA_RECORD).write_text(json.dumps({"class_folders": ["n0"], "held_out_by": "by-moonlight"}))
    with pytest.raises(UserError, match=f"the saved state {state} holds its images out by 'by-moonlight', which"):
        held_out_by_of(state, run)


def test_an_old_manifest_is_the_same_data_as_the_seeded_shuffles_now_and_not_as_content_hashes(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=3, per_class=12, size=8)
    saved = old_manifest(data)
    now = splits_held_out(scan_splits(folders_from_root(data), False, None), 0.1, 0, 0.2, SEEDED_SHUFFLE).manifest()
    assert data_change(saved, now) is None
    assert data_change(saved, discover_splits(folders_from_root(data), 0.1, 0, False).manifest()) is not None


def test_a_state_saved_before_content_hashes_resumes_on_the_files_it_held_out(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=3, per_class=12, size=8)
    flags = ["--data", str(data), *TINY, "--cache-dir", str(tmp_path / "cache"), "--run-name", "old"]
    with interrupted("term", 5):
        train_here(flags, tmp_path)
    run = tmp_path / "runs" / "old"
    began = json.loads((run / DATA_RECORD).read_text())
    assert began["held_out_by"] == CONTENT_HASH  # a new run's record names its order
    old = old_manifest(data)  # the run as if begun before content hashes: its records as it wrote them
    assert old["files"]["val"] != began["files"]["val"]  # or this test would prove nothing
    state = state_dirs(run)[-1]
    for record in (run / DATA_RECORD, state / DATA_RECORD):
        record.write_text(json.dumps(old, indent=2))
    sizes = {**recorded_sizes(state), DATA_RECORD: (state / DATA_RECORD).stat().st_size}  # as it was saved
    (state / COMPLETE).write_text(json.dumps({"files": sizes}))

    resumed = train_here([*flags, "--resume", "auto"], tmp_path)  # refused before: "holds other files"
    assert "resumed from" in resumed.stdout and (run / "results.json").is_file()
    now = json.loads((run / DATA_RECORD).read_text())
    assert now["files"] == old["files"] and now["held_out_by"] == SEEDED_SHUFFLE
