"""Run under `torchrun --nproc_per_node 2` as `distributed_checks.py WORK_DIR DATA_ROOT TRAIN_FLAGS...`:
three checks, one after the other in the same two processes (a fresh process spends about 7 s
importing torch, timm and Accelerate), each in its own folder WORK_DIR/CHECK, where each rank
writes a JSON report of what it saw (rank<r>.json):

    collectives   channel stats and a test-split evaluation of DATA_ROOT, cached under cache/
    graphed       DDP runs with their steps replayed from emulated CUDA graphs (graph_emulator.py),
                  and the same runs eager, their weights compared
    train         the real training entry point on DATA_ROOT with TRAIN_FLAGS, its runs in runs/,
                  recording which files each rank writes and every best-epoch decision it takes
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from graphed_runs import as_on_a_gpu, different_weights, train_run as emulated_run
from monkeytrain import graphed as graphed_module
from monkeytrain import selection, train, trainer
from monkeytrain.data import imagefiles
from monkeytrain.data.augment import Augmenter, AugmentSettings
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.data.pipeline import ResidentPipeline, StreamPipeline
from monkeytrain.data.stats import channel_stats
from monkeytrain.engine import evaluate
from monkeytrain.model import create_model

IMAGE_SIZE = 32


def report(folder: Path, **fields) -> None:
    """One JSON file per rank in `folder` (stdout lines of two ranks can interleave)."""
    (folder / f"rank{os.environ['RANK']}.json").write_text(json.dumps(fields))


def stats_and_test_evaluation(pipeline, splits, cache_dir: Path, accelerator) -> dict:
    """Channel stats of the training split and a fixed model's test-split evaluation."""
    stats, cached = channel_stats(splits.train, pipeline.eval_batches("train"), IMAGE_SIZE, cache_dir, accelerator)
    torch.manual_seed(0)
    model = create_model("resnet18", len(splits.class_names)).eval()
    prepare = Augmenter(AugmentSettings(), IMAGE_SIZE, stats.mean, stats.std, generator=None).eval
    result = evaluate(model, pipeline.eval_batches("test"), prepare, accelerator, len(splits.class_names))
    return dict(mean=stats.mean, std=stats.std, cached=cached, count=result.count,
                confusion=result.confusion.tolist(), loss=result.loss, balanced=result.balanced_accuracy(),
                shard=sum(len(labels) for _, labels in pipeline.eval_batches("test")))


def collectives(folder: Path, data_root: str) -> None:
    """Both pipelines' channel stats and test-split evaluation, as seen by this rank."""
    accelerator = Accelerator(cpu=True)
    splits = discover_splits(folders_from_root(Path(data_root)), 0.0, 0, strict=False)
    pipelines = {
        "stream": StreamPipeline(splits, IMAGE_SIZE, 4, 0, 0, accelerator),
        "resident": ResidentPipeline(splits, IMAGE_SIZE, 4, 0, folder / "cache" / "views", accelerator),
    }
    report(folder, rank=accelerator.process_index, world=accelerator.num_processes,
           big_batches=big_batch_epochs(splits, folder / "cache" / "views", accelerator), **{
               mode: stats_and_test_evaluation(pipeline, splits, folder / "cache" / mode, accelerator)
               for mode, pipeline in pipelines.items()})


def big_batch_epochs(splits, views_cache: Path, accelerator) -> dict:
    """Both pipelines' batches of one epoch when --batch-size exceeds a rank's share of the training
    images (16 of 27 over two ranks): [batches an epoch, [the size of each batch]] by mode."""
    pipelines = {"stream": StreamPipeline(splits, IMAGE_SIZE, 16, 0, 0, accelerator),
                 "resident": ResidentPipeline(splits, IMAGE_SIZE, 16, 0, views_cache, accelerator)}
    return {mode: [pipeline.batches_per_epoch, [len(labels) for _, labels in pipeline.train_epoch(1)]]
            for mode, pipeline in pipelines.items()}


def graphed(folder: Path, data_root: str) -> None:
    """Eager DDP runs and the same runs with --cuda-graphs, emulated: 2 epochs of 6 batches a rank,
    with 3 warm-up batches instead of DDP's 11 (what they avoid on a GPU, DDP's timed iterations, the
    emulator does not see), so that captures and replays come in the first epoch. One run steps every
    batch, one accumulates gradients over 2 (its adding graph captured without the all-reduce)."""
    def compared(accumulation: str) -> dict:
        flags = ("--epochs", "2", "--min-train-size", "0", "--grad-accum-steps", accumulation)
        eager = emulated_run(Path(data_root), "eager", *flags, cache=folder / "cache")
        graphs = emulated_run(Path(data_root), "graphed", *flags, "--cuda-graphs", cache=folder / "cache")
        return dict(different=different_weights(graphs, eager), warm_batches=graphs.step.warm_batches,
                    captures=graphs.step.graphs.captures, steps=graphs.progress.step,
                    best=dataclasses.asdict(graphs.best),
                    weight_sum=sum(float(w.double().sum()) for w in graphs.learner.model.parameters()))

    with pytest.MonkeyPatch.context() as patch:
        as_on_a_gpu(patch)
        patch.setattr(graphed_module, "DDP_WARMUP_BATCHES", 3)
        patch.chdir(folder)
        report(folder, rank=int(os.environ["RANK"]), runs={group: compared(group) for group in ("1", "2")})


def record_writes(output_dir: Path, writes: list[str]) -> None:
    """Note every file opened for writing (by open or os.open), replaced or created under `output_dir`."""
    real_open, real_os_open, real_replace, real_mkdir = builtins.open, os.open, os.replace, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    inside = lambda p: str(Path(p).resolve()).startswith(str(output_dir.resolve()))

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            writes.append(f"open {file}")
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and inside(path):
            writes.append(f"os.open {path}")
        return real_os_open(path, flags, *args, **kwargs)

    def replace_(src, dst, *args, **kwargs):
        if inside(dst):
            writes.append(f"replace {dst}")
        return real_replace(src, dst, *args, **kwargs)

    def mkdir_(path, *args, **kwargs):
        if inside(path):
            writes.append(f"mkdir {path}")
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open, os.replace, os.mkdir = os_open, replace_, mkdir_


def record_decisions(decisions: list) -> None:
    real_update = selection.BestEpoch.update

    def update(self, epoch, accuracy, loss, balanced_accuracy):
        improved = real_update(self, epoch, accuracy, loss, balanced_accuracy)
        decisions.append([epoch, accuracy, loss, balanced_accuracy, improved])
        return improved

    selection.BestEpoch.update = update


def record_evaluated_statistics(statistics: list[float]) -> None:
    """Note, at each validation, the sum of the floating-point buffers (batch-norm statistics) of the
    model this rank validates."""
    real_validate = trainer.Trainer.validate

    def validate(self, epoch, trained):
        buffers = [b.double().sum() for b in self.learner.averager.model.buffers() if b.is_floating_point()]
        statistics.append(float(sum(buffers)))
        return real_validate(self, epoch, trained)

    trainer.Trainer.validate = validate


def record_decodes(decoded: list[str]) -> None:
    """Note every file the scan decodes rather than takes from the scans cache. The data set was
    written just before this launch: its files count as changed since any scan (RACY_NS) unless
    files changed up to now are trusted."""
    real_inspect = imagefiles.inspect

    def inspect(path, label):
        decoded.append(str(path))
        return real_inspect(path, label)

    imagefiles.inspect, imagefiles.RACY_NS = inspect, 0


def train_run(folder: Path, data_root: str, *flags: str) -> None:
    """A training run with runs/ and cache/ in `folder`, its writes, decodes and decisions recorded."""
    output_dir = folder / "runs"
    writes: list[str] = []
    decisions: list = []
    decoded: list[str] = []
    statistics: list[float] = []
    record_decisions(decisions)
    record_evaluated_statistics(statistics)
    record_writes(output_dir, writes)
    record_decodes(decoded)
    results = train.main(["--output-dir", str(output_dir), "--data", data_root,
                          "--cache-dir", str(folder / "cache"), *flags])
    report(folder, rank=int(os.environ["RANK"]), writes=writes, decisions=decisions, decoded=decoded,
           evaluated_statistics=statistics,
           best_epoch=results["best_epoch"], test_accuracy=results["test_accuracy"],
           test_images=results["test_images"])


def run_checks(work_dir: Path, data_root: str, *train_flags: str) -> None:
    """collectives, graphed, then train, each in its own folder under `work_dir`."""
    (work_dir / "collectives").mkdir(exist_ok=True)  # by both ranks
    collectives(work_dir / "collectives", data_root)
    # One process group for both: re-creating it after a destroy can hang on torchrun's store
    # (pytorch#55967), so collectives leaves it open, train's end_training closes it. Accelerate's
    # shared state is cleared so that train's Accelerator takes its own settings and finds the group.
    AcceleratorState._reset_state(True)
    (work_dir / "graphed").mkdir(exist_ok=True)
    graphed(work_dir / "graphed", data_root)  # resets Accelerate's shared state itself
    # train goes last: it sets torch's thread count and signal handlers, and its recorders patch
    # open, os.replace, os.mkdir, BestEpoch.update and the scan's inspect for good. It seeds itself (set_seed), and
    # collectives changes neither the environment nor the working folder (its paths are absolute).
    (work_dir / "train").mkdir(exist_ok=True)
    train_run(work_dir / "train", data_root, *train_flags)


if __name__ == "__main__":
    work_dir, data_root, *train_flags = sys.argv[1:]
    run_checks(Path(work_dir), data_root, *train_flags)
