"""The training loop: epochs of optimizer steps, the best epoch, saved states and stop signals.

`train.py` builds the parts and hands them to a `Trainer`, which owns one
`Progress` (epoch, batch, optimizer step, best epoch so far): what a saved
state records and a resume restores, as a whole. Words, everywhere: a
*batch* is one forward and backward pass; an optimizer *step* comes every
`--grad-accum-steps` batches.

Every rank runs the same code: the log writes only on the main process and the
checkpoint is saved only there, so the loop never asks which rank it is on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from monkeytrain.averaging import weight_averager
from monkeytrain.checkpoint import BEST_NAME, BestCheckpoint, CheckpointInfo
from monkeytrain.config import TrainConfig, recorded_config
from monkeytrain.data.augment import Augmenter, AugmentSettings, EvalViews, train_resolution
from monkeytrain.data.loaders import ImageGone
from monkeytrain.data.mixing import MixSettings, batch_mixer
from monkeytrain.data.prepare import RunData
from monkeytrain.distributed import a_run_of_tune, failing_alike_on_every_rank, launcher_accumulation
from monkeytrain.engine import BatchStep, EvalResult, Learner, TrainStats, evaluate, train_one_epoch
from monkeytrain.errors import UserError
from monkeytrain.graphed import CaptureFailed, CudaGraphs, GraphedStep, graphs_unavailable
from monkeytrain.model import compiled, create_model
from monkeytrain.optim import build_optimizer, build_scheduler, hold_lr_in_tensors
from monkeytrain.pace import PhaseTimes, RemainingTime, report_time_left
from monkeytrain.preemption import (REQUEUE_REQUEST, Preemption, nothing_trained_since, resubmit, resume_flags,
                                    stop_check_interval)
from monkeytrain.runrecords import check_same_data, forget_epochs_alike, kept_with_a_state
from monkeytrain.selection import BestEpoch
from monkeytrain.statestore import StateStore, agree_on_state, resolve_resume, state_dirs
from monkeytrain.storage import FREE_SPACE, folder_size, free_bytes, human_size, with_way_out
from monkeytrain.tracking import RunLog
from monkeytrain.trainability import check_batch_norm_batches, check_input_sizes


class Diverged(UserError):
    """The validated model gives NaN or infinite losses: one line for train.py, one failed trial for tune
    (`what` happened, without the advice to the user of train.py)."""

    def __init__(self, what: str, advice: str):
        super().__init__(f"{what}{advice}")
        self.what = what


@dataclass
class Progress:
    """Where training stands: the next batch to train is `batch` of `epoch`, after `step`
    optimizer steps in all; and the best epoch so far."""

    epoch: int = 1
    batch: int = 0
    step: int = 0
    best: BestEpoch = field(default_factory=BestEpoch)

    @classmethod
    def from_saved(cls, extras: dict) -> "Progress":
        """From what a saved state holds (see Trainer.save_state)."""
        saved = dict(extras["progress"])
        if "global_step" in saved:  # an older state: the step named global_step, the best epoch beside
            saved["step"], saved["best"] = saved.pop("global_step"), extras["best"]
        return cls(**{**saved, "best": BestEpoch.from_saved(saved["best"])})


@dataclass
class RunContext:
    """What every part of a run shares: its config, its Accelerator, its folder, its log and its clock."""

    config: TrainConfig
    accelerator: object
    run_dir: Path
    log: RunLog
    phases: PhaseTimes = field(default_factory=PhaseTimes)


class Trainer:
    """Trains the remaining epochs of a run, resuming it first when asked to.

    `on_epoch(epoch, val_score)`, when given, is called on every rank after each epoch's validation, with
    the figure that chooses the best epoch (--select-on). To end the run there it raises (`monkeytrain
    tune` raises optuna.TrialPruned), which skips the saved state, the requeue and the test split; the run
    directory keeps what it has.
    """

    def __init__(self, run: RunContext, data: RunData, stop: Preemption,
                 on_epoch: Callable[[int, float], None] | None = None):
        self.run, self.data, self.stop = run, data, stop
        self.on_epoch = on_epoch or (lambda epoch, val_score: None)
        self.config, self.accelerator = run.config, run.accelerator
        self.stop_check_interval = stop_check_interval(self.accelerator.device)
        self.generator = torch.Generator(self.accelerator.device).manual_seed(
            self.config.seed * 1000 + self.accelerator.process_index)
        self.batches_per_epoch = whole_accumulation_groups(
            min(data.pipeline.batches_per_epoch, self.config.max_batches_per_epoch or data.pipeline.batches_per_epoch),
            self.config.grad_accum_steps, launcher_accumulation(self.config))
        self.augmenter = Augmenter(augment_settings(self.config), self.config.image_size, data.stats.mean,
                                   data.stats.std, self.generator)
        self.graphs = self.cuda_graphs()
        with self.graphs.side_stream() if self.graphs else nullcontext():  # for DDP's backward to be captured
            self.learner = build_learner(run, data, self.augmenter.train, self.batches_per_epoch)
        check_batch_norm_batches(self.learner.averager.model, self.config, len(data.splits.train), self.accelerator)
        self.learner.mix = batch_mixer(mix_settings(self.config), data.num_classes, self.generator)
        self.step = (GraphedStep(self.learner, self.accelerator, lambda: self.augmenter.train_size, self.graphs,
                                 run.phases) if self.graphs else BatchStep(self.learner, self.accelerator))
        self.eval_views = self.validation_views(data)
        self.evaluated = self.eval_views.averaged(self.learner.averager.model)  # what validation runs
        self.store = StateStore(run.run_dir, self.accelerator, self.config.keep_states)
        self.checkpoint = BestCheckpoint(run.run_dir, self.accelerator)
        self.progress = Progress(best=BestEpoch(select_on=self.config.select_on))  # a resume's state replaces it
        self.unsaved_stop: str | None = None  # how a stop that saved no state ended, for the stop line

    def validation_views(self, data: RunData) -> EvalViews:
        """The test-time views that validation averages: as --tta-flip and --tta-shift ask; a resumed run that
        began with a shift its stored views no longer leave room for gets the room there is (EvalViews.of_config)."""
        if self.config.resume:
            return EvalViews.of_config(self.config.to_dict(), self.config.image_size, data.stats.mean, data.stats.std)
        return EvalViews(self.config.image_size, data.stats.mean, data.stats.std, self.config.tta_flip,
                         self.config.tta_shift)

    def fit(self) -> bool:
        """Train the remaining epochs; True when a stop signal ended training (its state saved). A disk that
        fills up on the way ends the run in one line, which says how to continue from its newest saved state."""
        with self.resumable_when_space_runs_out():
            return self.train_remaining_epochs()

    def train_remaining_epochs(self) -> bool:
        resumed_from = self.resume()
        if self.stop.check(self.accelerator)[0]:  # while the data was read or the model built: nothing trained
            self.unsaved_stop = nothing_trained_since(resumed_from)  # since that state, so nothing to save
            return True
        self.warn_if_space_runs_short()
        pace = RemainingTime(self.progress.epoch, self.config.epochs)
        phases = self.run.phases
        for epoch in range(self.progress.epoch, self.config.epochs + 1):
            resumed_within = self.progress.batch > 0  # this epoch, or its end: its time is not an epoch's
            with phases.timing("training"), self.saved_on_a_fixable_stop():
                trained = self.train_epoch(epoch)
            if "first_epoch" not in phases.seconds:
                phases.add("first_epoch", trained.seconds)
            if trained.stopped:
                self.save_state()
                return True
            self.progress.epoch, self.progress.batch = epoch + 1, 0
            with phases.timing("validation"):
                validated = self.validate(epoch, trained)
            # first: a tune pruner may end a diverged trial as pruned
            self.on_epoch(epoch, self.best.score_of(validated.accuracy, validated.balanced_accuracy()))
            if not math.isfinite(validated.loss):
                raise self.diverged(epoch, trained.loss, validated.loss)
            if resumed_within:
                pace.start_after(epoch)
            report_time_left(pace, epoch, self.run.log, self.accelerator.device.type == "cpu", self.config.recipe)
            stopping, save_due = self.stop.check(self.accelerator)
            if stopping or save_due:
                self.save_state()
            if stopping:
                return True
        return False

    @contextmanager
    def resumable_when_space_runs_out(self) -> Iterator[None]:
        """A full disk (or quota) or a run folder made read-only, hours into a run that has a saved training state,
        says to free space (or make it writable) and continue from that state, not to start over elsewhere. A run
        of monkeytrain tune keeps its line, which tune words in its own flags (its command continues the study)."""
        try:
            yield
        except UserError as error:
            saved = state_dirs(self.run.run_dir)  # what --resume auto takes, alike on every rank
            if saved and not a_run_of_tune():
                message = with_way_out(str(error), "--output-dir",
                                       lambda fix: continue_after_freeing_space(saved[-1], self.run.run_dir, fix=fix))
                error.args = (message,) if message else error.args  # the same error (DiskFull, WriteFailed), new line
            raise

    def warn_if_space_runs_short(self) -> None:
        """One warning, before training, where the run folder's disk has less free space than the run's files
        will take: an estimate (and other processes free space), so not an error."""
        config, run_dir = self.config, self.run.run_dir
        best, state = best_checkpoint_bytes(self.learner), state_bytes(self.learner, config, run_dir)
        already = folder_size(run_dir / "state") + file_size(run_dir / BEST_NAME)  # a resumed run's
        needed = best + (config.keep_states + 1) * state - already  # a save writes a state, then retires the oldest
        free = free_bytes(run_dir)
        if free < needed:
            self.run.log.warn(f"the run will write about {human_size(needed)} into {run_dir} (best.safetensors, and "
                              f"training states of about {human_size(state)}: --keep-states {config.keep_states}, "
                              f"one more while a save replaces the oldest), and its disk has {human_size(free)} "
                              "free; free some space, or the run stops when the disk is full.")

    def resume(self) -> Path | None:
        """Restore the state --resume asks for, if any; which one."""
        found = agree_on_state(resolve_resume(self.config.resume, self.run.run_dir))
        if found is None:
            return None
        check_same_data(found, self.run.run_dir, self.accelerator.is_main_process)  # before anything is loaded
        self.store.load(found, restore=self.restore)
        # The epochs from here on are logged again
        forget_epochs_alike(self.run.run_dir, self.progress.epoch, self.accelerator.is_main_process)
        hold_lr_in_tensors(self.learner.optimizer, self.accelerator.device)  # loaded ones come back on the CPU
        self.run.log.info(f"resumed from {found}: epoch {self.progress.epoch}, batch {self.progress.batch}")
        return found

    def restore(self, mine: dict, main: dict) -> None:
        """Put back what save_state added to the Accelerate state (called by the store, which reports
        extras it cannot read)."""
        self.progress = Progress.from_saved(mine)
        self.generator.set_state(mine["generator"])
        self.learner.averager.load_state_dict(main["averager"])  # the main rank's: the one it saves

    def train_epoch(self, epoch: int) -> TrainStats:
        self.augmenter.train_size = epoch_train_size(self.config, epoch)
        skipped = self.progress.batch  # batches of this epoch trained before a resume
        batches = self.data.pipeline.train_epoch(epoch, self.batches_per_epoch, skip=skipped)

        def after_step(batches_done: int) -> bool:
            self.progress.epoch, self.progress.batch = epoch, skipped + batches_done
            return self.after_optimizer_step()

        return train_one_epoch(self.step, batches, self.accelerator, self.batches_per_epoch - skipped,
                               after_step, description=f"epoch {epoch}")

    @contextmanager
    def saved_on_a_fixable_stop(self) -> Iterator[None]:
        """Keep what the run has trained when a CUDA graph capture fails (its message says to resume), or
        when an image of a streamed epoch or of the test split can no longer be read (on every rank at once:
        the stream pipeline reads its batches in step); a run whose training had ended resumes to score it."""
        try:
            yield
        except CaptureFailed:
            self.save_state()  # the batches before the failed one; no graph ran, so nothing else changed
            raise
        except ImageGone as gone:
            self.save_state()  # the loader fails between steps: the last step's state is whole
            raise UserError(f"{gone} {self.how_to_continue()}") from None

    def how_to_continue(self) -> str:
        """How a run stopped by a problem the user can fix, its state saved, goes on, in words."""
        if a_run_of_tune():  # its flags are tune's to give: train.py's would be refused
            return "The same monkeytrain tune command continues the study."
        return f"The training state is saved: the same command with {resume_flags(self.run.run_dir)} continues the run."

    def cuda_graphs(self) -> CudaGraphs | None:
        """What captures the training step with --cuda-graphs, where graphs apply (None: the eager step)."""
        if not self.config.cuda_graphs:
            return None
        unavailable = graphs_unavailable(self.accelerator, self.data.pipeline.mode)
        if unavailable:
            self.run.log.warn(f"--cuda-graphs: training without them, as {unavailable}.")
            return None
        return CudaGraphs(self.generator)

    def after_optimizer_step(self) -> bool:
        """Count the step, save on schedule, and say whether the ranks agreed to stop."""
        self.progress.step += 1
        step = self.progress.step
        stopping, save_due = (self.stop.check(self.accelerator) if step % self.stop_check_interval == 0
                              else (False, False))
        scheduled = self.config.save_every and step % self.config.save_every == 0
        if (save_due or scheduled) and not stopping:  # on a stop, fit() saves this very step
            self.save_state()
        return stopping

    def validate(self, epoch: int, trained: TrainStats) -> EvalResult:
        """Score the validation split, save the checkpoint if it improved, and log the epoch."""
        self.learner.averager.model.eval()
        validated = evaluate(self.evaluated, self.data.pipeline.eval_batches("val"),
                             self.eval_views.prepare, self.accelerator, self.data.num_classes)
        finite = math.isfinite(validated.loss)  # else a broken model, never to be chosen (see diverged)
        balanced = validated.balanced_accuracy()  # from the confusion summed over the ranks: alike on all
        improved = finite and self.best.update(epoch, validated.accuracy, validated.loss, balanced)  # alike too
        # The epoch's line first, so that a full disk leaves its figures (a resume logs it again, see resume)
        self.log_epoch(epoch, trained, validated, improved)
        if improved:
            self.checkpoint.save(self.learner.averager.model, self.checkpoint_info(epoch))
        return validated

    def log_epoch(self, epoch: int, trained: TrainStats, validated: EvalResult, improved: bool) -> None:
        """The epoch's figures: the console line, metrics.jsonl and the tracker."""
        # A run resumed from a state saved at the very end of an epoch trains none of it again: its training
        # figures are unknown here (None, null in metrics.jsonl), not a loss of 0 at 0 images/s
        measured = trained.images > 0
        failing_alike_on_every_rank(lambda: self.run.log.epoch({
            "epoch": epoch, "epochs": self.config.epochs,
            "train_loss": trained.loss if measured else None,
            "train_accuracy": trained.accuracy if measured else None,
            "val_loss": validated.loss, "val_accuracy": validated.accuracy,
            "val_balanced_accuracy": validated.balanced_accuracy(),
            "lr": float(self.learner.scheduler.get_last_lr()[0]),
            "images_per_second": trained.images_per_second if measured else None,
            "epoch_seconds": trained.seconds, "train_size": self.augmenter.train_size, "is_best": improved,
        }))  # the main process alone writes metrics.jsonl: should that fail, every rank ends with its line

    def diverged(self, epoch: int, train_loss: float, val_loss: float) -> Diverged:
        """Why the run ends once the validated model gives NaN or infinite losses: its weights (or its inputs)
        hold them, and no later epoch trains its way back; the best checkpoint so far stays."""
        config, best = self.config, self.progress.best
        kept = f"; the best checkpoint so far (epoch {best.epoch}) is kept" if best.epoch > 0 else ""
        return Diverged(f"training diverged in epoch {epoch} (training loss {train_loss:.4g}, validation loss "
                        f"{val_loss:.4g})", f"{kept}; start a new run with a lower --lr (now {config.lr:g}) or "
                        "--clip-grad-norm 1.")

    def save_state(self) -> Path:
        saved = self.store.save(
            self.progress.step,
            {"progress": dataclasses.asdict(self.progress), "generator": self.generator.get_state()},
            shared={"averager": self.learner.averager.state_dict()}, copies=kept_with_a_state(self.run.run_dir))
        self.stop.schedule.saved()
        return saved

    def checkpoint_info(self, epoch: int) -> CheckpointInfo:
        """The header of best.safetensors for `epoch`, just chosen: the best epoch's figures are its own."""
        config, splits, stats, best = self.config, self.data.splits, self.data.stats, self.best
        return CheckpointInfo(
            architecture=config.model, class_names=splits.class_names, class_folders=splits.class_folders,
            mean=stats.mean, std=stats.std, image_size=config.image_size, epoch=epoch,
            val_accuracy=best.accuracy, config=recorded_config(config), synthetic_data=splits.synthetic,
            selected_on=best.select_on, val_balanced_accuracy=best.balanced_accuracy,
        )

    @property
    def best(self) -> BestEpoch:
        return self.progress.best


def build_learner(run: RunContext, data: RunData, augment: Callable, batches_per_epoch: int) -> Learner:
    """The model (prepared by Accelerate, compiled if asked), its optimizer, schedule, loss and average."""
    config, accelerator = run.config, run.accelerator
    plain = create_model(config.model, data.num_classes, config.pretrained, config.image_size, config.drop_rate,
                         config.drop_path_rate)
    plain = plain.to(accelerator.device, memory_format=torch.channels_last)
    check_input_sizes(plain, config.model, training_sizes(config), accelerator.device)
    optimizer = build_optimizer(plain, config, accelerator.device)
    scheduler = build_scheduler(optimizer, config, math.ceil(batches_per_epoch / config.grad_accum_steps))
    model, optimizer, scheduler = accelerator.prepare(plain, optimizer, scheduler)
    # From here each rank draws its own dropout and drop_path masks (the default generator): set_seed gave
    # every rank the same one, for the same initial weights, and the same masks would repeat one noise.
    torch.manual_seed(config.seed * 1000 + accelerator.process_index)
    # After prepare: the average pairs its tensors with the model's once, and prepare may give the model
    # new ones (on CPU ranks it moves it to "cpu:0", which copies every tensor), leaving the average
    # paired with the initial weights for good
    averager = weight_averager(plain, config.ema_decay)
    hold_lr_in_tensors(optimizer, accelerator.device)
    return Learner(
        model=compiled(model, config.compile, data.cache_dir), optimizer=optimizer, scheduler=scheduler,
        criterion=torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), averager=averager,
        augment=augment, clip_grad_norm=config.clip_grad_norm,
    )


def continue_after_freeing_space(state: Path, run_dir: Path, environ: Mapping[str, str] = os.environ, *,
                                 fix: str = FREE_SPACE) -> str:
    """What to do about a full disk (or a read-only run folder: `fix`) when the run has `state` saved: `fix`, then
    continue the run as the stop line on a signal says (requeue_or_exit: a job of the SLURM scripts is resubmitted)."""
    flags = resume_flags(run_dir)
    how = (resubmit(flags, environ) if environ.get("SLURM_JOB_ID") and environ.get(REQUEUE_REQUEST)
           else f"to continue, run the same command with {flags}.")
    return f"{fix}; the training state {state} is saved: {how}"


def best_checkpoint_bytes(learner: Learner) -> int:
    """About the size of best.safetensors: the weights it saves."""
    return tensor_bytes(learner.averager.model.state_dict())


def state_bytes(learner: Learner, config: TrainConfig, run_dir: Path) -> int:
    """About the size of one saved training state: the model, the optimizer's moments (one a parameter for SGD
    with momentum, two for AdamW; made at the first step, so counted from the config), the weight average and
    the copies of the run's files."""
    parameters = tensor_bytes([group["params"] for group in learner.optimizer.param_groups])
    moments = 2 if config.optimizer == "adamw" else int(config.momentum > 0)
    return (best_checkpoint_bytes(learner) + moments * parameters + tensor_bytes(learner.averager.state_dict())
            + sum(map(file_size, kept_with_a_state(run_dir))))


def tensor_bytes(value) -> int:
    """The bytes of the tensors in `value`, however nested in dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(map(tensor_bytes, value.values()))
    if isinstance(value, (list, tuple)):
        return sum(map(tensor_bytes, value))
    return 0


def file_size(path: Path) -> int:
    """A file's size, 0 where there is none."""
    return path.stat().st_size if path.is_file() else 0


def whole_accumulation_groups(batches: int, accumulation: int, launchers: str | None = None) -> int:
    """The batches an epoch trains: whole groups of `--grad-accum-steps` when there is one. Accelerate
    cannot see where an epoch of the resident pipeline ends, so a partial group would carry its
    gradients into the next epoch (and out of a saved state); and the schedule counts whole steps. Fewer
    batches than one group would train without a single optimizer step: a UserError, which names what set the
    accumulation: the flag, or `launchers`, the launcher's setting in words where it is its (launcher_accumulation)."""
    if batches < accumulation:
        asked, lower = ((launchers, "lower it where it is set") if launchers else
                        (f"--grad-accum-steps {accumulation}", "lower --grad-accum-steps"))
        raise UserError(f"{asked} needs at least {accumulation} batches an epoch, and an epoch here has {batches} "
                        f"(--batch-size, --max-batches-per-epoch); {lower}.")
    return batches - batches % accumulation


def epoch_train_size(config: TrainConfig, epoch: int) -> int:
    """The side of the training crops of `epoch` (progressive resizing, or the image size)."""
    return train_resolution(epoch, config.epochs, config.min_train_size, config.image_size,
                            config.full_size_fraction)


def training_sizes(config: TrainConfig) -> list[int]:
    """Every image side the run feeds its model: the progressive-resizing steps and the full size."""
    return sorted({epoch_train_size(config, epoch) for epoch in range(1, config.epochs + 1)} | {config.image_size})


def mix_settings(config: TrainConfig) -> MixSettings:
    return MixSettings(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                       probability=config.mix_prob, switch_probability=config.mix_switch_prob)


def augment_settings(config: TrainConfig) -> AugmentSettings:
    return AugmentSettings(min_crop_scale=config.min_crop_scale, rotation=config.rotation,
                           color_jitter=config.color_jitter, hflip=config.hflip, random_erasing=config.random_erasing)
