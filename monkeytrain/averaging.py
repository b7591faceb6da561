"""Exponential moving average of the weights, or its no-op twin, behind one interface."""

from __future__ import annotations

import copy

import torch


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
    """EMA of parameters and floating-point buffers (batch-norm statistics too):
    average <- decay * average + (1 - decay) * live, after every optimizer step.

    The decay is fixed (no warmup), so the average starts from the initial
    weights; for runs of few steps use a smaller decay or none.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)
        live = list(model.parameters()) + list(model.buffers())
        average = list(self.model.parameters()) + list(self.model.buffers())
        floating = {i for i, t in enumerate(live) if t.is_floating_point()}
        self.live_float = [live[i] for i in sorted(floating)]
        self.average_float = [average[i] for i in sorted(floating)]
        self.counters = [(average[i], live[i]) for i in range(len(live)) if i not in floating]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average_float, self.live_float, 1.0 - self.decay)
        for average, live in self.counters:  # e.g. batch norm's num_batches_tracked
            average.copy_(live)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def weight_averager(model: torch.nn.Module, ema_decay: float) -> LiveWeights | EmaWeights:
    """`model` is the plain module (not DDP- or compile-wrapped); decay 0 means no EMA."""
    return EmaWeights(model, ema_decay) if ema_decay > 0 else LiveWeights(model)
