"""The train.py flags a study is given: the machine's ones, which its best run gets back."""

from __future__ import annotations

from monkeytrain.tune_flags import machine_flags


def test_the_best_run_is_given_the_machine_flags_the_study_was_given_or_its_preset(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("cpu: true\nmixed-precision: bf16\nlr: 0.02\n")
    flags = machine_flags(["--config", str(preset), "--mixed-precision", "no", "--cpu-threads", "2", "--epochs", "3"])
    assert flags == ["--cpu", "--mixed-precision", "no", "--cpu-threads", "2"]  # flags override the preset
    assert machine_flags(["--epochs", "3"]) == []
