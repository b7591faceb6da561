"""Preemption-safe resume: a signal mid-epoch, then --resume auto, gives the same weights;
kills at random moments never leave a checkpoint or state that cannot be loaded."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from monkeytrain.checkpoint import read_checkpoint
from monkeytrain.resume import COMPLETE, state_dirs

PROJECT = Path(__file__).resolve().parent.parent
TRAIN = PROJECT / "monkeytrain" / "train.py"
SIGNALLING = Path(__file__).with_name("resume_checks.py")
# 3 classes x 11 training images, batch 3: 11 steps an epoch, 33 in all.
TINY = ["--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--num-workers", "0",
        "--epochs", "3", "--lr", "0.02", "--ema-decay", "0.9", "--report-to", "none"]


def train(script: Path, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(script), *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def data(tmp_path, make_image_folder) -> Path:
    return make_image_folder(tmp_path / "data", classes=3, per_class=12)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = state_dirs(run_dir)[-1]
    assert newest.name == "step-00000033"
    return load_file(str(newest / "model.safetensors"))


def test_sigterm_mid_epoch_then_resume_ends_with_identical_weights(tmp_path, data):
    common = ["--data", str(data), *TINY, "--cache-dir", str(tmp_path / "cache")]
    every_step = ["--save-every", "1", "--keep-states", "1"]  # so the final step's state is kept
    train(TRAIN, *common, *every_step, "--run-name", "whole", cwd=tmp_path)

    # SIGTERM arrives after step 14; the ranks notice at step 16 (epoch 2, batch 5 of 11).
    stopped = train(SIGNALLING, "14", *common, "--run-name", "cut", cwd=tmp_path)
    assert "{'stopped': True}" in stopped.stdout
    cut = tmp_path / "runs" / "cut"
    [saved] = state_dirs(cut)
    assert saved.name == "step-00000016" and (saved / COMPLETE).is_file()
    progress = torch.load(saved / "progress-rank0.pt", weights_only=False)["progress"]
    assert progress == {"epoch": 2, "batch": 5, "global_step": 16}
    assert not (cut / "results.json").exists()

    resumed = train(TRAIN, *common, *every_step, "--run-name", "cut", "--resume", "auto", cwd=tmp_path)
    assert "resumed from" in resumed.stdout
    whole, again = final_state(tmp_path / "runs" / "whole"), final_state(cut)
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    best_whole, _ = read_checkpoint(tmp_path / "runs" / "whole" / "best.safetensors")
    best_again, _ = read_checkpoint(cut / "best.safetensors")
    assert all(torch.equal(best_whole[k], best_again[k]) for k in best_whole)
    results = [json.loads((tmp_path / "runs" / r / "results.json").read_text()) for r in ("whole", "cut")]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    assert results[0]["best_epoch"] == results[1]["best_epoch"]


def test_sigkill_at_random_moments_never_leaves_anything_unloadable(tmp_path, data):
    flags = ["--data", str(data), *TINY, "--epochs", "80", "--cache-dir", str(tmp_path / "cache"),
             "--save-every", "1", "--keep-states", "2", "--run-name", "killed", "--resume", "auto"]
    run_dir = tmp_path / "runs" / "killed"
    chance = random.Random(20261127)
    landed = {"during a state write": 0, "between writes": 0, "before any state": 0}
    for _ in range(20):
        started = time.time()
        process = subprocess.Popen([sys.executable, str(TRAIN), *flags], cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(chance.uniform(3.0, 9.0))
        # a staging folder this process made and had not yet published: the kill lands mid-write
        staging = [p for p in (run_dir / "state").glob(".tmp-step-*") if p.stat().st_mtime >= started]
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.returncode == 0:
            break  # it finished before the kill
        landed["during a state write" if staging else
               "between writes" if state_dirs(run_dir) else "before any state"] += 1
        if (run_dir / "best.safetensors").exists():
            read_checkpoint(run_dir / "best.safetensors")  # raises if damaged
        for state in state_dirs(run_dir):  # what --resume auto may pick: every file readable
            load_file(str(state / "model.safetensors"))
            torch.load(state / "progress-rank0.pt", weights_only=False)
    print(f"SIGKILL landings: {landed}")
    assert sum(landed.values()) == 20 and landed["during a state write"] >= 1
    train(TRAIN, *flags, "--save-every", "0", cwd=tmp_path)  # and the run can always be finished
    assert json.loads((run_dir / "results.json").read_text())["test_images"] == 36
