"""The train.py flags a study is given: those tune sets itself refused, the data checked before any trial,
the fixed ones a study keeps (tune_study.check_same_search), and the machine's ones its best run gets back.
"""

from __future__ import annotations

from pathlib import Path

from monkeytrain.errors import UserError

# Flags that say where and how fast trials run, not what they train: a study may continue with others.
RUNTIME_FIELDS = {"cpu_threads", "num_workers", "cache_dir", "report_to", "log_checkpoint", "data_pipeline",
                  "compile", "save_every", "save_every_minutes", "keep_states"}
# tune names every trial's run directory itself and never lets a trial see the test split.
RESERVED_FIELDS = ("output_dir", "run_name", "resume", "score_test")


def fixed_flags(train_flags: list[str], space: dict) -> dict:
    """The train.py flags given (a --config preset's path among them), checked against the space."""
    given = given_flags(train_flags)
    for name in RESERVED_FIELDS:
        if name in given:
            raise UserError(f"--{name.replace('_', '-')} is set by monkeytrain tune itself (each trial's run "
                            "directory is under --study-dir, and no trial sees the test split); drop it.")
    clash = sorted(given.keys() & space.keys())
    if clash:
        raise UserError(f"--{clash[0].replace('_', '-')} is given as a flag and searched in the space; "
                        "drop one of them.")
    return {name: value for name, value in given.items() if name not in RUNTIME_FIELDS}


def given_flags(train_flags: list[str]) -> dict:
    """The train.py flags given, by field name (an old name must not dodge the checks; open_search's
    parse_config has warned about it)."""
    from monkeytrain.config import build_parser as train_parser, rename_old_names

    return rename_old_names(vars(train_parser().parse_args(train_flags)), say_so=False)


def machine_flags(train_flags: list[str]) -> list[str]:
    """The machine's flags the study was given, as flags or in its --config preset, which best_config.yaml
    leaves to whoever reuses it: the study's final run trains where and as its trials did (a --cpu study on
    a GPU machine)."""
    from monkeytrain.config import load_yaml_preset, rename_old_names
    from monkeytrain.tune_report import MACHINE_FIELDS
    from monkeytrain.tune_space import as_flags

    given = given_flags(train_flags)
    preset = rename_old_names(load_yaml_preset(Path(given["config"])), say_so=False) if given.get("config") else {}
    machine = {**preset, **given}
    return as_flags({name: machine[name] for name in MACHINE_FIELDS if name in machine})


def with_preset_values(fixed: dict) -> dict:
    """The fixed flags with a --config preset's values in place of its path (the flags given override
    them, as in train.py): a preset edited between two workers of a study changes its trials as much as
    another flag would."""
    from monkeytrain.config import load_yaml_preset

    if not fixed.get("config"):
        return fixed
    preset = {name: value for name, value in load_yaml_preset(Path(fixed["config"])).items()
              if name not in RUNTIME_FIELDS}
    return {**preset, **{name: value for name, value in fixed.items() if name != "config"}}


def check_data(config) -> None:
    """A wrong data path ends the command now, not every trial one after the other; so does a search
    whose trials would pick their best epochs on the test split."""
    from monkeytrain.data.dataset import find_split_folders, user_data_root

    root = user_data_root(config)
    if root is None and not (config.train_dir or config.val_dir or config.test_dir):
        return  # the built-in synthetic data set, which has a validation split
    if find_split_folders(config, root).selection is None and config.val_fraction == 0:
        raise UserError("--val-fraction 0 would score every trial on the test split, which a search must never "
                        "see; give it a fraction of the training images to hold out (default 0.1).")
