"""Preemption-safe resume: a signal mid-epoch, then --resume auto, gives the same weights; a
SIGKILL before any state, between state writes or in the middle of one never leaves a checkpoint or
state that cannot be loaded, and the resumed run ends exactly as an uninterrupted one.

Only the SIGKILLed runs have processes of their own, forked from a server that has imported torch and
the trainer once; the others are train.main in this one."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from conftest import train_here
from forked import exit_codes, printed, start
from resume_checks import OUTPUT, interrupted, killed_in
from monkeytrain import preemption, train
from monkeytrain.checkpoint import read_checkpoint
from monkeytrain.preemption import REQUEUE_REQUEST
from monkeytrain.statestore import COMPLETE, recorded_sizes, state_dirs

# --cpu-threads 1 everywhere: runs compared bit for bit use the same threads, and a second one only waits.
# 3 classes x 11 training images, batch 3: 11 steps an epoch, 33 in all.
TINY = ["--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--num-workers", "0",
        "--epochs", "3", "--lr", "0.02", "--ema-decay", "0.9", "--report-to", "none", "--cpu-threads", "1"]


def killed_run(point: str, step: int, flags: list[str], cwd: Path) -> None:
    """killed_in(CWD, POINT, STEP, FLAGS) in a process of its own, which must end by its own SIGKILL."""
    [ended] = exit_codes([start(killed_in, cwd, point, step, flags)])
    assert ended == -signal.SIGKILL, f"exit code {ended} (None: still running after the timeout)\n" + printed(
        cwd / OUTPUT)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import write_image_folder
    return write_image_folder(tmp_path_factory.mktemp("resume") / "data", classes=3, per_class=12)


def common(data: Path, cwd: Path) -> list[str]:
    return ["--data", str(data), *TINY, "--cache-dir", str(cwd / "cache")]


EVERY_STEP = ["--save-every", "1", "--keep-states", "1"]  # so the final step's state is kept


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> Path:
    """A run trained without interruption, to compare the interrupted ones with."""
    cwd = tmp_path_factory.mktemp("whole")
    train_here([*common(data, cwd), *EVERY_STEP, "--run-name", "whole"], cwd)
    return cwd / "runs" / "whole"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = state_dirs(run_dir)[-1]
    assert newest.name == "step-00000033"
    return load_file(str(newest / "model.safetensors"))


def assert_same_run(whole: Path, again: Path) -> None:
    """Bit-identical training: the final state, the best checkpoint and the test figures."""
    final_whole, final_again = final_state(whole), final_state(again)
    assert final_whole.keys() == final_again.keys()
    assert all(torch.equal(final_whole[k], final_again[k]) for k in final_whole)
    best_whole, _ = read_checkpoint(whole / "best.safetensors")
    best_again, _ = read_checkpoint(again / "best.safetensors")
    assert all(torch.equal(best_whole[k], best_again[k]) for k in best_whole)
    results = [json.loads((run / "results.json").read_text()) for run in (whole, again)]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    assert results[0]["best_epoch"] == results[1]["best_epoch"]


def test_sigterm_mid_epoch_then_resume_ends_with_identical_weights(tmp_path, data, whole):
    # SIGTERM arrives after step 14; the ranks notice it at that step's check (every step on the CPU):
    # epoch 2, batch 3 of 11.
    with interrupted("term", 14):
        stopped = train_here([*common(data, tmp_path), "--run-name", "cut"], tmp_path)
    assert stopped.results == {"stopped": True, "exit_status": 143}  # what python monkeytrain/train.py exits with
    cut = tmp_path / "runs" / "cut"
    [saved] = state_dirs(cut)
    assert saved.name == "step-00000014" and (saved / COMPLETE).is_file()
    progress = torch.load(saved / "progress-rank0.pt", weights_only=False)["progress"]
    assert {k: progress[k] for k in ("epoch", "batch", "step")} == {"epoch": 2, "batch": 3, "step": 14}
    assert not (cut / "results.json").exists()

    resumed = train_here([*common(data, tmp_path), *EVERY_STEP, "--run-name", "cut", "--resume", "auto"],
                         tmp_path)
    assert "resumed from" in resumed.stdout
    assert_same_run(whole, cut)


@pytest.mark.parametrize("naming, requeued", [(["--run-name", "mine", "--resume", "auto"], True),
                                              (["--resume", "auto"], False)])  # a new run's name each time
def test_a_job_script_of_the_users_own_is_requeued_when_its_command_continues_its_run(tmp_path, data, monkeypatch,
                                                                                     naming, requeued):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv(REQUEUE_REQUEST, raising=False)
    asked = []
    monkeypatch.setattr(preemption.subprocess, "run", lambda command, **_: asked.append(command) or
                        subprocess.CompletedProcess(command, 0, "", ""))
    with interrupted("usr1", 5):
        stopped = train_here([*common(data, tmp_path), *naming], tmp_path)
    assert stopped.results["stopped"] and asked == ([["scontrol", "requeue", "4242"]] if requeued else [])
    assert ("scontrol requeue 4242: ok" if requeued else "not requeued") in stopped.stdout


def test_a_stop_at_an_epoch_end_resumes_identically_and_logs_that_epoch_as_not_trained_again(tmp_path, data,
                                                                                          whole):
    # SIGTERM while step 11 ends, the last of epoch 1: the state is saved before that epoch's validation
    with interrupted("term", 11):
        train_here([*common(data, tmp_path), "--run-name", "cut"], tmp_path)
    cut = tmp_path / "runs" / "cut"
    assert [state.name for state in state_dirs(cut)] == ["step-00000011"]
    assert not (cut / "metrics.jsonl").exists()

    resumed = train_here([*common(data, tmp_path), *EVERY_STEP, "--run-name", "cut", "--resume", "auto"],
                         tmp_path)
    assert "train n/a (trained before the resume)" in resumed.stdout
    # The time left is estimated from epoch 2, the first the resumed run trained: epoch 1's validation alone
    # gave "about 0 s left (2 more epochs)"
    assert re.findall(r"about .* left \((\d+) more epochs?\)", resumed.stdout) == ["1"]
    first, *later = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert first["epoch"] == 1 and first["val_accuracy"] is not None
    assert first["train_loss"] is first["train_accuracy"] is first["images_per_second"] is None
    assert [line["epoch"] for line in later] == [2, 3] and all(line["train_loss"] > 0 for line in later)
    assert_same_run(whole, cut)


def test_a_resumed_run_keeps_its_flags_and_a_given_state_continues_its_own_run(tmp_path, data, capsys,
                                                                             monkeypatch):
    with interrupted("term", 5):
        train_here([*common(data, tmp_path), "--run-name", "cut"], tmp_path)
    run = tmp_path / "runs" / "cut"
    [state] = state_dirs(run)
    began = (run / "config.yaml").read_text()

    def refused(*flags: str) -> str:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exited:
            train.main([*common(data, tmp_path), *flags])
        assert exited.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    # a batch size or epoch count of its own would bend the schedule; another model fails to load
    assert "runs/cut began with --batch-size 3 (runs/cut/config.yaml), not 4; a resumed run goes on with the flags " \
           "it began with: give --batch-size 3, or start a new run." in refused("--run-name", "cut", "--resume", "auto",
                                                                            "--batch-size", "4")
    assert "began with --epochs 3 " in refused("--resume", str(state), "--epochs", "5")
    assert (run / "config.yaml").read_text() == began  # its record kept
    assert f"is a state of the run {run}" in refused("--resume", str(state), "--run-name", "elsewhere")
    assert not (tmp_path / "runs" / "elsewhere").exists()

    for part in ("optimizer*", "model.safetensors"):  # in a copy, one file of its state cut short
        damaged = tmp_path / "runs" / f"damaged-{part[:5]}"
        shutil.copytree(run, damaged)
        cut = next((damaged / "state" / state.name).glob(part))
        cut.write_bytes(cut.read_bytes()[:100])
        refusal = refused("--run-name", damaged.name, "--resume", "auto")
        assert f"has a damaged {cut.name} (100 bytes, not the" in refusal

    newer = tmp_path / "runs" / "newer"  # as if saved by a newer monkeytrain: a progress field this one lacks
    shutil.copytree(run, newer)
    kept = newer / "state" / state.name
    saved = torch.load(kept / "progress-rank0.pt", weights_only=False)
    torch.save({**saved, "progress": {**saved["progress"], "samples": 15}}, kept / "progress-rank0.pt")
    sizes = {**recorded_sizes(kept), "progress-rank0.pt": (kept / "progress-rank0.pt").stat().st_size}
    (kept / COMPLETE).write_text(json.dumps({"files": sizes}))
    assert "holds what this run cannot read (TypeError: " in refused("--run-name", "newer", "--resume", "auto")

    elsewhere = tmp_path / "another-folder"  # a state given by its path resumes its own run, from anywhere
    elsewhere.mkdir()
    resumed = train_here([*common(data, tmp_path), "--resume", str(state)], elsewhere)
    assert "resumed from" in resumed.stdout and (run / "results.json").is_file()
    assert not (elsewhere / "runs").exists()


def test_a_resume_whose_data_gained_or_lost_an_image_is_refused_and_keeps_the_run_as_it_was(tmp_path, capsys,
                                                                                          monkeypatch):
    from conftest import write_image_folder
    data = write_image_folder(tmp_path / "data", classes=3, per_class=12)
    with interrupted("term", 5):
        train_here([*common(data, tmp_path), "--run-name", "cut"], tmp_path)
    run = tmp_path / "runs" / "cut"
    began = (run / "data_manifest.json").read_text()
    image = data / "training" / "training" / "n0" / "n0_000.png"
    moved = image.rename(tmp_path / image.name)  # other batches, another mean and std: not the same run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        train.main([*common(data, tmp_path), "--run-name", "cut", "--resume", "auto"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "the data changed since" in error and "train split has 32 images, 33 when" in error
    assert (run / "data_manifest.json").read_text() == began  # the run's record of the data it trained on

    moved.rename(image)  # the data put back: the run resumes
    resumed = train_here([*common(data, tmp_path), "--run-name", "cut", "--resume", "auto"], tmp_path)
    assert "resumed from" in resumed.stdout and (run / "results.json").is_file()


def test_a_resume_from_a_state_older_than_the_last_logged_epoch_logs_each_epoch_once(tmp_path, data, whole):
    # states after steps 10 (epoch 1) and 14 (epoch 2, after epoch 1 was logged); the newer one moved away
    # by hand, as a damaged state is (or lost to a SIGKILL long after the last scheduled save)
    with interrupted("term", 14):
        train_here([*common(data, tmp_path), "--run-name", "cut", "--save-every", "5"], tmp_path)
    cut = tmp_path / "runs" / "cut"
    older, newer = state_dirs(cut)
    shutil.move(newer, tmp_path / newer.name)
    with (cut / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"epoch": 2, "train_lo')  # a line that a kill cut short

    resumed = train_here([*common(data, tmp_path), *EVERY_STEP, "--run-name", "cut", "--resume", "auto"],
                         tmp_path)
    assert f"resumed from runs/cut/state/{older.name}" in resumed.stdout
    logged = [json.loads(line)["epoch"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    assert_same_run(whole, cut)


def test_resume_auto_without_a_saved_state_starts_over_and_says_so(tmp_path, data):
    train_here([*common(data, tmp_path), "--run-name", "early"], tmp_path)
    run = tmp_path / "runs" / "early"
    (run / "results.json").unlink()  # as if killed before its first saved state, after 3 epochs
    shutil.rmtree(run / "state", ignore_errors=True)
    (run / "wandb_run_id.txt").write_text("abcd1234\n")  # its W&B run would drop epochs logged again

    again = train_here([*common(data, tmp_path), "--run-name", "early", "--resume", "auto"], tmp_path)
    assert "has no saved state to resume from" in again.stderr and "starts over from epoch 1" in again.stderr
    logged = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # one run's epochs, not two runs' one after the other
    assert not (run / "wandb_run_id.txt").exists()


# Saves every 3 steps, the last 2 kept. Each kill point: (what resume_checks does, at which step,
# the complete states left behind, whether an unpublished state is left behind).
KILLS = {
    "before any state": ("kill", 2, [], False),
    "between writes": ("kill", 7, ["step-00000003", "step-00000006"], False),
    "during a state write": ("kill-save", 9, ["step-00000003", "step-00000006"], True),
}


@pytest.mark.parametrize("landing", KILLS)
def test_a_sigkill_never_leaves_anything_unloadable_and_the_run_resumes_identically(tmp_path, data, whole,
                                                                                    landing):
    point, step, states, unpublished = KILLS[landing]
    flags = [*common(data, tmp_path), "--run-name", "killed", "--resume", "auto"]
    killed_run(point, step, [*flags, "--save-every", "3", "--keep-states", "2"], tmp_path)
    run_dir = tmp_path / "runs" / "killed"
    assert [state.name for state in state_dirs(run_dir)] == states
    assert bool(list((run_dir / "state").glob(".tmp-step-*"))) == unpublished
    for state in state_dirs(run_dir):  # what --resume auto may pick: every file readable
        load_file(str(state / "model.safetensors"))
        torch.load(state / "progress-rank0.pt", weights_only=False)
    if step > 11:  # past the first epoch: its best checkpoint exists and is whole
        read_checkpoint(run_dir / "best.safetensors")

    resumed = train_here([*flags, *EVERY_STEP], tmp_path)  # and the run can always be finished
    assert ("resumed from" in resumed.stdout) == bool(states)
    assert not list((run_dir / "state").glob(".tmp-*"))  # the unpublished state was swept away
    assert_same_run(whole, run_dir)


def test_a_run_begun_before_select_on_existed_resumes_choosing_on_accuracy_as_it_began(tmp_path, data):
    """Its config.yaml has no select_on, and its state's best epoch neither that nor a balanced accuracy, as an
    older version wrote them: it goes on choosing on plain accuracy (its saved best is one), says so once, and
    records it, rather than weigh a balanced accuracy against a plain one."""
    with interrupted("term", 15):  # in epoch 2 (11 steps an epoch): the state holds epoch 1 as the best
        train_here([*common(data, tmp_path), "--run-name", "old"], tmp_path)
    run = tmp_path / "runs" / "old"
    began = yaml.safe_load((run / "config.yaml").read_text())
    del began["select_on"]
    (run / "config.yaml").write_text(yaml.safe_dump(began, sort_keys=False))
    [state] = state_dirs(run)
    saved = torch.load(state / "progress-rank0.pt", weights_only=False)
    older_best = {key: saved["progress"]["best"][key] for key in ("epoch", "accuracy", "loss")}
    torch.save({**saved, "progress": {**saved["progress"], "best": older_best}}, state / "progress-rank0.pt")
    sizes = {**recorded_sizes(state), "progress-rank0.pt": (state / "progress-rank0.pt").stat().st_size}
    (state / COMPLETE).write_text(json.dumps({"files": sizes}))

    resumed = train_here([*common(data, tmp_path), "--run-name", "old", "--resume", "auto"], tmp_path)
    assert f"{Path('runs') / 'old'} began before --select-on existed: it goes on with --select-on accuracy" \
           in resumed.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["select_on"] == "accuracy"
    results = json.loads((run / "results.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [epoch["epoch"] for epoch in epochs] == [1, 2, 3]
    highest = max(epochs, key=lambda epoch: (epoch["val_accuracy"], -epoch["val_loss"]))  # ties: the earlier
    assert (results["selected_on"], results["best_epoch"]) == ("accuracy", highest["epoch"])
    assert results["best_val_accuracy"] == highest["val_accuracy"]
