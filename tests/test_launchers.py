"""Every documented way to launch training stops cleanly on a signal, whoever sends it.

Each test starts a short real run (a tiny model on a tiny image folder) through
one launch form, waits for its first epoch, signals the top process (or its
whole process group, or SIGKILLs the launcher), and then checks that a
complete state was saved, that no process of the run is left, and that
`--resume auto` ends with every tensor equal to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from monkeytrain.resume import COMPLETE, state_dirs

PROJECT = Path(__file__).resolve().parent.parent
TRAIN = PROJECT / "monkeytrain" / "train.py"
BIN = Path(sys.executable).parent
# 3 classes x 12 training images, 1 held out each: 33 images, batch 3, 11 steps an epoch (5 per rank
# with two), 4 epochs: a signal after the first is noticed (every 8 steps, or at an epoch's end) well
# before the last.
TINY = ["--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--epochs", "4", "--lr", "0.02",
        "--report-to", "none"]
ACCELERATE = [str(BIN / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
ONE_PROCESS = [*ACCELERATE, "--cpu", "--num_processes", "1", str(TRAIN), "--cpu"]
TWO_RANKS = [*ACCELERATE, "--config_file", str(PROJECT / "accelerate_configs" / "cpu_ddp.yaml"),
             str(TRAIN), "--cpu"]
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(TRAIN), "--cpu"]
FINISH_SECONDS = 120


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    env.update(OMP_NUM_THREADS="1", MONKEYTRAIN_CACHE=str(tmp_path / "cache"), PATH=f"{BIN}:{env['PATH']}")
    return env


def run_flags(tmp_path: Path, data: Path, name: str) -> list[str]:
    # An absolute --output-dir: the launch scripts change to the checkout first.
    return ["--data", str(data), *TINY, "--output-dir", str(tmp_path / "runs"), "--run-name", name]


def start(command: list[str], tmp_path: Path, data: Path, name: str) -> subprocess.Popen:
    """The run in its own process group (so the group can be signalled), logging to a file."""
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([*command, *run_flags(tmp_path, data, name)], cwd=tmp_path,
                            env=environment(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(command: list[str], tmp_path: Path, data: Path, name: str, *extra: str) -> None:
    done = subprocess.run([*command, *run_flags(tmp_path, data, name), *extra], cwd=tmp_path,
                          env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def wait_for_first_epoch(process: subprocess.Popen, run_dir: Path) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + FINISH_SECONDS
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert process.poll() is None, "the run ended before its first epoch"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.1)


def stop_and_wait(process: subprocess.Popen, how: str, sig: int) -> tuple[int, list[psutil.Process]]:
    """Signal the run as `how` says; returns the launcher's exit status and any process left over."""
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    if how == "group":
        os.killpg(process.pid, sig)
    else:
        os.kill(process.pid, sig)
    status = process.wait(timeout=FINISH_SECONDS)
    _, alive = psutil.wait_procs(family, timeout=FINISH_SECONDS)
    return status, [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The best epoch's (averaged) weights: they depend on every step of the run."""
    return load_file(str(run_dir / "best.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("data") / "d", classes=3, per_class=12)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The weights of an uninterrupted run of a command, made once per command and only when asked for."""
    made: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def weights(command: list[str]) -> dict[str, torch.Tensor]:
        if tuple(command) not in made:
            tmp_path = tmp_path_factory.mktemp("reference")
            finish(command, tmp_path, data, "whole")
            made[tuple(command)] = final_weights(tmp_path / "runs" / "whole")
        return made[tuple(command)]

    return weights


PYTHON = [sys.executable, str(TRAIN), "--cpu"]
STREAM = [*PYTHON, "--data-pipeline", "stream", "--num-workers", "2"]
FORMS = {
    # name: (command, how the signal is sent, which signal, ranks, the launcher's expected exit status)
    "python script, SIGTERM": (PYTHON, "top", signal.SIGTERM, 1, {0}),
    "python -m, Ctrl-C to the group": ([sys.executable, "-m", "monkeytrain.train", "--cpu"], "group",
                                       signal.SIGINT, 1, {0}),
    "monkeytrain train, SIGUSR1": ([str(BIN / "monkeytrain"), "train", "--cpu"], "top", signal.SIGUSR1, 1, {0}),
    "stream workers, SIGTERM to the group": (STREAM, "group", signal.SIGTERM, 1, {0}),
    "accelerate launch, one process, SIGTERM": (ONE_PROCESS, "top", signal.SIGTERM, 1, {-signal.SIGTERM}),
    "accelerate launch, one process, SIGKILL": (ONE_PROCESS, "top", signal.SIGKILL, 1, {-signal.SIGKILL}),
    "accelerate launch, two ranks, SIGTERM": (TWO_RANKS, "top", signal.SIGTERM, 2, None),
    "torchrun, two ranks, SIGTERM": (TORCHRUN, "top", signal.SIGTERM, 2, None),
    "launch/cpu_debug.sh, SIGTERM": ([str(PROJECT / "launch" / "cpu_debug.sh"), "--max-steps-per-epoch", "0",
                                      "--epochs", "4", "--batch-size", "3"], "top", signal.SIGTERM, 1, {143}),
    "launch/cpu_ddp.sh, SIGTERM to the group": ([str(PROJECT / "launch" / "cpu_ddp.sh")], "group",
                                                signal.SIGTERM, 2, {143}),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_a_signal_saves_every_rank_and_resume_gives_the_uninterrupted_weights(form, tmp_path, data, reference):
    command, how, sig, ranks, statuses = FORMS[form]
    run_dir = tmp_path / "runs" / "cut"
    process = start(command, tmp_path, data, "cut")
    wait_for_first_epoch(process, run_dir)
    status, left = stop_and_wait(process, how, sig)
    log = (tmp_path / "cut.log").read_text()
    assert not left, f"{left} outlived the launcher\n{log[-3000:]}"
    if statuses is not None:  # torchrun's own exit status after a signal is not ours to set
        assert status in statuses, log[-3000:]
    saved = state_dirs(run_dir)
    assert saved and (saved[-1] / COMPLETE).is_file(), log[-3000:]
    assert not (run_dir / "results.json").exists()  # it stopped; it did not run to the end
    assert len(list(saved[-1].glob("progress-rank*.pt"))) == ranks

    # Resumed, and compared, with the same data pipeline and number of ranks.
    resume = TORCHRUN if ranks == 2 else STREAM if command is STREAM else PYTHON
    finish(resume, tmp_path, data, "cut", "--resume", "auto")
    expected, resumed = reference(resume), final_weights(run_dir)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert json.loads((run_dir / "results.json").read_text())["test_images"] == 36


@pytest.mark.parametrize("command", [
    [str(PROJECT / "launch" / "cpu_debug.sh")],
    [*ACCELERATE, "--cpu", "--num_processes", "1", "--quiet", str(TRAIN), "--cpu"],
], ids=["launch/cpu_debug.sh", "accelerate launch --quiet"])
def test_our_error_line_is_the_last_thing_printed(command, tmp_path):
    done = subprocess.run([*command, "--data", str(tmp_path / "missing")], cwd=tmp_path,
                          env=environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("monkeytrain: error: ") and "missing" in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
