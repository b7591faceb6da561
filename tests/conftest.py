"""Shared fixtures: small real image-folder datasets written to a temporary folder.

`make_image_folder(root, layout="kaggle", classes=3, per_class=6, size=24)`
writes PNG files that a model can learn (each class its own colour) and whose
bytes all differ (per-image noise), so no accidental leakage between splits.

Tests marked `first` run before all the others and tests marked `last` after them
(see `pytest_collection_modifyitems`).
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import os
import signal
import subprocess
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import pytest
from PIL import Image

from monkeytrain.tracking import SilentLog

LAYOUTS = {
    # layout name -> {split name: folder relative to the root}
    "kaggle": {"train": "training/training", "test": "validation/validation"},
    "flattened": {"train": "training", "test": "validation"},
    "train-val": {"train": "train", "test": "val"},
    "train-val-test": {"train": "train", "val": "val", "test": "test"},
    "train-valid-test": {"train": "train", "val": "valid", "test": "test"},
    "train-test": {"train": "train", "test": "test"},
    "image-folder": {"train": "."},  # one folder of class subfolders, no split on disk
}
KAGGLE_LAYOUTS = ("kaggle", "flattened")
DEFAULT_PER_CLASS = 6
LABELS_HEADER = "Label,  Latin Name           , Common Name                   , Train Images , Validation Images"


def class_colour(label: int, classes: int) -> tuple[int, int, int]:
    """Well separated, saturated hues: class `label` of `classes`."""
    red, green, blue = colorsys.hsv_to_rgb(label / max(classes, 1), 0.9, 0.85)
    return int(red * 255), int(green * 255), int(blue * 255)


def noisy_image(colour: tuple[int, int, int], size: int, seed: list[int]) -> Image.Image:
    """A `size` x `size` RGB image of `colour` plus seeded noise of +-12 per channel."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-12, 13, size=(size, size, 3))
    pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def write_labels_file(path: Path, names: list[str], counts: list[int]) -> None:
    """A monkey_labels.txt like Kaggle's: padded CSV, common names with underscores."""
    rows = [LABELS_HEADER]
    for index, (name, count) in enumerate(zip(names, counts)):
        rows.append(f"{name:<5}, latin_name_{index:<10}, common_name_{index:<18}, {count:<12} , {count}")
    path.write_text("\n".join(rows) + "\n")


def a_finished_run(folder: Path) -> Path:
    """The files a run that ended leaves in `folder` (no plots): what tells monkeytrain's own folders from a
    class's (data.passedover), its data manifest as monkeytrain writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "best.safetensors", "metrics.jsonl"):
        (folder / name).write_text("")
    (folder / "data_manifest.json").write_text('{"class_folders": ["n0", "n1"]}')
    return folder


def write_image_folder(
    root: Path,
    layout: str = "kaggle",
    classes: int = 3,
    per_class: Union[int, dict[str, int]] = DEFAULT_PER_CLASS,
    size: int = 24,
    seed: int = 0,
) -> Path:
    """Write a dataset under `root` and return `root`.

    layout: "kaggle" (training/training/<class>, validation/validation/<class>),
        "flattened" (training/<class>, validation/<class>), "train-val"
        (train/<class>, val/<class>), "train-val-test" (train/, val/, test/),
        "train-valid-test", "train-test" or "image-folder" (<class>/ under the root itself).
    classes: class folders n0 .. n{classes-1}.
    per_class: images per class in every split; a dict maps a class folder name
        (n0, ...) to its count, names it lacks get 6. A count of 0 leaves the
        class folder empty.
    size: side of the square PNG images, in pixels.
    seed: changes every image's noise (two folders made with different seeds
        share no file contents).
    A monkey_labels.txt (common names common_name_<i>) is written for the two
    Kaggle layouts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    names = [f"n{i}" for i in range(classes)]
    counts = [per_class.get(n, DEFAULT_PER_CLASS) if isinstance(per_class, dict) else per_class for n in names]
    root.mkdir(parents=True, exist_ok=True)
    for split_index, folder in enumerate(LAYOUTS[layout].values()):
        for label, (name, count) in enumerate(zip(names, counts)):
            class_dir = root / folder / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = noisy_image(class_colour(label, classes), size, [seed, split_index, label, i])
                image.save(class_dir / f"{name}_{i:03d}.png")
    if layout in KAGGLE_LAYOUTS:
        write_labels_file(root / "monkey_labels.txt", names, counts)
    return root


def command_error(argv: list[str], capsys) -> str:
    """The one error line `monkeytrain ARGV` printed before exiting with status 2."""
    from monkeytrain import cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("monkeytrain: error: "), errors
    return errors[0]


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """Factory: make_image_folder(root, layout="kaggle", classes=3, per_class=6, size=24) -> root.

    See `write_image_folder` for the layouts and arguments.
    """
    return write_image_folder


@pytest.fixture
def cpu_accelerator():
    """A single-process CPU Accelerator; Accelerate's global state is reset around it so
    tests that build their own Accelerator with other settings are not affected."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


# --- training runs in this process ------------------------------------------------------------

@dataclass
class InProcessRun:
    results: dict
    stdout: str
    stderr: str


@contextlib.contextmanager
def process_state_put_back():
    """Puts back what a training run changes in its process: the working folder, the environment,
    torch's thread count, the signal handlers and Accelerate's global state."""
    import torch
    from accelerate.state import AcceleratorState

    folder, environment, threads = Path.cwd(), dict(os.environ), torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)
        os.chdir(folder)


def train_here(argv: list[str], cwd: Path, **env: str) -> InProcessRun:
    """`python -m monkeytrain.train ARGV` in `cwd`, run by this process: for tests of what a run
    does rather than of how it starts (the launch forms have their own tests in subprocesses), at
    none of the 5-7 s a fresh interpreter spends importing torch, timm and Accelerate."""
    from monkeytrain import train

    return run_here(train.main, argv, cwd, **env)


def run_here(main: Callable[[list[str]], Any], argv: list[str], cwd: Path, **env: str) -> InProcessRun:
    """`main(argv)` of one of the package's commands, in `cwd`, by this process (see `train_here`)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with process_state_put_back(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        os.chdir(cwd)
        os.environ.pop("MONKEYTRAIN_DATA", None)
        os.environ.update(env)
        results = main(argv)
    return InProcessRun(results, stdout.getvalue(), stderr.getvalue())


class RecordedLog(SilentLog):
    """A run's log that keeps what it is told (info lines, warnings) instead of showing it."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@contextlib.contextmanager
def started_at_once(runs: dict[str, tuple[list[str], Path, dict]]) -> Iterator[dict[str, subprocess.Popen]]:
    """{key: (command, working folder, environment)} -> {key: its process, output piped}, every one
    started before any is waited for: a command that fails on bad input is nearly all Python
    start-up, which uses one core of two. Those still running at the end (their test failed early)
    are killed."""
    processes = {key: subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for key, (command, cwd, env) in runs.items()}
    try:
        yield processes
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
            process.stdout.close()
            process.stderr.close()


# --- background work: started by the first tests of the session, checked by the last ----------

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "first: run before every other test of the session. For a test that starts slow "
        "background work (a SLURM job that requeues itself and is then held by Slurm for about two "
        "minutes), so that the rest of the suite runs meanwhile. first(soonest=True): before the "
        "other first tests, for the longest background job, which should not be the one still running "
        "when every other test is done.")
    config.addinivalue_line(
        "markers", "last: run after every other test of the session. For a test that checks the end of "
        "background work started by a `first` test.")


def pytest_collection_modifyitems(items):
    def place(item) -> int:
        first = item.get_closest_marker("first")
        if first:
            return -1 if first.kwargs.get("soonest") else 0
        return 2 if item.get_closest_marker("last") else 1

    items.sort(key=place)  # stable: the order within each group is kept


class Job:
    """Work that the background thread takes up in its turn, unless a test needs its result first:
    then the test's own thread does it. A test that finds it in hand in the background does other
    jobs that no thread has taken yet while it waits, so that both cores stay busy to the end."""

    def __init__(self, work: Callable[[], Any], queue: "BackgroundJobs | None" = None) -> None:
        self._work, self._taken, self._done = work, threading.Lock(), Future()
        self._queue = queue

    def run(self) -> bool:
        """Does the work, unless another thread has taken it up; whether this call did it."""
        if not self._taken.acquire(blocking=False):
            return False
        try:
            self._done.set_result(self._work())
        except BaseException as error:  # raised again in the thread that asks for the result
            self._done.set_exception(error)
        return True

    def result(self) -> Any:
        self.run()
        while not self._done.done() and self._queue is not None and self._queue.run_one_untaken():
            pass
        return self._done.result()


class BackgroundJobs:
    """One thread that works through the jobs given to it, in order, for the rest of the session."""

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._added, self._stop = threading.Condition(), False
        self._thread = threading.Thread(target=self._work_through, name="background", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any]) -> Job:
        job = Job(work, self)
        with self._added:
            self._jobs.append(job)
            self._added.notify()
        return job

    def run_one_untaken(self) -> bool:
        """Does the first job that no thread has taken up yet; False when there is none."""
        with self._added:
            jobs = list(self._jobs)
        return any(job.run() for job in jobs)

    def close(self) -> None:
        """Takes up no further job; waits for the one in hand."""
        with self._added:
            self._stop = True
            self._added.notify()
        self._thread.join()

    def _work_through(self) -> None:
        done = 0
        while True:
            with self._added:
                self._added.wait_for(lambda: self._stop or done < len(self._jobs))
                if self._stop:
                    return
                job = self._jobs[done]
            job.run()
            done += 1


@pytest.fixture(scope="session")
def background_jobs():
    """The session's background thread. Python start-up and tiny single-threaded runs keep one core
    of two busy, so a `first` test gives its slow runs to this thread, a `last` test checks them,
    and every other test runs meanwhile on the other core."""
    jobs = BackgroundJobs()
    yield jobs
    jobs.close()


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_run():
    """Runs in this process train on one thread, as the suite's subprocesses do (--cpu-threads 1):
    the background thread keeps the other core busy, and two threads on one free core mostly wait
    for each other. This process's code sees one usable core (its own subprocesses see them all)."""
    import torch

    patch = pytest.MonkeyPatch()
    if hasattr(os, "sched_getaffinity"):
        one_core = {min(os.sched_getaffinity(0))}
        patch.setattr(os, "sched_getaffinity", lambda pid: set(one_core))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()
