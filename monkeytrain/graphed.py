"""The training step replayed from a CUDA graph: one launch per batch instead of hundreds.

A ResNet-18 step at batch 64 is several hundred kernels of a few microseconds each; launched one
by one from Python, they keep the GPU waiting for the host (benchmarks/RESULTS.md). A CUDA graph
records the device work of a step once and replays it with a single launch. What a graph asks of
the step, and where each is met:

- Static shapes and memory: every batch of the resident pipeline is full (pipeline.py) and is
  copied into the same input tensors before each replay. A new shape (the next crop size of
  progressive resizing) is warmed up and captured anew; the previous graph is dropped.
- No value frozen at capture: the learning rate lives in a tensor that the scheduler fills
  (optim.hold_lr_in_tensors; optim.make_capturable at each capture), the EMA's decay in one that
  the averager fills (averaging.py), and the augmentation and mixing draw from the run's generator
  on the device, registered with the graph so that each replay draws new numbers. A model's dropout
  and drop_path draw from the default CUDA generator, which PyTorch registers with every capture
  itself (CUDAGraph::capture_begin): a capture moves no generator on, and each replay draws from
  where it stands and moves it on by the whole step's draws, as the eager step does. So the eager
  warm-up batches (on a side stream or not), a new size's capture and the RNG state a save keeps all
  follow the eager run: nothing more is needed here.
- No host work inside: the host half of an optimizer step (the average's decay, the scheduler)
  runs around each replay, as BatchStep (engine.py) runs it around the same device work.
- A warm-up before each capture: a few eager steps on a side stream, which run cuDNN's algorithm
  search, create the optimizer's momentum buffers and compile the model when asked to.
- Under DDP, as PyTorch's CUDA notes ask: the DDP wrapper built on a side stream (the trainer builds
  it inside `side_stream()`), and 11 warm-up steps, after which DDP has rebuilt its gradient buckets
  and stopped timing its first iterations with host-synced events. The gradient all-reduce and the
  buffer broadcast are then captured with the rest (NCCL 2.9.6 and later).

Where a graph does not apply, `graphs_unavailable` says why and the trainer uses BatchStep.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from monkeytrain.distributed import a_run_of_tune
from monkeytrain.engine import BatchStep, Learner, forward_backward, update_weights
from monkeytrain.errors import UserError, first_line
from monkeytrain.optim import make_capturable
from monkeytrain.pace import PhaseTimes

# The fused AdamW step made capturable warns when it runs outside a capture, as the eager warm-up
# before the next crop size's capture does; its fused kernel is the same either way.
warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")

WARMUP_BATCHES = 3  # eager steps before each capture, as in PyTorch's CUDA graph notes
# Under DDP the notes ask for at least 11: DDP times its first 10 forwards with host-synced events,
# and then every 100th, which `time_ddp_only_at_start` turns off: a capture, which any crop size's
# warm-up can bring to any forward count, must never be one of them.
DDP_WARMUP_BATCHES = 11


def graphs_unavailable(accelerator, pipeline_mode: str) -> Optional[str]:
    """Why this run cannot replay its steps from CUDA graphs (None: it can), in words for its log."""
    reasons = [
        (accelerator.device.type != "cuda", f"the run trains on {accelerator.device.type}, not a CUDA GPU"),
        (pipeline_mode != "resident", "streamed batches are not all full (graphs need one static shape)"),
        (accelerator.mixed_precision == "fp16", "fp16's loss scaling checks for overflow on the host"),
        (not hasattr(torch.cuda.CUDAGraph, "register_generator_state"),
         "this PyTorch cannot replay a generator of the run's own in a graph (2.5 and later can)"),
    ]
    return next((reason for unavailable, reason in reasons if unavailable), None)


class CudaGraphs:
    """How GraphedStep warms up and captures on a GPU (tests put a CPU emulation in its place)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @contextmanager
    def side_stream(self) -> Iterator[None]:
        """Queue the work inside on a side stream, which the current stream then waits for."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def warm_up(self, work: Callable):
        """Run eager work on a side stream, as capture's warm-up must."""
        with self.side_stream():
            return work()

    def capture(self, work: Callable[[], None]) -> Callable[[], None]:
        """Record `work`'s device work (nothing runs); returns what replays it."""
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)  # the default generator is registered by PyTorch
        with torch.cuda.graph(graph):
            work()
        return graph.replay


class CaptureFailed(UserError):
    """A capture failed; the trainer saves the training state before the run ends with it."""


def without_graphs() -> str:
    """How to train on without graphs once a capture failed, the training state saved. A run of monkeytrain tune
    has its flags from tune, and a study goes on only with the train.py flags and the space it began with
    (tune_study.check_same_search: --cuda-graphs is no runtime flag, which may change): only a study begun anew
    trains without graphs."""
    if a_run_of_tune():
        return ("a study keeps the flags and the space it began with, so begin it anew without --cuda-graphs (in "
                "its flags or its space) and with a new --study-dir, and please report it with the run's "
                "config.yaml (in its folder under --study-dir).")
    return ("the training state is saved: run again with --resume auto and without --cuda-graphs, and please "
            "report it with the run's config.yaml.")


@dataclass
class Captured:
    """One captured graph: what replays it, and the (loss, logits) each replay writes."""

    replay: Callable[[], None]
    outputs: tuple[torch.Tensor, torch.Tensor]


def time_ddp_only_at_start(model) -> None:
    """Leave DDP timing its first 10 forwards (the warm-up covers them) but none after: its sample
    rate is private API (torch 1.10 and later), so a model without it is left as it is."""
    set_sample_rate = getattr(model, "_set_ddp_runtime_logging_sample_rate", None)
    if set_sample_rate is not None:
        set_sample_rate(2**31 - 1)  # DDP's C++ side holds it in an int


class GraphedStep:
    """BatchStep's contract (called with a batch, returns its detached (loss, logits)), with the
    device work of each batch replayed from a CUDA graph once one is captured.

    One graph per shape; with --grad-accum-steps above 1, two: one for the batches that only add
    their gradients (without DDP's all-reduce), one for the batch that ends the group (adds, steps,
    then zeroes the gradients in place for the next group). `train_size()` gives the side of the
    crops the next batch trains at: a change starts a new warm-up and capture. `graphs` warms up and
    captures (CudaGraphs on a GPU); the seconds its captures take go to `phases` as "capture"."""

    def __init__(self, learner: Learner, accelerator, train_size: Callable[[], int], graphs: CudaGraphs,
                 phases: PhaseTimes | None = None):
        self.learner, self.accelerator, self.train_size, self.graphs = learner, accelerator, train_size, graphs
        self.phases = phases or PhaseTimes()  # where the time of each capture is added up ("capture")
        self.eager = BatchStep(learner, accelerator)
        self.warmup_batches = WARMUP_BATCHES if accelerator.num_processes == 1 else DDP_WARMUP_BATCHES
        self.accumulation = accelerator.gradient_accumulation_steps
        self.shape: tuple | None = None
        self.warm_batches = 0
        self.captured: dict[bool, Captured] = {}  # by whether the batch ends with an optimizer step
        self.batch_in_group = 0
        self.stepped = True  # whether the last batch ended with an optimizer step
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # what every replay reads
        self.gradients: list[torch.Tensor] = []  # accumulating: what the graphs add into, held here

    def __call__(self, views: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.train_size(), views.shape, labels.shape)
        if shape != self.shape:  # at an epoch's start, where a group of accumulated batches starts too
            self.shape, self.warm_batches, self.captured, self.batch_in_group = shape, 0, {}, 0
        if not self.captured and (self.warm_batches < self.warmup_batches or not self.eager.stepped):
            self.warm_batches += 1  # warm up in whole groups, so that the first replay starts one
            outputs = self.graphs.warm_up(lambda: self.eager(views, labels))
            self.stepped = self.eager.stepped
            return outputs
        self.stepped = self.batch_in_group == self.accumulation - 1
        self.batch_in_group = (self.batch_in_group + 1) % self.accumulation
        if self.stepped not in self.captured:
            self.captured[self.stepped] = self.capture(views, labels, self.stepped)
        return self.replay(self.captured[self.stepped], views, labels)

    def replay(self, captured: Captured, views: torch.Tensor, labels: torch.Tensor):
        """Copy the batch in, and run the host work of an optimizer step around the replay."""
        self.inputs[0].copy_(views)
        self.inputs[1].copy_(labels)
        if self.stepped:
            self.learner.averager.advance()
        captured.replay()
        if self.stepped:
            self.learner.scheduler.step()
        return captured.outputs

    def capture(self, views: torch.Tensor, labels: torch.Tensor, steps: bool) -> Captured:
        learner, accelerator = self.learner, self.accelerator
        if not self.captured:  # the first graph of this shape
            self.prepare_memory(views, labels)
        outputs: list[torch.Tensor] = []

        def device_work() -> None:
            with nullcontext() if steps else accelerator.no_sync(learner.model):
                outputs.extend(forward_backward(learner, accelerator, *self.inputs))
            if steps:
                update_weights(learner, accelerator)
                if self.accumulation > 1:
                    learner.optimizer.zero_grad(set_to_none=False)  # in place, in the graph

        try:
            with self.phases.timing("capture"):
                return Captured(self.graphs.capture(device_work), tuple(outputs))
        except RuntimeError as error:  # new with this option; say how to train on without it
            raise CaptureFailed(f"capturing the training step in a CUDA graph failed ({first_line(error)}); "
                                f"{without_graphs()}") from error

    def prepare_memory(self, views: torch.Tensor, labels: torch.Tensor) -> None:
        """The inputs every graph of this shape reads, and the gradients they write."""
        time_ddp_only_at_start(self.learner.model)
        make_capturable(self.learner.optimizer, views.device)  # here: a resume may have put floats back
        self.inputs = (views.clone(), labels.clone())  # holding a real batch, for the capture
        self.learner.optimizer.zero_grad(set_to_none=True)  # one step a batch: backward allocates them
        if self.accumulation > 1:  # graphs that add must find gradients there. Held here too: an
            # epoch's start sets .grad to None, and the graphs go on using this memory
            trained = [p for p in self.learner.model.parameters() if p.requires_grad]
            self.gradients = [torch.zeros_like(p) for p in trained]
            for parameter, gradient in zip(trained, self.gradients):
                parameter.grad = gradient
