"""Two real processes (gloo on CPU) through one torchrun launch: collectives, evaluation, training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import write_image_folder
from distributed_checks import IMAGE_SIZE, stats_and_test_evaluation

from monkeytrain import distributed
from monkeytrain.config import parse_config
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.data.pipeline import StreamPipeline
from monkeytrain.distributed import local_main_first
from monkeytrain.errors import UserError

CHECKS = Path(__file__).with_name("distributed_checks.py")
# 27 images a split: divisible neither by the world size (2) nor the batch size (4).
PER_CLASS = {"n0": 9, "n1": 8, "n2": 10}
LAUNCH_SECONDS = 600  # then the launch is ended, and both tests fail
TRAIN_FLAGS = ("--cpu", "--model", "resnet10t", "--image-size", "32", "--epochs", "3", "--batch-size", "4",
               "--num-workers", "0", "--val-fraction", "0.3", "--run-name", "ddp", "--lr", "0.02")


@dataclass
class Launch:
    """The one torchrun launch of both checks: how it ended, and the folder it ran in."""
    returncode: int
    stdout: str
    stderr: str
    folder: Path

    def reports(self, check: str) -> list[dict]:
        """Each rank's report of `check`; fails with the launch's output if the launch failed."""
        assert self.returncode == 0, self.stdout + self.stderr
        ranks = [json.loads((self.folder / check / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in ranks] == [0, 1]
        return ranks


def run_two_ranks(folder: Path, *arguments: str) -> Launch:
    """distributed_checks.py FOLDER ARGUMENTS on two ranks through torchrun, in `folder`. Ended after
    LAUNCH_SECONDS by SIGTERM, which torchrun passes on to its ranks (they run in sessions of their
    own, so a SIGKILL to torchrun would leave them running)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(CHECKS), str(folder), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=LAUNCH_SECONDS)
        except subprocess.TimeoutExpired:
            child.terminate()
            stdout, stderr = child.communicate()
            stderr += f"\n(ended after {LAUNCH_SECONDS} s)"
    return Launch(child.returncode, stdout, stderr, folder)


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=PER_CLASS, size=40)


@pytest.fixture(scope="module")
def two_ranks(odd_dataset, tmp_path_factory) -> Launch:
    """Both checks in one launch (a fresh process spends about 7 s importing torch, timm and
    Accelerate). A failed launch is left to each test to report, so that both fail, not error."""
    return run_two_ranks(tmp_path_factory.mktemp("ranks"), str(odd_dataset), *TRAIN_FLAGS)


def test_stats_and_evaluation_match_one_process(two_ranks, odd_dataset, tmp_path, cpu_accelerator):
    ranks = two_ranks.reports("collectives")

    splits = discover_splits(folders_from_root(odd_dataset), 0.0, 0, strict=False)
    reference = stats_and_test_evaluation(StreamPipeline(splits, IMAGE_SIZE, 4, 0, 0, cpu_accelerator),
                                          splits, tmp_path / "cache1", cpu_accelerator)
    assert not reference["cached"] and reference["count"] == 27
    for rank in ranks:
        assert rank["world"] == 2
        for mode in ("stream", "resident"):  # both pipelines, resident on CPU tensors here
            seen = rank[mode]
            assert not seen["cached"]
            assert seen["mean"] == reference["mean"] and seen["std"] == reference["std"]  # bit-identical
            assert seen["count"] == 27
            assert seen["confusion"] == reference["confusion"]
            assert seen["balanced"] == reference["balanced"]  # from the summed matrix, as accuracy is
            assert seen["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for mode in ("stream", "resident"):
        assert [r[mode]["shard"] for r in ranks] == [14, 13]  # disjoint shards, no padding


def test_a_batch_larger_than_a_ranks_share_trains_the_whole_share_in_either_pipeline(two_ranks):
    """--batch-size 16 on 27 training images over two ranks: each rank's share, 13, is one batch, as on one
    process a batch larger than the data is one batch of all of it (not an epoch of no batch at all)."""
    for rank in two_ranks.reports("collectives"):
        assert rank["big_batches"] == {"stream": [1, [13]], "resident": [1, [13]]}


def test_training_ranks_agree_and_only_rank0_writes(two_ranks):
    main, other = two_ranks.reports("train")
    assert other["writes"] == []
    written = " ".join(main["writes"])
    for name in ("best.safetensors", "config.json", "results.json", "metrics.jsonl", "data_manifest.json"):
        assert name in written
    assert len(main["decisions"]) == 3 and main["decisions"] == other["decisions"]
    # the evaluated average follows training: its validation loss changes from epoch to epoch
    assert len({loss for _, _, loss, _, _ in main["decisions"]}) == 3, main["decisions"]
    assert main["best_epoch"] == other["best_epoch"]
    assert main["test_images"] == other["test_images"] == 27
    output = two_ranks.folder / "train" / "runs"
    results = json.loads((output / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2 and results["test_accuracy"] == main["test_accuracy"]
    logged = [json.loads(line) for line in (output / "ddp" / "metrics.jsonl").read_text().splitlines()]
    # each epoch's balanced accuracy, reduced over both ranks, is the one both chose on and the one logged
    chosen_on = [balanced for _, _, _, balanced, _ in main["decisions"]]
    assert [line["val_balanced_accuracy"] for line in logged] == chosen_on
    assert results["selected_on"] == "balanced-accuracy"


def test_every_rank_validates_with_the_batch_norm_statistics_of_the_model_the_main_process_saves(two_ranks):
    """DDP hands rank 0's statistics to the others at each forward, which then update them from their own
    batch: without a broadcast at the epoch's end, each rank would validate a model of its own."""
    main, other = two_ranks.reports("train")
    assert len(main["evaluated_statistics"]) == 3
    assert main["evaluated_statistics"] == other["evaluated_statistics"]


def test_each_file_is_decoded_by_one_rank_the_other_reads_its_scans(two_ranks, odd_dataset):
    main, other = two_ranks.reports("train")
    assert sorted(main["decoded"]) == sorted(str(p) for p in odd_dataset.rglob("*.png"))
    assert other["decoded"] == []


class ThreadRank:
    """The parts of an Accelerator that local_main_first reads, for one of two ranks run as threads."""

    def __init__(self, rank: int, barrier: threading.Barrier):
        self.is_main_process = self.is_local_main_process = rank == 0
        self.barrier = barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=5)  # broken (both ranks then fail) if the other rank never comes


def test_a_failure_on_the_main_rank_lets_the_other_rank_go_on_and_meet_it():
    barrier, order, outcomes = threading.Barrier(2), [], {}

    def rank(index: int) -> None:
        try:
            with local_main_first(ThreadRank(index, barrier)):
                order.append(index)
                raise UserError("class folder n1 has no readable images")
        except Exception as error:
            outcomes[index] = type(error).__name__

    threads = [threading.Thread(target=rank, args=(index,)) for index in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert order == [0, 1]  # the main rank first, the other only once it is through
    assert outcomes == {0: "UserError", 1: "UserError"}  # not BrokenBarrierError: nobody was left waiting


@pytest.mark.parametrize("group, warm_batches, captures, steps", [("1", 3, 1, 12), ("2", 4, 2, 6)])
def test_a_graphed_ddp_run_trains_exactly_as_the_eager_one(two_ranks, group, warm_batches, captures, steps):
    """Under DDP the captured step holds the gradient all-reduce and the buffer broadcast, which the
    emulator replays on both ranks: each rank must end as the eager run, bit for bit, stepping every
    batch or accumulating gradients over 2 (the adding graph captured without the all-reduce)."""
    runs = [rank["runs"][group] for rank in two_ranks.reports("graphed")]
    for run in runs:
        assert run["different"] == []
        assert (run["warm_batches"], run["captures"], run["steps"]) == (warm_batches, captures, steps)
    assert runs[0]["weight_sum"] == runs[1]["weight_sum"] and runs[0]["best"] == runs[1]["best"]


@pytest.mark.parametrize("main_process", [True, False])
def test_the_precision_warning_is_printed_by_the_main_process_alone(monkeypatch, capsys, main_process):
    """Every rank meets the same hardware and config: eight GPUs would print the same line eight times."""
    class ThisRank(Accelerator):
        is_main_process = main_process  # rank 0, or another rank of a launch

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as a default config written on a GPU machine
    monkeypatch.setattr(distributed, "cpu_does_bf16", lambda: False)
    monkeypatch.setattr(distributed, "Accelerator", ThisRank)
    AcceleratorState._reset_state(True)
    try:
        distributed.make_accelerator(parse_config(["--cpu", "--cpu-threads", str(torch.get_num_threads())]))
    finally:
        AcceleratorState._reset_state(True)
    assert capsys.readouterr().err.count("only emulated on this CPU") == (1 if main_process else 0)


class Processes:
    """The part of an Accelerator that cores_per_process reads."""

    def __init__(self, count: int):
        self.num_processes = count


SLURM_CPU_VARIABLES = ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "SLURM_STEP_ID")


def on_a_64_core_node(monkeypatch, **slurm_variables: str) -> None:
    """This process may run on 64 cores, in a Slurm job with `slurm_variables` (none: in no job) which
    does not pin the job to its cores (TaskPlugin=task/none: the affinity is the whole node)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    for name in SLURM_CPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in slurm_variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("local_world_size, expected", [("8", 8), (None, 16), ("", 16), ("none", 16)])
def test_the_cores_of_a_machine_are_shared_among_the_processes_on_that_machine(monkeypatch, local_world_size,
                                                                                expected):
    """Two nodes of 8 GPUs and 64 cores each: 8 cores a process (stream workers, CPU threads), not 4."""
    on_a_64_core_node(monkeypatch)
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert distributed.cores_per_process(Processes(16)) == 64 // expected


def test_a_single_process_started_inside_a_launch_uses_all_its_cores(monkeypatch):
    on_a_64_core_node(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # inherited from the launch around it
    assert distributed.cores_per_process(Processes(1)) == 64


@pytest.mark.parametrize("variables, cores", [
    ({}, 64),  # no Slurm job: the affinity
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "8"}, 8),  # sbatch --cpus-per-task=8
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "4"}, 8),  # the batch script of --ntasks=2: all 8
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "4", "SLURM_STEP_ID": "0"}, 4),  # a task of srun -n2 -c4
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_STEP_ID": "0"}, 8),  # srun without -c
    ({"SLURM_CPUS_ON_NODE": "128"}, 64),  # pinned, or a node Slurm counts differently: never above the affinity
    ({"SLURM_CPUS_ON_NODE": "", "SLURM_CPUS_PER_TASK": "x", "SLURM_STEP_ID": "0"}, 64),  # odd values: no limit
])
def test_a_slurm_job_uses_the_cores_slurm_gave_it_where_it_is_not_pinned_to_them(monkeypatch, variables, cores):
    """A node shared by jobs (TaskPlugin=task/none): DataLoader workers and CPU threads for the job's
    cores, not for the whole node's, which other jobs use."""
    on_a_64_core_node(monkeypatch, **variables)
    assert distributed.usable_cores() == cores


def test_the_cores_slurm_gave_a_node_are_shared_among_its_processes(monkeypatch):
    on_a_64_core_node(monkeypatch, SLURM_CPUS_ON_NODE="32", SLURM_CPUS_PER_TASK="32", SLURM_STEP_ID="0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # train_multinode.sbatch: one srun task per node, 4 GPUs
    assert distributed.cores_per_process(Processes(8)) == 8


def test_the_first_line_names_the_processes_and_their_device_type_alike_on_every_count():
    """Not '1 process(es) on cpu' beside '2 process(es) on cpu:0' (rank 0's index)."""
    from types import SimpleNamespace

    from monkeytrain.distributed import processes_on

    one = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    two = SimpleNamespace(num_processes=2, device=torch.device("cpu", 0))
    assert (processes_on(one), processes_on(two)) == ("1 process on cpu", "2 processes on cpu")


# --- what the launcher asks for in the environment -----------------------------------------------------------

LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                      "ACCELERATE_DYNAMO_BACKEND")


@pytest.fixture
def launched_with(monkeypatch):
    """Sets the variables `accelerate launch` would have set (none else), and makes Accelerators afresh."""
    def launch(**variables: str) -> None:
        for name in LAUNCHER_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    AcceleratorState._reset_state(True)
    yield launch
    AcceleratorState._reset_state(True)


def accelerator_for(*flags: str):
    """(the Accelerator, the config) of a one-process CPU run with `flags`."""
    config = parse_config(["--cpu", "--cpu-threads", str(torch.get_num_threads()), *flags])
    return distributed.make_accelerator(config), config


def test_the_launchers_gradient_accumulation_is_the_runs_and_recorded(launched_with):
    """ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2 (a DeepSpeed launch, or a stray export): Accelerate accumulated over 2
    batches while the schedule and config.yaml said 1, and the last epoch's lr was 8.33e-2 instead of 0."""
    launched_with(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")
    accelerator, config = accelerator_for()
    assert accelerator.gradient_accumulation_steps == config.grad_accum_steps == 2


@pytest.mark.parametrize("flag, variable", [("3", "2"), ("1", "2"), ("1", "x"), ("1", "0")])
def test_a_gradient_accumulation_the_launcher_contradicts_or_garbles_is_one_line(launched_with, flag, variable):
    """--grad-accum-steps 1 given is the user's as much as 3 is: the launcher's 2 replaced it silently, the
    default it equals, and the run trained and recorded 2."""
    launched_with(ACCELERATE_GRADIENT_ACCUMULATION_STEPS=variable)
    with pytest.raises(UserError, match="ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        accelerator_for("--grad-accum-steps", flag)


def test_a_gradient_accumulation_a_preset_gives_is_the_users_too(launched_with, tmp_path):
    (tmp_path / "preset.yaml").write_text("grad_accum_steps: 1\n")
    launched_with(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="2")
    with pytest.raises(UserError, match="--grad-accum-steps 1 and the launcher's gradient accumulation"):
        accelerator_for("--config", str(tmp_path / "preset.yaml"))


def test_the_flags_gradient_accumulation_is_kept_where_the_launcher_agrees_or_says_nothing(launched_with):
    launched_with(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="3")
    accelerator, config = accelerator_for("--grad-accum-steps", "3")
    assert accelerator.gradient_accumulation_steps == config.grad_accum_steps == 3
    launched_with()
    AcceleratorState._reset_state(True)
    accelerator, config = accelerator_for("--grad-accum-steps", "4")
    assert accelerator.gradient_accumulation_steps == config.grad_accum_steps == 4


def test_the_launchers_inductor_backend_is_compile_and_recorded(launched_with):
    """`accelerate launch --dynamo_backend inductor`: Accelerate compiled in prepare() while config.yaml said
    compile: false, its kernels outside --cache-dir, unknown to the --cuda-graphs checks."""
    from accelerate.utils import DynamoBackend

    launched_with(ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    accelerator, config = accelerator_for()
    assert config.compile is True  # the trainer compiles, as --compile does
    assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO  # and Accelerate does not, again


def test_another_dynamo_backend_of_the_launchers_is_not_used_and_said_so(launched_with, capsys):
    from accelerate.utils import DynamoBackend

    launched_with(ACCELERATE_DYNAMO_BACKEND="AOT_EAGER")
    accelerator, config = accelerator_for()
    assert config.compile is False and accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    assert capsys.readouterr().err == ("monkeytrain: warning: the dynamo backend aot_eager from `accelerate launch` is "
                                       "not used: monkeytrain compiles with Inductor on --compile; pass --compile, or "
                                       "leave the backend out.\n")


def test_the_launchers_fp16_on_the_cpu_trains_and_is_recorded_as_fp32_and_says_so(launched_with, capsys):
    """`accelerate launch --mixed_precision fp16` on the CPU: Accelerate trains in fp32 (no native amp there)
    but said fp16, which config.yaml recorded; our own --mixed-precision fp16 is refused on the CPU."""
    launched_with(ACCELERATE_MIXED_PRECISION="fp16")
    accelerator, config = accelerator_for()
    assert accelerator.mixed_precision == config.mixed_precision == "no"
    assert capsys.readouterr().err == ("monkeytrain: warning: fp16 from the Accelerate config does not run on the CPU: "
                                       "training in fp32; pass --mixed-precision bf16 for mixed precision on the "
                                       "CPU.\n")


# --- a Slurm step of several tasks ----------------------------------------------------------------------------

SRUN_TWO_TASKS = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}


@pytest.mark.parametrize("variables", [
    {},                                                        # no Slurm
    {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"},       # the batch script of sbatch --ntasks=2: no step
    {**SRUN_TWO_TASKS, "SLURM_STEP_NUM_TASKS": "1"},          # srun -n 1
    {**SRUN_TWO_TASKS, "WORLD_SIZE": "2"},                    # one srun task per node, each running a launcher
])
def test_one_process_or_one_launch_per_slurm_step_trains(variables):
    distributed.check_one_run_per_slurm_step(variables)


def test_srun_of_several_tasks_without_a_launcher_is_one_line_from_the_first_task(tmp_path, monkeypatch, capsys):
    """`srun -n 2 python monkeytrain/train.py` (timm's idiom) trained two runs, each saying '1 process on cpu',
    both on the first GPU. The first task says what to do instead; the second exits as it does, silently."""
    from monkeytrain import train

    monkeypatch.chdir(tmp_path)
    for name, value in SRUN_TWO_TASKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", task)
        with pytest.raises(SystemExit) as ended:
            train.main(["--debug"])
        assert ended.value.code == 2
        said = capsys.readouterr().err.splitlines()
        assert said == ([] if task == "1" else [
            "monkeytrain: error: this Slurm job step runs 2 tasks (srun -n 2), each of which would train a run of its "
            "own; start one task per node, which starts a process per GPU: sbatch slurm/train.sbatch "
            "... for one node, sbatch slurm/train_multinode.sbatch ... for several (one slurm/launch_node.sh per "
            "node), or srun -n 1."])
    assert not (tmp_path / "runs").exists()
