"""One training epoch and one evaluation pass, on any number of processes.

Metrics accumulate on the device as sums and counts and are reduced once per
pass, so the loop never waits on the host and every rank ends with the same,
global figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from monkeytrain.distributed import sum_across_ranks


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    count: int
    confusion: torch.Tensor  # [true class, predicted class] counts, on the CPU

    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp_min(1)
        return (self.confusion.diag().double() / totals).tolist()


def train_one_epoch(
    model, loader, optimizer, scheduler, criterion, accelerator,
    max_steps: int = 0, clip_grad_norm: float = 0.0, description: str = "train",
) -> TrainStats:
    """Train over `loader` (at most `max_steps` batches when positive)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, count
    started = time.perf_counter()
    batches = tqdm(loader, desc=description, leave=False, disable=not accelerator.is_main_process)
    for step, (images, labels) in enumerate(batches):
        if max_steps and step >= max_steps:
            break
        with accelerator.accumulate(model):
            logits = model(images)
            loss = criterion(logits, labels)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        totals += _batch_totals(logits.detach(), labels, loss.detach() * labels.shape[0])
    totals = sum_across_ranks(totals)
    loss_sum, correct, count = totals.tolist()
    return TrainStats(loss_sum / max(count, 1), correct / max(count, 1), int(count),
                      time.perf_counter() - started)


def _batch_totals(logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
    correct = (logits.argmax(dim=1) == labels).sum()
    return torch.stack([loss_sum.double(), correct.double(),
                        torch.tensor(labels.shape[0], dtype=torch.float64, device=labels.device)])


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int) -> EvalResult:
    """Loss, accuracy and confusion matrix over every sample of a sharded loader, once each.

    `model` must be the unwrapped module: shards may differ in length by one
    batch, and a DDP forward could wait on a rank that has already finished.
    """
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        pairs = labels * num_classes + logits.argmax(dim=1)
        confusion += torch.bincount(pairs, minlength=num_classes * num_classes).double()
    totals = sum_across_ranks(torch.cat([loss_sum, confusion]))
    confusion_matrix = totals[1:].reshape(num_classes, num_classes).long().cpu()
    count = int(confusion_matrix.sum())
    return EvalResult(
        loss=float(totals[0]) / max(count, 1),
        accuracy=float(confusion_matrix.diag().sum()) / max(count, 1),
        count=count,
        confusion=confusion_matrix,
    )
