"""Every documented way to launch training stops cleanly on a signal, whoever sends it.

Each form starts a short real run (a tiny model on a tiny image folder), waits
for its first epoch, signals the top process (or its whole process group, or
SIGKILLs the launcher), and then checks that a complete state was saved, that no
process of the run is left, and that `--resume auto` ends with every tensor
equal to an uninterrupted run's.

Most of such a run is single-threaded Python start-up, so the runs are jobs for
the session's background thread (conftest's `background_jobs`): the first test
of the session hands them over, the last ones check each, taking up any job not
started yet in the test's own thread. Only the run that is signalled needs a
launcher: a one-process run is resumed, and its reference trained, in the test's
own process (`train_here`); the others with the form's ranks and data pipeline,
in processes forked from the session's forkserver (forked.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import Job, train_here
from forked import train_ranks
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
    # An absolute --output-dir: where the run is looked for whatever folder a form runs in.
    return ["--data", str(data), *TINY, "--output-dir", str(tmp_path / "runs"), "--run-name", name]


def start(command: list[str], tmp_path: Path, data: Path, name: str) -> subprocess.Popen:
    """The run in its own process group (so the group can be signalled), logging to a file."""
    with open(tmp_path / f"{name}.log", "w") as log:  # the child has its own copy: closed here, never leaked
        return subprocess.Popen([*command, *run_flags(tmp_path, data, name)], cwd=tmp_path,
                                env=environment(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


Resume = tuple[tuple[str, ...], int]  # how a run is resumed: its train.py flags, its number of ranks


def finish(resume: Resume, tmp_path: Path, data: Path, name: str, *extra: str) -> None:
    """The run with `resume`'s flags and ranks (see `resumed_with`), in processes forked from the
    session's forkserver: how a run is started is what the forms test, not how it is resumed."""
    flags, ranks = resume
    train_ranks(tmp_path, [*flags, *run_flags(tmp_path, data, name), *extra], environment(tmp_path), ranks)


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


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    from conftest import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("data") / "d", classes=3, per_class=12)


PYTHON = [sys.executable, str(TRAIN), "--cpu"]
STREAM = [*PYTHON, "--data-pipeline", "stream", "--num-workers", "2"]
FORMS = {
    # name: (command, how the signal is sent, which signal, ranks, the launcher's expected exit status)
    "python script, SIGTERM": (PYTHON, "top", signal.SIGTERM, 1, {128 + signal.SIGTERM}),
    "python -m, Ctrl-C to the group": ([sys.executable, "-m", "monkeytrain.train", "--cpu"], "group",
                                       signal.SIGINT, 1, {128 + signal.SIGINT}),
    "monkeytrain train, SIGUSR1": ([str(BIN / "monkeytrain"), "train", "--cpu"], "top", signal.SIGUSR1, 1,
                                   {128 + signal.SIGUSR1}),
    "stream workers, SIGTERM to the group": (STREAM, "group", signal.SIGTERM, 1, {128 + signal.SIGTERM}),
    # Accelerate's own status: up to 1.15 its one-process launcher dies of the signal (our process then
    # gets SIGTERM as its parent dies); from 1.16 it sends SIGTERM to our process, then exits with 143
    "accelerate launch, one process, SIGTERM": (ONE_PROCESS, "top", signal.SIGTERM, 1,
                                                {-signal.SIGTERM, 128 + signal.SIGTERM}),
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


def resumed_with(form: str) -> Resume:
    """The train.py flags and number of ranks that resume the form's run, and train the run it is
    compared with: the form's own data pipeline and number of ranks."""
    command, _, _, ranks, _ = FORMS[form]
    return tuple(STREAM[2:] if command is STREAM else PYTHON[2:]), ranks


def resumed_here(form: str) -> bool:
    """Whether the form's run is resumed in the test's process rather than in processes of its own."""
    return resumed_with(form) == (tuple(PYTHON[2:]), 1)


def uninterrupted_weights(resume: Resume, tmp_path: Path, data: Path) -> dict[str, torch.Tensor]:
    finish(resume, tmp_path, data, "whole")
    return final_weights(tmp_path / "runs" / "whole")


def train_here_as(tmp_path: Path, data: Path, name: str, *extra: str) -> None:
    """`finish` of a one-process run, in this process; it must be the main thread (signal handlers)."""
    train_here([*PYTHON[2:], *run_flags(tmp_path, data, name), *extra], tmp_path,
               MONKEYTRAIN_CACHE=str(tmp_path / "cache"))


def signal_and_check_the_state(form: str, tmp_path: Path, data: Path) -> Path:
    """Stops the form's run after its first epoch; returns its run directory, holding a complete state."""
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
    return run_dir


def signal_then_resume(form: str, tmp_path: Path, data: Path, reference: Job) -> Path:
    """The whole check of a form its launcher resumes; `reference` gives an uninterrupted run's weights."""
    run_dir = signal_and_check_the_state(form, tmp_path, data)
    finish(resumed_with(form), tmp_path, data, "cut", "--resume", "auto")
    assert_resumed_as(run_dir, reference.result())
    return run_dir


def assert_resumed_as(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    resumed = final_weights(run_dir)
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


@pytest.fixture(scope="session")
def background(request, tmp_path_factory, data, background_jobs) -> dict[tuple[str, str], Job]:
    """The runs of this module's tests that this session selected, as background jobs:
    ("error", name) -> its `run_on_missing_data`, ("form", form) -> its signalled run's checks (and,
    where a launcher resumes it, the resume's). The error runs come first, then the uninterrupted
    reference runs that launchers resume, then the forms in the tests' order; a form asks for its
    reference only after its own resume."""
    selected = [item.callspec.params for item in request.session.items
                if item.path == Path(__file__) and hasattr(item, "callspec")]
    forms = [params["form"] for params in selected if "form" in params]
    errors = [params["name"] for params in selected if "name" in params]
    jobs: dict[tuple[str, str], Job] = {}
    for name in errors:  # folders made here: tmp_path_factory is not for other threads
        jobs["error", name] = background_jobs.submit(functools.partial(
            run_on_missing_data, ERROR_COMMANDS[name], tmp_path_factory.mktemp(slug(name))))
    references: dict[Resume, Job] = {}
    for form in forms:
        resume = resumed_with(form)
        if not resumed_here(form) and resume not in references:
            references[resume] = background_jobs.submit(functools.partial(
                uninterrupted_weights, resume, tmp_path_factory.mktemp("reference"), data))
    for form in forms:
        folder = tmp_path_factory.mktemp(slug(form))
        if resumed_here(form):
            work = functools.partial(signal_and_check_the_state, form, folder, data)
        else:
            work = functools.partial(signal_then_resume, form, folder, data, references[resumed_with(form)])
        jobs["form", form] = background_jobs.submit(work)
    return jobs


@pytest.fixture(scope="session")
def weights_trained_here(tmp_path_factory, data) -> dict[str, torch.Tensor]:
    """An uninterrupted one-process run's weights, trained in this process."""
    folder = tmp_path_factory.mktemp("reference-here")
    train_here_as(folder, data, "whole")
    return final_weights(folder / "runs" / "whole")


def slug(name: str) -> str:
    return re.sub(r"\W+", "-", name).strip("-")


@pytest.mark.last
@pytest.mark.parametrize("form", list(FORMS))
def test_a_signal_saves_every_rank_and_resume_gives_the_uninterrupted_weights(form, background, data, request):
    run_dir = background["form", form].result()  # the form's own assertion error, if any, is raised here
    if resumed_here(form):
        folder = run_dir.parent.parent  # the form's own: its runs/ and cache/
        train_here_as(folder, data, "cut", "--resume", "auto")
        assert_resumed_as(run_dir, request.getfixturevalue("weights_trained_here"))


@pytest.mark.first
def test_every_launch_form_names_an_executable(background):
    """The first test of the session: it checks the forms' commands exist, and hands their runs to
    the background thread (`background`) for the last tests."""
    commands = [command for command, *_ in FORMS.values()] + list(ERROR_COMMANDS.values())
    for program in {command[0] for command in commands}:
        assert os.access(program, os.X_OK), f"{program} is not an executable file"


@pytest.mark.last
@pytest.mark.parametrize("name", list(ERROR_COMMANDS))
def test_our_error_line_is_the_last_thing_printed(name, background):
    done = background["error", name].result()
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("monkeytrain: error: ") and "missing" in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
