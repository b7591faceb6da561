"""Choosing the best epoch: higher validation accuracy, ties to lower validation loss."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BestEpoch:
    """The best epoch so far. Fed globally reduced metrics, every rank decides alike."""

    epoch: int = -1
    accuracy: float = -math.inf
    loss: float = math.inf

    def is_beaten_by(self, accuracy: float, loss: float) -> bool:
        return accuracy > self.accuracy or (accuracy == self.accuracy and loss < self.loss)

    def update(self, epoch: int, accuracy: float, loss: float) -> bool:
        """Record `epoch` if it beats the best so far; True when it did."""
        if not self.is_beaten_by(accuracy, loss):
            return False
        self.epoch, self.accuracy, self.loss = epoch, accuracy, loss
        return True
