"""monkeytrain.trainer on two real ranks (gloo, forked from the session's forkserver, see forked.py): an image
that one rank alone finds gone while streaming (in the channel statistics pass, training, validation or the
test scoring), or while decoding the resident views, stops every rank with the same one line and exit status 2,
with a state saved by all of them when it happened in training; no rank is left waiting for the other."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from forked import exit_codes, printed, rank_variables, free_port, start, train_rank
from monkeytrain.statestore import COMPLETE, state_dirs

FLAGS = ["--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "3", "--epochs", "2",
         "--data-pipeline", "stream", "--num-workers", "0", "--report-to", "none", "--cpu-threads", "1",
         "--save-every-minutes", "0", "--run-name", "gone"]
GONE_AFTER_STEP = 3  # in "training": the images of rank 1 go away once it has taken this optimizer step


def lose_images(when: str) -> None:
    """From `when` on ("stats", "decode": from the start, so in the first pass to read an image, the channel
    statistics' when streaming, the decode of the resident views; "training": after optimizer step
    GONE_AFTER_STEP; "validation": as the first one begins; "test": as the test split is scored), every image
    this process reads is gone, as if deleted; the other rank's stay."""
    from monkeytrain import results
    from monkeytrain.data import loaders
    from monkeytrain.trainer import Trainer

    gone = {"now": when in ("stats", "decode")}
    real_final_evaluation = results.final_evaluation

    def final_evaluation(*args):
        gone["now"] |= when == "test"
        return real_final_evaluation(*args)

    results.final_evaluation = final_evaluation
    real_step, real_validate, real_load = Trainer.after_optimizer_step, Trainer.validate, loaders.load_rgb

    def after_optimizer_step(trainer: Trainer) -> bool:
        stopping = real_step(trainer)
        gone["now"] |= when == "training" and trainer.progress.step == GONE_AFTER_STEP
        return stopping

    def validate(trainer: Trainer, *args):
        gone["now"] |= when == "validation"
        return real_validate(trainer, *args)

    def load_rgb(path, *args):
        if gone["now"]:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_load(path, *args)

    Trainer.after_optimizer_step, Trainer.validate, loaders.load_rgb = after_optimizer_step, validate, load_rgb


def train_rank_losing_images(folder: Path, flags: list[str], environment: dict[str, str], rank: int,
                             when: str) -> None:
    """forked.train_rank, rank 1 losing its images at `when`; when the resident views are decoded, on a full
    disk: no rank can write them to the cache, so each decodes them itself."""
    if when == "decode":
        from monkeytrain.data import views
        views.write_cache = lambda *args: None
    if rank == 1:
        lose_images(when)
    train_rank(folder, flags, environment, rank)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from conftest import write_image_folder
    return write_image_folder(tmp_path_factory.mktemp("gone") / "data", classes=3, per_class=12)


def two_ranks_losing_images(tmp_path: Path, data: Path, when: str, *more_flags: str) -> list[str]:
    """Both ranks' last lines, after checking that both ended with status 2."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    flags = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *FLAGS, *more_flags]
    children = [start(train_rank_losing_images, tmp_path, flags, {**environment, **rank_variables(rank, 2, port)},
                      rank, when) for rank in (0, 1)]
    ended = exit_codes(children)
    logs = [printed(tmp_path / f"rank{rank}.log") for rank in (0, 1)]
    assert ended == [2, 2], f"exit codes {ended}\n" + "\n".join(logs)
    assert not any("Traceback" in log for log in logs), "\n".join(logs)
    return [log.strip().splitlines()[-1] for log in logs]


def test_an_image_one_rank_finds_gone_in_training_stops_both_with_one_line_and_a_saved_state(tmp_path, data):
    last_lines = two_ranks_losing_images(tmp_path, data, "training")
    assert last_lines[0] == last_lines[1], last_lines  # rank 0 names the image that rank 1 could not read
    assert last_lines[0].startswith(f"monkeytrain: error: {data}") and "can no longer be read" in last_lines[0]
    assert "The training state is saved: the same command with --resume auto --run-name gone" in last_lines[0]
    [state] = state_dirs(tmp_path / "runs" / "gone")
    assert (state / COMPLETE).is_file()
    steps = [torch.load(state / f"progress-rank{rank}.pt", weights_only=False)["progress"]["step"] for rank in (0, 1)]
    assert steps == [GONE_AFTER_STEP] * 2 and state.name == f"step-{GONE_AFTER_STEP:08d}"


def test_an_image_one_rank_finds_gone_in_validation_stops_both_with_one_line(tmp_path, data):
    last_lines = two_ranks_losing_images(tmp_path, data, "validation")
    assert last_lines[0] == last_lines[1], last_lines
    assert last_lines[0].startswith(f"monkeytrain: error: {data}") and "can no longer be read" in last_lines[0]


def test_an_image_one_rank_finds_gone_in_the_channel_statistics_pass_stops_both_with_one_line(tmp_path, data):
    last_lines = two_ranks_losing_images(tmp_path, data, "stats")  # a new cache folder: the statistics are computed
    assert last_lines[0] == last_lines[1], last_lines
    assert last_lines[0].startswith(f"monkeytrain: error: {data}") and "can no longer be read" in last_lines[0]


def test_an_image_one_rank_finds_gone_in_the_test_scoring_stops_both_with_one_line(tmp_path, data):
    last_lines = two_ranks_losing_images(tmp_path, data, "test", "--epochs", "1")
    assert last_lines[0] == last_lines[1], last_lines
    assert last_lines[0].startswith(f"monkeytrain: error: {data}") and "can no longer be read" in last_lines[0]


def test_an_image_one_rank_finds_gone_decoding_the_resident_views_stops_both_with_one_line(tmp_path, data):
    last_lines = two_ranks_losing_images(tmp_path, data, "decode", "--data-pipeline", "resident")
    assert last_lines[0] == last_lines[1], last_lines
    assert last_lines[0].startswith(f"monkeytrain: error: {data}") and "can no longer be read" in last_lines[0]


def train_rank_on_a_full_disk(folder: Path, flags: list[str], environment: dict[str, str], rank: int) -> None:
    """forked.train_rank, the main process finding the disk full as it writes best.safetensors."""
    if rank == 0:
        from monkeytrain import checkpoint
        from monkeytrain.storage import DiskFull

        def save_checkpoint(run_dir: Path, *args) -> Path:
            raise DiskFull(run_dir / checkpoint.BEST_NAME, 4096, False, "--output-dir")

        checkpoint.save_checkpoint = save_checkpoint
    train_rank(folder, flags, environment, rank)


FULL_DISK = "monkeytrain: error: no space left on the device of runs/gone to write best.safetensors (4.0 KiB needed); "


@pytest.mark.parametrize("more_flags, way_out", [
    ([], "free some space or pick another --output-dir."),
    # a run with a saved state (of the epoch's last step, the 5th): both ranks say how to continue from it
    (["--save-every", "1"], "free some space; the training state runs/gone/state/step-00000005 is saved: to continue, "
                            "run the same command with --resume auto --run-name gone."),
])
def test_a_checkpoint_the_main_process_cannot_write_stops_both_with_its_one_line(tmp_path, data, more_flags, way_out):
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    flags = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *FLAGS, "--epochs", "1", *more_flags]
    children = [start(train_rank_on_a_full_disk, tmp_path, flags, {**environment, **rank_variables(rank, 2, port)},
                      rank) for rank in (0, 1)]
    ended = exit_codes(children)
    logs = [printed(tmp_path / f"rank{rank}.log") for rank in (0, 1)]
    assert ended == [2, 2], f"exit codes {ended}\n" + "\n".join(logs)
    assert not any("Traceback" in log for log in logs), "\n".join(logs)  # was rank 1's gloo "Connection closed"
    assert [log.strip().splitlines()[-1] for log in logs] == [FULL_DISK + way_out] * 2


def train_rank_noting_its_draws(folder: Path, flags: list[str], environment: dict[str, str], rank: int) -> None:
    """forked.train_rank, noting where the default generator (which dropout and drop_path draw from) stands
    as the first batch trains."""
    from monkeytrain import engine

    trained_batch = engine.forward_backward

    def noting(*args):
        noted = folder / f"draws{rank}.pt"
        if not noted.exists():
            torch.save(torch.get_rng_state(), noted)
        return trained_batch(*args)

    engine.forward_backward = noting
    train_rank(folder, flags, environment, rank)


def test_each_rank_draws_dropout_masks_of_its_own(tmp_path, data):
    """set_seed gave every rank the same default generator (the same initial weights, as it should), and nothing
    seeded it apart afterwards: the i-th image of every rank got the same dropout and drop_path masks."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    flags = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *FLAGS, "--epochs", "1"]
    children = [start(train_rank_noting_its_draws, tmp_path, flags, {**environment, **rank_variables(rank, 2, port)},
                      rank) for rank in (0, 1)]
    assert exit_codes(children) == [0, 0], "\n".join(printed(tmp_path / f"rank{rank}.log") for rank in (0, 1))
    first, second = (torch.load(tmp_path / f"draws{rank}.pt") for rank in (0, 1))
    assert not torch.equal(first, second)


def train_rank_with_metrics_on_a_full_disk(folder: Path, flags: list[str], environment: dict[str, str],
                                           rank: int) -> None:
    """forked.train_rank, the main process finding the disk full as it appends epoch 2's line to metrics.jsonl."""
    if rank == 0:
        from monkeytrain import tracking
        from monkeytrain.storage import DiskFull

        real_append_line = tracking.append_line

        def append_line(path: Path, line: str, **kwargs) -> None:
            if '"epoch": 2' in line:
                raise DiskFull(path, 4096, False, "--output-dir")
            real_append_line(path, line, **kwargs)

        tracking.append_line = append_line
    train_rank(folder, flags, environment, rank)


def test_metrics_the_main_process_cannot_write_stop_both_with_its_one_line(tmp_path, data):
    """The main process alone writes metrics.jsonl: the other rank ends with its line, not waiting for it at its next
    collective (gloo: "Connection closed by peer", exit status 1; NCCL: until a timeout)."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MONKEYTRAIN_"))}
    flags = ["--data", str(data), "--cache-dir", str(tmp_path / "cache"), *FLAGS, "--save-every", "1"]
    children = [start(train_rank_with_metrics_on_a_full_disk, tmp_path, flags,
                      {**environment, **rank_variables(rank, 2, port)}, rank) for rank in (0, 1)]
    ended = exit_codes(children, seconds=240)
    logs = [printed(tmp_path / f"rank{rank}.log") for rank in (0, 1)]
    assert ended == [2, 2], f"exit codes {ended}\n" + "\n".join(logs)
    assert not any("Traceback" in log for log in logs), "\n".join(logs)
    assert [log.strip().splitlines()[-1] for log in logs] == [  # was rank 1's exit 1: "Connection closed by peer"
        "monkeytrain: error: no space left on the device of runs/gone to write metrics.jsonl (4.0 KiB needed); free "
        "some space; the training state runs/gone/state/step-00000010 is saved: to continue, run the same command "
        "with --resume auto --run-name gone."] * 2
