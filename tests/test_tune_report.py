"""The files of a study's end: best_config.yaml leaves the machine out, and a full disk leaves each file whole."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from monkeytrain.config import parse_config
from monkeytrain.storage import DiskFull
from monkeytrain.tune_report import draw_search, write_best_config, write_json, write_trials_csv
from test_storage import fill_to_the_brim, full_disk  # noqa: F401  (a real 2 MiB tmpfs)


def test_best_config_leaves_the_device_and_precision_to_the_machine_that_reuses_it(tmp_path, monkeypatch):
    """A study on the CPU (--cpu, its precision resolved to fp32) gives a preset that trains on a GPU machine
    on its GPU, in its precision, with the recipe the study found."""
    import torch

    from monkeytrain.config import config_yaml

    monkeypatch.delenv("MONKEYTRAIN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    trial = tmp_path / "trial-0003"
    trial.mkdir()
    found = parse_config(["--cpu", "--lr", "0.03"])
    found.mixed_precision = "no"  # as the run records what it trained in on the CPU
    (trial / "config.yaml").write_text(config_yaml(found))
    best = write_best_config(SimpleNamespace(number=3, value=0.9), trial, ["lr"], tmp_path / "best_config.yaml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reused on a GPU machine
    reused = parse_config(["--config", str(best)])
    assert (reused.cpu, reused.mixed_precision) == (False, None)  # the GPU, in its own precision (bf16)
    assert (reused.lr, reused.image_size, reused.epochs) == (0.03, found.image_size, found.epochs)


def finished_trials(count: int) -> list:
    """`count` complete trials of a study held in memory, each with a long note (a few KiB in all)."""
    study = optuna.create_study(direction="maximize")
    for number in range(count):
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.01 + number / 1000}, value=0.5,
                                                  distributions={"lr": optuna.distributions.FloatDistribution(0, 1)},
                                                  user_attrs={"worker": f"host:{number}", "error": "x" * 40}))
    return study.get_trials()


def write_trials(folder: Path, count: int) -> Path:
    write_trials_csv(finished_trials(count), folder / "trials.csv")
    return folder / "trials.csv"


def write_best(folder: Path, count: int) -> Path:
    """best_config.yaml of a trial whose config holds `count` long values."""
    trial = folder.parent / f"trial-{count}"
    trial.mkdir(exist_ok=True)
    (trial / "config.yaml").write_text(yaml.safe_dump({f"key{n}": "x" * 40 for n in range(count)}))
    return write_best_config(SimpleNamespace(number=3, value=0.9), trial, ["lr"], folder / "best_config.yaml")


def write_summary(folder: Path, count: int) -> Path:
    return write_json({f"key{n}": "x" * 40 for n in range(count)}, folder / "summary.json")


def draw(folder: Path, count: int) -> Path:
    return draw_search(finished_trials(count), {}, "too few trials", folder / "search.png")


@pytest.mark.parametrize("write", [write_trials, write_best, write_summary, draw])
def test_a_study_file_the_disk_has_no_room_for_leaves_the_one_before_whole(full_disk, write):
    """Each was written in place (trials.csv opened with "w", the others with write_text): a full disk emptied
    the file before, then left half of the new one, and the error named no file."""
    path = write(full_disk, 2)
    before = path.read_bytes()
    fill_to_the_brim(full_disk)
    with pytest.raises(DiskFull, match=f"^no space left on the device of {full_disk} to write {path.name}"
                                       r"( \(.* needed\))?; free some space or pick another --study-dir\.$"):
        write(full_disk, 200)  # more than the page the old file frees
    assert path.read_bytes() == before
    assert not [p for p in full_disk.iterdir() if p.name.startswith(".")]  # no temporary file
