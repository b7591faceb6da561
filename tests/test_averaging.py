"""monkeytrain.averaging: the no-op LiveWeights and the EMA of parameters and buffers."""

from __future__ import annotations

import pytest
import torch

from monkeytrain.averaging import EmaWeights, LiveWeights, weight_averager

DECAY = 0.75


def set_weights(layer: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(-value)


def ema_of(start: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """average <- decay * average + (1 - decay) * value, from `start`, for each value in turn."""
    average = start
    for value in values:
        average = DECAY * average + (1 - DECAY) * value
    return average


def test_decay_zero_gives_live_weights_and_a_positive_decay_an_ema():
    model = torch.nn.Linear(3, 2)
    assert isinstance(weight_averager(model, 0.0), LiveWeights)
    assert isinstance(weight_averager(model, 0.9), EmaWeights)
    assert isinstance(weight_averager(model, 0.01), EmaWeights)


def test_live_weights_are_the_model_and_update_changes_nothing():
    model = torch.nn.Linear(3, 2)
    live = weight_averager(model, 0.0)
    assert live.model is model
    set_weights(model, 2.0)
    live.update()
    assert torch.equal(live.model.weight, torch.full((2, 3), 2.0))
    assert torch.equal(live.model.bias, torch.full((2,), -2.0))


def test_ema_weights_follow_the_ema_formula_from_the_initial_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    initial_weight, initial_bias = model.weight.detach().clone(), model.bias.detach().clone()
    ema = weight_averager(model, DECAY)
    assert ema.model is not model and ema.model.weight is not model.weight
    torch.testing.assert_close(ema.model.weight, initial_weight)  # before any update: the initial weights
    values = [1.0, 3.0, -2.0]
    for value in values:
        set_weights(model, value)  # stands in for an optimizer step
        ema.update()
    expected_weight = ema_of(initial_weight, [torch.full((2, 3), v) for v in values])
    expected_bias = ema_of(initial_bias, [torch.full((2,), -v) for v in values])
    # by hand for one entry: 0.75^3 w0 + 0.25 (0.75^2 * 1 + 0.75 * 3 - 2)
    assert float(ema.model.weight[1, 2]) == pytest.approx(0.421875 * float(initial_weight[1, 2]) + 0.203125)
    torch.testing.assert_close(ema.model.weight, expected_weight)
    torch.testing.assert_close(ema.model.bias, expected_bias)
    assert torch.equal(model.weight, torch.full((2, 3), -2.0))  # the live model keeps its own weights


def test_ema_averages_batch_norm_statistics_too():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).train()
    norm = model[1]
    start_mean, start_var = norm.running_mean.clone(), norm.running_var.clone()  # zeros and ones
    ema = weight_averager(model, DECAY)
    means, variances = [], []
    for shift, scale in ((0.0, 1.0), (5.0, 3.0), (10.0, 0.5)):
        model(torch.randn(16, 2) * scale + shift)  # a train-mode forward pass moves the running stats
        means.append(norm.running_mean.clone())
        variances.append(norm.running_var.clone())
        ema.update()
    assert not torch.allclose(means[-1], ema_of(start_mean, means), atol=1e-3)  # averaging made a difference
    torch.testing.assert_close(ema.model[1].running_mean, ema_of(start_mean, means))
    torch.testing.assert_close(ema.model[1].running_var, ema_of(start_var, variances))
    # an integer counter is not averaged but follows the live model
    assert int(ema.model[1].num_batches_tracked) == int(norm.num_batches_tracked) == 3
    # the averaged model is a separate copy: evaluating it leaves the live statistics alone
    ema.model.eval()(torch.randn(4, 2))
    assert torch.equal(norm.running_mean, means[-1])
