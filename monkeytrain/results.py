"""The final report of a run: the reloaded best checkpoint on the test split, results.json's
content and the misclassified test images (or, for a search's trial, the best epoch's figures alone);
and its JSON, a confusion matrix one row a line (results.json and `monkeytrain evaluate --json`)."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Iterator

import torch
from accelerate.utils import gather_object

from monkeytrain.checkpoint import BEST_NAME, CheckpointInfo, load_model
from monkeytrain.data.dataset import DatasetSplits
from monkeytrain.data.imagefiles import ImageFile
from monkeytrain.data.prepare import RunData
from monkeytrain.distributed import a_run_of_tune, shard_indices
from monkeytrain.engine import EvalResult, balanced_accuracy, evaluate
from monkeytrain.errors import UserError, first_line
from monkeytrain.predict import inference, shown_class_names
from monkeytrain.runrecords import folder_apart_from
from monkeytrain.selection import BestEpoch
from monkeytrain.storage import FREE_SPACE, DiskFull, first_fix, is_disk_full, with_way_out
from monkeytrain.tracking import METRICS_NAME

MAX_MISCLASSIFIED = 200  # the most confident mistakes first, in results and in W&B
Z_95 = NormalDist().inv_cdf(0.975)  # 1.95996...: the normal quantile of a two-sided 95% interval


def score(run, data: RunData, best: BestEpoch) -> tuple[dict, str]:
    """results.json's figures and the one that ends the log: the test split's, or with --no-score-test
    (a trial of monkeytrain tune, or a user's choice) the best epoch's alone, the test split unseen. `run` is
    the trainer's RunContext."""
    if not run.config.score_test:
        return (selection_summary(data.splits, best, run.run_dir),
                f"best validation {best.metric} {best.score:.2%}, not scored on the test split")
    results, wrong = final_evaluation(run.accelerator, data, run.run_dir, best)
    # No failing_alike_on_every_rank: the plots and W&B's copies (the main process's alone) only warn on a full
    # disk, so no rank has a line to end with here
    run.log.final(results, wrong, run.run_dir / BEST_NAME)
    return results, scored_line(results)


@contextmanager
def checkpoint_named_on_a_full_disk(run, splits: DatasetSplits, best: BestEpoch) -> Iterator[None]:
    """Once training has ended, a full disk (while the test split is scored or results.json is written; the
    plots and W&B's final files only warn) names the best.safetensors it left and how to score it, rather than
    another --output-dir or a --resume: no training state is saved at the end, so either would train it again. A run
    of monkeytrain tune (a trial, the best run) keeps its line, which tune words in its own flags. A DiskFull is
    known by its line: the other ranks of a run have it as a plain UserError (failing_alike_on_every_rank), and
    end with the same line as the main process, which says it for them all."""
    try:
        yield
    except Exception as error:
        if a_run_of_tune():
            raise
        if isinstance(error, UserError) and first_fix(str(error), "--output-dir") == FREE_SPACE:
            error.args = (with_way_out(str(error), "--output-dir", score_the_checkpoint(run, best, splits)),)
            raise  # the same error, its line changed (as Trainer.resumable_when_space_runs_out does)
        if isinstance(error, DiskFull) or not is_disk_full(error):  # a DiskFull of another folder keeps its line
            raise
        raise UserError(f"the disk filled up after training ({first_line(error)}); "
                        f"{score_the_checkpoint(run, best, splits)}") from error


def score_the_checkpoint(run, best: BestEpoch, splits: DatasetSplits) -> str:
    """What to do about a full disk once training has ended and RUN/best.safetensors holds the `best` epoch."""
    checkpoint = run.run_dir / BEST_NAME
    saved = f"training had ended, and {checkpoint} (epoch {best.epoch}) is saved"
    if not run.config.score_test:  # the user chose not to score it: its figures are all there already
        return (f"{saved}, each epoch's validation figures in {run.run_dir / METRICS_NAME}: free some space; they "
                "are the run's results (--no-score-test), so do not train it again.")
    saved += ": free some space and score it"
    folder = own_test_folder(splits)
    if folder is not None:
        return (f"{saved} on the test split with `monkeytrain evaluate --checkpoint {checkpoint} {folder}` "
                "rather than train again.")
    return (f"{saved} with `monkeytrain evaluate --checkpoint {checkpoint} FOLDER` on images it did not train on "
            f"rather than train again (its test split was held out of {splits.root}; data_manifest.json lists "
            "its files).")


def own_test_folder(splits: DatasetSplits) -> Path | None:
    """The test split's own folder (Kaggle's validation/validation, --test-dir), which `monkeytrain evaluate`
    scores as the run did; None for a test split held out of the training folder, whose other images the
    model trained on. Its images lie in class subfolders of it, so it is the folder they have in common."""
    return folder_apart_from([image.path for image in splits.test], splits.root) if splits.test else None


def scored_line(results: dict) -> str:
    """The test accuracy and its 95% interval (272 test images leave about ±5 points), and the balanced one
    where it differs: 96% on 50 images of one class and 2 of another may be a model that never answers the
    small class. Classes the test split has no image of are counted, as the figure says nothing of them."""
    accuracy, balanced = f"{results['test_accuracy']:.2%}", results["balanced_accuracy"]
    never, classes = results["never_predicted"], len(results["class_names"])
    untested = [name for name, accuracy in results["per_class_accuracy"].items() if accuracy is None]
    notes = [f"balanced {balanced:.2%}"] if balanced is not None and f"{balanced:.2%}" != accuracy else []
    notes += [f"{len(never)} of {classes} classes never predicted"] if never else []
    # A class of one image keeps it for training: the figure then leaves that class out, and says so.
    notes += [f"{len(untested)} of {classes} classes without a test image"] if untested else []
    # A semicolon, so that the interval is not read as the balanced accuracy's
    noted = "; ".join(filter(None, [interval_words(results.get("test_accuracy_ci95")), ", ".join(notes)]))
    return f"test accuracy {accuracy}{f' ({noted})' if noted else ''} on {results['test_images']} images"


def interval_words(interval: list[float] | None) -> str:
    """[0.738, 0.835] as "95% CI 73.8-83.5%" (one decimal: enough for a range points wide)."""
    return f"95% CI {100 * interval[0]:.1f}-{interval[1]:.1%}" if interval else ""


def accuracy_interval(result: EvalResult) -> list[float] | None:
    """The 95% interval of an evaluation's accuracy, from its correct and total counts (None for no image)."""
    return wilson_interval(int(result.confusion.diag().sum()), result.count)


def wilson_interval(correct: int, total: int, z: float = Z_95) -> list[float] | None:
    """The Wilson score interval of a proportion `correct` / `total`: [low, high] fractions, None for no
    trials. Unlike the normal approximation (p ± z·sqrt(p(1-p)/n)) it stays inside [0, 1] and does not shrink
    to nothing at 0% or 100% or for a few images. Our own few lines: no dependency offers it (torch and numpy
    have none; scipy and statsmodels, which do, are not dependencies, and are not worth adding for this)."""
    if total <= 0:
        return None
    p, z2 = correct / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    # At 0 of n and n of n an end is exactly 0 or 1: rounding left 0 of 10's at 2.8e-17
    return [0.0 if correct == 0 else centre - half, 1.0 if correct == total else centre + half]


def final_evaluation(accelerator, data: RunData, run_dir: Path, best: BestEpoch) -> tuple[dict, list[dict]]:
    """Every rank reloads best.safetensors into a fresh model and scores the test split."""
    model, info = load_model(run_dir / BEST_NAME, accelerator.device)
    prepare, forward = inference(model, info)
    test = evaluate(in_full_precision(forward, accelerator.device.type), data.pipeline.eval_batches("test"),
                    prepare, accelerator, info.num_classes)
    summary = results_summary(test, info, data.splits, best, run_dir, accelerator.num_processes)
    summary.update(data_pipeline=data.pipeline.mode, resident_data_bytes=data.pipeline.resident_bytes,
                   peak_gpu_memory_bytes=peak_gpu_memory())
    return summary, misclassified(test, data.splits.test, summary["class_names"], accelerator)


def in_full_precision(forward: Callable, device_type: str) -> Callable:
    """`forward` in fp32 whatever precision the run trained in: the test figures are then those of the model
    as `monkeytrain predict`, `evaluate` and its ONNX export run it (in fp32); under the run's bf16 autocast a
    test image or two could land in another class than `evaluate` of the same checkpoint puts it in."""
    def forward_in_fp32(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, enabled=False):
            return forward(images.float())

    return forward_in_fp32


def peak_gpu_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def results_summary(test: EvalResult, info: CheckpointInfo, splits: DatasetSplits,
                    best: BestEpoch, run_dir: Path, world_size: int) -> dict:
    names, per_class = shown_class_names(info), test.per_class_accuracy()
    summary = {
        "test_accuracy": test.accuracy,
        # The uncertainty from the test split's size alone (not from the seed): 95% Wilson score interval
        "test_accuracy_ci95": accuracy_interval(test),
        "balanced_accuracy": balanced_accuracy(per_class),
        "test_loss": test.loss,
        "test_images": test.count,
        "per_class_accuracy": dict(zip(names, per_class)),
        # What each per-class figure rests on: 100% of one image says little.
        "per_class_test_images": dict(zip(names, test.confusion.sum(dim=1).tolist())),
        "never_predicted": [name for name, column in zip(names, test.confusion.sum(dim=0).tolist()) if not column],
        "confusion_matrix": test.confusion.tolist(),
        "class_names": names,
        **best_epoch_figures(best),
        "val_images": len(splits.val),
        "selection_biased": splits.selection_on_test,
        "synthetic_data": splits.synthetic,
        "checkpoint": str(run_dir / BEST_NAME),
        "world_size": world_size,
    }
    if splits.selection_on_test:
        summary["note"] = ("the best epoch was chosen on the test split (--val-fraction 0), "
                           "so test_accuracy is selection-biased (optimistic)")
    return summary


def best_epoch_figures(best: BestEpoch) -> dict:
    """The chosen epoch, what chose it (--select-on) and its validation figures."""
    return {
        "best_epoch": best.epoch,
        "selected_on": best.select_on,
        "best_val_accuracy": best.accuracy,
        "best_val_balanced_accuracy": best.balanced_accuracy,
        "best_val_loss": best.loss,
    }


def selection_summary(splits: DatasetSplits, best: BestEpoch, run_dir: Path) -> dict:
    """results.json of a run that never saw its test split (--no-score-test: a trial of monkeytrain tune)."""
    return {
        **best_epoch_figures(best),
        "val_images": len(splits.val),
        "test_accuracy": None,
        "note": "not scored on the test split (--no-score-test)",
        "synthetic_data": splits.synthetic,
        "checkpoint": str(run_dir / BEST_NAME),
    }


def misclassified(test: EvalResult, files: list[ImageFile], class_names: list[str], accelerator) -> list[dict]:
    """Every rank's wrong predictions, gathered on all ranks: path, true, predicted, confidence.

    Each rank evaluated its `shard_indices` share of `files`, in order.
    """
    mine = shard_indices(len(files), accelerator.process_index, accelerator.num_processes)
    wrong = [
        {"path": str(files[index].path), "true": class_names[files[index].label],
         "predicted": class_names[predicted], "confidence": confidence}
        for index, predicted, confidence in zip(mine, test.predicted.tolist(), test.confidence.tolist())
        if predicted != files[index].label
    ]
    everyone = gather_object(wrong) if accelerator.num_processes > 1 else wrong
    return sorted(everyone, key=lambda item: -item["confidence"])[:MAX_MISCLASSIFIED]


def json_with_matrix_rows(document: dict) -> str:
    """`document` as json.dumps(indent=2) writes it, but for its matrices (lists of lists of numbers),
    written one row a line: indent=2 puts every number of a 10-class confusion matrix on a line of its own,
    120 lines that no one can read as a matrix; and a list of numbers (an interval's [low, high]) on one line."""
    fields = [f"  {json.dumps(key)}: {json_field(value)}" for key, value in document.items()]
    return "{\n" + ",\n".join(fields) + "\n}" if fields else "{}"


def json_field(value) -> str:
    if is_matrix(value):
        return matrix_rows(value)
    return json.dumps(value) if is_numbers(value) else indented(value)


def is_numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def is_matrix(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(row, list) and all(isinstance(x, (int, float)) for x in row) for row in value))


def matrix_rows(matrix: list[list]) -> str:
    return "[\n" + ",\n".join(f"    {json.dumps(row)}" for row in matrix) + "\n  ]"


def indented(value) -> str:
    """`value` as indent=2 writes it, one level in (the document's own fields are)."""
    return json.dumps(value, indent=2).replace("\n", "\n  ")
