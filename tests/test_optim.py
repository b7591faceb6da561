"""monkeytrain.optim: decay-free 1-D parameters and the warmup-then-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from monkeytrain.config import parse_config
from monkeytrain.model import create_model
from monkeytrain.optim import (build_optimizer, build_scheduler, hold_lr_in_tensors, make_capturable,
                               parameter_groups, warmup_cosine)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return create_model("test_resnet", 3)


def test_all_one_dimensional_parameters_get_no_weight_decay(model):
    decay, no_decay = parameter_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    one_d = {id(p) for p in named.values() if p.ndim == 1}
    assert {id(p) for p in no_decay["params"]} == one_d
    assert {id(p) for p in decay["params"]} == {id(p) for p in named.values() if p.ndim > 1}
    # biases and norm scales are among them, convolution and linear weights are not
    assert id(named["fc.bias"]) in one_d and id(named["fc.weight"]) not in one_d
    assert any(name.startswith("bn1.") for name, p in named.items() if id(p) in one_d)


def test_frozen_parameters_are_left_out():
    layer = torch.nn.Linear(4, 2)
    layer.bias.requires_grad_(False)
    decay, no_decay = parameter_groups(layer, 0.1)
    assert decay["params"] == [layer.weight] and no_decay["params"] == []


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_uses_the_config(model, name, kind):
    config = parse_config(["--optimizer", name, "--lr", "0.3", "--weight-decay", "0.01", "--momentum", "0.8"])
    optimizer = build_optimizer(model, config, CPU)
    assert isinstance(optimizer, kind)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 0.3 for g in optimizer.param_groups)
    momentum = optimizer.param_groups[0]["betas"][0] if name == "adamw" else optimizer.param_groups[0]["momentum"]
    assert momentum == 0.8


def test_sgd_without_momentum_is_plain_sgd(model):
    optimizer = build_optimizer(model, parse_config(["--momentum", "0"]), CPU)  # torch refuses Nesterov here
    assert optimizer.param_groups[0]["momentum"] == 0 and not optimizer.param_groups[0]["nesterov"]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_build_optimizer_picks_foreach_kernels_on_the_cpu_and_fused_on_cuda(name):
    # Building a fused optimizer needs no GPU, only the device it is meant for.
    layer = torch.nn.Linear(4, 2)
    config = parse_config(["--optimizer", name])
    on_cpu = build_optimizer(layer, config, CPU)
    assert on_cpu.defaults.get("foreach") is True and not on_cpu.defaults.get("fused")
    on_cuda = build_optimizer(layer, config, torch.device("cuda"))
    assert on_cuda.defaults.get("fused") is True and not on_cuda.defaults.get("foreach")


def test_warmup_cosine_starts_low_peaks_at_one_and_ends_near_zero():
    warmup, total = 10, 100
    values = [warmup_cosine(step, warmup, total) for step in range(total)]
    assert values[0] <= 0.15
    assert values[warmup - 1] == pytest.approx(1.0)
    assert max(values) == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:warmup], values[1:warmup]))  # rising warmup
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))  # then falling
    assert values[-1] < 0.01
    assert warmup_cosine(total, warmup, total) == pytest.approx(0.0, abs=1e-12)
    # halfway through the decay the cosine is at one half
    assert warmup_cosine(warmup + (total - warmup) // 2, warmup, total) == pytest.approx(0.5)


def test_warmup_cosine_without_warmup_starts_at_one():
    assert warmup_cosine(0, 0, 50) == pytest.approx(1.0)
    assert warmup_cosine(49, 0, 50) < 0.01


def test_warmup_cosine_stays_at_zero_past_the_end():
    assert warmup_cosine(500, 5, 100) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_follows_optimizer_steps(model):
    config = parse_config(["--epochs", "4", "--warmup-epochs", "1", "--lr", "0.2"])
    optimizer = build_optimizer(model, config, CPU)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.2 / 5)
    assert rates[4] == pytest.approx(0.2)
    assert max(rates) == pytest.approx(0.2)
    assert rates[-1] < 0.2 * 0.05
    expected_mid = 0.2 * 0.5 * (1 + math.cos(math.pi * 7 / 15))
    assert rates[12] == pytest.approx(expected_mid)


def test_warmup_longer_than_training_is_capped(model):
    config = parse_config(["--epochs", "1", "--warmup-epochs", "5", "--lr", "0.1"])
    optimizer = build_optimizer(model, config, CPU)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1])


@pytest.mark.filterwarnings("ignore:Detected call of")  # fused: no step without a GPU
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_kernels_read_a_rate_held_in_a_tensor_that_the_schedule_fills(name):
    layer = torch.nn.Linear(4, 2)
    config = parse_config(["--optimizer", name, "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.2"])
    fused = build_optimizer(layer, config, torch.device("cuda"))  # built for CUDA, never stepped here
    scheduler = build_scheduler(fused, config, steps_per_epoch=4)
    hold_lr_in_tensors(fused, CPU)
    held = [group["lr"] for group in fused.param_groups]
    assert all(rate.dtype == torch.float32 and rate.ndim == 0 for rate in held)
    floats = build_optimizer(layer, config, CPU)
    float_schedule = build_scheduler(floats, config, steps_per_epoch=4)
    hold_lr_in_tensors(floats, CPU)  # foreach kernels: left as floats
    for _ in range(6):
        scheduler.step()
        float_schedule.step()
    assert [group["lr"] for group in fused.param_groups] == held  # the same tensors, filled in place
    assert [float(rate) for rate in held] == pytest.approx([g["lr"] for g in floats.param_groups])
    assert all(isinstance(g["lr"], float) for g in floats.param_groups)


@pytest.mark.parametrize("name, flagged", [("sgd", False), ("adamw", True)])
def test_made_capturable_adamw_says_so_and_sgd_has_no_such_flag(name, flagged):
    optimizer = build_optimizer(torch.nn.Linear(4, 2), parse_config(["--optimizer", name]), torch.device("cuda"))
    make_capturable(optimizer, CPU)
    assert all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups)
    assert all(g.get("capturable", False) == flagged for g in optimizer.param_groups)
