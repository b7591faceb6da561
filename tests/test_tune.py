"""monkeytrain tune: real (tiny) studies in subprocesses, bad input in one line, and a SLURM array.

The studies train resnet10t at 32 px for two or three epochs of three batches on a tiny coloured-shapes
set. Which trial is pruned is made certain, not left to chance: the test enqueues (Optuna's own
enqueue_trial, on the study's storage, outside the space's range: Optuna warns and runs it) a trial with
lr 1000, which diverges; its weights turn to NaN, every image is then predicted as class 0, which holds 2
of the 18 validation images: a balanced accuracy (the trials' score, by default) of 1/3, all of class 0 and
none of the others, and `--pruner below:0.4` prunes it after its first epoch (without a pruner, the
divergence fails it). lr 0.02-0.05, the space's own range, reaches 89-100% on this set.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import run_here, write_image_folder
from monkeytrain import cli, tune
from monkeytrain.config import parse_config
from monkeytrain.errors import UserError
from monkeytrain.storage import DiskFull
from monkeytrain.tune_flags import machine_flags
from monkeytrain.tune_study import STORAGE_NAME, STUDY_NAME, study_storage
from monkeytrain.tune_workers import CLAIM_NAME
from test_slurm import (RECORDING_SCONTROL, job_environment, job_state, read_log, slurm_cluster,  # noqa: F401
                        stand_in_commands, submit, wait_for_job)


PROJECT = Path(__file__).resolve().parent.parent
SPACE = {"lr": {"low": 0.02, "high": 0.05, "log": True}, "weight-decay": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
         "label_smoothing": {"low": 0.0, "high": 0.2}}
TINY = ["--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "6", "--num-workers", "0",
        "--report-to", "none", "--max-batches-per-epoch", "3", "--warmup-epochs", "0", "--ema-decay", "0",
        "--cpu-threads", "1"]


def write_study_inputs(folder: Path) -> tuple[Path, list[str]]:
    """(space file, train flags) of a tiny study: class n0 is rare, so a diverged model, which answers n0 for
    every image, scores 2/18 accuracy and 1/3 balanced accuracy."""
    data = write_image_folder(folder / "data", layout="train-val-test", classes=3,
                              per_class={"n0": 2, "n1": 8, "n2": 8}, size=32)
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return space, ["--data", str(data), "--cache-dir", str(folder / "cache"), *TINY]


@pytest.fixture
def study_inputs(tmp_path):
    return write_study_inputs(tmp_path)


def tune_command(space: Path, study_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "monkeytrain.cli", "tune", "--space", str(space), "--study-dir", str(study_dir),
            *flags]


def run_tune(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def enqueue(study_dir: Path, *params: dict) -> None:
    """Trials to run first, through Optuna's own API on the study's storage, imported as the README's recipe does."""
    from monkeytrain.tune import STUDY_NAME, study_storage

    study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=study_storage(study_dir), direction="maximize")
    for values in params:
        study.enqueue_trial(values)


def read_trials(study_dir: Path) -> list[dict]:
    with open(study_dir / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_two_workers_share_a_study_prune_a_trial_and_finish_it_once(study_inputs, tmp_path):
    space, train_flags = study_inputs
    study_dir = tmp_path / "study"
    enqueue(study_dir, {"lr": 1000.0, "weight_decay": 1e-4, "label_smoothing": 0.1},
            {"lr": 0.05, "weight_decay": 1e-4, "label_smoothing": 0.1})
    done = run_tune(tune_command(space, study_dir, "--trials", "3", "--workers", "2", "--pruner", "below:0.4",
                                 *train_flags, "--epochs", "2"))

    out = done.stdout
    assert out.count(" joins ") == 2 and out.count("training the best config once more") == 1, out
    trials = read_trials(study_dir)
    assert len(trials) == 3 and len({t["worker"] for t in trials}) == 2  # both workers ran trials
    assert trials[0]["state"] == "PRUNED" and trials[0]["note"] == "pruned at epoch 1"
    assert float(trials[0]["value"]) == pytest.approx(1 / 3)  # the balanced accuracy, not the plain 2/18
    assert trials[1]["state"] == "COMPLETE" and float(trials[1]["value"]) >= 0.8
    pruned_dir = study_dir / "trials" / "trial-0000"
    assert json.loads((pruned_dir / "trial.json").read_text())["state"] == "PRUNED"
    assert not (pruned_dir / "results.json").exists()  # ended at epoch 1 of 2, never scored
    complete = json.loads((study_dir / "trials" / "trial-0001" / "results.json").read_text())
    assert complete["test_accuracy"] is None and "best_val_accuracy" in complete  # trials never see test

    summary = json.loads((study_dir / "summary.json").read_text())
    best = summary["best_trial"]
    assert summary["selected_on"] == "balanced-accuracy" and "best_trial_val_balanced_accuracy" in summary
    assert f"best: trial {best}, validation balanced accuracy " in out
    assert trials[best]["state"] == "COMPLETE" and float(trials[best]["value"]) == max(
        float(t["value"]) for t in trials if t["state"] == "COMPLETE")
    assert (study_dir / "search.png").read_bytes()[:4] == b"\x89PNG"
    preset = parse_config(["--config", str(study_dir / "best_config.yaml")])
    assert preset.lr == summary["best_params"]["lr"] and preset.epochs == 2 and preset.model == "resnet10t"
    # best_run trained from best_config.yaml with --config, and is the one run scored on the test split.
    best_run = json.loads((study_dir / "best_run" / "results.json").read_text())
    assert 0 <= best_run["test_accuracy"] <= 1 and best_run["test_images"] == 18
    best_run_config = yaml.safe_load((study_dir / "best_run" / "config.yaml").read_text())
    assert best_run_config["lr"] == preset.lr
    # best_config.yaml leaves the machine out; the study's own best run keeps the study's (--cpu here)
    assert (best_run_config["cpu"], best_run_config["cpu_threads"]) == (True, 1)
    assert "the study's one look at the test split" in out
    low, high = best_run["test_accuracy_ci95"]  # how sure its one look is, as every run's last line says
    assert f"test accuracy {best_run['test_accuracy']:.2%} (95% CI {100 * low:.1f}-{high:.1%}) on 18 images" in out
    assert summary["best_run"]["test_accuracy_ci95"] == [low, high]


def test_a_study_begun_before_select_on_goes_on_scoring_its_trials_on_accuracy(study_inputs, tmp_path, capsys):
    """Its trials were scored on plain accuracy: its next ones are too, rather than rank balanced accuracies
    against them; a new study keeps what scores its trials for every later worker."""
    from monkeytrain.tune_space import load_space, space_json

    space, train_flags = study_inputs

    def opened(study_dir: Path) -> tune.Setup:
        args, flags = tune.build_parser().parse_known_args(["--space", str(space), "--study-dir", str(study_dir),
                                                           *train_flags])
        return tune.open_search(args, flags)[1]

    older = tmp_path / "older"
    study = optuna.create_study(study_name=STUDY_NAME, storage=study_storage(older), direction="maximize")
    study.set_user_attr("space", space_json(load_space(space)))  # as a version without --select-on kept it
    setup = opened(older)
    assert (setup.select_on, setup.train_flags[-2:]) == ("accuracy", ["--select-on", "accuracy"])
    assert "began before --select-on existed and scores its trials on validation accuracy" in capsys.readouterr().out
    new = opened(tmp_path / "new")
    assert (new.select_on, new.train_flags, new.objective) == ("balanced-accuracy", train_flags,
                                                               "validation balanced accuracy")
    assert opened(tmp_path / "new").select_on == "balanced-accuracy"  # a later worker: the space is kept now


def test_a_worker_whose_select_on_differs_is_refused_without_a_word_on_studies_before_select_on(tmp_path, capsys,
                                                                                                  monkeypatch):
    """A study begun with --select-on accuracy, and a worker given the default: the study did not begin before
    --select-on existed, and the worker is refused for its other flags, which is all it is told."""
    space = tmp_path / "space.yaml"
    space.write_text("{lr: [0.1, 0.2]}")
    monkeypatch.setattr(tune, "work", lambda study, setup, finish_now: 0)  # open the study, train nothing
    argv = ["--space", str(space), "--study-dir", str(tmp_path / "study"), "--cpu"]
    assert tune.main([*argv, "--select-on", "accuracy"]) == 0
    with pytest.raises(SystemExit) as exited:
        tune.main(argv)
    said = capsys.readouterr()
    assert exited.value.code == 2 and "holds a study begun with other fixed train.py flags" in said.err, said.err
    assert "before --select-on existed" not in said.out + said.err


def test_a_worker_warned_by_slurm_during_a_trial_asks_for_the_requeue(study_inputs, tmp_path, monkeypatch):
    """SIGUSR1 inside a trial (tune.sbatch's warning before a time limit): the worker asks for the requeue that
    brings the task back to the study. The trial leaves it to tune, and its log names no flags of its own (the
    same tune command continues the study, not --resume auto --run-name trial-0000)."""
    from monkeytrain import tune_trial

    space, train_flags = study_inputs
    study_dir, request = tmp_path / "study", tmp_path / "job.requeue"

    def warned_at_each_epochs_end(trial, objective):  # the trial's on_epoch: SLURM's warning comes in epoch 1
        return lambda epoch, score: os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(tune_trial, "pruning_hook", warned_at_each_epochs_end)
    done = run_here(tune.main, ["--space", str(space), "--study-dir", str(study_dir), "--trials", "1", *train_flags,
                                "--epochs", "2"], PROJECT, SLURM_JOB_ID="55", MONKEYTRAIN_REQUEUE_FILE=str(request))
    assert done.results == 128 + signal.SIGUSR1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tune: asked the job script to requeue the job once its processes have ended." in done.stdout
    assert request.read_text() == "55\n\n"
    log = (study_dir / "trials" / "trial-0000" / "train.log").read_text()
    assert "stopped on SIGUSR1 after saving the training state; monkeytrain tune stops too, and says how its " \
           "study goes on." in log and "--run-name" not in log, log


def test_srun_of_several_tune_workers_runs_one_worker_in_each_task(study_inputs, tmp_path):
    """`srun -n 2 monkeytrain tune ...` (the README's N workers of one study): each task is a worker whose trials
    and best run are one process each, unlike `srun -n 2 python monkeytrain/train.py` (refused: one run each)."""
    space, train_flags = study_inputs
    srun_task_1 = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    done = run_here(tune.main, ["--space", str(space), "--study-dir", str(tmp_path / "study"), "--trials", "1",
                                *train_flags, "--epochs", "1"], PROJECT, **srun_task_1)
    assert done.results == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "study" / "best_run" / "results.json").is_file()


@pytest.mark.filterwarnings("ignore:Fixed parameter lr with value 1000")  # enqueued out of range
def test_a_trial_whose_training_diverges_fails_and_the_study_goes_on(study_inputs, tmp_path):
    space, train_flags = study_inputs
    study_dir = tmp_path / "study"
    enqueue(study_dir, {"lr": 1000.0, "weight_decay": 1e-4, "label_smoothing": 0.1})
    done = run_here(tune.main, ["--space", str(space), "--study-dir", str(study_dir), "--trials", "2",
                                "--pruner", "none", *train_flags, "--epochs", "1"], PROJECT)
    assert done.results == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = read_trials(study_dir)
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0]["note"].startswith("failed: training diverged in epoch 1 (training loss ")
    assert (study_dir / "best_run" / "results.json").is_file()


def test_a_stopped_study_loses_only_the_trial_in_flight_and_continues(study_inputs, tmp_path):
    space, train_flags = study_inputs
    study_dir = tmp_path / "study"
    command = tune_command(space, study_dir, "--trials", "1", "--pruner", "none", *train_flags, "--epochs", "3")
    first = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = study_dir / "trials" / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)  # in epoch 2 of 3: the trial saves at its end and stops
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM and "stopped on SIGTERM" in output, output
    assert "interrupted by a stop signal; it does not count" in output

    again = run_here(tune.main, command[4:], PROJECT)  # how it starts was checked above: no new process
    assert again.results == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "0 of 1 trials done, 0 running" in again.stdout  # the interrupted trial does not count
    trials = read_trials(study_dir)
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[0]["note"] == "interrupted (a stop signal); not counted"
    assert trials[0]["value"] == ""  # its last epoch's accuracy was no score
    assert (study_dir / "best_run" / "results.json").is_file()
    assert "is a finished study" in run_tune(command).stdout  # nothing more to do, nothing retrained


BAD_SPACES = {
    "unknown field": ("{learning_rate: [0.1]}", "unknown field 'learning_rate'"),
    "range on a str field": ("{model: {low: 1, high: 2}}", "str field; give a list of choices"),
    "int field, float bound": ("{epochs: {low: 1.5, high: 3}}", "must be of type int"),
    "low above high": ("{lr: {low: 0.5, high: 0.1}}", "is not a usable range"),
    "log from zero": ("{label_smoothing: {low: 0.0, high: 0.1, log: true}}", "is not a usable range"),
    "refused value": ("{label_smoothing: [0.1, 1.5]}", "which train.py refuses (--label-smoothing"),
    "not a timm model": ("{model: [resnet18, resnet9000]}",
                         "allows 'resnet9000', which train.py refuses (unknown timm model 'resnet9000')"),
    "unsearchable": ("{val_fraction: [0.1, 0.2]}", "cannot be searched"),
    "the trials' own score": ("{select_on: [accuracy, balanced-accuracy]}", "'select_on' in"),
    "empty choices": ("{lr: []}", "lists no choices"),
    "not a mapping": ("[lr, 0.1]", "must map train.py flags"),
    "bad YAML": ("{lr: [0.1", "is not valid YAML"),
    "not UTF-8": (b"\xff\xfe{lr: [0.1]}", "is not valid YAML (UnicodeDecodeError)"),
    "a null bound": ("{cpu_threads: {low: null, high: 4}}", "must have low and high numbers"),
    "an int step of 0": ("{epochs: {low: 1, high: 3, step: 0}}", "is not a usable range"),
    "a key twice": ("lr: [0.1]\nepochs: [2]\nlr: [0.2]\n", "gives 'lr' twice (again on line 3)"),
    "two spellings": ("{batch-size: [8], batch_size: [16]}", "sets --batch-size twice"),
}


@pytest.mark.parametrize("text, expected", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_a_bad_space_file_is_one_line_and_exit_2(tmp_path, capsys, text, expected):
    space = tmp_path / "space.yaml"
    space.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as exited:
        cli.main(["tune", "--space", str(space), "--study-dir", str(tmp_path / "study"), "--cpu"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("monkeytrain: error: ") and expected in error, error
    assert not (tmp_path / "study").exists()  # nothing created before the input is known good


BAD_COMMANDS = {
    "missing space": (["--space", "{tmp}/nope.yaml"], "search space {tmp}/nope.yaml does not exist"),
    "flag also searched": (["--lr", "0.1"], "--lr is given as a flag and searched in the space"),
    "run directory flag": (["--output-dir", "{tmp}/runs"], "--output-dir is set by monkeytrain tune itself"),
    "missing data": (["--data", "{tmp}/nothing"], "dataset folder {tmp}/nothing does not exist"),
    "no time at all": (["--timeout-minutes", "0"], "--timeout-minutes must be above 0, got 0"),
    "negative time": (["--timeout-minutes", "-5"], "--timeout-minutes must be above 0, got -5"),
}


@pytest.mark.parametrize("flags, expected", BAD_COMMANDS.values(), ids=BAD_COMMANDS.keys())
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, expected):
    space = tmp_path / "space.yaml"
    space.write_text("{lr: [0.1, 0.2]}")
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exited:
        cli.main(["tune", "--space", str(space), "--study-dir", str(tmp_path / "study"), "--cpu", *flags])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1 and expected.format(tmp=tmp_path) in error, error


SPACES_AGAINST_FLAGS = {
    "a choice the fixed flags refuse": ("{min_train_size: [0, 48]}", ["--image-size", "32"],
                                        "'min-train-size' in {space} allows 48, which train.py refuses"),
    "a range end the fixed flags refuse": ("{min_train_size: {low: 16, high: 64}}", ["--image-size", "32"],
                                           "allows 64, which train.py refuses"),
    "searched under an old flag name": ("{max_batches_per_epoch: [1, 2]}", ["--max-steps-per-epoch", "5"],
                                        "--max-batches-per-epoch is given as a flag and searched"),
    "trials scored on the test split": ("{lr: [0.1]}", ["--data", "{data}", "--val-fraction", "0"],
                                        "--val-fraction 0 would score every trial on the test split"),
}


@pytest.mark.parametrize("text, flags, expected", SPACES_AGAINST_FLAGS.values(), ids=SPACES_AGAINST_FLAGS.keys())
def test_the_space_is_checked_with_the_fixed_flags_before_any_trial(tmp_path, capsys, text, flags, expected):
    space, data = tmp_path / "space.yaml", write_image_folder(tmp_path / "data", layout="kaggle")
    space.write_text(text)
    flags = [flag.format(data=data) for flag in flags]
    with pytest.raises(SystemExit) as exited:  # --trials 1 --epochs 1: short, should a check let it through
        cli.main(["tune", "--space", str(space), "--study-dir", str(tmp_path / "study"), "--trials", "1", "--cpu",
                  "--epochs", "1", *flags])
    error = capsys.readouterr().err.splitlines()[-1]
    assert exited.value.code == 2 and expected.format(space=space) in error, error
    assert not (tmp_path / "study").exists()


def test_a_study_whose_files_cannot_be_written_stops_in_one_line_and_a_rerun_finishes_it(study_inputs, tmp_path,
                                                                                          monkeypatch):
    """The worker that ends the study lets go of it when a file fails: a rerun, here by the same process
    (alive, so its claim would never be taken over), finishes it without training another trial."""
    from monkeytrain import tune_report

    space, train_flags = study_inputs
    study_dir = tmp_path / "study"
    argv = ["--space", str(space), "--study-dir", str(study_dir), "--trials", "1", "--pruner", "none",
            *train_flags, "--epochs", "1"]
    real_write = tune_report.write_best_config

    def full(best, trial_dir, searched, path, objective):
        raise DiskFull(path, 1234, False, "--study-dir")

    monkeypatch.setattr(tune_report, "write_best_config", full)
    with pytest.raises(SystemExit) as raised:
        run_here(tune.main, argv, PROJECT)
    assert raised.value.code == 2
    assert not (study_dir / CLAIM_NAME).exists()
    monkeypatch.setattr(tune_report, "write_best_config", real_write)
    done = run_here(tune.main, argv, PROJECT)
    assert done.results == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 trial (1 complete)" in done.stdout and len(read_trials(study_dir)) == 1
    assert (study_dir / "best_run" / "results.json").is_file() and (study_dir / "best_config.yaml").is_file()


def test_a_trial_that_fills_the_disk_says_to_free_space_and_run_tune_again(study_inputs, tmp_path, monkeypatch):
    """Its saved state is no reason to give it train.py's --resume auto --run-name trial-0000 (flags tune refuses):
    the same tune command continues the study once there is space (the trial is run anew)."""
    from monkeytrain import tracking

    space, train_flags = study_inputs
    study_dir, real_append = tmp_path / "study", tracking.append_line

    def full_at_epoch_2(path, line, **kwargs):  # after epoch 1 saved its state (--save-every 1)
        if '"epoch": 2' in line:
            raise DiskFull(Path(path), 4096, False, "--output-dir")
        return real_append(path, line, **kwargs)

    monkeypatch.setattr(tracking, "append_line", full_at_epoch_2)
    with pytest.raises(DiskFull) as failed:  # the undecorated command: its error, not the exit it makes of it
        run_here(tune.main.__wrapped__, ["--space", str(space), "--study-dir", str(study_dir), "--trials", "1",
                                         *train_flags, "--epochs", "2", "--save-every", "1"], PROJECT)
    assert (study_dir / "trials" / "trial-0000" / "state").is_dir()  # saved, yet of no use to tune
    assert str(failed.value) == (f"no space left on the device of {study_dir / 'trials' / 'trial-0000'} to write "
                                 "metrics.jsonl (4.0 KiB needed); free some space or pick another --study-dir; "
                                 "rerunning tune continues the study.")


def test_an_image_gone_in_a_trial_says_to_run_tune_again(study_inputs, tmp_path, monkeypatch):
    """Not train.py's --resume auto --run-name trial-0000, which tune refuses."""
    from monkeytrain import tune_trial

    space, train_flags = study_inputs
    folder = Path(train_flags[1]) / "train" / "n1"

    def images_gone_after_epoch_1(trial, objective):  # scanned, and streamed again in epoch 2
        return lambda epoch, score: [image.unlink() for image in folder.iterdir()]

    monkeypatch.setattr(tune_trial, "pruning_hook", images_gone_after_epoch_1)
    with pytest.raises(UserError) as failed:
        run_here(tune.main.__wrapped__, ["--space", str(space), "--study-dir", str(tmp_path / "study"), "--trials",
                                         "1", *train_flags, "--epochs", "2", "--data-pipeline", "stream"], PROJECT)
    assert str(failed.value).startswith(f"{folder}/") and str(failed.value).endswith(
        "put it back, or run again to scan the data anew. The same monkeytrain tune command continues the study.")


def test_a_study_continues_only_with_the_space_it_began_with(tmp_path, capsys, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("{lr: [0.1, 0.2]}")
    monkeypatch.setattr(tune, "work", lambda study, setup, finish_now: 0)  # open the study, train nothing
    assert tune.main(["--space", str(space), "--study-dir", str(tmp_path / "study"), "--cpu"]) == 0
    space.write_text("{lr: [0.1, 0.3]}")
    with pytest.raises(SystemExit) as exited:
        tune.main(["--space", str(space), "--study-dir", str(tmp_path / "study"), "--cpu"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "holds a study begun with another search space" in error, error


def test_an_old_flag_name_given_to_a_study_is_warned_about_once(tmp_path, capsys, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("{lr: [0.1, 0.2]}")
    ended_with = []  # the flags the study's best run is given, worked out as at the study's end
    monkeypatch.setattr(tune, "work", lambda study, setup, finish_now: ended_with.append(
        machine_flags(setup.train_flags)) or 0)
    argv = ["--space", str(space), "--study-dir", str(tmp_path / "study"), "--cpu", "--max-steps-per-epoch", "2"]
    assert tune.main(argv) == 0 and ended_with == [["--cpu"]]
    assert capsys.readouterr().err.count("--max-steps-per-epoch is now called") == 1


def test_a_study_continues_with_the_same_data_named_by_an_absolute_path(tmp_path, capsys, monkeypatch):
    space, study = tmp_path / "space.yaml", tmp_path / "study"
    space.write_text("{lr: [0.1, 0.2]}")
    for name in ("data", "other"):
        write_image_folder(tmp_path / name, layout="kaggle")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune, "work", lambda study, setup, finish_now: 0)  # open the study, train nothing
    for data in ("data", str(tmp_path / "data")):  # as run in the checkout, then from a job script
        assert tune.main(["--space", str(space), "--study-dir", str(study), "--cpu", "--data", data]) == 0
    with pytest.raises(SystemExit) as exited:
        tune.main(["--space", str(space), "--study-dir", str(study), "--cpu", "--data", "other"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "holds a study begun with other fixed train.py flags" in error, error


def test_a_study_continues_only_with_the_preset_values_it_began_with(tmp_path, capsys, monkeypatch):
    space, study, preset = tmp_path / "space.yaml", tmp_path / "study", tmp_path / "preset.yaml"
    space.write_text("{lr: [0.1, 0.2]}")
    preset.write_text("epochs: 4\ncpu-threads: 1\n")
    monkeypatch.setattr(tune, "work", lambda study, setup, finish_now: 0)  # open the study, train nothing
    opened = ["--space", str(space), "--study-dir", str(study), "--cpu", "--config", str(preset)]
    assert tune.main(opened) == 0
    preset.write_text("epochs: 4\ncpu-threads: 2\n")  # how a worker runs may differ
    assert tune.main(opened) == 0
    assert tune.main(["--space", str(space), "--study-dir", str(study), "--cpu", "--epochs", "4"]) == 0
    preset.write_text("epochs: 8\n")  # what the trials train may not
    with pytest.raises(SystemExit) as exited:
        tune.main(opened)
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "holds a study begun with other fixed train.py flags" in error, error
    assert '"epochs": 4' in error


@pytest.mark.parametrize("damage", ["a line that is not JSON", "a folder"])
def test_a_damaged_study_file_is_one_line(tmp_path, capsys, damage):
    space, journal = tmp_path / "space.yaml", tmp_path / "study" / STORAGE_NAME
    space.write_text("{lr: [0.1, 0.2]}")
    journal.parent.mkdir()
    journal.mkdir() if damage == "a folder" else journal.write_text('{"op_code": 0, garbage\n')
    with pytest.raises(SystemExit) as exited:
        tune.main(["--space", str(space), "--study-dir", str(journal.parent), "--cpu"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1, error
    assert f"{journal} cannot be read as a study" in error and "move it away" in error


def test_without_optuna_one_line_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without it gives: ImportError
    with pytest.raises(SystemExit) as exited:
        cli.main(["tune", "--space", str(tmp_path / "space.yaml"), "--study-dir", str(tmp_path / "study")])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1 and 'pip install -e ".[tune]"' in error, error


@pytest.fixture(scope="session")
def slurm_study(slurm_cluster, tmp_path_factory) -> tuple[int, Path]:
    """A study run by a SLURM array of two workers, submitted by the first tests of the session and
    checked by the last, so that the rest of the suite runs meanwhile: (job id, its folder)."""
    folder = tmp_path_factory.mktemp("slurm-study")
    space, train_flags = write_study_inputs(folder)
    job = submit(PROJECT / "slurm" / "tune.sbatch", "--space", str(space), "--study-dir", str(folder / "study"),
                 "--trials", "2", "--pruner", "none", *train_flags, "--epochs", "2",
                 workdir=folder, env=job_environment(PYTHONPATH=str(PROJECT)),
                 sbatch_flags=["--array=0-1", "--cpus-per-task=1"])
    yield job, folder
    subprocess.run(["scancel", str(job)], capture_output=True)  # nothing to do once it has completed


@pytest.mark.first
def test_tune_sbatch_names_its_jobs_as_its_log_files_expect(slurm_study):
    job, _ = slurm_study
    assert job_state(job)["JobName"] == "monkeytrain-tune"


@pytest.mark.last
def test_a_slurm_array_of_two_workers_runs_one_study_and_finishes_it_once(slurm_study):
    job, folder = slurm_study
    study_dir = folder / "study"
    # Polled here, not with sbatch --wait, which looks again only 2, 10 and 42 s after submitting.
    states = [wait_for_job(f"{job}_{task}", timeout=300)["JobState"] for task in (0, 1)]

    logs = [read_log(folder / f"monkeytrain-tune-{job}_{task}.out") for task in (0, 1)]
    assert states == ["COMPLETED", "COMPLETED"], "\n".join(log[-3000:] for log in logs)
    assert sum(log.count("training the best config once more") for log in logs) == 1  # exactly one finishes
    assert all(" joins " in log for log in logs)
    trials = read_trials(study_dir)
    assert [t["state"] for t in trials] == ["COMPLETE"] * 2
    assert {t["worker"].rsplit(":", 1)[1] for t in trials} <= {f"slurm-{job}_0", f"slurm-{job}_1"}
    assert json.loads((study_dir / "best_run" / "results.json").read_text())["test_images"] == 18


# Stands in for the worker tune.sbatch starts (`python -m monkeytrain.cli tune ...`), with tune's own
# stop between trials: on SIGUSR1 it asks for a requeue and exits, as a worker does.
WORKER_STAND_IN = """#!{python}
import json, os, signal, sys, time
from pathlib import Path
from monkeytrain.tune_stops import stopped

out = Path(os.environ["STUB_OUTPUT"])
signal.signal(signal.SIGUSR1, lambda signum, frame: sys.exit(stopped("SIGUSR1")))
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
(out / "ready").touch()
time.sleep(60)
sys.exit(1)
"""


def test_tune_sbatch_passes_the_warning_to_its_worker_and_requeues_once_it_has_exited(tmp_path):
    """The batch shell's part, without SLURM: SIGUSR1 to it reaches the worker (started with SIGUSR1
    ignored, which Python's handler overrides), which asks for a requeue; the shell requeues after."""
    out, calls = tmp_path / "out", tmp_path / "scontrol-calls"
    out.mkdir()
    commands = stand_in_commands(tmp_path / "bin", scontrol=RECORDING_SCONTROL,
                                 python=WORKER_STAND_IN.format(python=sys.executable))
    env = job_environment(SLURM_JOB_ID="77", MONKEYTRAIN_ROOT=str(PROJECT), TMPDIR=str(tmp_path),
                          STUB_OUTPUT=str(out), SCONTROL_CALLS=str(calls))
    env["PATH"] = f"{commands}{os.pathsep}{env['PATH']}"
    batch = subprocess.Popen(["bash", str(PROJECT / "slurm" / "tune.sbatch"), "--space", "s.yaml"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "ready").exists() and batch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        batch.send_signal(signal.SIGUSR1)
        stdout, stderr = batch.communicate(timeout=60)
    finally:
        batch.kill()
    assert batch.returncode == 128 + signal.SIGUSR1, stdout + stderr  # the worker's status, as train.sbatch's
    assert json.loads((out / "argv.json").read_text()) == ["-m", "monkeytrain.cli", "tune", "--space", "s.yaml"]
    assert "tune: asked the job script to requeue the job once its processes have ended." in stdout
    assert calls.read_text() == "requeue 77\n"
    assert "tune.sbatch: scontrol requeue 77: ok" in stderr.splitlines()[-1], stderr


