"""Run under `torchrun --nproc_per_node 2`: each rank writes a JSON report of what it saw.

    collectives DATA_ROOT CACHE_DIR   channel stats and a test-split evaluation
    train OUTPUT_DIR TRAIN_FLAGS...   the real training entry point, recording
                                      which files each rank writes and every
                                      best-epoch decision it takes
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from monkeytrain import selection, train
from monkeytrain.data.augment import Augmenter, AugmentSettings
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.data.pipeline import ResidentPipeline, StreamPipeline
from monkeytrain.data.stats import channel_stats
from monkeytrain.engine import evaluate
from monkeytrain.model import create_model

IMAGE_SIZE = 32


def report(**fields) -> None:
    """One JSON file per rank in $RANK_REPORTS (stdout lines of two ranks can interleave)."""
    path = Path(os.environ["RANK_REPORTS"]) / f"rank{os.environ['RANK']}.json"
    path.write_text(json.dumps(fields))


def stats_and_test_evaluation(pipeline, splits, cache_dir: Path, accelerator) -> dict:
    """Channel stats of the training split and a fixed model's test-split evaluation."""
    stats, cached = channel_stats(splits.train, pipeline.eval_batches("train"), IMAGE_SIZE, cache_dir, accelerator)
    torch.manual_seed(0)
    model = create_model("resnet18", len(splits.class_names)).eval()
    prepare = Augmenter(AugmentSettings(), IMAGE_SIZE, stats.mean, stats.std, generator=None).eval
    result = evaluate(model, pipeline.eval_batches("test"), prepare, accelerator, len(splits.class_names))
    return dict(mean=stats.mean, std=stats.std, cached=cached, count=result.count,
                confusion=result.confusion.tolist(), loss=result.loss,
                shard=sum(len(labels) for _, labels in pipeline.eval_batches("test")))


def collectives(data_root: str, cache_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    splits = discover_splits(folders_from_root(Path(data_root)), 0.0, 0, strict=False)
    pipelines = {
        "stream": StreamPipeline(splits, IMAGE_SIZE, 4, 0, 0, accelerator),
        "resident": ResidentPipeline(splits, IMAGE_SIZE, 4, 0, Path(cache_dir) / "views", accelerator),
    }
    report(rank=accelerator.process_index, world=accelerator.num_processes, **{
        mode: stats_and_test_evaluation(pipeline, splits, Path(cache_dir) / mode, accelerator)
        for mode, pipeline in pipelines.items()})
    accelerator.end_training()


def record_writes(output_dir: Path, writes: list[str]) -> None:
    """Note every file opened for writing, replaced or created under `output_dir`."""
    real_open, real_replace, real_mkdir = builtins.open, os.replace, os.mkdir
    inside = lambda p: str(Path(p).resolve()).startswith(str(output_dir.resolve()))

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            writes.append(f"open {file}")
        return real_open(file, mode, *args, **kwargs)

    def replace_(src, dst, *args, **kwargs):
        if inside(dst):
            writes.append(f"replace {dst}")
        return real_replace(src, dst, *args, **kwargs)

    def mkdir_(path, *args, **kwargs):
        if inside(path):
            writes.append(f"mkdir {path}")
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.replace, os.mkdir = replace_, mkdir_


def record_decisions(decisions: list) -> None:
    real_update = selection.BestEpoch.update

    def update(self, epoch, accuracy, loss):
        improved = real_update(self, epoch, accuracy, loss)
        decisions.append([epoch, accuracy, loss, improved])
        return improved

    selection.BestEpoch.update = update


def train_run(output_dir: str, *flags: str) -> None:
    writes: list[str] = []
    decisions: list = []
    record_decisions(decisions)
    record_writes(Path(output_dir), writes)
    results = train.main(["--output-dir", output_dir, *flags])
    report(rank=int(os.environ["RANK"]), writes=writes, decisions=decisions,
           best_epoch=results["best_epoch"], test_accuracy=results["test_accuracy"],
           test_images=results["test_images"])


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"collectives": collectives, "train": train_run}[command](*arguments)
