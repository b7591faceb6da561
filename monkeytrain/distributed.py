"""The run's Accelerator, and named collectives: each says what it reduces, and is a no-op
on one process. And how the processes of a launch end with one message, not one each."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import GradientAccumulationPlugin, broadcast, broadcast_object_list, gather_object, reduce

from monkeytrain.config import PRECISION_CHOICES
from monkeytrain.errors import USAGE_EXIT_CODE, UserError, to_stderr

T = TypeVar("T")
# How long a process other than the main one waits to hear how the main process ended before it speaks for
# itself: an error that every process meets reaches the main one moments apart (the same code, in step), and a
# main process waiting in a collective fails as soon as this one's connections close.
MAIN_OUTCOME_SECONDS = 10.0
A_BUG = "(a bug: its traceback follows)"  # the main process's outcome when it is no message of ours
# What `accelerate launch` (its flags or config file) sets, which Accelerate would read by itself.
GRADIENT_ACCUMULATION_VARIABLE = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
# Accelerate 1.16 sets it for DeepSpeed only; Accelerator() reads it whoever set it.
WHO_SETS_IT = "set by `accelerate launch --gradient_accumulation_steps` with DeepSpeed, its config, or an export"
DYNAMO_BACKEND_VARIABLE = "ACCELERATE_DYNAMO_BACKEND"
# Set by `monkeytrain tune` (to its --study-dir) in its own process, whose runs are its trials and its best run:
# tune, not such a run, says how a stopped study goes on, and `srun -n N monkeytrain tune` is N workers of one
# study, each training its runs one process each, not N tasks of one run.
TUNE_STUDY_VARIABLE = "MONKEYTRAIN_TUNE_STUDY"


def make_accelerator(config) -> Accelerator:
    """The one Accelerator of a run, in the precision `choose_precision` picks. What Accelerate would read
    by itself from the launcher's environment, unknown to the config (gradient accumulation, a dynamo
    backend), is the config's first (take_launcher_settings): the run uses and records what it trains with."""
    if not a_run_of_tune():  # a tune worker's runs are one process each, whatever its srun step holds
        check_one_run_per_slurm_step()
    on_gpu = torch.cuda.is_available() and not config.cpu
    if config.mixed_precision == "fp16" and not on_gpu:
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")
    notes = take_launcher_settings(config)
    precision, note = choose_precision(config.mixed_precision, launcher_precision(),
                                       Hardware.of_this_process(on_gpu))
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=precision,
        # Given, so that Accelerate reads neither from the environment itself (take_launcher_settings has):
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.grad_accum_steps),
        dynamo_backend="no",  # the trainer compiles on --compile (model.compiled), its kernels in --cache-dir
        step_scheduler_with_optimizer=False,  # the trainer steps it once per optimizer step itself
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.is_main_process:  # the same on every rank: once, not once per GPU
        for warning in [*notes, note] if note else notes:
            to_stderr("warning", warning)
    config.mixed_precision = accelerator.mixed_precision  # record what the launcher chose
    if accelerator.device.type == "cpu":
        # Not OMP_NUM_THREADS: `accelerate launch` without a config sets it to 1,
        # which would make the main command train at half speed on two cores.
        torch.set_num_threads(config.cpu_threads or cores_per_process(accelerator))
    return accelerator


def a_run_of_tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process trains the runs of a `monkeytrain tune` worker (TUNE_STUDY_VARIABLE)."""
    return bool(environ.get(TUNE_STUDY_VARIABLE))


def check_one_run_per_slurm_step(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a Slurm job step of several tasks that no launcher made one run of (no WORLD_SIZE above 1):
    `srun -n 2 python monkeytrain/train.py` (timm's idiom) would train a separate run in each task, all on
    the first GPU. The first task says so; the others exit with the same status, silently."""
    tasks = positive_int(environ.get("SLURM_STEP_NUM_TASKS")) if environ.get("SLURM_STEP_ID") else None
    if (tasks or 1) == 1 or (positive_int(environ.get("WORLD_SIZE")) or 1) > 1:
        return
    if environ.get("SLURM_PROCID", "0").strip() not in ("", "0"):
        raise SystemExit(USAGE_EXIT_CODE)
    raise UserError(f"this Slurm job step runs {tasks} tasks (srun -n {tasks}), each of which would train a run of "
                    "its own; start one task per node, which starts a process per GPU: sbatch "
                    "slurm/train.sbatch ... for one node, sbatch slurm/train_multinode.sbatch ... for several "
                    "(one slurm/launch_node.sh per node), or srun -n 1.")


def take_launcher_settings(config, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Make the config's what `accelerate launch` asked for in the environment, which Accelerate would apply
    unknown to the config: the trainer would schedule the lr for steps that never come (gradient accumulation),
    and compile where the cache folder and the --cuda-graphs checks do not know (a dynamo backend). Returns
    warnings to show. The launcher's gradient accumulation replaces the default --grad-accum-steps; a value given
    to both that differs (--grad-accum-steps 1 included) is refused. Its Inductor backend is --compile; another
    backend is not used."""
    steps = launcher_accumulation_steps(environ)
    if steps and "grad_accum_steps" not in config.given:
        config.grad_accum_steps = steps
    elif steps and steps != config.grad_accum_steps:
        raise UserError(f"--grad-accum-steps {config.grad_accum_steps} and the launcher's gradient accumulation "
                        f"({GRADIENT_ACCUMULATION_VARIABLE}={steps}: {WHO_SETS_IT}) differ; give one of them, or both "
                        "the same.")
    backend = environ.get(DYNAMO_BACKEND_VARIABLE, "").strip().lower()
    if backend == "inductor":
        config.compile = True
    elif backend not in ("", "no"):
        return [f"the dynamo backend {backend} from `accelerate launch` is not used: monkeytrain compiles with "
                "Inductor on --compile; pass --compile, or leave the backend out."]
    return []


def launcher_accumulation(config, environ: Mapping[str, str] = os.environ) -> str | None:
    """The launcher's setting in words where the run's gradient accumulation is the launcher's, not a given
    --grad-accum-steps (take_launcher_settings), for a message to name what the user set; else None."""
    if "grad_accum_steps" in config.given or not launcher_accumulation_steps(environ):
        return None
    return f"{GRADIENT_ACCUMULATION_VARIABLE}={config.grad_accum_steps} ({WHO_SETS_IT})"


def launcher_accumulation_steps(environ: Mapping[str, str]) -> int | None:
    """The gradient accumulation `accelerate launch` passes on (None: none), checked: Accelerate would end an
    odd value in a traceback."""
    value = environ.get(GRADIENT_ACCUMULATION_VARIABLE, "").strip()
    if value and not positive_int(value):
        raise UserError(f"{GRADIENT_ACCUMULATION_VARIABLE}={environ[GRADIENT_ACCUMULATION_VARIABLE]!r} ({WHO_SETS_IT}) "
                        "is not a whole number of at least 1; fix it or unset it, and give --grad-accum-steps.")
    return positive_int(value)


@dataclass(frozen=True)
class Hardware:
    """What the precision of a run rests on: the GPU's compute capability (None: the run trains on the
    CPU), and whether the CPU computes in bf16 natively (AVX512-BF16 or AMX)."""

    capability: tuple[int, int] | None
    cpu_bf16: bool = True

    @classmethod
    def of_this_process(cls, on_gpu: bool) -> "Hardware":
        if on_gpu:
            return cls(torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0))))
        return cls(None, cpu_does_bf16())

    def emulating_bf16(self) -> str | None:
        """The device in words where it only emulates bf16 (then slower than fp32), else None. A GPU older
        than Ampere (compute capability below 8: T4, V100, P100, the free notebook GPUs); a CPU without
        bf16 instructions: about 10x slower than fp32 on the 2-core Xeon of benchmarks/RESULTS.md."""
        if self.capability is not None:
            major, minor = self.capability
            return f"GPU (compute capability {major}.{minor})" if major < 8 else None
        return None if self.cpu_bf16 else "CPU (no AVX512-BF16 or AMX instructions)"


def cpu_does_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (a private op of torch's: where it is missing,
    say yes, and bf16 stays wherever the launcher asks for it, as before)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def launcher_precision() -> str | None:
    """The precision `accelerate launch` passes on (from its flag or config file), checked: we hand it to
    the Accelerator ourselves, where an odd value would end in a traceback."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if value and value not in PRECISION_CHOICES:
        raise UserError(f"ACCELERATE_MIXED_PRECISION={os.environ['ACCELERATE_MIXED_PRECISION']!r} (from `accelerate "
                        f"launch --mixed_precision` or its config file) is not one of {', '.join(PRECISION_CHOICES)}; "
                        "fix the config, or pass --mixed-precision.")
    return value or None


def choose_precision(asked: str | None, launcher: str | None, hardware: Hardware) -> tuple[str, str | None]:
    """(the autocast precision, a warning when it is not the launcher's): the one asked for, else the
    launcher's, else bf16 on a GPU and none on the CPU. Where bf16 is only emulated, the launcher's bf16
    (our GPU configs say bf16, as may a default config shared with GPU machines) becomes what the device
    does fast: fp16 with loss scaling on an older GPU's tensor cores, fp32 on the CPU."""
    emulating = hardware.emulating_bf16()
    fast = "fp16" if hardware.capability is not None else "no"
    if asked:
        return asked, None
    if launcher == "fp16" and hardware.capability is None:  # Accelerate has no fp16 autocast on the CPU
        return "no", ("fp16 from the Accelerate config does not run on the CPU: training in fp32; "
                      "pass --mixed-precision bf16 for mixed precision on the CPU.")
    if launcher == "bf16" and emulating:
        return fast, (f"bf16 from the Accelerate config is only emulated on this {emulating}, slower than "
                      f"fp32: training in {'fp32' if fast == 'no' else fast}; pass --mixed-precision bf16 to insist.")
    if launcher:
        return launcher, None
    if hardware.capability is None:
        return "no", None
    return ("fp16" if emulating else "bf16"), None


@contextmanager
def local_main_first(accelerator, everywhere: bool = False) -> Iterator[None]:
    """The work inside done first by each node's main process (by the run's one main process with
    `everywhere`), then by the others, which find what it left in the caches. Unlike Accelerate's
    `local_main_process_first`, a main process that fails still lets the others go: they then meet
    the same error themselves (a data error is the same on every rank) and every rank ends with its
    one line, where they would otherwise wait for ever at a barrier the main process never reaches."""
    goes_first = accelerator.is_main_process if everywhere else accelerator.is_local_main_process
    if not goes_first:
        accelerator.wait_for_everyone()
    try:
        yield
    finally:
        if goes_first:
            accelerator.wait_for_everyone()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `tensor` over all ranks (pixel sums, correct counts, ...)."""
    return reduce(tensor, reduction="sum")


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank, so all ranks take the same branch."""
    votes = sum_across_ranks(torch.tensor([0 if flag else 1], device=device))
    return int(votes.item()) == 0


def broadcast_from_main(value: T) -> T:
    """Every rank receives the main process's `value` (any picklable object)."""
    holder: list[Any] = [value]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def first_problem_of_any_rank(problem: str | None) -> str | None:
    """The problem of the lowest rank that has one (None: no rank has), on every rank: a failure that
    one rank alone may meet (a write), which every rank then stops with, none left waiting for it."""
    problems = [found for found in gather_object([problem]) if found]
    return problems[0] if problems else None


def failing_alike_on_every_rank(work: Callable[[], None]) -> None:
    """`work` on every rank, where it may fail on one alone (the main process's write of metrics.jsonl): its
    UserError's line then ends every rank, at the cost of one small gather, rather than leave the others waiting
    for it at their next collective (until a timeout under NCCL; gloo's closed connection, a line of its own)."""
    failure = None
    try:
        work()
    except UserError as error:  # DiskFull, WriteFailed, the run folder gone
        failure = error
    problem = first_problem_of_any_rank(str(failure) if failure else None)
    if failure:
        raise failure
    if problem:
        raise UserError(problem)


def processes_on(accelerator) -> str:
    """'2 processes on cuda', for the run's first line: the device type, as every rank has its own index."""
    count = accelerator.num_processes
    return f"{count} process{'es' * (count > 1)} on {accelerator.device.type}"


def main_process_statistics(module: torch.nn.Module) -> None:
    """Every rank's floating-point buffers of `module` (batch-norm running statistics) made the main
    process's, in place (a CUDA graph may read them). DDP broadcasts them only at the start of each
    forward, which then updates them from the rank's own batch, so between forwards, and in a weight
    average taken then, each rank holds statistics of its own: the model it evaluates would not be the
    one the main process saves."""
    buffers = [buffer for buffer in module.buffers() if buffer.is_floating_point()]
    if buffers:
        broadcast(buffers, from_process=0)


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share of `range(num_items)`, with no padding duplicates.

    Shards differ in length by at most one, so anything computed per shard must
    be reduced as sums and counts, never as per-rank means.
    """
    return list(range(rank, num_items, world_size))


def cores_per_process(accelerator) -> int:
    """The CPU cores this process may use, shared among the run's processes on this machine (at least one)."""
    return max(1, usable_cores() // processes_on_this_machine(accelerator))


def processes_on_this_machine(accelerator) -> int:
    """The run's processes that share this machine's cores: on several machines, fewer than the run's
    (two nodes of 8 GPUs: 8, not 16). torchrun and `accelerate launch` say how many in LOCAL_WORLD_SIZE;
    without it, all of the run's, which is right on one machine and too many, never too few, on several
    (and never more: a run of one process started from inside a launch inherits its LOCAL_WORLD_SIZE)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    count = int(local) if local.isdigit() and int(local) >= 1 else accelerator.num_processes
    return min(count, accelerator.num_processes)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as under taskset), and in a Slurm job at most
    those Slurm gave it: a cluster that does not pin jobs to their cores (TaskPlugin=task/none) leaves
    the affinity at the whole node, which the job shares with others."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    allocated = slurm_cores()
    return min(affinity, allocated) if allocated else affinity


def slurm_cores() -> int | None:
    """The CPUs Slurm gave this process on this node (None: not in a Slurm job). SLURM_CPUS_ON_NODE is
    the job step's: the batch script's whole share of the node, or an `srun` step's. Within an srun
    step each task has SLURM_CPUS_PER_TASK of them (where given); the batch script is no such task:
    with `--ntasks=2 --cpus-per-task=2` it may use all 4. (Not SLURM_JOB_CPUS_PER_NODE: an salloc
    shell on the login node has it too, which names other machines' CPUs.)"""
    counts = [positive_int(os.environ.get("SLURM_CPUS_ON_NODE"))]
    if os.environ.get("SLURM_STEP_ID"):  # unset in the batch script, set in an srun step's tasks
        counts.append(positive_int(os.environ.get("SLURM_CPUS_PER_TASK")))
    known = [count for count in counts if count]
    return min(known) if known else None


def positive_int(text: str | None) -> int | None:
    """`text` as a whole number of at least 1, else None (unset, empty or odd: then not a limit)."""
    text = (text or "").strip()
    return int(text) if text.isdigit() and int(text) >= 1 else None


def said_once_per_launch(outcome: str, say: Callable[[], None], main_said: Callable[[str], bool]) -> None:
    """`say()` how this process ends, once per launch rather than once per process. The main process says
    it at once, then tells the others `outcome` (its message); another process waits for the main process's
    and says its own unless `main_said(the main process's outcome)`. Where no launcher's store answers (a
    launch without torchrun's agent), or the main process tells nothing in time, every process speaks: a
    message is said twice rather than lost."""
    if os.environ.get("RANK", "0") == "0":
        say()
        tell_the_other_processes(outcome)
        return
    told = main_outcome(launcher_store())
    if told is None or not main_said(told):
        say()


def tell_the_other_processes(outcome: str) -> None:
    """On the main process, leave `outcome` (how it ends: its message, or A_BUG) in the launcher's store, for
    the others that wait for it in `said_once_per_launch`; nothing elsewhere."""
    store = launcher_store() if os.environ.get("RANK", "0") == "0" else None
    if store is not None:
        with suppress(RuntimeError):  # gone meanwhile: nobody is left to tell
            store.set(main_outcome_key(), outcome.encode("utf-8", "surrogatepass"))  # a path's escaped bytes too


def launcher_store():
    """A client of the key-value store that torchrun's agent (under `accelerate launch` too) keeps for the
    whole launch, which any process reaches whatever the others are doing, unlike a collective (None: no
    such store answers). Probed first: torch's client prints a page of C++ errors while it retries one gone."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not port.isdigit():
        return None
    try:
        socket.create_connection((address, int(port)), timeout=2).close()
        return torch.distributed.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=5),
                                          wait_for_workers=False)
    except (OSError, RuntimeError):  # torch's DistNetworkError is a RuntimeError
        return None


def main_outcome(store) -> str | None:
    """The main process's outcome, once it is in `store` (None: not within MAIN_OUTCOME_SECONDS, or no store).
    Looked for rather than waited for: a wait that times out prints C++ warnings."""
    deadline = time.monotonic() + MAIN_OUTCOME_SECONDS
    try:
        while store is not None and time.monotonic() < deadline:
            if store.check([main_outcome_key()]):
                return store.get(main_outcome_key()).decode("utf-8", "surrogatepass")
            time.sleep(0.05)
    except RuntimeError:  # the store went away with the launcher
        pass
    return None


def main_outcome_key() -> str:
    """The store's key for the main process's outcome; a restarted worker group (torchrun --max-restarts)
    keeps the store, so each has its own."""
    return f"monkeytrain/main-outcome/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
