"""An average of the weights over training (timm's EMA with decay warm-up), or its no-op twin.

Both share one interface (`model`, `update()`, `state_dict()`), so the training
loop never asks whether averaging is on.
"""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3

# The decay after n updates is min(decay, 1 - (1 + n) ** -WARMUP_POWER): the
# average forgets the initial weights within a few dozen steps, whatever the
# run length, and reaches the full decay only in long runs (0.998 after about
# 4,000 steps). timm's docs suggest 3/4 for runs under a few hundred thousand steps.
WARMUP_POWER = 0.75


class LiveWeights:
    """No averaging: evaluate and save the model being trained."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def update(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EmaWeights:
    """EMA of the parameters and floating-point buffers (batch-norm statistics too),
    after every optimizer step, with timm's decay warm-up; integer buffers are copied.

    timm's ModelEmaV3 does the averaging (foreach lerp); this wrapper counts the
    updates, so the warm-up continues where it stopped after a resume.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.live = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=WARMUP_POWER)
        self.model = self.ema.module.requires_grad_(False)
        self.updates = 0

    def update(self) -> None:
        self.updates += 1
        self.ema.update(self.live, step=self.updates)

    def current_decay(self) -> float:
        """The decay the last update used (0 before the second one: that copies the weights)."""
        return self.ema.get_decay(self.updates)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = state["updates"]


def weight_averager(model: torch.nn.Module, ema_decay: float) -> LiveWeights | EmaWeights:
    """`model` is the plain module (not DDP- or compile-wrapped); decay 0 means no EMA."""
    return EmaWeights(model, ema_decay) if ema_decay > 0 else LiveWeights(model)
