"""An average of the weights over training (timm's EMA with decay warm-up), or its no-op twin.

Both share one interface (`model`, `advance()`, `apply()`, `state_dict()`), so the
training loop never asks whether averaging is on. An update is two halves, so that
a CUDA graph can replay the second: `advance()` on the host counts it and puts its
decay in a tensor; `apply()` averages on the device, reading the decay from that
tensor (a Python float would be frozen into the graph at capture).
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

    def advance(self) -> None:
        pass

    def apply(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EmaWeights:
    """EMA of the parameters and floating-point buffers (batch-norm statistics too),
    after every optimizer step, with timm's decay warm-up; integer buffers are copied.

    timm's ModelEmaV3 holds the average and gives each update's decay; this wrapper counts the
    updates, so the warm-up continues where it stopped after a resume, and averages itself (see `apply`).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.live = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=WARMUP_POWER)
        self.model = self.ema.module.requires_grad_(False)
        self.updates = 0
        self.weight = torch.zeros((), device=next(model.parameters()).device)  # 1 - the next apply()'s decay
        # (average, live) tensor pairs, paired once: state_dict() twice costs about 0.9 ms of host time
        # (ResNet-18, one CPU core), every optimizer step. Its tensors alias the weights and buffers,
        # which load_state_dict copies into in place.
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self.copied = unzipped([pair for pair in pairs if not pair[0].is_floating_point()])
        self.averaged = unzipped([pair for pair in pairs if pair[0].is_floating_point()])

    def advance(self) -> None:
        """Count one update and set its decay (host work: outside a CUDA graph)."""
        self.updates += 1
        self.weight.fill_(1 - self.ema.get_decay(self.updates))

    def apply(self) -> None:
        """average += (1 - decay) * (live - average), the decay as advance() set it; integer buffers
        are copied. Device work only, so a CUDA graph may replay it. Not timm's apply_update_: that
        hands the weight to _foreach_lerp_ as a Python number, which a tensor only becomes by a host
        sync."""
        if self.copied[0]:
            torch._foreach_copy_(*self.copied)
        move_towards(*self.averaged, self.weight)

    def current_decay(self) -> float:
        """The decay the last update used (0 before the second one: that copies the weights)."""
        return self.ema.get_decay(self.updates)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = state["updates"]


def unzipped(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """[(a, b), ...] -> ([a, ...], [b, ...])."""
    return [first for first, _ in pairs], [second for _, second in pairs]


def move_towards(averages: list[torch.Tensor], values: list[torch.Tensor], weight: torch.Tensor) -> None:
    """averages += weight * (values - averages), in place, `weight` a 0-dim tensor read on the device.

    On a GPU, three multi-tensor kernels (a 0-dim tensor weight keeps _foreach_lerp_ off its fused
    path, and would cost a launch per tensor); on the CPU, which loops over the tensors anyway, one
    in-place lerp each, with no temporary copy of the weights."""
    if averages[0].is_cuda:
        change = torch._foreach_sub(values, averages)
        torch._foreach_mul_(change, weight)
        torch._foreach_add_(averages, change)
    else:
        torch._foreach_lerp_(averages, values, [weight] * len(averages))


def weight_averager(model: torch.nn.Module, ema_decay: float) -> LiveWeights | EmaWeights:
    """`model` is the plain module (not DDP- or compile-wrapped); decay 0 means no EMA."""
    return EmaWeights(model, ema_decay) if ema_decay > 0 else LiveWeights(model)
