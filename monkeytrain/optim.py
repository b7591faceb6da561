"""Optimizer with decay-free norm and bias parameters, and a warmup-then-cosine schedule."""

from __future__ import annotations

import math

import torch

from monkeytrain.config import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weights decay; biases and norm scales (1-D tensors) do not, as in timm."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW; fused kernels on the GPU, foreach on the CPU."""
    groups = parameter_groups(model, config.weight_decay)
    kernels = kernel_options(device)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999), **kernels)
    nesterov = config.momentum > 0  # torch refuses Nesterov without momentum; --momentum 0 is plain SGD
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov, **kernels)


def kernel_options(device: torch.device) -> dict:
    """Fused kernels on the GPU (one launch per step, the learning rate read on the device), foreach on the CPU."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def hold_lr_in_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Keep each fused parameter group's learning rate in a 0-dim float32 tensor on `device`: the
    scheduler then fills it in place and the fused kernels read it there, so a CUDA graph replays the
    current rate (a Python float would be frozen into it at capture). Done from the first step, not
    only for graphs: AdamW computes with a float32 rate a little differently than with a Python
    float, and graphed and eager runs should compute alike. Foreach kernels keep the float (a tensor
    rate would cost them a host sync). A group already holding such a tensor keeps it."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Ready the optimizer's step for a CUDA graph: the learning rate in tensors (above), and AdamW's
    `capturable` flag, without which its step refuses a capture (SGD has no such flag). Call it after
    a saved state is loaded, which puts back what was saved."""
    hold_lr_in_tensors(optimizer, device)
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear from 1/warmup to 1, then cosine down to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (not per batch when accumulating gradients)."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total)
    )
