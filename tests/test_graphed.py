"""monkeytrain.graphed: the training step replayed from CUDA graphs, checked on the CPU.

The GPU's capture is replaced by tests/graph_emulator.py, which replays recorded ops with every
host value frozen as a CUDA graph freezes it. A graphed run must then train exactly as the eager
one: same weights, same average, same figures, across progressive resizing, MixUp/CutMix,
clipping, a stop and a resume.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch

from conftest import write_image_folder
from graph_emulator import EmulatedGraphs, FreedUnderTheGraph, HostSyncInCapture
from graphed_runs import StopAt, as_on_a_gpu, different_weights, train_run
from monkeytrain import averaging, graphed
from monkeytrain import trainer as trainer_module
from monkeytrain.averaging import LiveWeights
from monkeytrain.distributed import TUNE_STUDY_VARIABLE
from monkeytrain.engine import BatchStep, Learner
from monkeytrain.errors import UserError
from monkeytrain.graphed import WARMUP_BATCHES, CaptureFailed, GraphedStep, graphs_unavailable
from monkeytrain.statestore import state_dirs
from monkeytrain.trainer import Trainer


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """2 classes x 9 images (8 train, 1 held out each): 8 batches of 2 per epoch."""
    return write_image_folder(tmp_path_factory.mktemp("graphed") / "data", layout="train-val", classes=2,
                              per_class=9, size=36)


@pytest.fixture(scope="module")
def eager(data_folder, tmp_path_factory) -> Trainer:
    """The eager run that graphed runs must equal, trained once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        as_on_a_gpu(patch)
        patch.chdir(tmp_path_factory.mktemp("eager"))
        return train_run(data_folder, "eager")


@pytest.fixture
def train(data_folder, tmp_path, monkeypatch):
    """train(run_name, *flags, stop=None) -> the Trainer after fit(), with graphs as on a GPU."""
    as_on_a_gpu(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return lambda name, *flags, stop=None: train_run(data_folder, name, *flags, stop=stop)


def assert_same_weights(trained: Trainer, reference: Trainer) -> None:
    different = different_weights(trained, reference)
    assert not different, f"{len(different)} tensors differ, the first {different[:3]}"


def test_a_graphed_run_trains_exactly_as_the_eager_one(eager, train):
    graphs = train("graphed", "--cuda-graphs")
    assert isinstance(graphs.step, GraphedStep) and isinstance(eager.step, BatchStep)
    assert graphs.step.graphs.captures == 2  # one per crop size: 16 px, then 32 px
    assert graphs.run.phases.seconds["capture"] > 0 and "capture" not in eager.run.phases.seconds
    assert_same_weights(graphs, eager)
    assert graphs.best == eager.best
    assert graphs.learner.scheduler.get_last_lr() == eager.learner.scheduler.get_last_lr()
    assert torch.equal(graphs.generator.get_state(), eager.generator.get_state())


@pytest.mark.parametrize("first_run", ["--cuda-graphs", "--no-cuda-graphs"])
def test_a_graphed_run_stopped_and_resumed_ends_as_the_uninterrupted_one(eager, train, first_run):
    # The stop comes at the 9th check (one before training, then one a step on the CPU), after optimizer
    # step 8, the last batch of epoch 1, which a graphed run trains by replaying its first capture.
    stopped = train("stopped", first_run, stop=StopAt(check=9))
    assert (stopped.progress.epoch, stopped.progress.batch) == (1, 8) and state_dirs(stopped.run.run_dir)
    resumed = train("stopped", "--cuda-graphs", "--resume", "auto")
    assert resumed.step.graphs.captures == 2 and resumed.progress == eager.progress
    assert_same_weights(resumed, eager)


def test_a_graphed_run_accumulating_gradients_trains_exactly_as_the_eager_one(train):
    """Groups of 4 (two an epoch): two graphs per crop size, one for the batches that only add their
    gradients (three times a group, each adding to the last), one for the batch that ends the group.
    Warm-up comes in whole groups (3 batches make 4), so that the first replay starts one."""
    graphs, eager = (train(name, "--grad-accum-steps", "4", *flags) for name, flags in
                     (("graphed", ["--cuda-graphs"]), ("eager", [])))
    assert graphs.step.graphs.captures == 4 and graphs.step.warm_batches == 4
    assert graphs.progress == eager.progress and graphs.progress.step == 6
    assert_same_weights(graphs, eager)


def test_a_graphed_adamw_run_trains_exactly_as_the_eager_one(train):
    flags = ("--optimizer", "adamw", "--lr", "0.002", "--epochs", "1", "--min-train-size", "0")
    graphs, eager = train("graphed", *flags, "--cuda-graphs"), train("eager", *flags)
    assert graphs.step.graphs.captures == 1 and graphs.learner.optimizer.param_groups[0]["capturable"]
    assert_same_weights(graphs, eager)


def test_a_graphed_run_with_random_erasing_trains_exactly_as_the_eager_one(eager, train):
    """The rectangles and their noise are drawn on the device from the run's generator: each replay, at
    16 px and then at 32 px, erases what the eager step erases."""
    erasing = ("--random-erasing", "0.5")
    graphs, erased = train("graphed", *erasing, "--cuda-graphs"), train("erased", *erasing)
    assert graphs.step.graphs.captures == 2
    assert different_weights(erased, eager)  # the erasing changed what was trained
    assert_same_weights(graphs, erased)
    assert torch.equal(graphs.generator.get_state(), erased.generator.get_state())


def with_dropout(patch: pytest.MonkeyPatch) -> None:
    """Models built with dropout before the head and drop_path in the blocks: both draw from the
    default generator (given none), which a CUDA graph replays as it does the run's own (PyTorch
    registers it with every capture): each replay draws anew, in the eager step's order."""
    patch.setattr(timm, "create_model", partial(timm.create_model, drop_rate=0.5, drop_path_rate=0.2))


@pytest.fixture(scope="module")
def eager_with_dropout(data_folder, tmp_path_factory) -> tuple[Trainer, torch.Tensor]:
    """The eager run with dropout, and the default generator's state after it."""
    with pytest.MonkeyPatch.context() as patch:
        as_on_a_gpu(patch)
        with_dropout(patch)
        patch.chdir(tmp_path_factory.mktemp("eager_with_dropout"))
        return train_run(data_folder, "eager"), torch.default_generator.get_state()


def test_a_graphed_run_of_a_model_with_drop_path_and_dropout_trains_exactly_as_the_eager_one(
        eager, eager_with_dropout, train, monkeypatch):
    dropped, generator_after = eager_with_dropout
    with_dropout(monkeypatch)
    graphs = train("graphed", "--cuda-graphs")
    assert graphs.step.graphs.captures == 2
    assert different_weights(dropped, eager)  # the dropping changed what was trained
    assert_same_weights(graphs, dropped)
    assert torch.equal(torch.default_generator.get_state(), generator_after)


def test_a_graphed_run_with_dropout_stopped_and_resumed_ends_as_the_uninterrupted_one(eager_with_dropout, train,
                                                                                      monkeypatch):
    """The saved state holds the default generator where the eager run's stands (no capture moved it)."""
    with_dropout(monkeypatch)
    stopped = train("stopped", "--cuda-graphs", stop=StopAt(check=9))
    assert (stopped.progress.epoch, stopped.progress.batch) == (1, 8)
    resumed = train("stopped", "--cuda-graphs", "--resume", "auto")
    assert_same_weights(resumed, eager_with_dropout[0])


def test_the_emulator_sees_a_learning_rate_frozen_into_the_graph(train, monkeypatch):
    """What the graphed run's equality with the eager one rests on: a rate left in a Python float is
    frozen at capture, and then the run drifts (the schedule changes the rate every step)."""
    for module, name in ((graphed, "make_capturable"), (trainer_module, "hold_lr_in_tensors")):
        monkeypatch.setattr(module, name, lambda optimizer, device: None)
    frozen = train("frozen", "--cuda-graphs", "--epochs", "1", "--min-train-size", "0")
    eager = train("eager", "--epochs", "1", "--min-train-size", "0")
    assert not torch.equal(frozen.learner.model.conv1[0].weight, eager.learner.model.conv1[0].weight)


def test_the_emulator_refuses_a_host_sync_inside_the_step(train, monkeypatch):
    """timm's own EMA update, even given the decay as a tensor, hands _foreach_lerp_ its weight as a
    Python number, which takes a host sync (.item()): it cannot be captured, as on a GPU."""
    monkeypatch.setattr(averaging.EmaWeights, "apply", lambda self: self.ema.apply_update_(self.live, 1 - self.weight))
    with pytest.raises(HostSyncInCapture, match="_local_scalar_dense"):
        train("synced", "--cuda-graphs", "--epochs", "1")


def test_the_emulator_refuses_a_replay_on_a_tensor_the_program_has_let_go_of():
    """On a GPU that tensor's memory would go back to the allocator while the graph still uses it."""
    weights, step = torch.ones(3), torch.ones(3)
    replay = EmulatedGraphs().capture(lambda: weights.add_(step))
    replay()
    assert torch.equal(weights, torch.full((3,), 2.0))  # the capture ran nothing; one replay added once
    del step
    with pytest.raises(FreedUnderTheGraph, match=r"aten.add_.Tensor replays on a tensor the program has let go"):
        replay()


def test_the_emulator_replays_draws_from_the_default_generator_as_the_eager_step_draws_them():
    """Given no generator, a random op draws from the default one: a capture leaves it where it was, and
    each replay draws the next numbers, as on a GPU (PyTorch registers its default generator with every
    capture)."""
    kept = torch.empty(64)
    torch.manual_seed(0)
    eager = [kept.bernoulli_(0.5).clone() for _ in range(2)]
    torch.manual_seed(0)
    replay = EmulatedGraphs().capture(lambda: kept.bernoulli_(0.5))
    replayed = []
    for _ in range(2):
        replay()
        replayed.append(kept.clone())
    assert not torch.equal(eager[0], eager[1])
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(replayed, eager))


def test_a_capture_that_fails_part_way_leaves_the_tensors_and_generators_as_it_found_them():
    """As a real one, which ran nothing: the trainer saves the training state after a failed capture."""
    weights, before = torch.ones(8), torch.random.get_rng_state()

    def fails_part_way():
        weights.add_(torch.rand(8))
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="not permitted"):
        EmulatedGraphs().capture(fails_part_way)
    assert torch.equal(weights, torch.ones(8)) and torch.equal(torch.random.get_rng_state(), before)


def test_warm_up_batches_come_before_each_capture(train):
    trainer = train("graphed", "--cuda-graphs", "--epochs", "1", "--min-train-size", "0")
    assert WARMUP_BATCHES < trainer.batches_per_epoch
    assert trainer.step.warm_batches == WARMUP_BATCHES and trainer.step.graphs.captures == 1


@pytest.mark.parametrize("processes, warm_batches", [(1, WARMUP_BATCHES), (2, 11)])
def test_under_ddp_eleven_batches_warm_up_before_each_capture(processes, warm_batches):
    """PyTorch's CUDA notes ask for at least 11 under DDP (tests/distributed_checks.py runs DDP graphs
    with fewer: the emulator does not see what they avoid)."""
    accelerator = SimpleNamespace(num_processes=processes, gradient_accumulation_steps=1)
    step = GraphedStep(SimpleNamespace(), accelerator, lambda: 32, EmulatedGraphs())
    assert step.warmup_batches == warm_batches


def test_ddp_times_no_forward_after_its_first_ten_once_graphs_are_captured(tmp_path):
    """Every 100th DDP forward is timed with host-synced events, which a capture must never meet."""
    rates = []
    model = SimpleNamespace(_set_ddp_runtime_logging_sample_rate=rates.append, parameters=lambda: [])
    learner = SimpleNamespace(model=model, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    accelerator = SimpleNamespace(num_processes=2, gradient_accumulation_steps=1)
    GraphedStep(learner, accelerator, lambda: 32, EmulatedGraphs()).prepare_memory(torch.zeros(1), torch.zeros(1))
    assert rates == [2**31 - 1]


def test_on_the_cpu_cuda_graphs_are_declined_with_the_reason(data_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = train_run(data_folder, "cpu", "--cuda-graphs", "--epochs", "1", "--max-batches-per-epoch", "1")
    assert isinstance(trainer.step, BatchStep)
    assert trainer.run.log.warnings == ["--cuda-graphs: training without them, as the run trains on cpu, "
                                        "not a CUDA GPU."]


def one_cuda_process(**changes):
    return SimpleNamespace(**{"device": torch.device("cuda"), "num_processes": 1, "mixed_precision": "bf16",
                              **changes})


@pytest.mark.parametrize("accelerator, mode, named", [
    (one_cuda_process(), "resident", None),  # AdamW and accumulation too: the config has no say
    (one_cuda_process(device=torch.device("cpu")), "resident", "trains on cpu"),
    (one_cuda_process(), "stream", "streamed batches"),
    (one_cuda_process(num_processes=2), "resident", None),  # DDP: checked in test_distributed
    (one_cuda_process(mixed_precision="fp16"), "resident", "fp16"),
])
def test_graphs_apply_to_cuda_processes_on_resident_data(accelerator, mode, named):
    reason = graphs_unavailable(accelerator, mode)
    assert reason is None if named is None else named in reason


class FailingCapture(EmulatedGraphs):
    def capture(self, work):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")


def failed_capture_line(accelerator) -> str:
    """The line of a step whose first capture (after the warm-up batches) fails."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    learner = Learner(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                      torch.nn.CrossEntropyLoss(), LiveWeights(model), augment=lambda views: views)
    step = GraphedStep(learner, accelerator, lambda: 3, FailingCapture())
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    for _ in range(WARMUP_BATCHES):
        step(*batch)
    with pytest.raises(UserError) as failed:
        step(*batch)
    return str(failed.value)


def test_a_failed_capture_is_one_line_that_says_to_train_without_graphs(cpu_accelerator, monkeypatch):
    monkeypatch.delenv(TUNE_STUDY_VARIABLE, raising=False)
    assert failed_capture_line(cpu_accelerator) == (
        "capturing the training step in a CUDA graph failed (CUDA error: operation not permitted when stream is "
        "capturing); the training state is saved: run again with --resume auto and without --cuda-graphs, and "
        "please report it with the run's config.yaml.")


def test_a_failed_capture_in_a_run_of_tune_says_what_a_study_can_do(cpu_accelerator, monkeypatch):
    """tune gives its runs their flags (--resume is refused), and a study continues only with the train.py
    flags and the space it began with (tune_study.check_same_search): tune again without --cuda-graphs is
    refused on the same --study-dir."""
    monkeypatch.setenv(TUNE_STUDY_VARIABLE, "studies/s")  # as a tune worker sets it for the runs it trains
    assert failed_capture_line(cpu_accelerator) == (
        "capturing the training step in a CUDA graph failed (CUDA error: operation not permitted when stream is "
        "capturing); a study keeps the flags and the space it began with, so begin it anew without --cuda-graphs "
        "(in its flags or its space) and with a new --study-dir, and please report it with the run's config.yaml "
        "(in its folder under --study-dir).")


class FailingSecondCapture(EmulatedGraphs):
    def capture(self, work):
        if self.captures == 1:
            return FailingCapture.capture(self, work)
        return super().capture(work)


def test_a_failed_capture_keeps_what_the_run_trained_and_the_run_resumes_without_graphs(eager, train,
                                                                                     monkeypatch):
    """The second capture (32 px crops, after 3 warm-up batches of epoch 3) fails: the state of the
    batches trained so far is saved, and the run resumed eagerly ends exactly as the eager run."""
    monkeypatch.setattr(trainer_module, "CudaGraphs", FailingSecondCapture)
    with pytest.raises(CaptureFailed):
        train("failed", "--cuda-graphs")
    resumed = train("failed", "--resume", "auto")
    assert resumed.run.log.infos[0].startswith("resumed from") and "epoch 3, batch 3" in resumed.run.log.infos[0]
    assert resumed.progress == eager.progress
    assert_same_weights(resumed, eager)
