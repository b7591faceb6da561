"""The final report of a run: results.json's content and the misclassified test images."""

from __future__ import annotations

from pathlib import Path

from accelerate.utils import gather_object

from monkeytrain.checkpoint import BEST_NAME, CheckpointInfo
from monkeytrain.data.dataset import DatasetSplits
from monkeytrain.data.imagefiles import ImageFile
from monkeytrain.distributed import shard_indices
from monkeytrain.engine import EvalResult
from monkeytrain.selection import BestEpoch

MAX_MISCLASSIFIED = 200


def results_summary(test: EvalResult, info: CheckpointInfo, splits: DatasetSplits,
                    best: BestEpoch, run_dir: Path, world_size: int) -> dict:
    summary = {
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "test_images": test.count,
        "per_class_accuracy": dict(zip(info.class_names, test.per_class_accuracy())),
        "confusion_matrix": test.confusion.tolist(),
        "class_names": info.class_names,
        "best_epoch": best.epoch,
        "best_val_accuracy": best.accuracy,
        "best_val_loss": best.loss,
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
