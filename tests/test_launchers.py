"""Every documented way to launch training stops cleanly on a signal, whoever sends it.

Each test starts a short real run (a tiny model on a tiny image folder) through
one launch form, waits for its first epoch, signals the top process (or its
whole process group, or SIGKILLs the launcher), and then checks that a
complete state was saved, that no process of the run is left, and that
`--resume auto` ends with every tensor equal to an uninterrupted run's.

Most of such a run is single-threaded Python start-up, so the runs go two at a
time (the machine has two cores) in background threads (`background`), started
when the first test asks for them, in the tests' order; each test waits for its
own, and a form's checks (the asserts in `signal_then_resume`) raise in its test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from monkeytrain.statestore import COMPLETE, state_dirs

PROJECT = Path(__file__).resolve().parent.parent
TRAIN = PROJECT / "monkeytrain" / "train.py"
BIN = Path(sys.executable).parent
# 3 classes x 12 training images, 1 held out each: 33 images, batch 3, 11 steps an epoch (5 per rank
# with two), 4 epochs: a signal after the first is noticed (every 8 steps, or at an epoch's end) well
# before the last. One thread per process: for a model this small a second one only waits, and on a
# busy 2-core machine it makes an epoch anywhere from 1x to 50x slower.
TINY = ["--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--epochs", "4", "--lr", "0.02",
        "--report-to", "none", "--cpu-threads", "1"]
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
    "launch/cpu_debug.sh, SIGTERM": ([str(PROJECT / "launch" / "cpu_debug.sh"), "--max-batches-per-epoch", "0",
                                      "--epochs", "4", "--batch-size", "3"], "top", signal.SIGTERM, 1, {143}),
    "launch/cpu_ddp.sh, SIGTERM to the group": ([str(PROJECT / "launch" / "cpu_ddp.sh")], "group",
                                                signal.SIGTERM, 2, {143}),
}


# Both use Accelerate's default rendezvous port (29500), so they must not run at the same time.
DEFAULT_PORT_FORMS = {"accelerate launch, two ranks, SIGTERM", "launch/cpu_ddp.sh, SIGTERM to the group"}
DEFAULT_PORT = threading.Lock()


def resume_command(form: str) -> list[str]:
    """The form's run is resumed, and compared, with the same data pipeline and number of ranks."""
    command, _, _, ranks, _ = FORMS[form]
    return TORCHRUN if ranks == 2 else STREAM if command is STREAM else PYTHON


def uninterrupted_weights(command: list[str], tmp_path: Path, data: Path) -> dict[str, torch.Tensor]:
    finish(command, tmp_path, data, "whole")
    return final_weights(tmp_path / "runs" / "whole")


def signal_then_resume(form: str, tmp_path: Path, data: Path, reference: Future) -> None:
    """The whole check of one form; `reference` gives the weights of an uninterrupted run."""
    command, how, sig, ranks, statuses = FORMS[form]
    run_dir = tmp_path / "runs" / "cut"
    with DEFAULT_PORT if form in DEFAULT_PORT_FORMS else contextlib.nullcontext():
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

    finish(resume_command(form), tmp_path, data, "cut", "--resume", "auto")
    expected, resumed = reference.result(), final_weights(run_dir)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert json.loads((run_dir / "results.json").read_text())["test_images"] == 36


ERROR_COMMANDS = {
    "launch/cpu_debug.sh": [str(PROJECT / "launch" / "cpu_debug.sh")],
    "accelerate launch --quiet": [*ACCELERATE, "--cpu", "--num_processes", "1", "--quiet", str(TRAIN), "--cpu"],
}


def run_on_missing_data(command: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--data", str(tmp_path / "missing")], cwd=tmp_path,
                          env=environment(tmp_path), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def background(request, tmp_path_factory, data) -> dict[tuple[str, str], Future]:
    """The runs of this module's tests that this session selected, two at a time in worker threads:
    ("form", form) -> the future of its `signal_then_resume`, ("error", name) -> of its
    `run_on_missing_data`.

    The workers take the uninterrupted reference runs first (one per resume command), then the forms
    and the error runs in the tests' order. A form waits for its reference only after its own
    resume, when every reference has been taken up already, so no worker waits on queued work."""
    selected = [item.callspec.params for item in request.session.items if item.module is request.module]
    forms = [params["form"] for params in selected if "form" in params]
    errors = [params["name"] for params in selected if "name" in params]
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="launch")
    try:
        references: dict[tuple[str, ...], Future] = {}
        for form in forms:
            command = tuple(resume_command(form))
            if command not in references:
                references[command] = pool.submit(uninterrupted_weights, list(command),
                                                  tmp_path_factory.mktemp("reference"), data)
        futures = {}
        for form in forms:
            futures["form", form] = pool.submit(signal_then_resume, form, tmp_path_factory.mktemp(slug(form)),
                                                data, references[tuple(resume_command(form))])
        for name in errors:
            futures["error", name] = pool.submit(run_on_missing_data, ERROR_COMMANDS[name],
                                                 tmp_path_factory.mktemp(slug(name)))
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def slug(name: str) -> str:
    return re.sub(r"\W+", "-", name).strip("-")


@pytest.mark.parametrize("form", list(FORMS))
def test_a_signal_saves_every_rank_and_resume_gives_the_uninterrupted_weights(form, background):
    background["form", form].result()  # the form's own assertion error, if any, is raised here


@pytest.mark.parametrize("name", list(ERROR_COMMANDS))
def test_our_error_line_is_the_last_thing_printed(name, background):
    done = background["error", name].result()
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("monkeytrain: error: ") and "missing" in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
