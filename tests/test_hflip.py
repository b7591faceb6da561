"""--hflip P (timm's flag): the chance that a training image is mirrored, 0 for data whose left and right differ.

The flip draws themselves are tested with the rest of the warp in test_augment. Here: the flag, the rule that
flip test-time augmentation follows it (a run that never mirrors evaluates without the mirror image, unless
--tta-flip is given), and a whole run on bars at the left or the right, which only --hflip 0 can learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import command_error, train_here
from monkeytrain import cli
from monkeytrain.checkpoint import read_checkpoint
from monkeytrain.config import config_yaml, parse_config
from monkeytrain.data.augment import EvalViews
from monkeytrain.trainer import augment_settings

WARNING = "--hflip 0 with --tta-flip: evaluation averages each image with its mirror image"


def test_the_flag_reaches_the_augmentation_and_mirrors_half_the_images_by_default():
    assert augment_settings(parse_config([])).hflip == 0.5
    assert augment_settings(parse_config(["--hflip", "0.25"])).hflip == 0.25


@pytest.mark.parametrize("flags, tta_flip", [
    ([], True),
    (["--hflip", "0.1"], True),  # mirrored now and then: both views are images the model has learned
    (["--hflip", "0"], False),
    (["--hflip", "0", "--no-tta-flip"], False),
])
def test_a_run_that_never_mirrors_evaluates_without_the_mirror_and_records_it(flags, tta_flip, capsys):
    config = parse_config(flags)
    assert config.tta_flip is tta_flip and yaml.safe_load(config_yaml(config))["tta_flip"] is tta_flip
    assert WARNING not in capsys.readouterr().err


def test_a_preset_without_the_mirror_is_read_as_the_flags_are(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("hflip: 0\n")
    assert parse_config(["--config", str(preset)]).tta_flip is False
    preset.write_text("hflip: 0\ntta_flip: true\n")
    assert parse_config(["--config", str(preset)]).tta_flip is True  # given, as by the flag


def test_the_mirror_asked_for_with_hflip_0_is_kept_with_one_warning_from_the_first_process(capsys, monkeypatch):
    assert parse_config(["--hflip", "0", "--tta-flip"]).tta_flip is True
    warnings = [line for line in capsys.readouterr().err.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "leave --tta-flip out for such data" in warnings[0]
    monkeypatch.setenv("RANK", "1")
    assert parse_config(["--hflip", "0", "--tta-flip"]).tta_flip is True
    assert WARNING not in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_a_chance_outside_0_to_1_is_one_line_and_exit_2(value, capsys):
    line = command_error(["train", "--hflip", value], capsys)
    assert "--hflip must" in line and "fix the flag or the config file" in line


def test_timms_vertical_flip_is_told_apart(capsys):
    assert "(--vflip: no vertical flip; --hflip mirrors left and right)" in command_error(
        ["train", "--vflip", "0.5"], capsys)


# --- a whole run on data whose classes are mirror images -------------------------------------------------------

def write_left_right_bars(root: Path, per_class: dict[str, int], size: int = 32) -> Path:
    """train/ and test/ of two classes, a white vertical bar near the left or near the right edge of dark noise
    (its width, height and distance from the edge drawn): each image of one class is the mirror of one the other
    class could hold, so a run that mirrors its training images cannot learn them."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for side in ("left", "right"):
            (root / split / side).mkdir(parents=True)
            for index in range(count):
                image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                width, top, bottom = rng.integers(3, 6), rng.integers(0, size // 4), rng.integers(3 * size // 4, size)
                left = rng.integers(1, size // 4)
                left = left if side == "left" else size - left - width
                image[top:bottom, left:left + width] = 255
                Image.fromarray(image).save(root / split / side / f"{index}.png")
    return root


def test_a_run_that_never_mirrors_learns_left_from_right_and_its_checkpoint_tells_them_apart(tmp_path, capsys):
    data = write_left_right_bars(tmp_path / "bars", {"train": 40, "test": 10})
    train_here(["--data", str(data), "--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "16",
                "--num-workers", "0", "--cpu-threads", "1", "--epochs", "10", "--lr", "0.05", "--hflip", "0",
                "--run-name", "bars", "--cache-dir", str(tmp_path / "cache"), "--report-to", "none"], tmp_path)
    run = tmp_path / "runs" / "bars"
    assert json.loads((run / "results.json").read_text())["test_accuracy"] >= 0.8  # chance: 0.5; 1.0 at seeds 0 to 3
    info = read_checkpoint(run / "best.safetensors")[1]
    assert info.config["hflip"] == 0 and EvalViews.of_config(info.config, 32, info.mean, info.std).count == 1
    capsys.readouterr()
    cli.main(["predict", "--cpu", "--json", "--checkpoint", str(run / "best.safetensors"),
              str(data / "test" / "left" / "0.png"), str(data / "test" / "right" / "0.png")])
    left, right = ({top["class"]: top["probability"] for top in answer["top"]}
                   for answer in json.loads(capsys.readouterr().out))
    assert right["right"] > left["right"] + 0.2  # with the mirror averaged in, a mirror pair would score alike
