"""Training runs as train.py builds them, with the GPU's CUDA graphs emulated on the CPU
(graph_emulator.py): what test_graphed.py and the two-rank check (distributed_checks.py) compare."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from conftest import RecordedLog
from graph_emulator import EmulatedGraphs
from monkeytrain import optim
from monkeytrain import trainer as trainer_module
from monkeytrain.config import parse_config
from monkeytrain.data.prepare import prepare_data
from monkeytrain.distributed import make_accelerator
from monkeytrain.trainer import RunContext, Trainer

# 3 epochs of 8 batches: 16 px crops for two, then 32 px; mixed batches, clipped gradients, the EMA.
EVERYTHING = ["--epochs", "3", "--image-size", "32", "--min-train-size", "16", "--full-size-fraction", "0.5",
              "--mixup-alpha", "0.4", "--cutmix-alpha", "1.0", "--clip-grad-norm", "1.0"]


class StopAt:
    """Preemption's interface, with a stop agreed at the n-th check."""

    def __init__(self, check: int | None = None):
        self.checks, self.stop_check = 0, check
        self.schedule = SimpleNamespace(saved=lambda: None)

    def check(self, accelerator) -> tuple[bool, bool]:
        self.checks += 1
        return self.checks == self.stop_check, False


def as_on_a_gpu(patch: pytest.MonkeyPatch) -> None:
    """With --cuda-graphs, the trainer does here what it does on a GPU: graphs apply, the optimizer is
    the fused kind, and the emulator captures."""
    patch.setattr(trainer_module, "graphs_unavailable", lambda accelerator, mode: None)
    patch.setattr(trainer_module, "CudaGraphs", EmulatedGraphs)
    patch.setattr(optim, "kernel_options", lambda device: {"fused": True})


def train_run(data: Path, name: str, *flags: str, stop: StopAt | None = None, cache: Path | None = None) -> Trainer:
    """A Trainer after fit(), built as train.py builds it, its run in the working folder. The data's
    prepared views are cached in `cache` (default: beside the data folder)."""
    cache = cache or data.parent / "cache"
    config = parse_config(["--data", str(data), "--cpu", "--model", "resnet10t", "--batch-size", "2",
                           "--num-workers", "0", "--report-to", "none", "--val-fraction", "0.1",
                           "--cache-dir", str(cache), "--run-name", name, *EVERYTHING, *flags])
    AcceleratorState._reset_state(True)
    accelerator = make_accelerator(config)
    run_dir = Path(config.output_dir) / config.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    context = RunContext(config, accelerator, run_dir, RecordedLog())
    set_seed(config.seed)  # as train.py does: the same initial weights in every run
    trainer = Trainer(context, prepare_data(config, accelerator, cache, context.log), stop or StopAt())
    trainer.fit()
    AcceleratorState._reset_state(True)
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The live weights and buffers (unwrapped from DDP), and the average's."""
    live = trainer.accelerator.unwrap_model(trainer.learner.model).state_dict()
    return {f"live.{k}": v for k, v in live.items()} | {
        f"average.{k}": v for k, v in trainer.learner.averager.model.state_dict().items()}


def different_weights(trained: Trainer, reference: Trainer) -> list[str]:
    """The names of the tensors that differ between two runs' weights (both live and average)."""
    ours, theirs = weights(trained), weights(reference)
    return [name for name in theirs if not torch.equal(ours[name], theirs[name])]
