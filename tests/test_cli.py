"""Bad input ends with one sentence naming the problem, exit status 2, never a traceback."""

from __future__ import annotations

import errno
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from safetensors.torch import save_file

from conftest import process_state_put_back, started_at_once
from forked import exit_codes, printed, run_in, start
import monkeytrain
from monkeytrain import cli, train
from monkeytrain.errors import exits_cleanly_on_user_error
from monkeytrain.statestore import state_dirs

PROJECT = Path(__file__).resolve().parent.parent
SMALL = ["--cpu", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test in its own folder and cache; the signal handlers and the rest that the runs of train.main
    here install put back after it (a SIGTERM to pytest must still end it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MONKEYTRAIN_DATA", raising=False)
    with process_state_put_back():
        yield


def error_of(entry_point, argv: list[str], capsys) -> str:
    """The one error line an entry point printed before exiting with status 2."""
    with pytest.raises(SystemExit) as stopped:
        entry_point(argv)
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def data(tmp_path, make_image_folder) -> Path:
    return make_image_folder(tmp_path / "data", classes=3, per_class=4)


def test_missing_data_folder(capsys):
    assert "/no/such/place does not exist" in error_of(train.main, ["--data", "/no/such/place"], capsys)


def test_invalid_flag_values(capsys, data):
    assert "--epochs must be at least 1" in error_of(train.main, ["--data", str(data), "--epochs", "0"], capsys)
    assert "--val-fraction" in error_of(train.main, ["--val-fraction", "1.5"], capsys)
    assert "invalid choice: 'lion'" in error_of(train.main, ["--optimizer", "lion"], capsys)
    assert "needs a GPU" in error_of(train.main, ["--mixed-precision", "fp16", "--cpu"], capsys)


@pytest.mark.parametrize("entry_point, argv, expected", [
    (train.main, ["--lrr", "0.1"], "unrecognized arguments: --lrr 0.1 (did you mean --lr?); "
                                   "see `monkeytrain train --help`."),
    (cli.main, ["inspect-data", "--jsn"], "unrecognized arguments: --jsn (did you mean --json?); "
                                          "see `monkeytrain inspect-data --help`."),
    (cli.main, ["predict", "a.jpg"], "the following arguments are required: --checkpoint; "
                                     "see `monkeytrain predict --help`."),
    (cli.main, ["tune", "--space"], "argument --space: expected one argument; see `monkeytrain tune --help`."),
    (train.main, ["--epoch", "2"], "unrecognized arguments: --epoch 2 (did you mean --epochs?); "
                                   "see `monkeytrain train --help`."),  # not taken for --epochs
    (train.main, ["--amp", "--opt", "adamw"], "unrecognized arguments: --amp --opt adamw (did you mean "
                                               "--mixed-precision, --optimizer?); see `monkeytrain train --help`."),
    (cli.main, ["predict", "--checkpoint", "m.onnx", "--top", "3", "a.jpg"],
     "unrecognized arguments: --top (did you mean --top-k?); see `monkeytrain predict --help`."),
    (cli.main, ["trian"], "argument COMMAND: invalid choice: 'trian' (did you mean train?); see `monkeytrain --help`."),
    (cli.main, ["predcit", "--checkpoint", "m.onnx", "a.jpg"], "argument COMMAND: invalid choice: 'predcit' (did you "
                                                               "mean predict?); see `monkeytrain --help`."),
    (cli.main, ["zebra"], "argument COMMAND: invalid choice: 'zebra' (choose from 'train', 'tune', 'predict', "
                          "'evaluate', 'export', 'inspect-data', 'download', 'cache'); see `monkeytrain --help`."),
    # a flag's value names the choice meant as a flag does (still refused: each choice is spelled one way)
    (train.main, ["--select-on", "balanced_accuracy"], "argument --select-on: invalid choice: 'balanced_accuracy' "
                                                       "(did you mean balanced-accuracy?); see `monkeytrain train "
                                                       "--help`."),
    (train.main, ["--recipe", "GPU"], "argument --recipe: invalid choice: 'GPU' (did you mean gpu?); see "
                                      "`monkeytrain train --help`."),
    (train.main, ["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam' (did you mean adamw?); see "
                                          "`monkeytrain train --help`."),
    (train.main, ["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion' (choose from 'sgd', "
                                          "'adamw'); see `monkeytrain train --help`."),  # nothing near: the list
])
def test_a_bad_flag_is_one_line_naming_it_not_the_whole_usage(entry_point, argv, expected, capsys):
    with pytest.raises(SystemExit) as stopped:
        entry_point(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"monkeytrain: error: {expected}"]


@pytest.mark.parametrize("entry_point, argv", [
    (train.main, ["--lrr", "0.1"]),
    (cli.main, ["tune", "--space", "{space}", "--study-dir", "{study}", "--lrr", "0.1"]),  # a train flag to tune
])
def test_the_help_a_bad_flag_names_runs_as_typed(entry_point, argv, capsys, tmp_path):
    """The hint is a command to copy: `monkeytrain/train.py --help` was not executable as typed."""
    (tmp_path / "space.yaml").write_text("lr: {low: 0.01, high: 0.1}\n")
    argv = [arg.format(space=tmp_path / "space.yaml", study=tmp_path / "study") for arg in argv]
    with pytest.raises(SystemExit):
        entry_point(argv)
    hint = capsys.readouterr().err.rsplit("see `", 1)[1].split("`")[0]
    assert hint == "monkeytrain train --help"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    shown = subprocess.run(shlex.split(hint), capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "--lr LR" in shown.stdout


def test_inspect_data_shows_the_test_split_held_out_of_one_folder_of_classes(capsys, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "flat", layout="image-folder", classes=3, per_class=10)
    cli.main(["inspect-data", str(root), "--test-fraction", "0.3", "--val-fraction", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [f"{root}: layout image-folder, 3 classes",
                         "  train     9 images  per class [3, 3, 3]",
                         "  val      12 images  per class [4, 4, 4]",  # half of the 7 left, rounded
                         "  test      9 images  per class [3, 3, 3]"]
    assert lines[4:7] == [f"  train from {root}, less the val and test held out of it",
                          f"  val   held out of {root} (--val-fraction 0.5, --seed 0)",
                          f"  test  held out of {root} (--test-fraction 0.3, the same for every seed)"]


def test_inspect_data_says_where_each_split_of_the_kaggle_layout_comes_from(capsys, data):
    cli.main(["inspect-data", str(data)])
    assert capsys.readouterr().out.splitlines()[4:7] == [
        "  train from training/training, less the val held out of it",
        "  val   held out of training/training (--val-fraction 0.1, --seed 0)",
        "  test  from validation/validation"]


def test_inspect_data_says_each_of_three_split_folders_is_used_under_its_usual_name(capsys, tmp_path,
                                                                                     make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val-test", classes=2, per_class=2, size=8)
    for name, new_name in (("train", "training"), ("val", "validation"), ("test", "testing")):
        (root / name).rename(root / new_name)
    cli.main(["inspect-data", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{root}: layout train-val-test, 2 classes"
    assert lines[4:7] == ["  train from training", "  val   from validation", "  test  from testing"]


def test_inspect_data_takes_split_folders_one_by_one_as_train_py_does(capsys, data):
    train, test = data / "training" / "training", data / "validation" / "validation"
    cli.main(["inspect-data", "--train-dir", str(train), "--val-dir", str(test), "--test-dir", str(test)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{train}: layout explicit, 3 classes"
    assert lines[4:7] == [f"  train from {train}", f"  val   from {test}", f"  test  from {test}"]
    assert "need --train-dir" in error_of(cli.main, ["inspect-data", "--val-dir", str(test)], capsys)
    assert "not both" in error_of(cli.main, ["inspect-data", str(data), "--train-dir", str(train),
                                             "--test-dir", str(test)], capsys)


def test_inspect_data_lists_each_image_under_two_classes(capsys, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=3, size=8)
    shutil.copyfile(root / "train" / "n0" / "n0_000.png", root / "train" / "n1" / "copy.png")
    cli.main(["inspect-data", str(root)])
    assert (f"  two classes (n0, n1): {root / 'train' / 'n0' / 'n0_000.png'} = {root / 'train' / 'n1' / 'copy.png'}"
            in capsys.readouterr().out.splitlines())


def test_inspect_data_sums_up_the_counts_of_many_classes(capsys, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "many", layout="train-val", classes=21, per_class={"n0": 3, "n1": 2}, size=8)
    cli.main(["inspect-data", str(root), "--val-fraction", "0"])
    assert "  test    119 images  per class 2 to 6, median 6" in capsys.readouterr().out.splitlines()


def test_a_file_name_that_is_not_utf8_prints_on_a_strict_utf8_console(data):
    """As in a UTF-8 locale (en_US.UTF-8), where Python's stdout refuses the escaped bytes of such names."""
    broken = os.fsencode(data / "training" / "training" / "n1") + b"/caf\xe9.jpg"  # Latin-1, from a Windows zip
    with open(broken, "wb") as handle:
        handle.write(b"not an image")
    done = subprocess.run([sys.executable, "-m", "monkeytrain.cli", "inspect-data", "--data", str(data)],
                          capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT), "PYTHONIOENCODING": "utf-8:strict"})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"skipped " + broken.replace(b"\xe9", b"\\udce9") + b": not an image" in done.stdout


@pytest.mark.parametrize("flags", [["--resume"], ["--data"], ["--run-name"]])
def test_a_path_too_long_for_the_system_is_one_line(capsys, data, flags):
    too_long = "x" * 300  # over the 255 bytes a file name may have
    value = too_long if flags == ["--run-name"] else f"{data}/{too_long}"
    message = error_of(train.main, ["--data", str(data), *SMALL, *flags, value], capsys)
    assert "File name too long" in message and too_long in message


def test_an_image_gone_while_streaming_is_one_line_and_the_state_is_saved(capsys, data):
    folder = data / "training" / "training" / "n1"

    def delete_an_image(epoch: int, val_accuracy: float) -> None:
        for image in folder.iterdir():  # after epoch 1: scanned, and streamed again in epoch 2
            image.unlink()

    with pytest.raises(SystemExit) as stopped:
        train.main(["--data", str(data), *SMALL, "--epochs", "2", "--batch-size", "4", "--data-pipeline", "stream",
                    "--run-name", "streamed"], on_epoch=delete_an_image)
    assert stopped.value.code == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error.startswith(f"monkeytrain: error: {folder}/n1_0") and error.endswith(
        ".png can no longer be read as an image (No such file or directory): it changed or went away after the data "
        "was scanned; put it back, or run again to scan the data anew. The training state is saved: the same command "
        "with --resume auto --run-name streamed continues the run.")
    [state] = state_dirs(Path("runs") / "streamed")  # complete, at the end of epoch 1
    assert torch.load(state / "progress-rank0.pt", weights_only=False)["progress"]["epoch"] == 2


def test_an_image_gone_before_the_test_split_is_scored_costs_no_training(capsys, data):
    """The state saved when a test image cannot be read holds the finished training: the resume the line
    names scores the best checkpoint at once (before, the advice was to run again, that is train again)."""
    folder = data / "validation" / "validation" / "n1"  # the test split
    kept = data.parent / "kept"
    flags = ["--data", str(data), *SMALL, "--batch-size", "4", "--data-pipeline", "stream", "--run-name", "scored"]
    with pytest.raises(SystemExit) as stopped:  # the one epoch trained and validated, then the images go
        train.main(flags, on_epoch=lambda epoch, accuracy: shutil.move(folder, kept))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.endswith("The training state is saved: the same command with --resume auto --run-name scored "
                          "continues the run.\n") and f"{folder}/n1_" in error
    shutil.move(kept, folder)  # put back, as the line says
    results = train.main([*flags, "--resume", "auto"])
    assert "resumed from" in capsys.readouterr().out, "not resumed"
    assert results["test_images"] == 12
    assert len(Path("runs/scored/metrics.jsonl").read_text().splitlines()) == 1  # no epoch trained again


def lose_an_image_while_streaming_with_workers(folder: Path, data: Path, environment: dict[str, str]) -> None:
    """In a child process: the run above, its images read by two loader workers, then the garbage collector,
    which a long-lived process (this session, `monkeytrain tune` between trials) runs at any moment."""
    run_in(folder, "output.txt", environment)
    images = data / "training" / "training" / "n1"
    try:
        train.main(["--data", str(data), *SMALL, "--epochs", "2", "--batch-size", "4", "--num-workers", "2",
                    "--data-pipeline", "stream"], on_epoch=lambda *_: [image.unlink() for image in images.iterdir()])
    except SystemExit as stopped:
        assert stopped.code == 2
    gc.collect()


def test_an_image_gone_while_streaming_with_workers_leaves_none_behind(data, tmp_path):
    """The worker's error reaches the main process as one that a reference cycle holds, and with it the run's
    loaders: the garbage collector frees a loader's iterator after closing its queues, so that the iterator
    cannot tell its workers to end, and SIGTERMs them, which they ignore. Unless the run ended them, the
    process would wait for them forever at its exit."""
    child = start(lose_an_image_while_streaming_with_workers, tmp_path, data, dict(os.environ))
    assert exit_codes([child], seconds=60) == [0], printed(tmp_path / "output.txt")


def test_an_image_gone_in_a_loader_worker_keeps_its_one_line():
    from monkeytrain.data.loaders import ImageGone

    # what DataLoader makes of a worker's exception: one of its type, the worker's traceback as its message
    relayed = ("Caught ImageGone in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "loaders.py", line 70, in __getitem__\nmonkeytrain.data.loaders.ImageGone: a.png can no '
               "longer be read as an image\n")
    assert str(ImageGone(relayed)) == "a.png can no longer be read as an image"
    assert str(ImageGone("b.png can no longer be read")) == "b.png can no longer be read"


def test_a_signal_while_the_data_is_read_stops_before_training(capsys, data, monkeypatch):
    import signal

    prepare = train.prepare_data

    def prepared_then_signalled(*args):
        prepared = prepare(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came while the data was read
        return prepared

    monkeypatch.setattr(train, "prepare_data", prepared_then_signalled)
    assert train.main(["--data", str(data), *SMALL, "--run-name", "early"])["stopped"] is True
    assert "run the same command with --resume auto --run-name early." in capsys.readouterr().out
    assert not (Path("runs") / "early" / "metrics.jsonl").exists()  # not one step trained
    assert not state_dirs(Path("runs") / "early")


def test_runs_started_in_the_same_second_each_get_a_folder_of_their_own(tmp_path, monkeypatch):
    from monkeytrain import rundir

    monkeypatch.setattr(rundir.time, "strftime", lambda pattern: "20261202-193705")
    names = [rundir.new_run_name(tmp_path / "runs") for _ in range(3)]
    assert names == ["20261202-193705", "20261202-193705-2", "20261202-193705-3"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == names  # each claimed by making it



def test_a_run_folder_another_run_is_using_is_refused_and_left_as_it_is(capsys, data):
    """The same --run-name started twice: the second run would mix its metrics and states into the first's."""
    from monkeytrain import rundir

    busy = Path("runs") / "busy"
    busy.mkdir(parents=True)
    (busy / "metrics.jsonl").write_text("{}\n")  # the first run's, stopped before its first save
    holder = rundir.lock_file(busy / rundir.LOCK_NAME)  # as that run, still going, holds it
    argv = ["--data", str(data), *SMALL, "--run-name", "busy", "--resume", "auto"]
    message = error_of(train.main, argv, capsys)
    assert f"{busy} is in use by a run that is still going (process {os.getpid()} on " in message
    assert (busy / "metrics.jsonl").read_text() == "{}\n"  # not started over under the running one
    os.close(holder)  # it ended: the folder is free
    train.main(argv)
    assert (busy / rundir.RESULTS_NAME).is_file() and not (busy / rundir.LOCK_NAME).exists()


def test_a_file_system_without_locks_leaves_the_run_unguarded(tmp_path, monkeypatch):
    from monkeytrain import rundir

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    assert rundir.lock_file(tmp_path / rundir.LOCK_NAME) is None

def test_an_interrupt_that_reaches_the_entry_point_is_one_line_and_status_130(capsys):
    @exits_cleanly_on_user_error
    def interrupted():
        raise KeyboardInterrupt  # a second Ctrl-C, while the first one's stop was still under way

    with pytest.raises(SystemExit) as stopped:
        interrupted()
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "monkeytrain: error: interrupted (a training run continues from its last saved state, if it saved one, "
        "with --resume auto and its --run-name)."]


def test_inspect_data_takes_the_dataset_as_train_py_spells_it(capsys, data):
    cli.main(["inspect-data", "--data", str(data)])
    assert capsys.readouterr().out.startswith(f"{data}: layout kaggle, 3 classes")
    assert "two dataset roots" in error_of(cli.main, ["inspect-data", str(data), "--data", "elsewhere"], capsys)


@pytest.mark.parametrize("argv", [["inspect-data", ""], ["inspect-data", "--data", ""]])
def test_inspect_data_refuses_an_empty_dataset_root(argv, capsys, data, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(data))  # what an empty root would silently fall back to
    assert "--data is empty" in error_of(cli.main, argv, capsys)


def test_every_argument_of_every_command_says_what_it_is():
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    undescribed = [f"{name} {action.dest}" for name, parser in commands.items() for action in parser._actions
                   if not action.help]
    assert undescribed == []
    assert "(default: data/10-monkey-species" in " ".join(commands["download"].format_help().split())


@pytest.mark.parametrize("command", ["inspect-data", "cache"])
def test_commands_that_only_look_at_files_start_without_torch(command, data):
    """Importing torch would add seconds (inspect-data: 3.0 s against 0.4 s on a 2-core Xeon)."""
    argv = {"inspect-data": ["inspect-data", "--data", str(data)], "cache": ["cache"]}[command]
    code = "import sys; from monkeytrain import cli; cli.main(sys.argv[1:]); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


def test_config_file_errors(capsys, tmp_path):
    assert "missing.yaml does not exist" in error_of(train.main, ["--config", "missing.yaml"], capsys)
    preset = tmp_path / "preset.yaml"
    preset.write_text("epochs: 3\nlearning_rate: 0.1\n")
    assert "unknown key 'learning_rate'" in error_of(train.main, ["--config", str(preset)], capsys)


@pytest.mark.parametrize("argv, argument", [
    (["predict", "", "--checkpoint", "best.safetensors"], "IMAGE_OR_DIR"),  # would predict the current folder
    (["evaluate", "", "--checkpoint", "best.safetensors"], "folder"),
    (["evaluate", "val", "--checkpoint", ""], "--checkpoint"),
    (["export", "--checkpoint", "best.safetensors", "--output", ""], "--output"),
    (["download", "--dest", ""], "--dest"),  # would unpack into the current folder
])
def test_an_empty_path_is_refused_by_every_command_not_taken_for_the_current_folder(capsys, argv, argument):
    message = error_of(cli.main, argv, capsys)
    assert f"argument {argument}: is empty (an unset shell variable?); give a path" in message


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet9000"], "unknown timm model 'resnet9000'"),
    (["--tta-shift", "5", "--model", "resnet10t"], "--tta-shift 5 reaches beyond"),
    # the largest shift at 96 px while stored views were rounded to the nearest pixel: a new run is refused it
    (["--tta-shift", "7", "--image-size", "96", "--model", "resnet10t"], "--tta-shift 7 reaches beyond the 6-pixel"),
    (["--grad-accum-steps", "50", "--model", "resnet10t"], "--grad-accum-steps 50 needs at least 50 batches"),
])
def test_a_flag_the_model_or_the_data_refuses_leaves_no_run_folder(capsys, data, flags, message):
    assert message in error_of(train.main, ["--data", str(data), *SMALL, *flags], capsys)
    assert list(Path("runs").glob("*")) == []  # none at all for --model, refused with the flags


def test_a_run_whose_model_diverges_ends_in_one_line_and_never_chooses_the_broken_epoch(capsys, data):
    message = error_of(train.main, ["--data", str(data), *SMALL, "--lr", "1e30", "--run-name", "nan"], capsys)
    assert "training diverged in epoch 1 (training loss " in message
    assert "validation loss nan); start a new run with a lower --lr (now 1e+30)" in message
    lines = (Path("runs") / "nan" / "metrics.jsonl").read_text().splitlines()
    (epoch,) = [json.loads(line, parse_constant=refused_as_no_json) for line in lines]  # as jq reads it
    assert epoch["is_best"] is False and not (Path("runs") / "nan" / "best.safetensors").exists()
    assert epoch["val_loss"] is None and epoch["not_finite"]["val_loss"] == "nan"


def refused_as_no_json(constant: str):
    raise ValueError(f"{constant} is not JSON (jq refuses the line)")

def test_corrupt_file_is_skipped_with_a_warning_or_fatal_when_strict(capsys, data):
    bad = data / "training" / "training" / "n1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    message = error_of(train.main, ["--data", str(data), "--strict-data", *SMALL], capsys)
    assert f"{bad} is a damaged or truncated image" in message and "--strict-data" in message
    assert list(Path("runs").iterdir()) == []  # no empty run folder left behind

    results = train.main(["--data", str(data), *SMALL, "--run-name", "lenient"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "broken.jpg" in line]
    assert len(warnings) == 1 and "skipping" in warnings[0]
    assert results["test_images"] == 12
    assert '"skipped_count": 1' in (Path("runs/lenient/data_manifest.json")).read_text()


def test_empty_class_and_mismatched_classes(capsys, data):
    for image in (data / "validation" / "validation" / "n2").iterdir():
        image.unlink()
    assert "n2 has no readable images" in error_of(train.main, ["--data", str(data), *SMALL], capsys)
    (data / "validation" / "validation" / "n2").rmdir()
    message = error_of(train.main, ["--data", str(data), *SMALL], capsys)
    assert "class folder 'n2'" in message and "not in" in message


def test_no_images_at_all(capsys, tmp_path):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "texts" / split / name).mkdir(parents=True)
            (tmp_path / "texts" / split / name / "notes.txt").write_text("hello")
    assert "has no readable images" in error_of(train.main, ["--data", str(tmp_path / "texts"), *SMALL], capsys)


def test_a_resume_path_that_is_no_saved_state_stops_before_anything_is_written(capsys, data):
    message = error_of(train.main, ["--data", str(data), *SMALL, "--resume", "runs/old/state"], capsys)
    assert message.endswith("runs/old/state is not a complete saved state; pass a RUN/state/step-* folder "
                            "or --resume auto.")
    assert not Path("runs").exists()  # no run directory of a run that never began


def test_resume_auto_without_a_run_name_says_that_a_new_run_starts(capsys, data):
    train.main(["--data", str(data), *SMALL, "--resume", "auto"])
    (run_dir,) = Path("runs").iterdir()
    assert (f"warning: --resume auto without --run-name has no run to continue: a new run {run_dir.name} starts"
            in capsys.readouterr().err)


@pytest.mark.parametrize("entry_point", [cli.main, train.main])
def test_version_prints_the_package_version(capsys, entry_point):
    with pytest.raises(SystemExit) as exited:
        entry_point(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"monkeytrain {monkeytrain.__version__}\n"


def test_model_and_weights_errors(capsys, data):
    assert "unknown timm model 'resnet9000'" in error_of(
        train.main, ["--data", str(data), *SMALL, "--model", "resnet9000"], capsys)
    assert "missing.safetensors does not exist" in error_of(
        train.main, ["--data", str(data), *SMALL, "--pretrained", "missing.safetensors"], capsys)


def test_explicit_dirs_need_a_second_split(capsys, data):
    message = error_of(train.main, ["--train-dir", str(data / "training" / "training"), *SMALL], capsys)
    assert "--train-dir alone leaves no split to report on; add --val-dir or --test-dir, or pass the folder " \
           "as --data to hold a test split out of it" in message


def test_finished_run_is_never_overwritten(capsys, data):
    finished = Path("runs/done")
    finished.mkdir(parents=True)
    (finished / "best.safetensors").write_bytes(b"precious")
    assert "already holds a checkpoint" in error_of(
        train.main, ["--data", str(data), *SMALL, "--run-name", "done"], capsys)
    assert (finished / "best.safetensors").read_bytes() == b"precious"


def test_predict_and_evaluate_errors(capsys, tmp_path, data):
    assert "does not exist" in error_of(cli.main, ["predict", "--checkpoint", "nope.safetensors", "x.png"], capsys)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert "not a readable .safetensors" in error_of(
        cli.main, ["predict", "--checkpoint", str(garbage), str(data)], capsys)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert "no monkeytrain metadata" in error_of(
        cli.main, ["predict", "--checkpoint", str(foreign), str(data)], capsys)

    train.main(["--data", str(data), *SMALL, "--run-name", "ok"])
    checkpoint = "runs/ok/best.safetensors"
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert "notes.txt is not an image" in error_of(
        cli.main, ["predict", "--checkpoint", checkpoint, str(notes)], capsys)
    assert "runs/ok is a folder; pass the best.safetensors" in error_of(
        cli.main, ["predict", "--checkpoint", "runs/ok", str(data / "validation")], capsys)
    (tmp_path / "other").mkdir()
    assert "other has no class subfolders" in error_of(
        cli.main, ["evaluate", "--checkpoint", checkpoint, str(tmp_path / "other")], capsys)
    (tmp_path / "other" / "zebra").mkdir(parents=True)
    assert "class folder 'zebra'" in error_of(
        cli.main, ["evaluate", "--checkpoint", checkpoint, str(tmp_path / "other")], capsys)

    shutil.copytree(data / "validation" / "validation" / "n0", tmp_path / "only-n0" / "n0")
    cli.main(["evaluate", "--checkpoint", checkpoint, str(tmp_path / "only-n0"), "--json"])
    printed_json = capsys.readouterr().out
    scored = json.loads(printed_json)
    per_class = scored["per_class_accuracy"]
    assert per_class["common name 1"] is None and per_class["common name 2"] is None  # no images of theirs
    # the confusion matrix one row a line, as it reads (indent=2 gave each number a line of its own)
    lines = printed_json.splitlines()
    start = lines.index('  "confusion_matrix": [')
    assert [line.strip().rstrip(",") for line in lines[start + 1:start + 5]] == [
        *(json.dumps(row) for row in scored["confusion_matrix"]), "]"]  # 3 classes


def test_evaluates_table_lines_up_chinese_and_japanese_class_names_as_a_terminal_shows_them(capsys, tmp_path,
                                                                                           make_image_folder):
    """A wide character (猫) takes two columns: padded by its length, each such name pushed its figures right."""
    from test_predict import tiny_checkpoint

    long_name = "black headed night monkey (n7)"  # 30 columns, wider than the table's usual 28
    checkpoint = tiny_checkpoint(tmp_path, ["猫", "ニホンザル", long_name])
    split = make_image_folder(tmp_path / "d", classes=3, per_class=2, size=8) / "validation" / "validation"
    cli.main(["evaluate", "--cpu", "--checkpoint", str(checkpoint), str(split)])
    table = capsys.readouterr().out.splitlines()[1:]
    assert [line[:line.index("%") - 5] for line in table] == [  # each figure is 6 wide: " 50.0%", "100.0%"
        "  猫" + " " * 28 + " ", "  ニホンザル" + " " * 20 + " ", f"  {long_name} "]


def test_inspect_and_download_errors(capsys, tmp_path, monkeypatch):
    assert "does not exist" in error_of(cli.main, ["inspect-data", str(tmp_path / "nothing")], capsys)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert "not empty" in error_of(cli.main, ["download", "--dest", str(occupied)], capsys)
    assert (occupied / "keep.txt").read_text() == "mine"

    import kagglehub

    def offline(*args, **kwargs):
        raise ConnectionError("no route to kaggle.com")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    assert "could not download" in error_of(cli.main, ["download", "--dest", str(tmp_path / "fresh")], capsys)


ENTRY_POINTS = {
    "train.py": [sys.executable, str(PROJECT / "monkeytrain" / "train.py"), "--data", "/no/such/place"],
    "python -m monkeytrain.cli": [sys.executable, "-m", "monkeytrain.cli", "predict", "--checkpoint",
                                  "missing.safetensors", "x.jpg"],
}


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory) -> Iterator[dict[str, subprocess.Popen]]:
    """Each entry point started with a bad path, all at once."""
    runs = {}
    for name, command in ENTRY_POINTS.items():
        cwd = tmp_path_factory.mktemp("entry")
        runs[name] = (command, cwd, {**os.environ, "MONKEYTRAIN_CACHE": str(cwd / "cache")})
    with started_at_once(runs) as started:
        yield started


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_real_entry_points_print_no_traceback(entry_points, name):
    _, stderr = entry_points[name].communicate(timeout=300)
    assert entry_points[name].returncode == 2
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and stderr.startswith("monkeytrain: error:")


def test_a_reader_that_stops_reading_ends_the_command_quietly(data, tmp_path):
    """`monkeytrain inspect-data DATA | head -0`: the pipe is closed before anything is written."""
    reader, writer = os.pipe()
    os.close(reader)
    with os.fdopen(writer, "w") as closed_pipe:
        done = subprocess.run([sys.executable, "-m", "monkeytrain.cli", "inspect-data", str(data)], cwd=tmp_path,
                              stdout=closed_pipe, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "", done.stderr[-3000:]


def test_an_error_or_warning_line_is_written_at_once_so_that_ranks_do_not_glue_their_lines(monkeypatch):
    """print() writes the text and its newline apart: two ranks' identical lines could come out as one."""
    from monkeytrain.config import warn
    from monkeytrain.errors import fail

    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
    warn("an old flag")
    with pytest.raises(SystemExit):
        fail("a wrong path", 2)
    assert writes == ["monkeytrain: warning: an old flag\n", "monkeytrain: error: a wrong path\n"]


def test_the_checkpoint_names_the_data_that_the_environment_gave(data, monkeypatch):
    """As config.yaml does: its header's config repeats the run on the same data from any shell."""
    from monkeytrain.checkpoint import read_checkpoint

    monkeypatch.setenv("MONKEYTRAIN_DATA", str(data))
    train.main([*SMALL, "--run-name", "from-env"])
    _, info = read_checkpoint(Path("runs") / "from-env" / "best.safetensors")
    assert info.config["data"] == os.path.abspath(data)


def test_python_dash_m_monkeytrain_is_the_monkeytrain_command():
    """For an environment whose scripts are not on PATH (a venv not activated, a notebook)."""
    done = subprocess.run([sys.executable, "-m", "monkeytrain", "--version"], capture_output=True, text=True,
                          timeout=60, cwd=Path(monkeytrain.__file__).parent.parent)
    assert (done.returncode, done.stdout) == (0, f"monkeytrain {monkeytrain.__version__}\n"), done.stderr


class BufferedFullDisk:
    """The standard output of `monkeytrain --help > /dev/full`: Python buffers what is written to a file, so the
    disk's refusal comes with the flush, which argparse's --help and --version leave to Python's exit."""

    def __init__(self):
        self.buffered = []

    def write(self, text: str) -> int:
        self.buffered.append(text)
        return len(text)

    def flush(self) -> None:
        if self.buffered:
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["predict", "--help"], ["train", "--version"]])
def test_help_and_version_that_cannot_be_written_say_so_as_every_command_does(argv, monkeypatch, capsys):
    """They exited 0 and left the failure to Python's flush at exit: a notice naming no file, status 120."""
    monkeypatch.setattr(sys, "stdout", BufferedFullDisk())
    assert "standard output could not be written (No space left on device)" in error_of(cli.main, argv, capsys)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_the_training_scripts_help_and_version_that_cannot_be_written_say_so(flag):
    """`python monkeytrain/train.py --help > /dev/full`, not through the monkeytrain command."""
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as by default
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "monkeytrain/train.py", flag], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=Path(monkeytrain.__file__).parent.parent, env=buffered)
    assert (done.returncode, done.stderr) == (2, "monkeytrain: error: standard output could not be written (No "
                                                 "space left on device); free space where it goes, or send it "
                                                 "elsewhere.\n")


def test_a_batch_of_one_image_that_batch_norm_cannot_train_on_leaves_no_run_folder(capsys, data, tmp_path):
    """Refused at the first batch, the run folder kept a config.yaml and data_manifest.json of a run that never
    trained; refused as the model is built, nothing this run made is left, and nothing already there goes."""
    flags = ["--data", str(data), *SMALL, "--batch-size", "1"]  # 32 px: a ResNet's last features are 1x1
    assert "with --batch-size 1, resnet18 cannot train on 32-pixel images" in error_of(
        train.main, [*flags, "--run-name", "one"], capsys)
    assert not (tmp_path / "runs" / "one").exists()
    kept = tmp_path / "runs" / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert "--batch-size 2 or more" in error_of(train.main, [*flags, "--run-name", "kept"], capsys)
    assert [path.name for path in kept.iterdir()] == ["notes.txt"]
