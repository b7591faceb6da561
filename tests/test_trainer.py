"""monkeytrain.trainer: one Progress saved and restored whole; batches and optimizer steps counted
apart; the best epoch checkpointed; a stop saves the very step it happened at."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState

from monkeytrain import checkpoint
from monkeytrain import trainer as trainer_module
from monkeytrain.checkpoint import read_checkpoint
from monkeytrain.config import parse_config
from monkeytrain.data.prepare import prepare_data
from monkeytrain.distributed import make_accelerator
from monkeytrain.errors import UserError
from monkeytrain.preemption import REQUEUE_REQUEST
from monkeytrain.selection import PLAIN, BestEpoch
from monkeytrain.statestore import state_dirs
from monkeytrain.storage import DiskFull, WriteFailed, folder_size
from monkeytrain.tracking import SilentLog
from monkeytrain.trainer import (Progress, RunContext, Trainer, continue_after_freeing_space, training_sizes,
                                 whole_accumulation_groups)


class NoStop:
    """Preemption's interface, with a stop requested at a chosen optimizer step."""

    def __init__(self, stop_at_check: int | None = None):
        self.checks, self.stop_at_check = 0, stop_at_check
        self.schedule = type("Schedule", (), {"saved": lambda self: None})()

    def check(self, accelerator) -> tuple[bool, bool]:
        self.checks += 1
        return self.checks == self.stop_at_check, False


def test_progress_round_trips_through_what_a_state_saves():
    progress = Progress(epoch=3, batch=2, step=40, best=BestEpoch(epoch=2, accuracy=0.5, loss=1.25,
                                                                  balanced_accuracy=0.25))
    assert Progress.from_saved({"progress": dataclasses.asdict(progress)}) == progress


def test_a_state_saved_by_the_previous_version_still_resumes():
    extras = {"progress": {"epoch": 3, "batch": 2, "global_step": 40},
              "best": {"epoch": 2, "accuracy": 0.5, "loss": 1.25}}
    # its best epoch was chosen on accuracy, and the run goes on choosing so
    assert Progress.from_saved(extras) == Progress(3, 2, 40, BestEpoch(2, 0.5, 1.25, select_on=PLAIN))


@pytest.mark.parametrize("batches, accumulation, trained", [(8, 1, 8), (9, 2, 8), (11, 4, 8), (3, 2, 2), (2, 2, 2)])
def test_an_epoch_trains_whole_accumulation_groups(batches, accumulation, trained):
    assert whole_accumulation_groups(batches, accumulation) == trained


def test_an_epoch_shorter_than_one_accumulation_group_is_a_user_error():
    """It would train without a single optimizer step (a run of 50 batches a group on 5 batches did)."""
    with pytest.raises(UserError, match="--grad-accum-steps 4 needs at least 4 batches an epoch, and an epoch here "
                                        "has 3"):
        whole_accumulation_groups(3, 4)


@pytest.fixture
def trainer_for(tmp_path, make_image_folder):
    """A Trainer on 2 classes x 9 images (8 train, 1 held out each), batch 2, on the CPU."""
    data = make_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=9, size=20)

    def make(*flags: str, stop=None, on_epoch=None) -> Trainer:
        config = parse_config(["--data", str(data), "--cpu", "--model", "resnet10t", "--image-size", "16",
                               "--batch-size", "2", "--num-workers", "0", "--report-to", "none",
                               "--val-fraction", "0.1", "--cache-dir", str(tmp_path / "cache"),
                               "--run-name", "r", *flags])
        AcceleratorState._reset_state(True)
        accelerator = make_accelerator(config)
        run_dir = Path(config.output_dir) / config.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        run = RunContext(config, accelerator, run_dir, SilentLog())
        return Trainer(run, prepare_data(config, accelerator, tmp_path / "cache", run.log), stop or NoStop(),
                       on_epoch)

    yield make
    AcceleratorState._reset_state(True)


def test_optimizer_steps_are_counted_apart_from_batches(trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "2", "--grad-accum-steps", "2")
    assert trainer.batches_per_epoch == 8  # 16 training images, batch 2: 8 batches, 4 optimizer steps
    assert trainer.fit() is False
    assert (trainer.progress.epoch, trainer.progress.batch, trainer.progress.step) == (3, 0, 8)
    assert 1 <= trainer.best.epoch <= 2 and (trainer.run.run_dir / "best.safetensors").is_file()


def test_a_stop_saves_the_step_it_was_agreed_at_and_says_so(trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # On the CPU the ranks compare stop flags before training and after every optimizer step: epoch 1's
    # 6 steps are checks 2-7, its end the 8th, and the 9th comes after batch 1 of epoch 2.
    trainer = trainer_for("--epochs", "3", "--max-batches-per-epoch", "6", stop=NoStop(stop_at_check=9))
    assert trainer.fit() is True
    [saved] = state_dirs(trainer.run.run_dir)
    assert saved.name == f"step-{trainer.progress.step:08d}"
    assert (trainer.progress.epoch, trainer.progress.batch, trainer.progress.step) == (2, 1, 7)


def test_a_stop_before_the_first_step_saves_nothing_and_says_so(trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "2", "--max-batches-per-epoch", "2", stop=NoStop(stop_at_check=1))
    assert trainer.fit() is True
    assert state_dirs(trainer.run.run_dir) == [] and trainer.progress.step == 0
    assert trainer.unsaved_stop == "before its first training step, so there was nothing to save"


def test_a_resumed_run_stopped_before_its_first_step_names_the_state_it_keeps(trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert trainer_for("--epochs", "2", "--max-batches-per-epoch", "2", stop=NoStop(stop_at_check=3)).fit()
    [saved] = state_dirs(Path("runs") / "r")
    again = trainer_for("--epochs", "2", "--max-batches-per-epoch", "2", "--resume", "auto",
                        stop=NoStop(stop_at_check=1))
    assert again.fit() is True and state_dirs(again.run.run_dir) == [saved]
    assert again.unsaved_stop == f"before its first training step, nothing trained since {saved}"


def test_an_epoch_shorter_than_the_launchers_accumulation_names_the_launchers_setting(trainer_for, monkeypatch,
                                                                                       tmp_path):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS=8 with --max-batches-per-epoch 2: the line named --grad-accum-steps 8,
    a flag the user had not given, and said to lower it (which the launcher's 8 would then refuse)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "8")
    with pytest.raises(UserError, match=r"^ACCELERATE_GRADIENT_ACCUMULATION_STEPS=8 \(set by .*\) needs at least 8 "
                                        r"batches an epoch, and an epoch here has 2 .*; lower it where it is set\.$"):
        trainer_for("--epochs", "1", "--max-batches-per-epoch", "2")


class Pruned(Exception):
    pass


def test_on_epoch_sees_each_validation_and_may_end_the_run_there(trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    seen = []

    def prune_after_two(epoch: int, val_score: float) -> None:  # what monkeytrain tune's pruner does
        seen.append((epoch, val_score))
        if epoch == 2:
            raise Pruned

    trainer = trainer_for("--epochs", "3", "--max-batches-per-epoch", "2", on_epoch=prune_after_two)
    with pytest.raises(Pruned):
        trainer.fit()
    # it sees the figure that chooses the best epoch: the balanced accuracy by default
    assert [epoch for epoch, _ in seen] == [1, 2] and trainer.best.select_on == "balanced-accuracy"
    assert trainer.best.score == trainer.best.balanced_accuracy == max(score for _, score in seen)
    assert state_dirs(trainer.run.run_dir) == []  # no state saved: a pruned run is not resumed
    _, info = read_checkpoint(trainer.run.run_dir / "best.safetensors")  # its header says what chose it
    assert (info.epoch, info.selected_on, info.val_balanced_accuracy, info.val_accuracy) == (
        trainer.best.epoch, "balanced-accuracy", trainer.best.balanced_accuracy, trainer.best.accuracy)


def test_progressive_resizing_trains_small_crops_first_and_validates_at_full_size(trainer_for, monkeypatch,
                                                                                   tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "4", "--image-size", "32", "--min-train-size", "16",
                          "--full-size-fraction", "0.5", "--max-batches-per-epoch", "1")
    sides = []  # (training?, side) of every batch the live model sees
    trainer.learner.model.register_forward_pre_hook(
        lambda module, inputs: sides.append((module.training, inputs[0].shape[-1])))
    evaluated = trainer.evaluated
    trainer.evaluated = lambda images: sides.append((False, images.shape[-1])) or evaluated(images)
    trainer.fit()
    assert [side for training, side in sides if training] == [16, 16, 32, 32]
    assert {side for training, side in sides if not training} == {32}


def test_mixup_and_cutmix_flags_mix_the_training_batches_with_the_run_generator(trainer_for, monkeypatch,
                                                                               tmp_path):
    monkeypatch.chdir(tmp_path)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    plain = trainer_for()
    assert plain.learner.mix(images, labels) == (images, labels)
    mixing = trainer_for("--mixup-alpha", "0.4", "--cutmix-alpha", "1.0")
    state = mixing.generator.get_state()
    mixed, targets = mixing.learner.mix(images, labels)
    assert targets.shape == (4, 2) and not torch.equal(mixed, images)
    assert not torch.equal(mixing.generator.get_state(), state)  # drawn from the run's generator


def fixed_size_vit(name: str, num_classes: int, pretrained=None, image_size=None, *_rates):
    """timm's test_vit with a fixed 32-pixel patch grid, as vit_base_patch16_224 has one of 224."""
    import timm

    model = timm.create_model("test_vit", num_classes=num_classes, img_size=32)
    model.patch_embed.strict_img_size = True
    return model


def test_a_model_that_cannot_take_a_training_size_is_one_clear_error_before_training(
        trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_module, "create_model", fixed_size_vit)
    assert trainer_for("--model", "test_vit", "--image-size", "32").batches_per_epoch == 8  # its own size: fine
    with pytest.raises(UserError, match=r"--model test_vit cannot take 16-pixel images \(Input height \(16\) "
                                         r"doesn't match model \(32\)\.\); give --image-size"):
        trainer_for("--model", "test_vit", "--image-size", "32", "--min-train-size", "16")


def test_the_sizes_checked_are_every_step_of_the_resizing_and_the_full_size():
    config = parse_config(["--epochs", "8", "--image-size", "64", "--min-train-size", "32", "--cpu"])
    assert training_sizes(config) == [32, 48, 64]
    assert training_sizes(parse_config(["--image-size", "64", "--cpu"])) == [64]


def test_the_trainer_builds_its_model_with_the_drop_rates_given(trainer_for):
    model = trainer_for("--drop-rate", "0.25", "--drop-path-rate", "0.1").learner.averager.model
    assert model.drop_rate == 0.25
    assert max(module.drop_prob for module in model.modules() if isinstance(module, timm.layers.DropPath)) == (
        pytest.approx(0.1))


class RecordingLog(SilentLog):
    """The log of the main process, as far as these tests look: the epochs' lines and the warnings."""

    def __init__(self):
        self.epochs, self.warnings = [], []

    def epoch(self, metrics: dict) -> None:
        self.epochs.append(metrics["epoch"])

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def best_checkpoint_on_a_full_disk(monkeypatch) -> None:
    def save_checkpoint(run_dir: Path, *args) -> Path:
        raise DiskFull(run_dir / checkpoint.BEST_NAME, 4096, False, "--output-dir")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)


@pytest.mark.parametrize("problem, fix", [
    # a full disk (or quota) hours into a run
    (lambda path: DiskFull(path, 4096, False, "--output-dir"),
     "no space left on the device of runs/r to write best.safetensors (4.0 KiB needed); free some space"),
    # a scratch folder remounted read-only, or its permissions changed, mid-run
    (lambda path: WriteFailed(path, "read-only file system", "--output-dir"),
     "cannot write best.safetensors in runs/r (read-only file system); make that folder writable"),
], ids=["full disk", "read-only folder"])
def test_a_failed_write_after_a_saved_state_says_to_fix_it_and_continue_from_it(trainer_for, monkeypatch, tmp_path,
                                                                                problem, fix):
    """Not to pick another --output-dir, which would start over a run that may have trained for hours."""
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "2", "--max-batches-per-epoch", "2", "--save-every", "1")

    def save_checkpoint(run_dir: Path, *args) -> Path:
        raise problem(run_dir / checkpoint.BEST_NAME)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_checkpoint)
    with pytest.raises(WriteFailed) as failed:  # a DiskFull is one too
        trainer.fit()
    assert type(failed.value) is type(problem(Path("x")))  # the same error, its line changed
    assert str(failed.value) == (f"{fix}; the training state runs/r/state/step-00000002 is saved: to continue, run "
                                 "the same command with --resume auto --run-name r.")


def test_a_full_disk_before_any_saved_state_still_says_to_free_space_or_write_elsewhere(trainer_for, monkeypatch,
                                                                                         tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "2", "--max-batches-per-epoch", "2")
    trainer.run.log = RecordingLog()
    best_checkpoint_on_a_full_disk(monkeypatch)
    with pytest.raises(DiskFull, match=r"to write best.safetensors \(4.0 KiB needed\); free some space or pick "
                                       r"another --output-dir\.$"):
        trainer.fit()
    assert trainer.run.log.epochs == [1]  # the epoch's figures are written before its checkpoint


def test_a_full_disk_in_a_job_of_the_slurm_scripts_says_to_resubmit_it():
    environ = {"SLURM_JOB_ID": "7", REQUEUE_REQUEST: "/tmp/requeue", "SLURM_ARRAY_TASK_ID": "2"}
    assert continue_after_freeing_space(Path("runs/slurm-7_2/state/step-00000040"), Path("runs/slurm-7_2"),
                                        environ) == (
        "free some space; the training state runs/slurm-7_2/state/step-00000040 is saved: to continue, resubmit this "
        "task alone (sbatch --array=2 ...) with --resume auto --run-name slurm-7_2.")


def test_a_disk_with_less_free_space_than_the_run_needs_is_warned_of_once_before_training(trainer_for, monkeypatch,
                                                                                           tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "1", "--max-batches-per-epoch", "2", "--save-every", "1", "--keep-states", "1")
    trainer.run.log = RecordingLog()
    monkeypatch.setattr(trainer_module, "free_bytes", lambda folder: 1000)
    trainer.fit()
    [warning] = trainer.run.log.warnings
    assert re.fullmatch(r"the run will write about [\d.]+ MiB into runs/r \(best.safetensors, and training states of "
                        r"about [\d.]+ MiB: --keep-states 1, one more while a save replaces the oldest\), and its disk "
                        r"has 1000 B free; free some space, or the run stops when the disk is full\.", warning)
    # the estimate of a state is near what one takes on disk
    [state] = state_dirs(trainer.run.run_dir)
    estimate = trainer_module.state_bytes(trainer.learner, trainer.config, trainer.run.run_dir)
    assert 0.8 < estimate / folder_size(state) < 1.2


def test_a_disk_with_room_for_the_run_gets_no_warning(trainer_for, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    trainer = trainer_for("--epochs", "1", "--max-batches-per-epoch", "2")
    trainer.run.log = RecordingLog()
    trainer.fit()
    assert trainer.run.log.warnings == []
