"""monkeytrain.selection: higher accuracy wins; equal accuracy goes to the lower loss."""

from __future__ import annotations

from monkeytrain.selection import BestEpoch


def run(history: list[tuple[float, float]]) -> tuple[BestEpoch, list[bool]]:
    best = BestEpoch()
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
