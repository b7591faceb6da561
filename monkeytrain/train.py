"""Train, select the best epoch, reload it and evaluate on the test split.

    accelerate launch monkeytrain/train.py [flags]      # any Accelerate setup
    python -m monkeytrain.train --debug                  # one process, quick check

This file is wiring: it creates the one Accelerator, builds the pieces from
the other modules, runs the epochs and always closes the Accelerator.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts monkeytrain/ itself first on sys.path; put the
    # project root there instead so only absolute `monkeytrain.` imports resolve.
    _package_dir = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _package_dir]
    sys.path.insert(0, str(_package_dir.parent))

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed

from monkeytrain.averaging import weight_averager
from monkeytrain.checkpoint import BEST_NAME, CheckpointInfo, load_model, save_checkpoint
from monkeytrain.config import TrainConfig, parse_config, save_config
from monkeytrain.data.augment import Augmenter, AugmentSettings
from monkeytrain.data.dataset import DatasetSplits, default_cache_dir, resolve_dataset, usable_cache_dir
from monkeytrain.data.pipeline import build_pipeline
from monkeytrain.data.stats import ChannelStats, channel_stats
from monkeytrain.distributed import broadcast_from_main, cores_per_process
from monkeytrain.engine import evaluate, flip_averaged, train_one_epoch
from monkeytrain.errors import UserError, exits_cleanly_on_user_error
from monkeytrain.model import compiled, create_model
from monkeytrain.optim import build_optimizer, build_scheduler
from monkeytrain.pace import RemainingTime, estimate_line, long_cpu_run_advice
from monkeytrain.predict import inference
from monkeytrain.preemption import STOP_CHECK_INTERVAL, Preemption, requeue_or_exit
from monkeytrain.results import misclassified, results_summary
from monkeytrain.resume import Progress, TrainingState, agree_on_state, resolve_resume
from monkeytrain.selection import BestEpoch
from monkeytrain.storage import check_writable_dir
from monkeytrain.tracking import RunLog, make_run_log


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Parse flags, train, and return the results written to results.json."""
    config = parse_config(argv)
    on_gpu = torch.cuda.is_available() and not config.cpu
    if config.mixed_precision == "fp16" and not on_gpu:
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")
    accelerator = Accelerator(
        cpu=config.cpu,
        # an explicit flag, else the launcher's setting, else bf16 on a GPU
        mixed_precision=config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
        or ("bf16" if on_gpu else "no"),
        gradient_accumulation_steps=config.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step ourselves
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    config.mixed_precision = accelerator.mixed_precision  # record what the launcher chose
    if accelerator.device.type == "cpu":
        # Not OMP_NUM_THREADS: `accelerate launch` without a config sets it to 1,
        # which would make the main command train at half speed on two cores.
        torch.set_num_threads(config.cpu_threads or cores_per_process(accelerator))
    try:
        return run(config, accelerator)
    finally:
        accelerator.end_training()  # without it, gloo ranks can abort at exit


def run(config: TrainConfig, accelerator: Accelerator) -> dict:
    started = time.perf_counter()
    stop = Preemption(config.save_every_minutes)  # from the start: a SIGUSR1 would kill us unsaved
    set_seed(config.seed)
    usable_cache_dir(config)  # before the run directory: a bad --cache-dir leaves nothing behind
    run_dir = prepare_run_dir(config, accelerator)
    log = make_run_log(run_dir, accelerator.is_main_process, config.report_to, config.to_dict(),
                       config.log_checkpoint)
    try:
        return train_and_report(config, accelerator, run_dir, log, stop, started)
    finally:
        log.close()


def train_and_report(config: TrainConfig, accelerator: Accelerator, run_dir: Path, log: RunLog,
                     stop: Preemption, started: float) -> dict:
    splits = resolve_dataset(config, accelerator, log)
    cache_dir = default_cache_dir(config)
    pipeline = build_pipeline(config, splits, cache_dir, accelerator)
    stats, cached = channel_stats(splits.train, pipeline.eval_batches("train"), config.image_size,
                                  cache_dir, accelerator)
    log.info(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
             f"{len(splits.class_names)} classes; channel mean {fmt(stats.mean)} std {fmt(stats.std)}"
             f" ({'cached' if cached else 'computed'}); {pipeline.mode} data pipeline; "
             f"{accelerator.num_processes} process(es) on {accelerator.device}; {config.recipe} recipe; "
             f"run directory {run_dir}")
    if accelerator.is_main_process:
        save_config(config, run_dir / "config.yaml")
        (run_dir / "data_manifest.json").write_text(json.dumps(splits.manifest(), indent=2))

    best, stopped = fit(config, accelerator, splits, pipeline, stats, run_dir, log, stop)
    if stopped:
        log.close()  # before a requeue, which ends this job at once
        if accelerator.is_main_process:
            requeue_or_exit(log)
        return {"stopped": True}
    results, wrong = final_evaluation(accelerator, splits, pipeline, run_dir, best)
    results.update(wall_seconds=round(time.perf_counter() - started, 2), data_pipeline=pipeline.mode,
                   resident_data_bytes=pipeline.resident_bytes, peak_gpu_memory_bytes=peak_gpu_memory())
    if accelerator.is_main_process:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.final(results, wrong, run_dir / BEST_NAME)
    log.info(f"test accuracy {results['test_accuracy']:.2%} on {results['test_images']} images "
             f"(best epoch {best.epoch}); results in {run_dir / 'results.json'}")
    return results


def prepare_run_dir(config: TrainConfig, accelerator: Accelerator) -> Path:
    """The run directory, named alike on every rank; a finished run is only reopened to resume."""
    config.run_name = config.run_name or broadcast_from_main(time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(config.output_dir) / config.run_name
    if (run_dir / BEST_NAME).exists() and not config.resume:
        raise UserError(f"{run_dir} already holds a checkpoint; pick another --run-name, move it away, "
                        "or continue it with --resume auto.")
    if (run_dir / "results.json").exists():
        raise UserError(f"{run_dir} holds a finished run (results.json); pick another --run-name.")
    problem = None
    if accelerator.is_main_process:
        try:
            check_writable_dir(run_dir, "--output-dir")  # now, not as a traceback at the first save
        except UserError as error:
            problem = str(error)
    problem = broadcast_from_main(problem)  # every rank stops; none is left waiting for the main one
    if problem:
        raise UserError(problem)
    return run_dir


@dataclass
class Training:
    """The prepared pieces one run trains with."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: torch.nn.Module
    averager: object
    augmenter: Augmenter
    evaluated: Callable  # what validation runs: the (averaged) model, flip-averaged if asked
    steps: int           # batches per epoch
    state: TrainingState


def build_training(config: TrainConfig, accelerator: Accelerator, num_classes: int, pipeline,
                   stats: ChannelStats, run_dir: Path) -> Training:
    generator = torch.Generator(accelerator.device).manual_seed(config.seed * 1000 + accelerator.process_index)
    augmenter = Augmenter(augment_settings(config), config.image_size, stats.mean, stats.std, generator)
    steps = min(pipeline.batches_per_epoch, config.max_steps_per_epoch or pipeline.batches_per_epoch)
    plain = create_model(config.model, num_classes, config.pretrained)
    plain = plain.to(accelerator.device, memory_format=torch.channels_last)
    averager = weight_averager(plain, config.ema_decay)
    optimizer = build_optimizer(plain, config, accelerator.device)
    scheduler = build_scheduler(optimizer, config, math.ceil(steps / config.grad_accum_steps))
    model, optimizer, scheduler = accelerator.prepare(plain, optimizer, scheduler)
    return Training(
        model=compiled(model, config.compile, default_cache_dir(config)), optimizer=optimizer,
        scheduler=scheduler, criterion=torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        averager=averager, augmenter=augmenter,
        evaluated=flip_averaged(averager.model) if config.tta_flip else averager.model, steps=steps,
        state=TrainingState(run_dir, accelerator, averager, generator, config.keep_states),
    )


def fit(config, accelerator, splits: DatasetSplits, pipeline, stats: ChannelStats, run_dir: Path,
        log: RunLog, stop: Preemption) -> tuple[BestEpoch, bool]:
    """Train the remaining epochs; returns the best epoch and whether a stop signal ended training."""
    t = build_training(config, accelerator, len(splits.class_names), pipeline, stats, run_dir)
    progress, best = Progress(), BestEpoch()
    resume_from = agree_on_state(resolve_resume(config.resume, run_dir))
    if resume_from is not None:
        progress, best = t.state.load(resume_from)
        log.info(f"resumed from {resume_from}: epoch {progress.epoch}, batch {progress.batch}")
    pace = RemainingTime(progress.epoch, config.epochs)
    for epoch in range(progress.epoch, config.epochs + 1):
        trained = train_one_epoch(
            t.model, pipeline.train_epoch(epoch, t.steps, skip=progress.batch), t.augmenter.train,
            t.optimizer, t.scheduler, t.criterion, accelerator, t.averager, config.clip_grad_norm,
            f"epoch {epoch}", t.steps - progress.batch,
            after_step=step_boundary(config, accelerator, progress, epoch, best, t.state, stop))
        if trained.stopped:
            save_state(t.state, progress, best, stop)
            return best, True
        progress.epoch, progress.batch = epoch + 1, 0
        validate_and_checkpoint(config, accelerator, splits, pipeline, stats, run_dir, log, t, epoch, best, trained)
        report_time_left(pace, epoch, config, accelerator.device.type == "cpu", log)
        stopping, save_due = stop.check(accelerator)
        if stopping or save_due:
            save_state(t.state, progress, best, stop)
        if stopping:
            return best, True
    return best, False


def save_state(state: TrainingState, progress: Progress, best: BestEpoch, stop: Preemption) -> None:
    state.save(progress, best)
    stop.schedule.saved()


def step_boundary(config, accelerator, progress: Progress, epoch: int, best: BestEpoch,
                  state: TrainingState, stop: Preemption) -> Callable[[int], bool]:
    """After each optimizer step: note progress, save on schedule, and say whether to stop."""
    skipped = progress.batch

    def after_step(batches_done: int) -> bool:
        progress.epoch, progress.batch = epoch, skipped + batches_done
        progress.global_step += 1
        stopping, save_due = (stop.check(accelerator) if progress.global_step % STOP_CHECK_INTERVAL == 0
                              else (False, False))
        scheduled = config.save_every and progress.global_step % config.save_every == 0
        if (save_due or scheduled) and not stopping:  # on a stop, fit() saves this very step
            save_state(state, progress, best, stop)
        return stopping

    return after_step


def validate_and_checkpoint(config, accelerator, splits, pipeline, stats, run_dir, log, t: Training,
                            epoch: int, best: BestEpoch, trained) -> None:
    """Score the validation split; rank 0 saves the checkpoint if it improved; log the epoch."""
    t.averager.model.eval()
    validated = evaluate(t.evaluated, pipeline.eval_batches("val"), t.augmenter.eval, accelerator,
                         len(splits.class_names))
    improved = best.update(epoch, validated.accuracy, validated.loss)  # same inputs on every rank
    if improved and accelerator.is_main_process:
        save_checkpoint(run_dir, t.averager.model, checkpoint_info(config, splits, stats, epoch, validated.accuracy))
    accelerator.wait_for_everyone()  # reached by every rank, improved or not
    log.epoch({
        "epoch": epoch, "epochs": config.epochs,
        "train_loss": trained.loss, "train_accuracy": trained.accuracy,
        "val_loss": validated.loss, "val_accuracy": validated.accuracy,
        "lr": t.scheduler.get_last_lr()[0], "images_per_second": trained.images_per_second,
        "epoch_seconds": trained.seconds, "is_best": improved,
    })


def report_time_left(pace: RemainingTime, epoch: int, config: TrainConfig, on_cpu: bool, log: RunLog) -> None:
    seconds_left = pace.due(epoch)
    if seconds_left is None:
        return
    log.info(estimate_line(seconds_left, config.epochs - epoch))
    advice = long_cpu_run_advice(seconds_left, config.recipe) if on_cpu and pace.is_first(epoch) else None
    if advice:
        log.warn(advice)


def augment_settings(config: TrainConfig) -> AugmentSettings:
    return AugmentSettings(min_crop_scale=config.min_crop_scale, rotation=config.rotation,
                           color_jitter=config.color_jitter)


def checkpoint_info(config, splits: DatasetSplits, stats: ChannelStats, epoch: int, accuracy: float) -> CheckpointInfo:
    return CheckpointInfo(
        architecture=config.model, class_names=splits.class_names, class_folders=splits.class_folders,
        mean=stats.mean, std=stats.std, image_size=config.image_size, epoch=epoch,
        val_accuracy=accuracy, config=config.to_dict(), synthetic_data=splits.synthetic,
    )


def final_evaluation(accelerator, splits: DatasetSplits, pipeline, run_dir: Path,
                     best: BestEpoch) -> tuple[dict, list[dict]]:
    """Every rank reloads best.safetensors into a fresh model and scores the test split."""
    model, info = load_model(run_dir / BEST_NAME, accelerator.device)
    prepare, forward = inference(model, info)
    test = evaluate(forward, pipeline.eval_batches("test"), prepare, accelerator, info.num_classes)
    summary = results_summary(test, info, splits, best, run_dir, accelerator.num_processes)
    return summary, misclassified(test, splits.test, info.class_names, accelerator)


def peak_gpu_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


if __name__ == "__main__":
    main()
