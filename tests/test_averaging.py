"""monkeytrain.averaging: the no-op LiveWeights and the EMA (timm's, with decay warm-up)."""

from __future__ import annotations

import pytest
import timm
import torch

from monkeytrain.averaging import WARMUP_POWER, EmaWeights, LiveWeights, weight_averager
from monkeytrain.config import TrainConfig
from monkeytrain.engine import BatchStep, Learner, evaluate, train_one_epoch

DECAY = 0.75


def one_update(averager) -> None:
    """One whole update, as the training step makes it: advance on the host, then apply."""
    averager.advance()
    averager.apply()


def set_weights(layer: torch.nn.Linear, value: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(-value)


def warmed_decay(update: int, cap: float = DECAY) -> float:
    """The decay of the n-th update (n from 1): 0 for the first (a copy), then 1 - n^-power, capped."""
    return min(cap, 1 - update ** -WARMUP_POWER) if update > 1 else 0.0


def ema_of(start: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """average <- d_n * average + (1 - d_n) * value_n, from `start`, for each value in turn."""
    average = start
    for n, value in enumerate(values, start=1):
        decay = warmed_decay(n)
        average = decay * average + (1 - decay) * value
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
    one_update(live)
    assert torch.equal(live.model.weight, torch.full((2, 3), 2.0))
    assert torch.equal(live.model.bias, torch.full((2,), -2.0))


def test_the_decay_warms_up_then_stays_at_its_cap():
    ema = weight_averager(torch.nn.Linear(3, 2), DECAY)
    decays = []
    for _ in range(8):
        one_update(ema)
        decays.append(ema.current_decay())
    assert decays[0] == 0.0  # the first update copies the live weights
    assert decays[1] == pytest.approx(1 - 2 ** -WARMUP_POWER)
    assert decays == sorted(decays) and decays[-1] == DECAY == decays[-2]


def test_ema_weights_follow_the_warmed_up_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    initial_weight, initial_bias = model.weight.detach().clone(), model.bias.detach().clone()
    ema = weight_averager(model, DECAY)
    assert ema.model is not model and ema.model.weight is not model.weight
    torch.testing.assert_close(ema.model.weight, initial_weight)  # before any update: the initial weights
    values = [1.0, 3.0, -2.0, 5.0, 0.5, 4.0, -1.0, 2.0]  # past the cap at the 7th update
    for value in values:
        set_weights(model, value)  # stands in for an optimizer step
        one_update(ema)
    torch.testing.assert_close(ema.model.weight, ema_of(initial_weight, [torch.full((2, 3), v) for v in values]))
    torch.testing.assert_close(ema.model.bias, ema_of(initial_bias, [torch.full((2,), -v) for v in values]))
    assert torch.equal(model.weight, torch.full((2, 3), 2.0))  # the live model keeps its own weights


def test_in_a_short_run_the_average_follows_the_recent_weights():
    """The failure the warm-up fixes: with a fixed 0.998, the average of a 93-step run
    held 90% of weights from its first half (here 0) and 10% of its second half (here 1)."""
    model = torch.nn.Linear(3, 2)
    ema = weight_averager(model, TrainConfig().ema_decay)
    for step in range(93):
        set_weights(model, 0.0 if step < 43 else 1.0)
        one_update(ema)
    assert float(ema.model.weight.min()) > 0.8


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
        one_update(ema)
    assert not torch.allclose(means[-1], ema_of(start_mean, means), atol=1e-3)  # averaging made a difference
    torch.testing.assert_close(ema.model[1].running_mean, ema_of(start_mean, means))
    torch.testing.assert_close(ema.model[1].running_var, ema_of(start_var, variances))
    # an integer counter is not averaged but follows the live model
    assert int(ema.model[1].num_batches_tracked) == int(norm.num_batches_tracked) == 3
    # the averaged model is a separate copy: evaluating it leaves the live statistics alone
    ema.model.eval()(torch.randn(4, 2))
    assert torch.equal(norm.running_mean, means[-1])


def test_a_restored_average_continues_its_warm_up_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    straight, interrupted = weight_averager(model, DECAY), weight_averager(model, DECAY)
    values = [1.0, 3.0, -2.0, 5.0, 0.5, 4.0]
    for value in values[:3]:
        set_weights(model, value)
        one_update(straight)
        one_update(interrupted)
    resumed = weight_averager(model, DECAY)  # as a resumed run builds it, on its live model
    resumed.ema.module.load_state_dict(torch.nn.Linear(3, 2).state_dict())  # other weights, then restored
    resumed.load_state_dict(interrupted.state_dict())
    for value in values[3:]:
        set_weights(model, value)
        one_update(straight)
        one_update(resumed)
    assert resumed.updates == straight.updates == 6
    assert torch.equal(resumed.model.weight, straight.model.weight)


def colour_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 16 px uint8 images: each of 4 classes its own colour, plus strong noise."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 4, (batch,), generator=generator)
        noise = torch.randint(-90, 91, (batch, 3, 16, 16), generator=generator)
        batches.append(((colours[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8), labels))
    return batches


def test_after_a_short_run_the_default_average_scores_as_well_as_the_live_weights(cpu_accelerator):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    averager = weight_averager(model, TrainConfig().ema_decay)  # the default decay, warm-up included
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prepare = lambda views: (views.float() - 128) / 64  # noqa: E731
    learner = Learner(model, optimizer, scheduler, torch.nn.CrossEntropyLoss(), averager, prepare)
    for epoch in range(3):  # 30 optimizer steps in all
        train_one_epoch(BatchStep(learner, cpu_accelerator), colour_batches(10, 16, seed=epoch), cpu_accelerator)
    test = colour_batches(4, 32, seed=99)
    model.eval()
    live = evaluate(model, test, prepare, cpu_accelerator, 4).accuracy
    averaged = evaluate(averager.model.eval(), test, prepare, cpu_accelerator, 4).accuracy
    assert live > 0.5, live  # the run learned something (chance is 0.25)
    assert averaged >= live - 0.1, (averaged, live)  # 0.1: 13 of 128 test images, noise for 30 steps
