"""monkeytrain.config: defaults, --debug, YAML presets, flags, and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from monkeytrain.config import (
    CPU_RECIPE, DEBUG_PRESET, TrainConfig, config_yaml, load_yaml_preset, parse_config, resolve_recipe,
)
from monkeytrain.data.synthetic import DATA_NAME as SYNTHETIC
from monkeytrain.distributed import Hardware, choose_precision, launcher_precision, make_accelerator
from monkeytrain.errors import UserError, exits_cleanly_on_user_error


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def no_data_found_without_flags(tmp_path, monkeypatch):
    """No $MONKEYTRAIN_DATA and no data/10-monkey-species in the working folder, as on a machine without
    the data: a saved config then names no data, and loads back as the config it was."""
    monkeypatch.delenv("MONKEYTRAIN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


def test_the_gpu_recipe_is_the_dataclass_defaults():
    assert parse_config(["--recipe", "gpu"]) == TrainConfig(recipe="gpu")


def test_a_cpu_run_starts_from_the_cpu_recipe():
    config = parse_config(["--cpu"])
    assert config.recipe == "cpu"
    for name, value in CPU_RECIPE.items():
        assert getattr(config, name) == value, name
    # the recipe really differs from the GPU one where it matters, or this test proves nothing
    gpu = TrainConfig()
    assert config.epochs < gpu.epochs and config.image_size < gpu.image_size


def test_auto_picks_the_recipe_of_the_device(monkeypatch):
    import torch

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_recipe("auto", cpu_flag=False) == "gpu"
    assert resolve_recipe("auto", cpu_flag=True) == "cpu"
    assert parse_config(["--debug"]).recipe == "cpu"  # --debug trains on the CPU
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert resolve_recipe("auto", cpu_flag=False) == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_recipe("auto", cpu_flag=False) == "cpu"
    assert resolve_recipe("gpu", cpu_flag=True) == "gpu"  # asked for explicitly: kept


def test_recipe_lies_beneath_debug_yaml_and_flags(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "lr: 0.3\n")
    config = parse_config(["--cpu", "--config", preset, "--epochs", "3"])
    assert (config.lr, config.epochs, config.image_size) == (0.3, 3, CPU_RECIPE["image_size"])
    debug = parse_config(["--debug"])
    assert debug.batch_size == DEBUG_PRESET["batch_size"] and debug.epochs == DEBUG_PRESET["epochs"]
    assert debug.image_size == CPU_RECIPE["image_size"]
    assert debug.lr == CPU_RECIPE["lr"]  # what --debug does not set comes from the recipe


def test_the_gpu_recipe_can_be_asked_for_on_the_cpu():
    config = parse_config(["--cpu", "--recipe", "gpu"])
    assert config.recipe == "gpu" and config.epochs == TrainConfig().epochs


def test_saved_config_says_which_recipe_applied_and_reproduces_it(tmp_path):
    config = parse_config(["--cpu"])
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    assert "recipe: cpu" in (tmp_path / "config.yaml").read_text()
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == dataclasses.replace(config, data=SYNTHETIC)


def test_old_flag_names_still_work_with_one_warning_line(tmp_path, capsys):
    assert parse_config(["--max-steps-per-epoch", "4"]).max_batches_per_epoch == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-steps-per-epoch is now called --max-batches-per-epoch" in err
    preset = write_yaml(tmp_path / "old.yaml", "max_steps_per_epoch: 5\n")
    assert parse_config(["--config", preset]).max_batches_per_epoch == 5
    assert "now called --max-batches-per-epoch" in capsys.readouterr().err


def test_an_old_flag_name_is_warned_about_by_the_runs_first_process_alone(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # as torchrun and accelerate launch number the processes
    assert parse_config(["--max-steps-per-epoch", "4", "--data-pipeline", "gpu"]).data_pipeline == "resident"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag, value, message", [
    ("--optimizer", "sgdd", "--optimizer must be sgd or adamw"),
    ("--data-pipeline", "gpus", "--data-pipeline must be auto, resident or stream"),
    ("--report-to", "tensorboard", "--report-to must be auto, wandb or none"),
])
def test_a_wrong_choice_in_a_yaml_preset_names_the_choices(tmp_path, flag, value, message):
    preset = write_yaml(tmp_path / "p.yaml", f"{flag[2:]}: {value}\n")
    with pytest.raises(UserError, match=message):
        parse_config(["--config", preset])


@pytest.mark.parametrize("key, value, meant", [
    ("recipe", "GPU", "gpu"), ("select_on", "balanced_accuracy", "balanced-accuracy"), ("optimizer", "adam", "adamw"),
])
def test_a_wrong_choice_in_a_yaml_preset_names_the_one_meant_as_the_flag_does(tmp_path, key, value, meant):
    preset = write_yaml(tmp_path / "p.yaml", f"{key}: {value}\n")
    with pytest.raises(UserError, match=rf"must be .* \(did you mean {meant}\?\); fix the flag or the config file"):
        parse_config(["--config", preset])


def test_a_wrong_choice_far_from_every_choice_gets_no_hint(tmp_path):
    with pytest.raises(UserError) as raised:
        parse_config(["--config", write_yaml(tmp_path / "p.yaml", "optimizer: lion\n")])
    assert "did you mean" not in str(raised.value)


def test_old_gpu_pipeline_name_still_works(capsys):
    assert parse_config(["--data-pipeline", "gpu"]).data_pipeline == "resident"
    assert "now called resident" in capsys.readouterr().err


def test_yaml_preset_sets_values_and_flags_override_it(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "lr: 0.2\nepochs: 7\nmodel: resnet34\nbatch-size: 12\n")
    config = parse_config(["--config", preset, "--epochs", "3"])
    assert config.lr == 0.2
    assert config.model == "resnet34"
    assert config.batch_size == 12  # dashed YAML keys work like the flags
    assert config.epochs == 3  # the flag wins over the preset


def test_flag_before_config_still_overrides_the_preset(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "epochs: 7\n")
    assert parse_config(["--epochs", "4", "--config", preset]).epochs == 4


def test_yaml_int_is_accepted_for_a_float_field(tmp_path):
    config = parse_config(["--config", write_yaml(tmp_path / "p.yaml", "lr: 1\n")])
    assert config.lr == 1.0 and isinstance(config.lr, float)


def test_unknown_yaml_key_is_an_error_naming_the_key(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "epochs: 3\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match="learning_rat"):
        parse_config(["--config", preset])


@pytest.mark.parametrize("text, expected", [
    ("opt: adamw\nsmoothing: 0.1\n", "unknown keys 'opt' (monkeytrain calls it optimizer) and 'smoothing' "
                                     "(monkeytrain calls it label_smoothing) in"),
    ("epoch: 3\n", "unknown key 'epoch' (did you mean epochs?) in"),
    ("--lr: 0.1\n", "unknown key '--lr' (write it as lr, without the dashes) in"),
    ("sched: cosine\n", "unknown key 'sched' (the learning rate always warms up linearly for --warmup-epochs, "
                     "then follows a cosine down to 0) in"),
    ("LR: 0.1\n", "unknown key 'LR' (did you mean lr?) in"),
])
def test_an_unknown_key_names_the_key_probably_meant(tmp_path, text, expected):
    """timm's train.py names (its args.yaml), a flag's dashes and typos each get a hint; all keys at once."""
    preset = write_yaml(tmp_path / "p.yaml", text)
    with pytest.raises(UserError) as error:
        parse_config(["--config", preset])
    assert str(error.value) == f"{expected} {preset}; valid keys are the flags listed by --help."


def test_a_whole_args_yaml_of_another_trainer_is_named_in_one_line_of_its_first_keys(tmp_path):
    preset = write_yaml(tmp_path / "args.yaml", "".join(f"option_{n}: 1\n" for n in range(20)))
    with pytest.raises(UserError, match="'option_6', 'option_7' and 12 more in"):
        parse_config(["--config", preset])


@pytest.mark.parametrize("key", ["config", "--config"])
def test_a_preset_naming_another_preset_is_one_clear_sentence(tmp_path, key):
    preset = write_yaml(tmp_path / "p.yaml", f"{key}: base.yaml\nepochs: 3\n")
    with pytest.raises(UserError) as error:
        parse_config(["--config", preset])
    assert str(error.value) == (f"{preset} has a key 'config', but a preset cannot name another preset; copy that "
                                "file's keys into this one, or give that file to --config instead.")


def test_an_accelerate_config_given_to_config_says_where_it_goes(tmp_path):
    """`monkeytrain/train.py --config accelerate_configs/cpu.yaml`: the launcher's --config_file was meant."""
    accelerate_config = Path(__file__).resolve().parent.parent / "accelerate_configs" / "cpu.yaml"
    with pytest.raises(UserError) as error:
        parse_config(["--config", str(accelerate_config)])
    assert str(error.value) == (f"{accelerate_config} is an Accelerate config, not a monkeytrain preset; give it to "
                                f"accelerate launch --config_file {accelerate_config}, before monkeytrain/train.py.")


def test_a_home_folder_in_a_preset_is_the_home_folder_as_on_a_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    preset = write_yaml(tmp_path / "p.yaml", "data: ~/monkeys\ncache-dir: ~/cache\nrun-name: ~night\n")
    config = parse_config(["--config", preset])
    assert (config.data, config.cache_dir) == (str(tmp_path / "monkeys"), str(tmp_path / "cache"))
    assert config.run_name == "~night"  # a name, not a path


def test_a_run_folder_given_to_config_names_its_config_yaml(tmp_path):
    run = tmp_path / "runs" / "cut"
    run.mkdir(parents=True)
    with pytest.raises(UserError, match=f"^config file {run} is a folder; give --config a YAML file.$"):
        parse_config(["--config", str(run)])
    (run / "config.yaml").write_text("epochs: 3\n")
    with pytest.raises(UserError) as error:
        parse_config(["--config", str(run)])
    assert str(error.value) == f"config file {run} is a folder; give --config a YAML file ({run / 'config.yaml'}?)."


def test_a_quoted_whole_number_is_a_number_as_a_quoted_decimal_is(tmp_path):
    """As timm's train.py reads its YAML (argparse converts text with the flag's type): epochs: "10" is 10."""
    config = parse_config(["--config", write_yaml(tmp_path / "p.yaml", 'epochs: "10"\nlr: "0.01"\n'
                                                                        "num-workers: '2'\n")])
    assert (config.epochs, config.lr, config.num_workers) == (10, 0.01, 2) and type(config.epochs) is int


@pytest.mark.parametrize("text, key", [
    ("epochs: three\n", "epochs"),
    ("epochs: 2.5\n", "epochs"),
    ("lr: fast\n", "lr"),
    ("cpu: 1\n", "cpu"),
    ("model: 18\n", "model"),
])
def test_wrong_yaml_type_is_an_error_naming_the_key(tmp_path, text, key):
    preset = write_yaml(tmp_path / "p.yaml", text)
    with pytest.raises(UserError, match=f"'{key}'"):
        parse_config(["--config", preset])


@pytest.mark.parametrize("text, advice", [
    ('epochs: "ten"\n', "give a whole number, such as 10"),
    ("epochs:\n", "give a value, or leave the key out for the default"),
    ("lr: [0.1, 0.2]\n", "give a number, such as 0.001"),
    ('tta_flip: "yes"\n', "give true or false"),
    ("run_name: 2024\n", "put it in quotes to give it as text"),
    ("optimizer: 1\n", "give sgd or adamw"),
])
def test_a_wrong_yaml_type_says_what_to_write_instead(tmp_path, text, advice):
    with pytest.raises(UserError) as error:
        parse_config(["--config", write_yaml(tmp_path / "p.yaml", text)])
    assert str(error.value).endswith(f"; {advice}.")


def test_a_yaml_number_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as text; in a float field it is the number everyone means."""
    config = parse_config(["--config", write_yaml(tmp_path / "p.yaml", "lr: 1e-3\nweight_decay: 5E-4\n")])
    assert (config.lr, config.weight_decay) == (0.001, 0.0005)


@pytest.mark.parametrize("text", ["mixed_precision: no\n", "mixed-precision: 'no'\n"])
def test_an_unquoted_no_is_the_precision_no(tmp_path, text):
    """YAML 1.1 reads `no` as false; Accelerate's configs write `mixed_precision: no` unquoted."""
    assert parse_config(["--config", write_yaml(tmp_path / "p.yaml", text)]).mixed_precision == "no"


@pytest.mark.parametrize("text, message", [
    ("lr: 0.1\nepochs: 3\nlr: 0.2\n", "gives 'lr' twice (again on line 3); keep one of them."),
    ("batch-size: 16\nbatch_size: 32\n", "sets --batch-size twice, as 'batch-size' and as 'batch_size'"),
    ("max-steps-per-epoch: 3\nmax_batches_per_epoch: 4\n", "sets --max-batches-per-epoch twice"),
])
def test_a_preset_setting_one_flag_twice_is_an_error_naming_it(tmp_path, text, message):
    """YAML keeps the last of two equal keys silently: the other may be the one that was edited."""
    with pytest.raises(UserError) as error:
        parse_config(["--config", write_yaml(tmp_path / "p.yaml", text)])
    assert message in str(error.value)


def test_a_yaml_merge_may_override_what_it_merges(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "lr: 0.05\n<<: {lr: 0.2, epochs: 4}\n")
    assert (parse_config(["--config", preset]).lr, parse_config(["--config", preset]).epochs) == (0.05, 4)


def test_missing_and_malformed_yaml_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(UserError, match="YAML"):
        parse_config(["--config", write_yaml(tmp_path / "bad.yaml", "epochs: [1,\n")])
    with pytest.raises(UserError, match="mapping"):
        parse_config(["--config", write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")])


@pytest.mark.parametrize("flags, flag_named", [
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--val-fraction", "-0.1"], "--val-fraction"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--image-size", "8"], "--image-size"),
    (["--lr", "0"], "--lr"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--min-crop-scale", "0"], "--min-crop-scale"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--tta-shift", "-1"], "--tta-shift"),
    (["--min-train-size", "8"], "--min-train-size"),
    (["--image-size", "64", "--min-train-size", "96"], "--min-train-size"),
    (["--full-size-fraction", "1.5"], "--full-size-fraction"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--rotation", "inf"], "--rotation must be a finite number"),
    (["--mixup-alpha", "inf"], "--mixup-alpha must be a finite number"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number"),
    (["--epochs", "99999999999"], "--epochs must be at most"),
    (["--momentum", "1.5"], "--momentum"),
    (["--momentum", "-0.5"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--color-jitter", "-1"], "--color-jitter"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
])
def test_invalid_flag_values_are_user_errors_naming_the_flag(flags, flag_named):
    with pytest.raises(UserError, match=flag_named):
        parse_config(flags)


def test_invalid_value_from_yaml_is_also_rejected(tmp_path):
    with pytest.raises(UserError, match="--val-fraction"):
        parse_config(["--config", write_yaml(tmp_path / "p.yaml", "val_fraction: 1.0\n")])


def test_choice_flags_reject_other_values():
    with pytest.raises(UserError, match="argument --optimizer: invalid choice: 'lamb'"):
        parse_config(["--optimizer", "lamb"])


def test_data_and_explicit_dirs_together_are_rejected():
    with pytest.raises(UserError, match="--data"):
        parse_config(["--data", "a", "--train-dir", "b", "--val-dir", "c"])


@pytest.mark.parametrize("flags", [["--data", ""], ["--train-dir", "", "--val-dir", "v"], ["--val-dir", ""],
                                   ["--test-dir", ""], ["--pretrained", ""], ["--output-dir", ""],
                                   ["--run-name", ""]])
def test_an_empty_path_is_refused_not_taken_for_the_default(flags):
    """`--data "$DATA"` with DATA unset: training on the default folder or the synthetic set would be silent."""
    with pytest.raises(UserError, match=f"^{flags[0]} is empty"):
        parse_config(flags)


def test_an_empty_path_in_a_config_file_is_refused_too(tmp_path):
    with pytest.raises(UserError, match="^--data is empty"):
        parse_config(["--config", write_yaml(tmp_path / "p.yaml", "data: ''\n")])


@pytest.mark.parametrize("flags, message", [
    (["--model", "resnet_nope"], "unknown timm model 'resnet_nope'"),
    (["--pretrained", "runs/nosuch.safetensors"], "runs/nosuch.safetensors does not exist"),
    (["--pretrained", "notes.txt"], "notes.txt is neither a readable .safetensors file"),
    (["--pretrained", "whole_model.pt"], "whole_model.pt is a torch.save file that could not be read as weights"),
])
def test_model_and_weights_are_checked_with_the_flags_before_any_data_is_read(flags, message, tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole_model.pt")
    with pytest.raises(UserError, match=message):
        parse_config(["--data", "/no/such/data", *flags])  # only read later, when the data is scanned


def test_debug_preset_applies_beneath_explicit_flags():
    config = parse_config(["--debug", "--image-size", "32"])
    assert config.image_size == 32  # the explicit flag wins
    for name, value in DEBUG_PRESET.items():
        if name != "image_size":
            assert getattr(config, name) == value
    # and the preset really differs from the CPU recipe's values, or this test proves nothing
    plain = parse_config(["--cpu"])
    assert all(getattr(plain, name) != value for name, value in DEBUG_PRESET.items() if name != "cpu")


def test_debug_preset_lies_beneath_the_yaml_preset(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "epochs: 5\ndebug: true\n")
    config = parse_config(["--config", preset])
    assert config.debug is True
    assert config.epochs == 5  # YAML beats the debug preset
    assert config.max_batches_per_epoch == DEBUG_PRESET["max_batches_per_epoch"]


def test_no_debug_flag_cancels_a_debug_yaml(tmp_path):
    preset = write_yaml(tmp_path / "p.yaml", "debug: true\n")
    config = parse_config(["--config", preset, "--no-debug"])
    assert config.debug is False
    assert config.epochs == parse_config([]).epochs


def test_pretrained_flag_alone_means_hub_and_takes_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file({"weight": torch.zeros(1)}, tmp_path / "w.safetensors")  # its header is read with the flags
    assert parse_config([]).pretrained is None
    assert parse_config(["--pretrained"]).pretrained == "hub"
    assert parse_config(["--pretrained", "w.safetensors"]).pretrained == "w.safetensors"


@pytest.mark.parametrize("text, weights", [("pretrained: true\n", "hub"), ("pretrained: no\n", None)])
def test_pretrained_true_or_false_in_a_preset_means_what_the_flag_or_its_absence_does(tmp_path, text, weights):
    """timm's train.py saves `pretrained: true` or `false` in its args.yaml."""
    assert parse_config(["--config", write_yaml(tmp_path / "p.yaml", text)]).pretrained == weights


def test_saved_config_loads_back_identically(tmp_path):
    save_file({"weight": torch.zeros(1)}, tmp_path / "x.safetensors")  # its header is read with the flags
    config = parse_config(["--lr", "0.01", "--model", "resnet34", "--pretrained", str(tmp_path / "x.safetensors"),
                           "--cpu", "--val-fraction", "0"])
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    named = dataclasses.replace(config, data=SYNTHETIC)  # no data found: the synthetic set, by its name
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == named
    assert load_yaml_preset(tmp_path / "config.yaml") == dataclasses.asdict(named)


def test_the_saved_config_names_the_data_that_the_environment_or_the_default_folder_gave(tmp_path, monkeypatch):
    """Saved as null, a run repeated with --config from another shell would train on that shell's data."""
    monkeys = tmp_path / "monkeys"
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(monkeys))
    saved = write_yaml(tmp_path / "config.yaml", config_yaml(parse_config(["--cpu"])))
    monkeypatch.delenv("MONKEYTRAIN_DATA")  # another shell, where the run is repeated from its config.yaml
    assert parse_config(["--config", saved]).data == str(monkeys)
    default = tmp_path / "data" / "10-monkey-species"  # the working folder's, as an absolute path
    default.mkdir(parents=True)
    assert Path(yaml.safe_load(config_yaml(parse_config(["--cpu"])))["data"]) == default.resolve()


def test_the_saved_config_of_a_run_resumed_from_a_state_folder_repeats_as_a_new_run(tmp_path):
    """A state folder continues its own run only: recorded as given, another run would be refused it."""
    resumed = parse_config(["--cpu", "--resume", "runs/cut/state/step-00000005"])
    saved = write_yaml(tmp_path / "config.yaml", config_yaml(resumed))
    assert parse_config(["--config", saved, "--run-name", "again"]).resume == "auto"  # a new run; none to resume


def test_the_saved_config_names_the_synthetic_set_and_no_data_for_split_folders():
    assert yaml.safe_load(config_yaml(parse_config(["--cpu"])))["data"] == SYNTHETIC  # see test_synthetic
    assert yaml.safe_load(config_yaml(parse_config(["--cpu", "--train-dir", "train", "--val-dir", "val"])))["data"] \
        is None


def test_the_save_schedule_help_says_how_often_the_clock_is_looked_at():
    import torch

    from monkeytrain.config import FIELDS
    from monkeytrain.preemption import stop_check_interval

    help_text = FIELDS["save_every_minutes"].metadata["help"]
    assert stop_check_interval(torch.device("cpu")) == 1 and "after every optimizer step on the CPU" in help_text
    assert f"every {stop_check_interval(torch.device('cuda'))}th on a GPU" in help_text


def test_the_cache_dir_help_names_everything_runs_keep_there():
    from monkeytrain.cachefolder import KINDS
    from monkeytrain.config import FIELDS

    words = {"views": "stored views", "scans": "scans", "stats": "statistics", "synthetic": "synthetic set",
             "compiled": "torch.compile"}
    assert set(words) == set(KINDS) - {"unfinished"}  # a new kind of entry needs a word here and in the help
    help_text = FIELDS["cache_dir"].metadata["help"]
    assert [kind for kind, word in words.items() if word not in help_text] == []


def test_the_val_dir_help_says_which_split_the_folder_becomes(tmp_path):
    """Given alone with --train-dir, --val-dir is the test split (as Kaggle's validation/), not the selection one."""
    from monkeytrain.config import FIELDS
    from monkeytrain.data.layout import folders_from_explicit

    train, val, test = (tmp_path / name for name in ("train", "val", "test"))
    for folder in (train, val, test):
        folder.mkdir()
    without_test, with_test = folders_from_explicit(str(train), str(val), None), folders_from_explicit(
        str(train), str(val), str(test))
    assert (without_test.selection, without_test.test) == (None, val) and with_test.selection == val
    help_text = " ".join(FIELDS["val_dir"].metadata["help"].split())
    assert "with --test-dir it chooses the best epoch" in help_text
    assert "without, it is scored as the test split" in help_text and "--val-fraction of the --train-dir" in help_text


def test_every_field_has_help_text_and_a_flag():
    from monkeytrain.config import build_parser

    options = {a.dest for a in build_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert f.name in options


def test_help_shows_no_default_of_none_beside_the_words_that_say_what_it_means():
    """--num-workers says "Default: the CPU cores ..."; "(default: None)" after it would contradict that."""
    from monkeytrain.config import build_parser

    helps = {a.dest: a.help for a in build_parser()._actions}
    assert [name for name, text in helps.items() if text and "default: None" in text] == []
    assert helps["epochs"].endswith(f"(default: 150; CPU recipe: {CPU_RECIPE['epochs']})")


def test_user_error_from_config_ends_with_one_line_and_status_2(capsys):
    main = exits_cleanly_on_user_error(parse_config)
    with pytest.raises(SystemExit) as exit_info:
        main(["--val-fraction", "1.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val-fraction" in err and "Traceback" not in err


@pytest.mark.parametrize("asked, launcher, hardware, expected", [
    (None, None, Hardware(None), ("no", None)),          # the CPU
    (None, None, Hardware((9, 0)), ("bf16", None)),      # H100/H200: bf16 in hardware
    (None, None, Hardware((8, 0)), ("bf16", None)),      # A100
    (None, None, Hardware((7, 5)), ("fp16", None)),      # T4: bf16 emulated, slower than fp32
    (None, "no", Hardware((7, 5)), ("no", None)),        # the launcher said fp32
    (None, "bf16", Hardware((9, 0)), ("bf16", None)),
    ("bf16", "no", Hardware((7, 0)), ("bf16", None)),    # asked for: kept, even where it is emulated
    ("bf16", None, Hardware(None, cpu_bf16=False), ("bf16", None)),
    (None, "bf16", Hardware(None, cpu_bf16=True), ("bf16", None)),  # a CPU with AVX512-BF16 or AMX
])
def test_the_precision_is_the_one_asked_for_else_the_launchers_else_the_devices_fastest(
        asked, launcher, hardware, expected):
    assert choose_precision(asked, launcher, hardware) == expected


def test_the_launchers_bf16_on_a_gpu_that_emulates_it_trains_in_fp16_and_says_so():
    precision, note = choose_precision(None, "bf16", Hardware((7, 0)))
    assert precision == "fp16"
    assert note == ("bf16 from the Accelerate config is only emulated on this GPU (compute capability 7.0), slower "
                    "than fp32: training in fp16; pass --mixed-precision bf16 to insist.")


def test_the_launchers_bf16_on_a_cpu_that_emulates_it_trains_in_fp32_and_says_so():
    precision, note = choose_precision(None, "bf16", Hardware(None, cpu_bf16=False))
    assert precision == "no"
    assert note == ("bf16 from the Accelerate config is only emulated on this CPU (no AVX512-BF16 or AMX "
                    "instructions), slower than fp32: training in fp32; pass --mixed-precision bf16 to insist.")


def test_a_run_on_a_cpu_without_bf16_instructions_trains_the_launchers_bf16_in_fp32(monkeypatch, capsys):
    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as a default config written on a GPU machine
    monkeypatch.setattr("monkeytrain.distributed.cpu_does_bf16", lambda: False)
    AcceleratorState._reset_state(True)
    try:
        accelerator = make_accelerator(parse_config(["--cpu", "--cpu-threads", str(torch.get_num_threads())]))
        assert accelerator.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(True)
    assert "only emulated on this CPU" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [(" BF16", "bf16"), ("no", "no"), ("", None)])
def test_the_launchers_precision_is_read_in_any_case(monkeypatch, value, expected):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", value)
    assert launcher_precision() == expected


@pytest.mark.parametrize("value", ["banana", "fp8"])
def test_a_launcher_precision_we_cannot_train_in_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", value)
    with pytest.raises(UserError, match=f"ACCELERATE_MIXED_PRECISION='{value}' .* is not one of no, fp16, bf16"):
        make_accelerator(parse_config(["--cpu"]))


def unknown_flag_line(argv: list[str]) -> str:
    with pytest.raises(UserError) as error:
        parse_config(argv)
    return str(error.value)


@pytest.mark.parametrize("flag, hint", [
    # timm's train.py, whose spelling was nearest to a flag of ours that means something else
    ("--sched", "(--sched: the learning rate always warms up linearly for --warmup-epochs, then follows a cosine"),
    ("--min-lr", "(--min-lr: the learning rate always warms up"),
    ("--initial-checkpoint", "(--initial-checkpoint: start from a weights file with --pretrained FILE)"),
    ("--num-classes", "(--num-classes: the classes are the class folders of the data)"),
    ("--reprob", "(did you mean --random-erasing?)"),
    ("--remode", "(--remode: --random-erasing always fills one rectangle an image with per-pixel noise"),
    ("--aa", "(--aa: no AutoAugment or RandAugment;"),
    ("--vflip", "(--vflip: no vertical flip; --hflip mirrors left and right)"),
    ("--mean", "(--mean: the normalisation is measured on the training split"),
    ("--std", "(--std: the normalisation is measured on the training split"),
    ("--crop-pct", "(--crop-pct: evaluation always takes the centre 0.875"),
    ("--interpolation", "(--interpolation: images are always resized bilinearly)"),
    ("--device", "(--device: the launcher picks the device; --cpu trains on the CPU"),
    ("--local-rank", "(--local-rank: each process takes its rank from the environment its launcher sets"),
    ("--grad-checkpointing", "(--grad-checkpointing: no gradient checkpointing;"),
    ("--channels-last", "(--channels-last: monkeytrain always trains in the channels-last memory format)"),
    ("--sync-bn", "(--sync-bn: there is no SyncBatchNorm; each process normalises its own batches"),
    ("--dist-bn", "(--dist-bn: there is no SyncBatchNorm;"),
    ("--drop", "(did you mean --drop-rate?)"),
    ("--drop-path", "(did you mean --drop-path-rate?)"),
    ("--eval-metric", "(did you mean --select-on?)"),
    ("--resume_from_checkpoint", "(did you mean --resume?)"),  # Hugging Face's Trainer
    # Accelerate's and torchrun's flags given after the script instead of before it
    ("--num_processes", "(--num_processes: a flag of accelerate launch: put it before monkeytrain/train.py)"),
    ("--num-processes", "(--num-processes: a flag of accelerate launch: put it before monkeytrain/train.py)"),
    ("--nproc_per_node", "(--nproc_per_node: a flag of torchrun: put it before monkeytrain/train.py)"),
    # ours with underscores, and typos, still get theirs
    ("--num_workers", "(did you mean --num-workers?)"),
    ("--lrr", "(did you mean --lr?)"),
])
def test_another_trainers_flag_gets_what_to_do_here_not_the_nearest_spelling(flag, hint):
    line = unknown_flag_line([flag, "1"])
    assert line.startswith(f"unrecognized arguments: {flag} 1 {hint}") and line.count("did you mean") <= 1


@pytest.mark.parametrize("flag", ["--sched", "--std", "--mean", "--drop", "--aa", "--device", "--interpolation"])
def test_a_far_spelling_gets_no_hint_of_a_flag_that_means_something_else(flag):
    """difflib at 0.8, as for a preset's keys: --sched is not --seed (0.77), --std not --seed."""
    line = unknown_flag_line([flag + "x", "1"])
    assert "did you mean" not in line, line


def test_unknown_flags_of_both_kinds_are_told_together():
    line = unknown_flag_line(["--sched", "cosine", "--opt", "sgd"])
    assert line.startswith("unrecognized arguments: --sched cosine --opt sgd (did you mean --optimizer?) (--sched: ")


def test_timms_short_flags_for_batch_size_and_workers_are_taken():
    config = parse_config(["-b", "8", "-j", "0", "--cpu"])
    assert (config.batch_size, config.num_workers) == (8, 0)
    assert parse_config(["-b16", "--cpu"]).batch_size == 16


def test_the_launcher_flags_named_are_the_launchers_own():
    """So that the hint never tells someone to move a flag that the launcher would refuse too."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from monkeytrain.config import LAUNCHER_FLAG, UNMATCHED_FLAGS

    accelerate_flags = launch_command_parser()._option_string_actions
    torchrun_flags = get_args_parser()._option_string_actions
    for name, why in UNMATCHED_FLAGS.items():
        if why == LAUNCHER_FLAG.format("accelerate launch"):
            assert f"--{name}" in accelerate_flags, name
        elif why == LAUNCHER_FLAG.format("torchrun"):
            assert f"--{name}" in torchrun_flags, name


def test_drop_rates_are_flags_recorded_in_config_yaml_and_zero_by_default():
    assert (parse_config([]).drop_rate, parse_config([]).drop_path_rate) == (0.0, 0.0)
    config = parse_config(["--drop-rate", "0.2", "--drop-path-rate", "0.1"])
    recorded = yaml.safe_load(config_yaml(config))
    assert (recorded["drop_rate"], recorded["drop_path_rate"]) == (0.2, 0.1)
    for flag in ("--drop-rate", "--drop-path-rate"):
        with pytest.raises(UserError, match=f"^{flag} must be in \\[0, 1\\); "):
            parse_config([flag, "1"])


def test_the_saved_config_names_what_the_run_read_by_absolute_paths(tmp_path, monkeypatch):
    """A relative --data was recorded as typed: the run's config.yaml given from another folder found no such
    folder there, or silently trained on another folder of that name."""
    begun = tmp_path / "project"
    (begun / "data").mkdir(parents=True)
    save_file({"weight": torch.zeros(1)}, begun / "w.safetensors")
    monkeypatch.chdir(begun)
    given = {"--data": "data", "--pretrained": "w.safetensors", "--cache-dir": "cache"}
    recorded = yaml.safe_load(config_yaml(parse_config(["--cpu", *[part for item in given.items() for part in item]])))
    assert {flag: recorded[flag[2:].replace("-", "_")] for flag in given} == {
        flag: str(begun / path) for flag, path in given.items()}
    splits = yaml.safe_load(config_yaml(parse_config(["--cpu", "--train-dir", "a", "--val-dir", "b", "--test-dir",
                                                      "c"])))
    assert [splits[name] for name in ("train_dir", "val_dir", "test_dir")] == [str(begun / n) for n in "abc"]
    saved = write_yaml(begun / "config.yaml", config_yaml(parse_config(["--cpu", "--data", "data"])))
    monkeypatch.chdir(tmp_path)  # another folder, where the run is repeated from its config.yaml
    assert parse_config(["--config", saved]).data == str(begun / "data")


@pytest.mark.parametrize("flags, name, kept", [(["--data", SYNTHETIC], "data", SYNTHETIC),
                                               (["--pretrained"], "pretrained", "hub")])
def test_a_value_that_names_no_path_is_recorded_as_given(flags, name, kept):
    assert yaml.safe_load(config_yaml(parse_config(["--cpu", *flags])))[name] == kept


def test_a_second_config_is_refused_rather_than_the_first_dropped(tmp_path):
    """--config m99.yaml --config e1.yaml trained the default model: the first preset was silently dropped."""
    model, experiment = write_yaml(tmp_path / "m99.yaml", "model: resnet50\n"), write_yaml(tmp_path / "e1.yaml",
                                                                                          "epochs: 3\n")
    with pytest.raises(UserError) as refused:
        parse_config(["--config", model, "--cpu", "--config", experiment])
    assert str(refused.value) == (f"--config is given twice ({model}, then {experiment}), and a run reads one "
                                  "preset; put the keys of both in one file, or give the values of one as flags.")


@pytest.mark.parametrize("text, where", [
    ("epochs: 3\nlr: [0.1\nmodel: resnet18\n", "line 3, column 6: expected ',' or ']', but got ':', while parsing a "
                                               "flow sequence that began on line 2"),
    ("epochs: 3\n  lr: 0.1\n", "line 2, column 5: mapping values are not allowed here"),
    ("epochs: !!int three\n", "invalid literal for int() with base 10: 'three'"),  # was a traceback
])
def test_invalid_yaml_names_the_line_and_column(tmp_path, text, where):
    """'not valid YAML (ScannerError)' left the user to find the mistake in the file."""
    preset = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as refused:
        parse_config(["--config", preset])
    assert str(refused.value) == f"config file {preset} is not valid YAML ({where}); fix its syntax."
