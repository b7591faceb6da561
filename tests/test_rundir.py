"""monkeytrain.rundir: what a resumed run is held to, its config.yaml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from monkeytrain.config import config_yaml, parse_config
from monkeytrain.errors import UserError
from monkeytrain.checkpoint import BEST_NAME
from monkeytrain.rundir import (
    CONFIG_NAME, LOCK_NAME, RESULTS_NAME, check_resumed_config, lock_file, prepare_run_dir,
)

RESUME = ["--cpu", "--resume", "auto"]


@pytest.fixture(autouse=True)
def no_data_found_without_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("MONKEYTRAIN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


def run_begun_with(tmp_path: Path, config_text: str) -> Path:
    run = tmp_path / "runs" / "cut"
    run.mkdir(parents=True)
    (run / CONFIG_NAME).write_text(config_text)
    return run


def test_a_run_on_data_from_the_environment_resumes_from_the_same_and_not_from_another(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(first))
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu"])))
    check_resumed_config(run, parse_config(RESUME))  # a requeued job, in the environment it began in
    check_resumed_config(run, parse_config([*RESUME, "--data", str(first)]))
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(second))
    with pytest.raises(UserError) as refused:
        check_resumed_config(run, parse_config(RESUME))
    assert str(refused.value) == (f"the data found without --data ({second}) is not the {first} that {run} began "
                                  f"with ({run / CONFIG_NAME}); give --data {first} to resume it, or start a new run.")


def test_a_run_whose_config_names_no_data_resumes_as_before(tmp_path, monkeypatch):
    """config.yaml named no data before it recorded the default's: such a run still resumes (the data
    manifest of its state is checked when the state is loaded), but not with another --data given."""
    from monkeytrain.data.synthetic import DATA_NAME

    began = config_yaml(parse_config(["--cpu"])).replace(f"data: {DATA_NAME}\n", "data: null\n", 1)
    assert yaml.safe_load(began)["data"] is None  # as a run on the synthetic set recorded it then
    run = run_begun_with(tmp_path, began)
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(tmp_path / "monkeys"))
    check_resumed_config(run, parse_config(RESUME))
    monkeypatch.delenv("MONKEYTRAIN_DATA")
    check_resumed_config(run, parse_config(RESUME))  # the synthetic set, now named builtin:synthetic-v2
    other = tmp_path / "other"
    with pytest.raises(UserError, match=f"began with the data found without --data .*, not with --data {other};"):
        check_resumed_config(run, parse_config([*RESUME, "--data", str(other)]))


def test_a_run_on_the_synthetic_set_resumes_on_it_and_not_on_the_data_of_another_shell(tmp_path, monkeypatch):
    from monkeytrain.data.synthetic import DATA_NAME

    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu"])))
    check_resumed_config(run, parse_config(RESUME))
    check_resumed_config(run, parse_config([*RESUME, "--data", DATA_NAME]))
    monkeys = tmp_path / "monkeys"
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(monkeys))
    with pytest.raises(UserError) as refused:
        check_resumed_config(run, parse_config(RESUME))
    assert str(refused.value) == (f"the data found without --data ({monkeys}) is not the {DATA_NAME} that {run} "
                                  f"began with ({run / CONFIG_NAME}); give --data {DATA_NAME} to resume it, or start "
                                  "a new run.")


@pytest.mark.parametrize("config_text", [None, "[not, a, mapping]\n", "epochs: [\n", ""])
def test_a_resume_without_a_readable_config_yaml_says_so_in_one_line_and_goes_on(tmp_path, capsys, config_text):
    run = run_begun_with(tmp_path, config_text or "")
    if config_text is None:
        (run / CONFIG_NAME).unlink()  # deleted by hand
    check_resumed_config(run, parse_config([*RESUME, "--batch-size", "4"]))
    assert capsys.readouterr().err == (
        f"monkeytrain: warning: {run / CONFIG_NAME} is missing or unreadable, so the flags of this resume cannot be "
        "checked against those the run began with: it goes on with the flags given, and records them there.\n")
    check_resumed_config(run, parse_config(RESUME), is_main_process=False)  # another rank: the main one says it
    assert capsys.readouterr().err == ""


def test_a_flag_left_out_on_resume_is_not_told_to_be_dropped(tmp_path):
    """A run begun with --seed 5 and resumed without it has the default seed 0 here: "--seed 0 is not the 5 ...:
    drop it" named a flag the user never gave."""
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu", "--seed", "5"])))
    with pytest.raises(UserError, match=f"^{run} began with --seed 5 .*, not 0; a resumed run goes on with the "
                                        "flags it began with: give --seed 5, or start a new run.$"):
        check_resumed_config(run, parse_config(RESUME))


def test_a_flag_added_or_dropped_on_resume_is_named_as_such(tmp_path):
    """Not 'is not the None that ...' (a split folder the run began without, or dropped on resume)."""
    splits = ["--train-dir", str(tmp_path / "a"), "--val-dir", str(tmp_path / "b")]
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu", *splits])))
    added = [*RESUME, *splits, "--test-dir", str(tmp_path / "c")]
    with pytest.raises(UserError, match=f"^{run} began without --test-dir .*, not with --test-dir {tmp_path / 'c'}; "):
        check_resumed_config(run, parse_config(added))
    run = run_begun_with(tmp_path / "2", config_yaml(parse_config(["--cpu", *splits, "--test-dir", str(tmp_path)])))
    with pytest.raises(UserError, match=f"^{run} began with --test-dir {tmp_path} .*; give it again to resume"):
        check_resumed_config(run, parse_config([*RESUME, *splits]))


def test_flags_left_out_on_resume_are_named_all_in_one_line(tmp_path):
    """A run begun with --debug --epochs 6 --image-size 32, resumed with --resume auto alone, was refused once
    for each flag, a try each."""
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu", "--epochs", "6", "--image-size", "32"])))
    with pytest.raises(UserError) as refused:
        check_resumed_config(run, parse_config(RESUME))
    assert str(refused.value) == (f"{run} began with other flags than this resume's ({run / CONFIG_NAME}): "
                                  "--image-size 32, --epochs 6; a resumed run goes on with the flags it began with: "
                                  f"give them again (--config {run / CONFIG_NAME} gives them all), or start a new "
                                  "run.")
    check_resumed_config(run, parse_config([*RESUME, "--config", str(run / CONFIG_NAME)]))  # as the line says


@pytest.mark.parametrize("by_its_state", [False, True])
def test_a_finished_run_is_not_reopened_and_its_state_says_what_to_do_instead(tmp_path, cpu_accelerator,
                                                                             by_its_state):
    """Given by its path, a finished run's state was told to pick another --run-name, which was then refused
    as a state of another run: the two lines sent the user round in a circle."""
    run = tmp_path / "runs" / "done"
    state = run / "state" / "step-00000008"
    state.mkdir(parents=True)
    (run / RESULTS_NAME).write_text("{}")
    flags = ["--resume", str(state)] if by_its_state else ["--run-name", "done"]
    with pytest.raises(UserError) as refused:
        prepare_run_dir(parse_config(["--cpu", *flags]), cpu_accelerator)
    told = (f"which its states cannot continue; start a new run without --resume (from its weights: --pretrained "
            f"{run / BEST_NAME})." if by_its_state else "pick another --run-name.")
    assert str(refused.value).endswith(told)


def test_a_run_begun_on_a_link_to_its_data_resumes_with_the_folder_it_links_to(tmp_path):
    """data/10-monkey-species, a link to a shared copy, given at the start; the shared copy's own path on resume."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "link").symlink_to(shared)
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu", "--data", str(tmp_path / "link")])))
    check_resumed_config(run, parse_config([*RESUME, "--data", str(shared)]))
    with pytest.raises(UserError, match=f"began with --data {shared} "):
        check_resumed_config(run, parse_config([*RESUME, "--data", str(tmp_path)]))


def test_a_run_begun_choosing_on_one_metric_is_not_resumed_choosing_on_the_other(tmp_path, capsys):
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu"])))  # balanced accuracy, the default
    with pytest.raises(UserError, match=f"^{run} began with --select-on balanced-accuracy .*, not accuracy;"):
        check_resumed_config(run, parse_config([*RESUME, "--select-on", "accuracy"]))
    (run / CONFIG_NAME).write_text(config_yaml(parse_config(["--cpu"])).replace("select_on: balanced-accuracy\n", ""))
    config = parse_config(RESUME)
    check_resumed_config(run, config)  # begun before the flag: on accuracy, as it began, and said once
    assert config.select_on == "accuracy"
    assert capsys.readouterr().err == (f"monkeytrain: warning: {run} began before --select-on existed: it goes on "
                                       f"with --select-on accuracy, as it began ({run / CONFIG_NAME}).\n")


@pytest.mark.parametrize("flag, given, began", [("hflip", "0.2", 0.5), ("random_erasing", "0.25", 0.0)])
def test_a_run_begun_before_an_augmentation_flag_goes_on_augmenting_as_it_began(tmp_path, capsys, flag, given, began):
    """Its images were mirrored half the time and never erased: a resume with the new flag would change its
    augmentation half-way through, silently, as config.yaml has nothing to compare the flag with."""
    yaml_text = config_yaml(parse_config(["--cpu"]))
    run = run_begun_with(tmp_path, "".join(line for line in yaml_text.splitlines(keepends=True)
                                           if not line.startswith(f"{flag}:")))
    config = parse_config([*RESUME, f"--{flag.replace('_', '-')}", given])
    check_resumed_config(run, config)
    assert getattr(config, flag) == began
    assert f"began before --{flag.replace('_', '-')} existed: it goes on with" in capsys.readouterr().err


def stopped_run(tmp_path: Path, name: str, with_state: bool = True) -> Path:
    """A run's folder as a stop leaves it: its best checkpoint and, after its first save, a complete state."""
    from monkeytrain.statestore import COMPLETE

    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    (run / BEST_NAME).write_bytes(b"weights")
    if with_state:
        state = run / "state" / "step-00000008"
        state.mkdir(parents=True)
        (state / COMPLETE).write_text("")
    return run


def test_a_run_still_going_is_named_before_its_checkpoint_is(tmp_path, cpu_accelerator):
    """The name of a running run that had saved its checkpoint was told to be continued with --resume auto,
    which was then refused as in use: the first line must be the one that holds."""
    run = stopped_run(tmp_path, "busy")
    lock = lock_file(run / LOCK_NAME)  # the running run's, as claimed() holds it
    try:
        for flags in ([], ["--resume", "auto"]):
            with pytest.raises(UserError, match="^runs/busy is in use by a run that is still going \\(process "):
                prepare_run_dir(parse_config(["--cpu", "--run-name", "busy", *flags]), cpu_accelerator)
    finally:
        os.close(lock)
    prepare_run_dir(parse_config(["--cpu", "--run-name", "busy", "--resume", "auto"]), cpu_accelerator)  # it ended


@pytest.mark.parametrize("how", ["finished", "stopped", "stopped before its first state"])
def test_reusing_a_run_name_suggests_resume_auto_only_where_it_continues_the_run(tmp_path, cpu_accelerator, how):
    """A finished run (results.json) was told "continue it with --resume auto", which then refused it."""
    run = stopped_run(tmp_path, "rep1", with_state=how != "stopped before its first state")
    if how == "finished":
        (run / RESULTS_NAME).write_text("{}")
    (run / CONFIG_NAME).write_text(config_yaml(parse_config(["--cpu", "--run-name", "rep1"])))
    with pytest.raises(UserError) as refused:
        prepare_run_dir(parse_config(["--config", str(run / CONFIG_NAME)]), cpu_accelerator)  # names the run
    shown = Path("runs", "rep1")  # as the user gave it, from the folder the test runs in
    told = {"finished": f"{shown} holds a finished run (results.json); pick another --run-name.",
            "stopped": f"{shown} holds a stopped run (a checkpoint and a saved state); pick another --run-name, move "
                       "it away, or continue it with --resume auto.",
            "stopped before its first state": f"{shown} already holds a checkpoint, and no saved state to continue "
                                              "the run from; pick another --run-name, or move it away."}
    assert str(refused.value) == told[how]


def test_a_run_begun_on_a_relative_data_path_resumes_with_it(tmp_path):
    """config.yaml records the absolute path; the resume, given the relative one again, is the same run."""
    (tmp_path / "data").mkdir()
    run = run_begun_with(tmp_path, config_yaml(parse_config(["--cpu", "--data", "data"])))
    assert yaml.safe_load((run / CONFIG_NAME).read_text())["data"] == str(tmp_path / "data")
    check_resumed_config(run, parse_config([*RESUME, "--data", "data"]))


def trained_run(tmp_path: Path, with_state: bool = True, saved_epoch: int = 2) -> Path:
    """A run in tmp_path/project/runs/trained, begun there on --data data (Kaggle's layout), whose training ended
    (its two epochs logged, the second its best), its best.safetensors holding `saved_epoch`, and never scored."""
    import json

    import torch
    from safetensors.torch import save_file

    from monkeytrain.runrecords import DATA_RECORD
    from monkeytrain.tracking import METRICS_NAME

    (tmp_path / "project" / "data" / "validation" / "validation").mkdir(parents=True)
    run = stopped_run(tmp_path / "project", "trained", with_state=with_state)
    save_file({"weight": torch.zeros(1)}, str(run / BEST_NAME), metadata={"epoch": str(saved_epoch)})
    (run / METRICS_NAME).write_text("".join(json.dumps({"epoch": epoch, "epochs": 2, "val_loss": 0.4, "is_best": True})
                                            + "\n" for epoch in (1, 2)))
    (run / DATA_RECORD).write_text(json.dumps({"root": "data/training/training", "files": {  # paths as given
        "test": ["data/validation/validation/n0/a.png", "data/validation/validation/n1/b.png"]}}))
    (run / CONFIG_NAME).write_text(f"data: {tmp_path / 'project' / 'data'}\n")  # absolute, as recorded
    return run


@pytest.mark.parametrize("with_state", [True, False], ids=["with a saved state", "without"])
def test_reusing_the_name_of_a_run_that_ended_after_training_offers_to_score_its_checkpoint(
        tmp_path, monkeypatch, cpu_accelerator, with_state):
    """Its test split was never scored (a full disk, a kill): --resume auto was offered, which trains again from
    the newest state (none is saved at the end), where scoring best.safetensors is what was left to do."""
    from monkeytrain.runrecords import DATA_RECORD

    run = trained_run(tmp_path, with_state)
    monkeypatch.chdir(tmp_path / "project")  # where it began
    with pytest.raises(UserError) as refused:
        prepare_run_dir(parse_config(["--cpu", "--run-name", "trained"]), cpu_accelerator)
    shown, folder = Path("runs", "trained"), tmp_path / "project" / "data" / "validation" / "validation"
    again = ", or train its last epochs again from its newest saved state with --resume auto" if with_state else ""
    assert str(refused.value) == (
        f"{shown} holds a run whose training ended but that was never scored (no results.json); score its best "
        f"checkpoint on its test split with `monkeytrain evaluate --checkpoint {shown / BEST_NAME} {folder}`{again}; "
        "or pick another --run-name.")
    (run / DATA_RECORD).unlink()  # its test split held out of the training folder says as much; here, no record
    with pytest.raises(UserError, match=f"score its best checkpoint with `monkeytrain evaluate --checkpoint "
                                        f"{shown / BEST_NAME} FOLDER` on images it did not train on{again};"):
        prepare_run_dir(parse_config(["--cpu", "--run-name", "trained"]), cpu_accelerator)


def test_the_test_folder_offered_is_one_from_any_working_directory(tmp_path, cpu_accelerator):
    """data_manifest.json has the paths as the run was given them (data/validation/validation, from project/):
    from another folder, that one names a folder that does not exist."""
    trained_run(tmp_path)  # the test runs in tmp_path, not in project/
    with pytest.raises(UserError) as refused:
        prepare_run_dir(parse_config(["--cpu", "--output-dir", "project/runs", "--run-name", "trained"]),
                        cpu_accelerator)
    folder = tmp_path / "project" / "data" / "validation" / "validation"
    assert f"--checkpoint {Path('project', 'runs', 'trained', BEST_NAME)} {folder}`" in str(refused.value)


def test_a_run_whose_last_best_checkpoint_was_never_written_is_not_offered_to_score_it(tmp_path, cpu_accelerator):
    """The disk filled up saving the last epoch's best.safetensors, logged as best before: the file holds an older
    epoch, which evaluate would score as if it were the run's; the run stopped, its last epoch to train again."""
    trained_run(tmp_path, with_state=True, saved_epoch=1)
    with pytest.raises(UserError) as refused:
        prepare_run_dir(parse_config(["--cpu", "--output-dir", "project/runs", "--run-name", "trained"]),
                        cpu_accelerator)
    assert str(refused.value) == (f"{Path('project', 'runs', 'trained')} holds a stopped run (a checkpoint and a saved "
                                  "state); pick another --run-name, move it away, or continue it with --resume auto.")
