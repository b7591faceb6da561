"""The study the workers share: it keeps the order its validation images were held out by (content hash),
and a study begun before that order, whose trials chose their best epochs on other images, takes no new trial."""

from __future__ import annotations

import optuna
import pytest

from monkeytrain import tune
from monkeytrain.tune_space import load_space, space_json
from monkeytrain.tune_study import STUDY_NAME, check_same_search, study_storage

SPACE = {"lr": optuna.distributions.FloatDistribution(0.1, 0.2)}


def scored_trial(value: float = 0.5):
    return optuna.trial.create_trial(params={"lr": 0.15}, distributions=SPACE, value=value)


def test_a_new_study_keeps_its_held_out_order_and_goes_on_with_it(tmp_path):
    study = optuna.create_study(direction="maximize")
    check_same_search(study, SPACE, {"cpu": True}, tmp_path)
    assert study.user_attrs["held_out_by"] == "content-hash"
    study.add_trial(scored_trial())
    check_same_search(study, SPACE, {"cpu": True}, tmp_path)  # a later worker, after a trial was scored
    assert study.user_attrs["held_out_by"] == "content-hash"


def test_a_study_begun_before_content_hashes_is_refused_in_one_line_before_any_trial(tmp_path, capsys, monkeypatch):
    """Its trials chose their best epochs on validation images held out by a seeded shuffle: new ones, held out
    by content hash, would be ranked against them on other images."""
    space, study_dir = tmp_path / "space.yaml", tmp_path / "study"
    space.write_text("{lr: [0.1, 0.2]}")
    older = optuna.create_study(study_name=STUDY_NAME, storage=study_storage(study_dir), direction="maximize")
    older.set_user_attr("space", space_json(load_space(space)))  # as a version before content hashes kept it
    older.add_trial(scored_trial())
    monkeypatch.setattr(tune, "work", lambda study, setup, finish_now: pytest.fail("a trial ran"))
    with pytest.raises(SystemExit) as exited:
        tune.main(["--space", str(space), "--study-dir", str(study_dir), "--cpu"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and error.count("\n") == 1, error
    assert (f"{study_dir} holds a study whose trials chose their best epochs on validation images held out the old "
            "way (by a seeded shuffle), and new trials would select on other images, so they would not compare; "
            "begin a new --study-dir (this one's trials stay where they are).") in error


def test_a_study_begun_before_content_hashes_that_scored_no_trial_goes_on_and_keeps_the_order(tmp_path):
    """Nothing to compare with: trials enqueued before any worker (the README's recipe), or a worker stopped
    in its first trial."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("space", space_json(SPACE))
    study.enqueue_trial({"lr": 0.15})
    check_same_search(study, SPACE, {}, tmp_path)
    assert study.user_attrs["held_out_by"] == "content-hash"
