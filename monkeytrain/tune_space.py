"""The search space of `monkeytrain tune`: a YAML mapping of TrainConfig fields to Optuna distributions.

    lr: {low: 0.01, high: 0.4, log: true}    # a range (float and int fields); log: true is log-uniform
    epochs: {low: 30, high: 90, step: 15}    # step: a grid (not together with log)
    model: [resnet18, resnet34, resnet50]    # a list: the choices (fields of any type; null: the default)

Keys are train.py flags, with dashes or underscores. Names, types and values are checked against
TrainConfig before the first trial, so a bad space costs one line, not a failed study.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution, distribution_to_json)

from monkeytrain.config import (FIELDS, RENAMED_FIELDS, TrainConfig, checked_value, field_names, field_type,
                                flag_name, read_yaml_file, validate)
from monkeytrain.errors import UserError

# Fields a search must not vary: where runs read and write, how they are tracked, and the held-out
# images that score every trial (scores on different validation images do not compare).
UNSEARCHABLE = {"data", "train_dir", "val_dir", "test_dir", "cache_dir", "output_dir", "run_name", "resume",
                "val_fraction", "score_test", "report_to", "log_checkpoint", "debug", "cpu",
                "select_on"}  # one study scores every trial on one figure
RANGE_KEYS = ("low", "high", "log", "step")


def load_space(path: Path) -> dict[str, BaseDistribution]:
    """The distributions of a space file, by field name; one clear UserError for anything wrong."""
    raw = read_yaml_file(path, "search space", "--space")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"search space {path} must map train.py flags to ranges or lists of choices.")
    space = {}
    for key, name in field_names(raw, path).items():
        name = searchable_name(key, name, path)
        space[name] = distribution(name, raw[key], f"'{key}' in {path}")
    return space


def searchable_name(key: Any, name: str, path: Path) -> str:
    name = RENAMED_FIELDS.get(name, name)
    if name not in FIELDS:
        raise UserError(f"unknown field '{key}' in {path}; search-space keys are the flags of "
                        "`monkeytrain train --help`.")
    if name in UNSEARCHABLE:
        raise UserError(f"'{key}' in {path} cannot be searched (it says where runs read or write, or which "
                        f"images score the trials); give it as a flag of monkeytrain tune instead.")
    return name


def distribution(name: str, spec: Any, where: str) -> BaseDistribution:
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where} lists no choices; give at least one.")
        choices = tuple(checked_value(name, value, where) for value in spec)
        check_values(name, choices, where)
        return CategoricalDistribution(choices)
    if isinstance(spec, dict):
        return value_range(name, spec, where)
    raise UserError(f"{where} must be a range like {{low: 0.01, high: 0.1}} or a list of choices, got {spec!r}.")


def value_range(name: str, spec: dict, where: str) -> BaseDistribution:
    kind = field_type(name)
    if kind not in (int, float):
        raise UserError(f"{where} is a {kind.__name__} field; give a list of choices instead of a range.")
    unknown = [key for key in spec if key not in RANGE_KEYS]
    if unknown or spec.get("low") is None or spec.get("high") is None:
        raise UserError(f"{where} must have low and high numbers (and optionally log, step); got {spec}.")
    low, high = (checked_value(name, spec[key], f"{where} {key}") for key in ("low", "high"))
    step = None if spec.get("step") is None else checked_value(name, spec["step"], f"{where} step")
    if not isinstance(spec.get("log", False), bool):
        raise UserError(f"{where} log must be true or false, got {spec['log']!r}.")
    check_values(name, (low, high), where)
    try:
        if kind is int:
            return IntDistribution(low, high, log=spec.get("log", False), step=1 if step is None else step)
        return FloatDistribution(low, high, log=spec.get("log", False), step=step)
    except ValueError as error:  # Optuna's own checks: low <= high, log needs low > 0, not log with step
        reason = str(error).rstrip(".")
        raise UserError(f"{where} is not a usable range ({reason}); fix low, high, log or step.") from None


def check_space_fits(space: dict[str, BaseDistribution], config: TrainConfig, path: Path) -> None:
    """Each choice and range end, set in `config` (the fixed flags of tune), must pass train.py's own checks:
    so a choice that clashes with a fixed flag (--min-train-size 48 with --image-size 32) ends the command
    now, not the study at whichever trial first samples it."""
    for name, values in space.items():
        ends = values.choices if isinstance(values, CategoricalDistribution) else (values.low, values.high)
        check_values(name, ends, f"'{flag_name(name)}' in {path}", config)


def check_values(name: str, values: tuple, where: str, base: TrainConfig | None = None) -> None:
    """Each value (a range's ends, every choice) must pass train.py's own checks, set in `base` (default:
    the defaults)."""
    for value in (v for v in values if v is not None):
        try:
            validate(dataclasses.replace(base or TrainConfig(), **{name: value}))
        except UserError as error:  # the check that failed, without train.py's advice about flags
            raise UserError(f"{where} allows {value!r}, which train.py refuses "
                            f"({str(error).split(';')[0]}); narrow it.") from None


def as_flags(params: dict[str, Any]) -> list[str]:
    """A trial's values as train.py flags; a null choice leaves the flag out (the default applies)."""
    flags: list[str] = []
    for name, value in params.items():
        if isinstance(value, bool):
            flags.append(f"--{flag_name(name)}" if value else f"--no-{flag_name(name)}")
        elif value is not None:
            flags += [f"--{flag_name(name)}", str(value)]
    return flags


def space_json(space: dict[str, BaseDistribution]) -> str:
    """The space as one comparable string: a study remembers it, so a changed space is caught."""
    return json.dumps({name: json.loads(distribution_to_json(d)) for name, d in sorted(space.items())},
                      sort_keys=True)
