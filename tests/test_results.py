"""monkeytrain.results: the misclassified test images (sorted, capped, from every rank's shard)
and results.json's summary, selection-bias note included.

Both work on an EvalResult and file lists alone, so the tests build them by hand.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from monkeytrain import results
from monkeytrain.checkpoint import CheckpointInfo
from monkeytrain.data.dataset import DatasetSplits
from monkeytrain.data.imagefiles import ImageFile
from monkeytrain.distributed import TUNE_STUDY_VARIABLE
from monkeytrain.engine import EvalResult
from monkeytrain.errors import UserError
from monkeytrain.results import (checkpoint_named_on_a_full_disk, json_with_matrix_rows, misclassified,
                                 results_summary, scored_line, wilson_interval)
from monkeytrain.storage import DiskFull
from monkeytrain.selection import BestEpoch

CLASS_NAMES = ["howler", "patas", "uakari"]
CONFUSION = [[2, 0, 0],   # true howler: both right
             [1, 1, 0],   # true patas: one taken for a howler
             [0, 1, 3]]   # true uakari: one taken for a patas


def image_files(labels: list[int]) -> list[ImageFile]:
    return [ImageFile(Path(f"/data/test/n{label}/{i:03d}.jpg"), label, f"digest-{i}") for i, label in enumerate(labels)]


def eval_result(predicted: list[int], confidence: list[float], confusion=CONFUSION,
                loss: float = 0.5, accuracy: float = 0.75) -> EvalResult:
    confusion = torch.tensor(confusion)
    return EvalResult(loss=loss, accuracy=accuracy, count=int(confusion.sum()), confusion=confusion,
                      predicted=torch.tensor(predicted), confidence=torch.tensor(confidence))


@pytest.fixture
def no_gather(monkeypatch):
    """Fail the test if misclassified() gathers."""
    def gather(_):
        raise AssertionError("gather_object called on one process")
    monkeypatch.setattr(results, "gather_object", gather)


# Six test images; four are wrong. Confidences are exact in float32, so they compare with ==.
LABELS = [0, 1, 2, 2, 1, 0]
PREDICTED = [0, 2, 0, 2, 0, 1]
CONFIDENCE = [0.96875, 0.5, 0.875, 0.9375, 0.625, 0.75]
WRONG_MOST_CONFIDENT_FIRST = [
    {"path": "/data/test/n2/002.jpg", "true": "uakari", "predicted": "howler", "confidence": 0.875},
    {"path": "/data/test/n0/005.jpg", "true": "howler", "predicted": "patas", "confidence": 0.75},
    {"path": "/data/test/n1/004.jpg", "true": "patas", "predicted": "howler", "confidence": 0.625},
    {"path": "/data/test/n1/001.jpg", "true": "patas", "predicted": "uakari", "confidence": 0.5},
]


def test_misclassified_lists_only_the_mistakes_most_confident_first(cpu_accelerator, no_gather):
    mistakes = misclassified(eval_result(PREDICTED, CONFIDENCE), image_files(LABELS), CLASS_NAMES, cpu_accelerator)
    assert mistakes == WRONG_MOST_CONFIDENT_FIRST


def test_misclassified_keeps_the_most_confident_up_to_the_cap(cpu_accelerator, no_gather, monkeypatch):
    monkeypatch.setattr(results, "MAX_MISCLASSIFIED", 2)
    mistakes = misclassified(eval_result(PREDICTED, CONFIDENCE), image_files(LABELS), CLASS_NAMES, cpu_accelerator)
    assert mistakes == WRONG_MOST_CONFIDENT_FIRST[:2]


def test_with_no_mistakes_misclassified_is_empty(cpu_accelerator, no_gather):
    assert misclassified(eval_result(LABELS, CONFIDENCE), image_files(LABELS), CLASS_NAMES, cpu_accelerator) == []


def test_on_two_ranks_each_prediction_is_matched_to_its_shard_file_and_all_are_gathered(monkeypatch):
    # rank 1 of 2 evaluated files 1, 3 and 5, in that order; rank 0's mistakes arrive by gather
    from_rank0 = [WRONG_MOST_CONFIDENT_FIRST[0]]
    monkeypatch.setattr(results, "gather_object", lambda mine: from_rank0 + mine)
    rank1 = SimpleNamespace(process_index=1, num_processes=2)
    mine = eval_result([PREDICTED[i] for i in (1, 3, 5)], [CONFIDENCE[i] for i in (1, 3, 5)])
    mistakes = misclassified(mine, image_files(LABELS), CLASS_NAMES, rank1)
    assert mistakes == [WRONG_MOST_CONFIDENT_FIRST[i] for i in (0, 1, 3)]


def checkpoint_info(class_names=CLASS_NAMES) -> CheckpointInfo:
    return CheckpointInfo(architecture="resnet18", class_names=class_names, class_folders=["n0", "n1", "n2"],
                          mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], image_size=64, epoch=4,
                          val_accuracy=0.8, config={"model": "resnet18"})


def dataset_splits(selection_on_test: bool) -> DatasetSplits:
    train, test = image_files([0, 1, 2] * 5), image_files(LABELS + [2, 2])
    val = test if selection_on_test else image_files([0, 1, 2])  # --val-fraction 0 validates on the test split
    return DatasetSplits(class_folders=["n0", "n1", "n2"], class_names=CLASS_NAMES, train=train, val=val,
                         test=test, selection_on_test=selection_on_test, layout="kaggle", root="/data",
                         synthetic=False)


@pytest.mark.parametrize("selection_on_test", [False, True])
def test_the_summary_reports_the_test_figures_the_best_epoch_and_the_data(tmp_path, selection_on_test):
    run_dir = tmp_path / "runs" / "r1"
    test = eval_result([0] * 8, [0.5] * 8, loss=0.625, accuracy=0.75)
    summary = results_summary(test, checkpoint_info(), dataset_splits(selection_on_test),
                              BestEpoch(epoch=4, accuracy=0.8, loss=0.375, balanced_accuracy=0.7), run_dir,
                              world_size=2)
    note = summary.pop("note", None)
    assert summary == {
        "test_accuracy": 0.75,
        "test_accuracy_ci95": pytest.approx(wilson_by_quadratic(6, 8)),  # CONFUSION's diagonal: 6 of 8 right
        "balanced_accuracy": 0.75,
        "test_loss": 0.625,
        "test_images": 8,
        "per_class_accuracy": {"howler": 1.0, "patas": 0.5, "uakari": 0.75},
        "never_predicted": [],
        "per_class_test_images": {"howler": 2, "patas": 2, "uakari": 4},
        "confusion_matrix": CONFUSION,
        "class_names": CLASS_NAMES,
        "best_epoch": 4,
        "selected_on": "balanced-accuracy",
        "best_val_accuracy": 0.8,
        "best_val_balanced_accuracy": 0.7,
        "best_val_loss": 0.375,
        "val_images": 8 if selection_on_test else 3,
        "selection_biased": selection_on_test,
        "synthetic_data": False,
        "checkpoint": str(run_dir / "best.safetensors"),
        "world_size": 2,
    }
    # the note exactly when the best epoch was chosen on the test split itself
    if selection_on_test:
        assert "selection-biased" in note and "--val-fraction 0" in note
    else:
        assert note is None


def test_the_summary_says_when_the_data_was_synthetic(tmp_path):
    splits = dataset_splits(False)
    splits.synthetic = True
    summary = results_summary(eval_result([0] * 8, [0.5] * 8), checkpoint_info(), splits, BestEpoch(), tmp_path, 1)
    assert summary["synthetic_data"] is True


# 50 test images of a common class, 2 of a rare one, 1 of a third: the model answers "common" for all but one.
SKEWED = [[50, 0, 0],
          [2, 0, 0],
          [0, 0, 1]]


def skewed_summary(tmp_path, class_names=CLASS_NAMES) -> dict:
    test = eval_result([0] * 53, [0.5] * 53, confusion=SKEWED, accuracy=51 / 53)
    return results_summary(test, checkpoint_info(class_names), dataset_splits(False), BestEpoch(), tmp_path, 1)


def test_the_summary_gives_the_balanced_accuracy_and_the_classes_never_predicted(tmp_path):
    summary = skewed_summary(tmp_path)
    assert summary["per_class_accuracy"] == {"howler": 1.0, "patas": 0.0, "uakari": 1.0}
    assert summary["balanced_accuracy"] == pytest.approx(2 / 3)  # the mean of the three, not 51 of 53
    assert summary["never_predicted"] == ["patas"]


def test_the_balanced_accuracy_leaves_out_a_class_without_test_images(tmp_path):
    test = eval_result([0] * 4, [0.5] * 4, confusion=[[3, 0, 0], [1, 0, 0], [0, 0, 0]], accuracy=0.75)
    summary = results_summary(test, checkpoint_info(), dataset_splits(False), BestEpoch(), tmp_path, 1)
    assert summary["per_class_accuracy"]["uakari"] is None
    assert summary["balanced_accuracy"] == 0.5 and summary["never_predicted"] == ["patas", "uakari"]
    assert summary["per_class_test_images"] == {"howler": 3, "patas": 1, "uakari": 0}
    assert scored_line(summary) == ("test accuracy 75.00% (95% CI 30.1-95.4%; balanced 50.00%, 2 of 3 classes never "
                                    "predicted, 1 of 3 classes without a test image) on 4 images")


def test_classes_that_share_a_display_name_keep_one_entry_each(tmp_path):
    summary = skewed_summary(tmp_path, class_names=["monkey", "monkey", "uakari"])  # a labels file said so
    assert summary["class_names"] == ["monkey (n0)", "monkey (n1)", "uakari"]
    assert summary["per_class_accuracy"] == {"monkey (n0)": 1.0, "monkey (n1)": 0.0, "uakari": 1.0}
    assert summary["never_predicted"] == ["monkey (n1)"]


def test_the_last_line_gives_the_balanced_accuracy_where_it_differs(tmp_path):
    assert scored_line(skewed_summary(tmp_path)) == (
        "test accuracy 96.23% (95% CI 87.2-99.0%; balanced 66.67%, 1 of 3 classes never predicted) on 53 images")
    even = {"test_accuracy": 0.75, "test_accuracy_ci95": [0.409275, 0.928521], "balanced_accuracy": 0.75,
            "test_images": 8, "never_predicted": [], "class_names": CLASS_NAMES,
            "per_class_accuracy": {name: 0.75 for name in CLASS_NAMES}}
    assert scored_line(even) == "test accuracy 75.00% (95% CI 40.9-92.9%) on 8 images"


def wilson_by_quadratic(correct: int, total: int) -> list[float]:
    """The textbook Wilson interval, worked out another way than results.py's: the proportions p whose normal
    test does not reject the observed one, (p_hat - p)^2 = z^2 p (1 - p) / n, the roots of a quadratic in p."""
    z, n, p_hat = 1.959963984540054, total, correct / total  # z: the 97.5% quantile of the standard normal
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return [(-b - root) / (2 * a), (-b + root) / (2 * a)]


@pytest.mark.parametrize("correct, total, low, high", [
    (0, 10, 0.0, 3.8415 / 13.8415),  # by hand: at 0 of n the upper end is z^2 / (n + z^2), z^2 = 1.96^2 = 3.8415
    (10, 10, 10 / 13.8415, 1.0),     # and at n of n the lower end is n / (n + z^2)
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (the Wilson score interval)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (215, 272, 0.7382, 0.8346),  # the monkey set's 79.04%: from wilson_by_quadratic, to 4 places
])
def test_the_accuracy_interval_is_the_wilson_score_interval(correct, total, low, high):
    assert wilson_interval(correct, total) == pytest.approx([low, high], abs=5e-5)
    assert wilson_interval(correct, total) == pytest.approx(wilson_by_quadratic(correct, total), abs=1e-12)


def test_the_interval_ends_exactly_at_0_and_100_percent_and_is_none_for_no_image():
    """Not 2.8e-17 below 0 of 10's 0%, which a reader would take for a figure; nothing for nothing measured."""
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize("select_on, line", [("balanced-accuracy", "best validation balanced accuracy 60.00%"),
                                             ("accuracy", "best validation accuracy 90.00%")])
def test_a_run_not_scored_on_test_names_the_figure_that_chose_its_best_epoch(tmp_path, select_on, line):
    run = SimpleNamespace(config=SimpleNamespace(score_test=False), run_dir=tmp_path)
    best = BestEpoch(epoch=3, accuracy=0.9, loss=0.4, balanced_accuracy=0.6, select_on=select_on)
    summary, figure = results.score(run, SimpleNamespace(splits=dataset_splits(False)), best)
    assert figure == f"{line}, not scored on the test split"
    assert "test_accuracy_ci95" not in summary and summary["test_accuracy"] is None  # no test figure, no interval
    assert summary["selected_on"] == select_on and summary["best_epoch"] == 3
    assert (summary["best_val_accuracy"], summary["best_val_balanced_accuracy"]) == (0.9, 0.6)


def test_results_json_holds_the_summary_with_one_confusion_matrix_row_a_line(tmp_path):
    """As the matrix reads, where indent=2 gave each of its numbers a line of its own; still one JSON document."""
    summary = results_summary(eval_result(PREDICTED, CONFIDENCE), checkpoint_info(), dataset_splits(False),
                              BestEpoch(), tmp_path, 1)
    text = json_with_matrix_rows({**summary, "phase_seconds": {"data": 1.5, "test": 0.25}})
    assert json.loads(text) == {**summary, "phase_seconds": {"data": 1.5, "test": 0.25}}
    lines = text.splitlines()
    start = lines.index('  "confusion_matrix": [') + 1
    rows = summary["confusion_matrix"]
    assert [json.loads(line.rstrip(",")) for line in lines[start:start + len(rows)]] == rows
    assert lines[start + len(rows)].strip() in ("]", "],")
    low, high = summary["test_accuracy_ci95"]
    assert f'  "test_accuracy_ci95": [{low}, {high}],' in lines  # one line, not four


def after_training(splits: DatasetSplits, score_test: bool = True):
    """checkpoint_named_on_a_full_disk of a run in runs/r whose best epoch was the 4th."""
    run = SimpleNamespace(config=SimpleNamespace(score_test=score_test), run_dir=Path("runs/r"))
    return checkpoint_named_on_a_full_disk(run, splits, BestEpoch(epoch=4))


def results_json_on_a_full_disk() -> DiskFull:
    return DiskFull(Path("runs/r/results.json"), 2048, False, "--output-dir")


def test_a_full_disk_once_training_has_ended_names_the_checkpoint_and_the_test_folder_to_score_it_on():
    """Not another --output-dir, nor a --resume: either would train the run again (no state is saved at its end)."""
    with pytest.raises(DiskFull) as failed, after_training(dataclasses.replace(dataset_splits(False),
                                                                               root="/data/train")):
        raise results_json_on_a_full_disk()
    assert str(failed.value) == (
        "no space left on the device of runs/r to write results.json (2.0 KiB needed); training had ended, and "
        "runs/r/best.safetensors (epoch 4) is saved: free some space and score it on the test split with "
        "`monkeytrain evaluate --checkpoint runs/r/best.safetensors /data/test` rather than train again.")


def test_another_rank_ends_a_full_disk_after_training_with_the_main_process_line():
    """The other ranks have the main process's DiskFull as a plain UserError with its line
    (failing_alike_on_every_rank): each must end with the same line for the main process to say it once for all."""
    splits = dataclasses.replace(dataset_splits(False), root="/data/train")
    with pytest.raises(DiskFull) as main_process, after_training(splits):
        raise results_json_on_a_full_disk()
    with pytest.raises(UserError) as other_rank, after_training(splits):
        raise UserError(str(results_json_on_a_full_disk()))
    assert str(other_rank.value) == str(main_process.value)


def test_a_test_split_held_out_of_the_training_folder_is_not_offered_to_evaluate():
    """evaluate would score the whole folder, the images the model trained on among them."""
    with pytest.raises(DiskFull) as failed, after_training(dataclasses.replace(dataset_splits(False),
                                                                               root="/data/test")):
        raise results_json_on_a_full_disk()
    assert str(failed.value).endswith(
        "score it with `monkeytrain evaluate --checkpoint runs/r/best.safetensors FOLDER` on images it did not train "
        "on rather than train again (its test split was held out of /data/test; data_manifest.json lists its files).")


def test_a_full_disk_under_another_writer_after_training_is_told_the_same_way():
    """A library's own files while the test split is scored fail with the system's error, not ours (W&B's final
    files only warn: tracking.WandbRunLog.final)."""
    with pytest.raises(UserError) as failed, after_training(dataclasses.replace(dataset_splits(False),
                                                                                root="/data/train")):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(failed.value).startswith("the disk filled up after training (No space left on device); training "
                                        "had ended, and runs/r/best.safetensors (epoch 4) is saved")


def test_a_users_own_run_without_test_scoring_on_a_full_disk_names_its_checkpoint_and_not_the_test_split(
        monkeypatch):
    """`train --no-score-test` was taken for a trial of tune: its line said to pick another --output-dir, which
    trains the run again, and a run's line may not tell its user to score the test split they chose to leave."""
    monkeypatch.delenv(TUNE_STUDY_VARIABLE, raising=False)
    with pytest.raises(DiskFull) as failed, after_training(dataset_splits(False), score_test=False):
        raise results_json_on_a_full_disk()
    assert str(failed.value) == (
        "no space left on the device of runs/r to write results.json (2.0 KiB needed); training had ended, and "
        "runs/r/best.safetensors (epoch 4) is saved, each epoch's validation figures in runs/r/metrics.jsonl: free "
        "some space; they are the run's results (--no-score-test), so do not train it again.")


@pytest.mark.parametrize("error, tune, score_test", [
    (results_json_on_a_full_disk(), True, False), (results_json_on_a_full_disk(), True, True),
    (OSError(errno.EACCES, "Permission denied"), False, True)],
    ids=["a trial of tune, worded by tune", "tune's best run, worded by tune", "not a full disk"])
def test_other_failures_after_training_keep_their_own_line(error, tune, score_test, monkeypatch):
    if tune:  # as a tune worker sets it for the runs it trains (tune_workers.runs_of_this_worker)
        monkeypatch.setenv(TUNE_STUDY_VARIABLE, "studies/s")
    else:
        monkeypatch.delenv(TUNE_STUDY_VARIABLE, raising=False)
    line = str(error)
    with pytest.raises(type(error)) as failed, after_training(dataset_splits(False), score_test):
        raise error
    assert str(failed.value) == line


def test_the_test_split_is_scored_in_fp32_under_the_runs_bf16_autocast():
    """As predict, evaluate and the ONNX export run the checkpoint: the same logits, not bf16-rounded ones."""
    from monkeytrain.results import in_full_precision

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    images = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits, logits = model(images), in_full_precision(model, "cpu")(images)
    assert autocast_logits.dtype == torch.bfloat16 and not torch.equal(autocast_logits.float(), expected)
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)
