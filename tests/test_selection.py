"""monkeytrain.selection: a higher score (balanced accuracy by default, or accuracy) wins; an equal one goes to
the lower loss."""

from __future__ import annotations

import dataclasses

from monkeytrain.selection import BALANCED, PLAIN, BestEpoch


def run(history: list[tuple[float, float]]) -> tuple[BestEpoch, list[bool]]:
    """Epochs of (accuracy, loss), chosen on accuracy."""
    best = BestEpoch(select_on=PLAIN)
    improved = [best.update(epoch, acc, loss) for epoch, (acc, loss) in enumerate(history, start=1)]
    return best, improved


def test_first_epoch_is_always_recorded_even_at_zero_accuracy():
    best, improved = run([(0.0, 9.0)])
    assert improved == [True] and (best.epoch, best.accuracy, best.loss) == (1, 0.0, 9.0)


def test_higher_accuracy_wins_even_with_a_higher_loss():
    best, improved = run([(0.5, 1.0), (0.6, 3.0)])
    assert improved == [True, True] and best.epoch == 2


def test_lower_accuracy_loses_even_with_a_lower_loss():
    best, improved = run([(0.6, 3.0), (0.5, 0.1)])
    assert improved == [True, False] and best.epoch == 1 and best.loss == 3.0


def test_equal_accuracy_goes_to_the_lower_loss():
    best, improved = run([(0.7, 1.0), (0.7, 0.8), (0.7, 0.9)])
    assert improved == [True, True, False]
    assert (best.epoch, best.loss) == (2, 0.8)


def test_complete_tie_keeps_the_earlier_epoch():
    best, improved = run([(0.7, 1.0), (0.7, 1.0)])
    assert improved == [True, False] and best.epoch == 1


def test_a_long_history_picks_the_right_epoch():
    history = [(0.2, 2.0), (0.5, 1.5), (0.8, 0.9), (0.8, 0.7), (0.75, 0.5), (0.8, 0.71)]
    best, improved = run(history)
    assert best.epoch == 4
    assert improved == [True, True, True, True, False, False]


# An imbalanced held-out set: 40 images of class 0, 9 of class 1. Epoch 1 always answers class 0 (82% accuracy,
# balanced 50%); epoch 2 gets 34 of the 40 and 8 of the 9 (86%, balanced 86.9%); epoch 3 gets 30 of the 40 and
# all 9 (80%, balanced 87.5%).
IMBALANCED = [(40 / 49, 0.50, 0.6), (42 / 49, (34 / 40 + 8 / 9) / 2, 0.5), (39 / 49, (30 / 40 + 9 / 9) / 2, 0.7)]


def chosen(select_on: str, history: list[tuple[float, float, float]]) -> BestEpoch:
    """Epochs of (accuracy, balanced accuracy, loss), chosen on `select_on`."""
    best = BestEpoch(select_on=select_on)
    for epoch, (accuracy, balanced, loss) in enumerate(history, start=1):
        best.update(epoch, accuracy, loss, balanced)
    return best


def test_balanced_accuracy_is_the_default_and_does_not_reward_the_majority_class():
    assert BestEpoch().select_on == BALANCED
    majority_first = [(40 / 49, 0.5, 0.6), (38 / 49, 0.8, 0.7)]  # 82% always answering class 0, then 78%
    assert chosen(PLAIN, majority_first).epoch == 1
    best = chosen(BALANCED, majority_first)
    assert (best.epoch, best.score, best.accuracy, best.balanced_accuracy) == (2, 0.8, 38 / 49, 0.8)


def test_the_two_metrics_choose_differently_on_an_imbalanced_set_and_alike_on_a_balanced_one():
    assert chosen(PLAIN, IMBALANCED).epoch == 2 and chosen(BALANCED, IMBALANCED).epoch == 3
    balanced_set = [(0.5, 0.5, 1.0), (0.7, 0.7, 1.2), (0.7, 0.7, 0.9), (0.6, 0.6, 0.1)]  # equal classes: equal figures
    assert chosen(PLAIN, balanced_set) == dataclasses.replace(chosen(BALANCED, balanced_set), select_on=PLAIN)
    assert chosen(BALANCED, balanced_set).epoch == 3  # the tie at 70% to the lower loss


def test_equal_balanced_accuracy_goes_to_the_lower_loss_whatever_the_plain_accuracy():
    best = chosen(BALANCED, [(0.9, 0.6, 1.0), (0.5, 0.6, 0.8), (0.95, 0.6, 0.9)])
    assert (best.epoch, best.loss) == (2, 0.8)


def test_a_state_saved_before_select_on_existed_goes_on_choosing_on_accuracy():
    best = BestEpoch.from_saved({"epoch": 2, "accuracy": 0.8, "loss": 0.5})
    assert (best.select_on, best.balanced_accuracy, best.score) == (PLAIN, None, 0.8)
    assert not best.update(3, 0.7, 0.4, 0.99)  # a higher balanced accuracy does not count against a plain best
    assert best.update(4, 0.85, 0.6, 0.1) and best.epoch == 4
    assert BestEpoch.from_saved(dataclasses.asdict(BestEpoch(1, 0.5, 1.0, 0.4))) == BestEpoch(1, 0.5, 1.0, 0.4)
