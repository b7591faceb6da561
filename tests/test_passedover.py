"""monkeytrain.data.passedover: monkeytrain's own folders among the class folders, passed over with a warning."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import a_finished_run
from monkeytrain.data import layout, passedover


def test_the_runs_of_monkeytrain_beside_the_classes_are_not_a_class(tmp_path, make_image_folder):
    """`monkeytrain train --data .` in a folder of classes: runs/ (the default --output-dir) beside them holds the
    run's own folder before the data is read, and later runs' plots, which are images."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / "runs" / "20261203-174800").mkdir(parents=True)
    (root / "runs" / "20261203-174800" / ".in-use").write_text("1234\n")  # training now: the data is read
    a_finished_run(root / "runs" / "20261202-090000")
    shutil.copy(root / "n0" / "n0_000.png", root / "runs" / "20261202-090000" / "curves.png")
    (root / "tune" / "study").mkdir(parents=True)
    (root / "tune" / "study" / "study.journal").write_text("")
    (root / "20261203-180000").mkdir()  # --output-dir .
    (root / "20261203-180000" / ".in-use").write_text("1234\n")
    ended = a_finished_run(root / "20261202-180000")  # --output-dir ., a run that ended: its plots are images
    for plot in ("curves.png", "confusion_matrix.png"):
        shutil.copy(root / "n0" / "n0_000.png", ended / plot)
    assert layout.class_folders(layout.folders_from_root(root).train) == ["n0", "n1"]


def test_a_class_folder_with_images_of_its_own_is_a_class_whatever_its_subfolders_hold(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / "n1" / "weights").mkdir()
    (root / "n1" / "weights" / "best.safetensors").write_bytes(b"")
    assert layout.class_folders(root) == ["n0", "n1"]


def test_the_files_that_mark_monkeytrains_own_folders_are_those_it_writes():
    from monkeytrain.rundir import CONFIG_NAME, LOCK_NAME
    from monkeytrain.runrecords import DATA_RECORD
    from monkeytrain.tune_study import STORAGE_NAME

    from monkeytrain.plots import CONFUSION_NAME, CURVES_NAME
    from monkeytrain.tune_report import SEARCH_NAME

    assert set(passedover.RUN_MARKS) == {(LOCK_NAME,), (DATA_RECORD, CONFIG_NAME), (STORAGE_NAME,)}
    assert set(passedover.RUN_PLOTS) == {CURVES_NAME, CONFUSION_NAME, SEARCH_NAME}


@pytest.mark.parametrize("beside", ["monkeytrain-1234.out", "Thumbs.db", "README", "desktop.ini", "notes.txt"])
def test_runs_beside_the_classes_stay_passed_over_with_a_log_or_a_readme_beside_them(tmp_path, make_image_folder,
                                                                                   beside, capsys):
    """A SLURM job's log (sbatch --output runs/%x-%j.out) or a README beside the runs made runs/ a class again."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    a_finished_run(root / "runs" / "20261203-174800")
    (root / "runs" / beside).write_text("epoch 1/3\n")
    assert layout.class_folders(layout.folders_from_root(root).train) == ["n0", "n1"]
    assert capsys.readouterr().err.count(f"warning: {root / 'runs'} is passed over: it holds monkeytrain's runs") == 1


def test_a_folder_of_runs_with_an_image_of_its_own_is_a_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    a_finished_run(root / "runs" / "20261203-174800")
    shutil.copy(root / "n0" / "n0_000.png", root / "runs" / "photo")  # no extension: judged by its content
    assert layout.class_folders(root) == ["n0", "n1", "runs"]


@pytest.mark.parametrize("stray", ["data_manifest.json", "best.safetensors", "config.yaml"])
def test_one_file_named_like_a_runs_in_a_class_folder_leaves_it_a_class(tmp_path, make_image_folder, stray):
    """`echo '{}' > bird/data_manifest.json` made class bird vanish without a word."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=3, per_class=1)
    (root / "n2" / stray).write_text("{}")
    assert layout.check_same_classes(layout.folders_from_root(root)) == ["n0", "n1", "n2"]


def test_one_file_named_like_a_runs_in_a_class_of_a_split_leaves_the_split_a_split(tmp_path, make_image_folder):
    """`touch train/cat/best.safetensors` made train/ a folder of runs, and the layout error blamed the layout."""
    root = make_image_folder(tmp_path / "data", layout="train-test", classes=2, per_class=2)
    (root / "train" / "n0" / "best.safetensors").write_bytes(b"")
    (root / "train" / "n1" / ".in-use").write_text("1234\n")  # even a whole mark: n1 holds images of its own
    assert layout.folders_from_root(root).layout == "train-test"
    assert layout.class_folders(root / "train") == ["n0", "n1"]


def test_runs_passed_over_are_named_by_the_first_process_of_a_run_only(tmp_path, make_image_folder, capsys,
                                                                        monkeypatch):
    """Every rank reads the layout: the second of a two-GPU run says nothing, rather than the same line again."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    a_finished_run(root / "runs" / "20261203-174800")
    monkeypatch.setenv("RANK", "1")
    assert layout.class_folders(root) == ["n0", "n1"]
    assert "passed over" not in capsys.readouterr().err


def test_runs_nested_two_folders_deep_beside_the_classes_are_not_a_class(tmp_path, make_image_folder, capsys):
    """`--data . --output-dir runs/exp1` puts each run at runs/exp1/<run>/: runs/ became a class of one run's plots."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    ended = a_finished_run(root / "runs" / "exp1" / "20261203-174800")
    shutil.copy(root / "n0" / "n0_000.png", ended / "curves.png")
    (root / "runs" / "exp2" / "20261203-180000").mkdir(parents=True)
    (root / "runs" / "exp2" / "20261203-180000" / ".in-use").write_text("1234\n")
    assert layout.class_folders(root) == ["n0", "n1"]
    assert capsys.readouterr().err.count(f"warning: {root / 'runs'} is passed over") == 1


def test_a_class_whose_subfolder_holds_a_run_and_images_is_a_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    a_finished_run(root / "n1" / "older" / "20261203-174800")
    shutil.move(root / "n1" / "n1_000.png", root / "n1" / "older" / "n1_000.png")
    assert layout.class_folders(root) == ["n0", "n1"]


def test_a_second_run_in_a_data_set_with_a_class_named_runs_trains_on_the_classes_images_only(tmp_path,
                                                                                            make_image_folder):
    """Its first run's plots (curves.png, confusion_matrix.png) were images of class runs in the next run."""
    from conftest import train_here

    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=8)
    (root / "n1").rename(root / "runs")
    flags = ["--data", ".", "--cpu", "--model", "resnet10t", "--image-size", "32", "--epochs", "1",
             "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--cache-dir", str(tmp_path / "cache")]
    train_here([*flags, "--run-name", "first"], root)
    assert (root / "runs" / "first" / "curves.png").is_file()  # what the next run must not train on
    again = train_here([*flags, "--run-name", "again"], root)
    record = json.loads((root / "runs" / "again" / "data_manifest.json").read_text())
    used = [path for files in record["files"].values() for path in files]
    assert len(used) == 16 and not any("first" in path for path in used), used
    assert "runs/again is passed over: it holds monkeytrain's runs" in again.stderr  # its own, made before the scan


def test_a_users_own_config_and_manifest_beside_a_class_images_leave_them_a_class(tmp_path, make_image_folder):
    """A class's batch1/ holding the user's own config.yaml and data_manifest.json, its images a folder below:
    taken for a run, its images were dropped from training with only a warning (a whole class, one level up)."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    for folder in (root / "n0", root / "n1" / "batch1"):
        folder.mkdir(exist_ok=True)
        (folder / "config.yaml").write_text("lens: 35mm\n")
        (folder / "data_manifest.json").write_text("{}")
    shutil.copytree(root / "n0", root / "n1" / "batch1" / "day1", ignore=shutil.ignore_patterns("*.yaml", "*.json"))
    assert layout.class_folders(root) == ["n0", "n1"]
    assert not passedover.holds_runs(root / "n1" / "batch1")


def test_a_class_folder_of_annotations_beside_its_images_is_told_from_runs_without_reading_them(
        tmp_path, make_image_folder, monkeypatch):
    """annotations/ of thousands of .xml files beside a class's images/: each was read by Pillow at every run."""
    from monkeytrain.data import imagefiles

    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / "n0" / "annotations").mkdir()
    for number in range(50):
        (root / "n0" / "annotations" / f"{number}.xml").write_text("<annotation/>")
    reads = []
    monkeypatch.setattr(imagefiles, "is_image_file", lambda path: reads.append(path) or False)
    assert not passedover.holds_runs(root / "n0" / "annotations")
    assert reads == []


def test_runs_as_deep_as_an_output_dir_goes_beside_the_classes_are_not_a_class(tmp_path, make_image_folder):
    """--output-dir runs/x/y/z: the check of runs/ stopped three folders down, so runs/ was a class, while the
    scan, checking runs/x afresh, passed its run over: the class had no images and the run stopped."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    a_finished_run(root / "runs" / "x" / "y" / "z" / "20261203-174800")
    assert layout.class_folders(root) == ["n0", "n1"]


def test_linked_folders_that_lead_back_round_end_the_walk(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / "runs" / "a").mkdir(parents=True)
    (root / "runs" / "a" / "back").symlink_to(root / "runs")
    assert not passedover.holds_runs(root / "runs")
