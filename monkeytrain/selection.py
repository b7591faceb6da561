"""Choosing the best epoch: a higher validation score, ties to lower validation loss.

The score is what --select-on names: balanced accuracy (the mean of the per-class accuracies), by default,
or plain accuracy. On a held-out set of equal classes the two rank epochs alike; on an imbalanced one, plain
accuracy rewards a model that answers the largest class, and balanced accuracy does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from monkeytrain.config import SELECT_ON_CHOICES

BALANCED, PLAIN = SELECT_ON_CHOICES
# What a state saved before --select-on existed chose on (its best is a plain accuracy)
BEFORE_SELECT_ON = PLAIN


@dataclass
class BestEpoch:
    """The best epoch so far and its figures. Fed globally reduced metrics, every rank decides alike."""

    epoch: int = -1
    accuracy: float = -math.inf
    loss: float = math.inf
    balanced_accuracy: float | None = None  # None: not measured (a state saved before it was)
    select_on: str = BALANCED  # which of the two figures chooses; one for the whole run

    @property
    def metric(self) -> str:
        """What chooses, in words: balanced accuracy or accuracy."""
        return self.select_on.replace("-", " ")

    @property
    def score(self) -> float:
        """The best epoch's figure that chose it."""
        return self.score_of(self.accuracy, self.balanced_accuracy)

    def score_of(self, accuracy: float, balanced_accuracy: float | None) -> float:
        if self.select_on == PLAIN:
            return accuracy
        return -math.inf if balanced_accuracy is None else balanced_accuracy

    def is_beaten_by(self, accuracy: float, loss: float, balanced_accuracy: float | None) -> bool:
        score, best = self.score_of(accuracy, balanced_accuracy), self.score
        return score > best or (score == best and loss < self.loss)

    def update(self, epoch: int, accuracy: float, loss: float, balanced_accuracy: float | None = None) -> bool:
        """Record `epoch` if it beats the best so far; True when it did."""
        if not self.is_beaten_by(accuracy, loss, balanced_accuracy):
            return False
        self.epoch, self.accuracy, self.loss, self.balanced_accuracy = epoch, accuracy, loss, balanced_accuracy
        return True

    @classmethod
    def from_saved(cls, saved: dict) -> "BestEpoch":
        """From a saved state's dict (dataclasses.asdict); one saved before --select-on chose on accuracy."""
        return cls(**{"select_on": BEFORE_SELECT_ON, **saved})
