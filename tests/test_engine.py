"""monkeytrain.engine: gradient accumulation, stopping mid-epoch, the one reduction per pass,
evaluation figures, flip test-time augmentation and gradient clipping."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from monkeytrain import engine
from monkeytrain.engine import BatchStep, Learner, evaluate, train_one_epoch
from monkeytrain.errors import UserError


def reset_accelerate() -> None:
    # GradientState too: it holds the accumulation count and whether the last batch synced.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def accumulating():
    """Factory: accumulating(k) -> a CPU Accelerator that steps the optimizer every k batches;
    Accelerate's global state is reset around it, as conftest's cpu_accelerator does."""
    def make(k: int) -> Accelerator:
        reset_accelerate()
        return Accelerator(cpu=True, gradient_accumulation_steps=k)

    yield make
    reset_accelerate()


class NotingSGD(torch.optim.SGD):
    """SGD that notes each step in `events`, and the norm of the gradient it stepped on."""

    def __init__(self, params, lr: float, events: list):
        super().__init__(params, lr=lr)
        self.events, self.grad_norms = events, []

    def step(self, closure=None):
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norms.append(float(torch.cat(grads).norm()))
        self.events.append("optimizer")
        return super().step(closure)


class Noting:
    """Stands in for the scheduler (`step`) and the weight average (`advance`, `apply`): notes each call."""

    def __init__(self, events: list, name: str):
        self.events, self.name = events, name

    def step(self) -> None:
        self.events.append(self.name)

    def advance(self) -> None:
        self.events.append("decay")

    def apply(self) -> None:
        self.events.append(self.name)


def make_learner(accelerator, model: torch.nn.Module, events: list, lr: float = 0.1,
                 clip: float = 0.0) -> tuple[Learner, NotingSGD]:
    """A Learner as the trainer builds one (model and optimizer prepared), and its bare optimizer."""
    optimizer = NotingSGD(model.parameters(), lr, events)
    prepared_model, prepared_optimizer = accelerator.prepare(model, optimizer)
    learner = Learner(prepared_model, prepared_optimizer, Noting(events, "scheduler"), torch.nn.CrossEntropyLoss(),
                      Noting(events, "average"), augment=lambda views: views, clip_grad_norm=clip)
    return learner, optimizer


def float_batches(count: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of `size` 3-feature samples with labels in {0, 1}."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, generator=generator), torch.randint(0, 2, (size,), generator=generator))
            for _ in range(count)]


def train_batches(learner: Learner, batches, accelerator, **kwargs):
    """One epoch of `batches`, each trained by the eager BatchStep."""
    return train_one_epoch(BatchStep(learner, accelerator), batches, accelerator, **kwargs)


def noting_after_step(events: list, stop_at: int | None = None):
    def after_step(batches_done: int) -> bool:
        events.append(("after", batches_done))
        return stop_at is not None and batches_done >= stop_at
    return after_step


@pytest.mark.parametrize("k, steps_after", [(1, [1, 2, 3, 4, 5, 6]), (2, [2, 4, 6]), (3, [3, 6])])
def test_the_optimizer_scheduler_and_average_step_once_every_k_batches(accumulating, k, steps_after):
    accelerator = accumulating(k)
    events: list = []
    learner, _ = make_learner(accelerator, torch.nn.Linear(3, 2), events)
    stats = train_batches(learner, float_batches(6, 4), accelerator, after_step=noting_after_step(events))
    # in this order (the average's decay set before the step, the average taken of the stepped
    # weights, the next learning rate last), and after_step told how many batches are done at each
    assert events == [event for done in steps_after
                      for event in ("decay", "optimizer", "average", "scheduler", ("after", done))]
    assert not stats.stopped
    assert stats.images == 24


def test_a_step_that_fp16s_loss_scaling_skipped_leaves_the_schedule_where_it_was(accumulating, monkeypatch):
    accelerator = accumulating(1)
    events: list = []
    learner, _ = make_learner(accelerator, torch.nn.Linear(3, 2), events)
    skipped = iter([True, False, True])  # as GradScaler skips steps whose gradients overflowed
    monkeypatch.setattr(type(accelerator), "optimizer_step_was_skipped", property(lambda self: next(skipped)))
    train_batches(learner, float_batches(3, 4), accelerator)
    assert events.count("scheduler") == 1 and events.count("average") == 3


def test_each_step_on_k_accumulated_batches_moves_the_weights_by_their_mean_gradient(accumulating):
    accelerator = accumulating(2)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    reference, initial = copy.deepcopy(model), model.weight.detach().clone()
    batches = float_batches(4, 2, seed=1)
    events: list = []
    learner, _ = make_learner(accelerator, model, events, lr=0.5)
    train_batches(learner, batches, accelerator)
    assert events.count("optimizer") == 2

    # by hand: two plain SGD steps, each on the loss of its two batches' four samples
    # (equal batch sizes: the mean of the batch losses is the loss of all their samples)
    for pair in (batches[:2], batches[2:]):
        images = torch.cat([views for views, _ in pair])
        labels = torch.cat([labels for _, labels in pair])
        reference.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter -= 0.5 * parameter.grad
    assert not torch.allclose(reference.weight, initial, atol=0.01)  # the steps are not negligible
    torch.testing.assert_close(model.weight.detach(), reference.weight.detach())
    torch.testing.assert_close(model.bias.detach(), reference.bias.detach())


def test_a_stop_ends_the_epoch_at_that_step_without_taking_more_batches(accumulating):
    accelerator = accumulating(2)
    events: list = []
    learner, _ = make_learner(accelerator, torch.nn.Linear(3, 2), events)
    taken = []
    source = float_batches(8, 3)

    def recorded():
        for index, batch in enumerate(source):
            taken.append(index)
            yield batch

    stats = train_batches(learner, recorded(), accelerator, after_step=noting_after_step(events, stop_at=4))
    assert stats.stopped
    assert taken == [0, 1, 2, 3]  # the generator was not asked for a fifth batch
    assert stats.images == 4 * 3  # the figures cover the trained batches only
    assert events.count("optimizer") == 2
    assert [event for event in events if isinstance(event, tuple)] == [("after", 2), ("after", 4)]


class PresetLogits(torch.nn.Module):
    """Returns its input as logits (times a gain of 1 that an lr of 0 never changes)."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return views * self.gain


def counting_sum(monkeypatch) -> list:
    """Make the engine's sum_across_ranks note each call (and still reduce)."""
    calls: list = []
    real = engine.sum_across_ranks

    def counted(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(tensor.clone())
        return real(tensor)

    monkeypatch.setattr(engine, "sum_across_ranks", counted)
    return calls


def two_class_loss(logits: list[float], label: int) -> float:
    """Cross-entropy of two logits: log(1 + exp(other - own))."""
    return math.log1p(math.exp(logits[1 - label] - logits[label]))


def test_train_loss_and_accuracy_are_means_over_samples_from_one_reduction(cpu_accelerator, monkeypatch):
    calls = counting_sum(monkeypatch)
    learner, _ = make_learner(cpu_accelerator, PresetLogits(), [], lr=0.0)
    rows_a, labels_a = [[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]], [0, 0, 0]  # right, wrong, right
    rows_b, labels_b = [[0.0, 3.0]], [0]                                 # wrong
    batches = [(torch.tensor(rows_a), torch.tensor(labels_a)), (torch.tensor(rows_b), torch.tensor(labels_b))]
    stats = train_batches(learner, batches, cpu_accelerator)

    losses = [two_class_loss(r, y) for r, y in zip(rows_a + rows_b, labels_a + labels_b)]
    assert stats.images == 4
    assert stats.loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    # a mean of the two batch means would be (2/3 + 0) / 2 and about 1.95
    assert stats.accuracy == 0.5
    assert len(calls) == 1


# Logits, labels and what evaluate() must make of them: two batches of 3 and 2 samples.
EVAL_LOGITS = [[[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 4.0]], [[1.0, 5.0, 0.0], [2.0, 1.0, 0.0]]]
EVAL_LABELS = [[0, 2, 2], [1, 1]]
EVAL_PREDICTED = [0, 1, 2, 1, 0]
EVAL_CONFUSION = [[1, 0, 0],   # true 0: predicted 0
                  [1, 1, 0],   # true 1: predicted 0 once, 1 once
                  [0, 1, 1]]   # true 2: predicted 1 once, 2 once


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(value) for value in row]
    return [value / sum(exps) for value in exps]


def eval_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor(logits), torch.tensor(labels)) for logits, labels in zip(EVAL_LOGITS, EVAL_LABELS)]


def test_evaluate_gives_loss_accuracy_confusion_and_each_prediction_in_order(cpu_accelerator, monkeypatch):
    calls = counting_sum(monkeypatch)
    result = evaluate(lambda logits: logits, eval_batches(), lambda views: views, cpu_accelerator, 3)
    rows = [row for batch in EVAL_LOGITS for row in batch]
    labels = [label for batch in EVAL_LABELS for label in batch]
    assert result.count == 5
    assert result.loss == pytest.approx(sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels)) / 5, rel=1e-6)
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.confusion.tolist() == EVAL_CONFUSION
    assert result.predicted.tolist() == EVAL_PREDICTED
    assert result.confidence.tolist() == pytest.approx([max(softmax(r)) for r in rows], rel=1e-6)
    assert result.per_class_accuracy() == pytest.approx([1.0, 0.5, 0.5])
    assert result.balanced_accuracy() == pytest.approx(2 / 3)  # from the same one reduction
    assert len(calls) == 1


def scored(confusion: list[list[int]], loss: float) -> engine.EvalResult:
    matrix = torch.tensor(confusion)
    return engine.EvalResult(loss, float(matrix.diag().sum() / matrix.sum()), int(matrix.sum()), matrix,
                             torch.zeros(0, dtype=torch.int64), torch.zeros(0))


def test_equal_balanced_accuracies_are_equal_figures_so_the_tie_goes_to_the_lower_loss():
    """26, 6 and 6 held-out images: 0, 0 and 5 right, or 0, 1 and 4, are both 5/18 balanced; as a float mean of
    the per-class accuracies the first is a bit above the second, which would keep the epoch of higher loss."""
    from monkeytrain.selection import BestEpoch

    earlier = scored([[0, 26, 0], [6, 0, 0], [1, 0, 5]], loss=1.4)
    later = scored([[0, 26, 0], [5, 1, 0], [2, 0, 4]], loss=1.3)
    assert sum([0, 0, 5 / 6]) / 3 != sum([0, 1 / 6, 4 / 6]) / 3  # what a float mean would compare
    assert earlier.balanced_accuracy() == later.balanced_accuracy() == 5 / 18
    best = BestEpoch()
    for epoch, result in enumerate((earlier, later), start=1):
        best.update(epoch, result.accuracy, result.loss, result.balanced_accuracy())
    assert best.epoch == 2


def test_evaluate_on_no_batches_counts_zero(cpu_accelerator):
    result = evaluate(lambda views: views, iter([]), lambda views: views, cpu_accelerator, 3)
    assert result.count == 0
    assert result.loss == 0.0 and result.accuracy == 0.0
    assert result.confusion.tolist() == [[0] * 3] * 3
    assert result.per_class_accuracy() == [None, None, None]  # no images: not 0%
    assert result.balanced_accuracy() is None
    assert result.predicted.numel() == 0 and result.confidence.numel() == 0


def large_gradient_learner(accelerator, clip: float) -> tuple[Learner, NotingSGD, list, float]:
    """A learner, one batch with a large loss, and the norm of its unclipped gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    views, labels = torch.randn(8, 4) * 1000, torch.randint(0, 3, (8,))
    probe = copy.deepcopy(model)
    F.cross_entropy(probe(views), labels).backward()
    unclipped = float(torch.cat([p.grad.flatten() for p in probe.parameters()]).norm())
    learner, optimizer = make_learner(accelerator, model, [], lr=0.01, clip=clip)
    return learner, optimizer, [(views, labels)], unclipped


def test_a_positive_clip_grad_norm_clips_the_gradient_to_it(cpu_accelerator):
    learner, optimizer, batches, unclipped = large_gradient_learner(cpu_accelerator, clip=1.0)
    assert unclipped > 100  # so clipping has work to do
    train_batches(learner, batches, cpu_accelerator)
    [stepped_on] = optimizer.grad_norms
    assert 0.99 <= stepped_on <= 1.0 + 1e-6


def test_a_zero_clip_grad_norm_leaves_the_gradient_alone(cpu_accelerator):
    learner, optimizer, batches, unclipped = large_gradient_learner(cpu_accelerator, clip=0.0)
    train_batches(learner, batches, cpu_accelerator)
    assert optimizer.grad_norms == [pytest.approx(unclipped, rel=1e-5)]


def test_mixed_targets_reach_the_loss_and_accuracy_counts_the_true_labels(cpu_accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    learner, _ = make_learner(cpu_accelerator, model, [], lr=0.0)  # lr 0: the weights stay as they are
    seen = []

    def swap_targets(images, labels):  # a "mix" whose targets are the other class, with certainty
        targets = torch.nn.functional.one_hot(1 - labels, 2).float()
        seen.append(targets)
        return images, targets

    learner.mix = swap_targets
    batches = float_batches(2, 4)
    trained = train_batches(learner, batches, cpu_accelerator)
    with torch.no_grad():
        logits = torch.cat([model(views) for views, _ in batches])
        labels = torch.cat([labels for _, labels in batches])
    assert len(seen) == 2
    assert trained.loss == pytest.approx(F.cross_entropy(logits, 1 - labels).item(), rel=1e-6)
    assert trained.accuracy == pytest.approx((logits.argmax(dim=1) == labels).double().mean().item())


@pytest.mark.parametrize("terminal, redraw_seconds", [(True, 0.1), (False, 60)])
def test_the_progress_bar_redraws_at_most_once_a_minute_into_a_file(monkeypatch, terminal, redraw_seconds):
    """A SLURM log or `> run.log` would keep each of ten redraws a second, \\r after \\r on one line."""
    from monkeytrain.engine import progress_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    with progress_bar(3, "epoch 1", shown=True) as bar:
        assert bar.mininterval == redraw_seconds and not bar.disable


def test_a_batch_of_one_image_that_batch_norm_cannot_train_on_is_one_line_to_act_on(cpu_accelerator):
    """`--batch-size 1` at 32 px, or two processes sharing 2 training images: a ResNet's last features are
    1x1, and torch's BatchNorm error came out as a traceback."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    learner, _ = make_learner(cpu_accelerator, model, [])
    with pytest.raises(UserError, match=r"^a training batch of one image cannot train the model's BatchNorm "
                                        r"layers .*; give --batch-size 2 or more, or, with several processes, at "
                                        r"least 2 training images per process\.$"):
        train_batches(learner, float_batches(1, 1), cpu_accelerator)
    assert train_batches(learner, float_batches(1, 2), cpu_accelerator).images == 2


def test_a_value_error_of_the_model_that_is_not_batch_norms_stays_a_bug(cpu_accelerator):
    class WrongShape(torch.nn.Linear):
        def forward(self, images):
            raise ValueError("Expected input batch_size (1) to match target batch_size (2).")

    learner, _ = make_learner(cpu_accelerator, WrongShape(3, 2), [])
    with pytest.raises(ValueError, match="^Expected input batch_size"):
        train_batches(learner, float_batches(1, 2), cpu_accelerator)
