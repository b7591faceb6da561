"""One training epoch and one evaluation pass, on any number of processes.

Metrics accumulate on the device as sums and counts and are reduced once per
pass, so the loop never waits on the host and every rank ends with the same,
global figures.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monkeytrain.distributed import main_process_statistics, sum_across_ranks
from monkeytrain.errors import UserError


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    stopped: bool = False  # the epoch ended early on an agreed stop signal

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    count: int
    confusion: torch.Tensor  # [true class, predicted class] counts, on the CPU
    predicted: torch.Tensor   # this rank's predicted class per sample, in shard order (CPU)
    confidence: torch.Tensor  # and the softmax probability of that prediction

    def per_class_accuracy(self) -> list[float | None]:
        """Each class's accuracy; None for a class with no image here (0% would read as a measured failure)."""
        totals = self.confusion.sum(dim=1)
        accuracies = (self.confusion.diag().double() / totals.clamp_min(1)).tolist()
        return [accuracy if total else None for accuracy, total in zip(accuracies, totals.tolist())]

    def balanced_accuracy(self) -> float | None:
        """The mean of the per-class accuracies, from the confusion matrix summed over every rank (so every rank
        has the same figure), worked out exactly from its counts: two epochs of equal balanced accuracy must
        compare equal, for the tie to go to the loss, and a float mean of other per-class accuracies (5/18 as
        (0 + 0 + 5/6) / 3 or as (0 + 1/6 + 4/6) / 3) can differ in its last bit."""
        totals, correct = self.confusion.sum(dim=1).tolist(), self.confusion.diag().tolist()
        per_class = [Fraction(right, total) for right, total in zip(correct, totals) if total]
        return float(sum(per_class) / len(per_class)) if per_class else None


def balanced_accuracy(per_class: list[float | None]) -> float | None:
    """The mean of the per-class accuracies (recalls) over the classes with an image, as scikit-learn's
    balanced_accuracy_score: a model that always answers the largest of k classes scores 1/k."""
    measured = [accuracy for accuracy in per_class if accuracy is not None]
    return sum(measured) / len(measured) if measured else None


@dataclass
class Learner:
    """What one optimizer step needs: the model, how to update it, and how to feed it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: torch.nn.Module
    averager: object            # updated after every optimizer step (an EMA, or the live weights)
    augment: Callable            # uint8 stored views -> model inputs
    clip_grad_norm: float = 0.0  # 0: no clipping
    mix: Callable = lambda images, labels: (images, labels)  # (inputs, labels) -> (inputs, loss targets)


class BatchStep:
    """Trains on one batch: forward, backward and, every `--grad-accum-steps` batches, an optimizer
    step. Called with (uint8 views, labels), it returns the batch's (loss, logits), detached.

    Its device work is `forward_backward` and `update_weights`; the host work of a step (the
    scheduler, the average's decay, clearing gradients) sits around them, so that `GraphedStep`
    (graphed.py) can replay the device work from a CUDA graph and run the same host work itself."""

    def __init__(self, learner: Learner, accelerator):
        self.learner, self.accelerator = learner, accelerator

    @property
    def stepped(self) -> bool:
        """Whether the last batch ended with an optimizer step."""
        return self.accelerator.sync_gradients

    def __call__(self, views: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        learner, accelerator = self.learner, self.accelerator
        with accelerator.accumulate(learner.model):
            loss, logits = forward_backward(learner, accelerator, views, labels)
            if accelerator.sync_gradients:
                learner.averager.advance()
                update_weights(learner, accelerator)
                if not accelerator.optimizer_step_was_skipped:  # by fp16's loss scaling, on an overflow;
                    learner.scheduler.step()  # else torch warns that the schedule stepped before the optimizer
                learner.optimizer.zero_grad(set_to_none=True)
        return loss, logits


def forward_backward(learner: Learner, accelerator, views: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment, mix, forward and backward one batch; its (loss, logits), detached."""
    images, targets = learner.mix(learner.augment(views), labels)
    try:
        logits = learner.model(images)
    except ValueError as error:
        if not str(error).startswith("Expected more than 1 value per channel when training"):
            raise  # a bug
        raise too_few_for_batch_norm() from None
    loss = learner.criterion(logits, targets)
    accelerator.backward(loss)
    return loss.detach(), logits.detach()


def too_few_for_batch_norm() -> UserError:
    """torch's error for a BatchNorm layer that sees one value per channel (a batch of one image whose
    features have shrunk to 1x1), as one line to act on."""
    return UserError("a training batch of one image cannot train the model's BatchNorm layers at this image size "
                     "(each channel needs more than one value); give --batch-size 2 or more, or, with several "
                     "processes, at least 2 training images per process.")


def update_weights(learner: Learner, accelerator) -> None:
    """The device work of an optimizer step: clip, step, average (the learning rate and the
    average's decay come from tensors that the host work of the step sets)."""
    if learner.clip_grad_norm > 0:
        accelerator.clip_grad_norm_(learner.model.parameters(), learner.clip_grad_norm)
    learner.optimizer.step()
    learner.averager.apply()


def progress_bar(total: int | None, description: str, shown: bool) -> tqdm:
    """The epoch's bar. Into a file (a SLURM log, `> run.log`), tqdm's ten redraws a second, each after a
    \r on one endless line, would be megabytes an hour that `less` shows as one line: there, at most one a
    minute (a long epoch's progress still shows)."""
    redraws = {} if sys.stderr.isatty() else {"mininterval": 60}
    return tqdm(total=total, desc=description, leave=False, disable=not shown, **redraws)


def train_one_epoch(step: BatchStep, batches, accelerator, batches_total: int | None = None,
                    after_step: Callable[[int], bool] = lambda batches_done: False,
                    description: str = "train") -> TrainStats:
    """Train with `step` (a BatchStep or a GraphedStep) on every (uint8 views, labels) batch of
    `batches` (`batches_total` of them, for the progress bar).

    `after_step(batches done so far)` runs after every optimizer step; when it
    returns True (a stop was agreed) the epoch ends there, with `stopped` set.

    No host synchronisation inside the loop: losses and correct counts stay on
    the device until the epoch's single reduction.
    """
    step.learner.model.train()
    step.learner.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    correct = torch.zeros((), dtype=torch.int64, device=accelerator.device)
    count = 0
    started = time.perf_counter()
    stopped = False
    # closed also on an error, which would otherwise be printed after the bar, on its line
    with progress_bar(batches_total, description, accelerator.is_main_process) as progress:
        for batch, (views, labels) in enumerate(batches, start=1):
            loss, logits = step(views, labels)
            loss_sum += loss.double() * labels.shape[0]
            correct += (logits.argmax(dim=1) == labels).sum()
            count += labels.shape[0]
            progress.update()
            if step.stepped and after_step(batch):
                stopped = True
                break
    if accelerator.num_processes > 1:  # each rank then validates the model the main process saves as the best
        main_process_statistics(step.learner.averager.model)
    totals = sum_across_ranks(torch.stack([loss_sum, correct.double(),
                                           torch.tensor(float(count), dtype=torch.float64, device=accelerator.device)]))
    loss_total, correct_total, count_total = totals.tolist()  # the epoch's one sync
    return TrainStats(loss_total / max(count_total, 1), correct_total / max(count_total, 1),
                      int(count_total), time.perf_counter() - started, stopped)


@torch.no_grad()
def evaluate(model: Callable, batches, prepare: Callable, accelerator, num_classes: int) -> EvalResult:
    """Loss, accuracy and confusion matrix over every sample of sharded batches, once each.

    `model` must not be DDP-wrapped: shards may differ in length by one batch,
    and a DDP forward could wait on a rank that has already finished.
    """
    device = accelerator.device
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    predictions, confidences = [], []
    for views, labels in batches:
        with accelerator.autocast():
            logits = model(prepare(views))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).double()
        predictions.append(predicted)
        confidences.append(confidence)
    totals = sum_across_ranks(torch.cat([loss_sum, confusion]))
    confusion_matrix = totals[1:].reshape(num_classes, num_classes).long().cpu()
    count = int(confusion_matrix.sum())
    return EvalResult(
        loss=float(totals[0]) / max(count, 1),
        accuracy=float(confusion_matrix.diag().sum()) / max(count, 1),
        count=count,
        confusion=confusion_matrix,
        predicted=torch.cat(predictions).cpu() if predictions else torch.zeros(0, dtype=torch.int64),
        confidence=torch.cat(confidences).cpu() if confidences else torch.zeros(0),
    )
