"""The run's Accelerator, and named collectives: each says what it reduces, and is a no-op
on one process."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, reduce

from monkeytrain.errors import UserError

T = TypeVar("T")


def make_accelerator(config) -> Accelerator:
    """The one Accelerator of a run, in the precision `choose_precision` picks."""
    on_gpu = torch.cuda.is_available() and not config.cpu
    if config.mixed_precision == "fp16" and not on_gpu:
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on the CPU.")
    capability = torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else None
    precision, note = choose_precision(config.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"),
                                       capability)
    if note:
        print(f"monkeytrain: warning: {note}", file=sys.stderr, flush=True)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        step_scheduler_with_optimizer=False,  # the trainer steps it once per optimizer step itself
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    config.mixed_precision = accelerator.mixed_precision  # record what the launcher chose
    if accelerator.device.type == "cpu":
        # Not OMP_NUM_THREADS: `accelerate launch` without a config sets it to 1,
        # which would make the main command train at half speed on two cores.
        torch.set_num_threads(config.cpu_threads or cores_per_process(accelerator))
    return accelerator


def choose_precision(asked: str | None, launcher: str | None,
                     capability: tuple[int, int] | None) -> tuple[str, str | None]:
    """(the autocast precision, a warning when it is not the launcher's): the one asked for, else the
    launcher's, else bf16 on a GPU and none on the CPU. A GPU older than Ampere (compute capability
    below 8: T4, V100, P100, the free notebook GPUs) only emulates bf16, which then runs slower than
    fp32; fp16, with loss scaling, is what its tensor cores take, so it gets fp16 instead, the
    launcher's bf16 (our GPU configs say bf16) included."""
    emulates_bf16 = capability is not None and capability[0] < 8
    if asked:
        return asked, None
    if launcher == "bf16" and emulates_bf16:
        return "fp16", (f"bf16 from the Accelerate config is only emulated on this GPU (compute capability "
                        f"{capability[0]}.{capability[1]}, slower than fp32): training in fp16; pass "
                        "--mixed-precision bf16 to insist.")
    if launcher:
        return launcher, None
    if capability is None:
        return "no", None
    return ("fp16" if emulates_bf16 else "bf16"), None


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


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share of `range(num_items)`, with no padding duplicates.

    Shards differ in length by at most one, so anything computed per shard must
    be reduced as sums and counts, never as per-rank means.
    """
    return list(range(rank, num_items, world_size))


def cores_per_process(accelerator) -> int:
    """The CPU cores this process may use, shared among the run's processes (at least one)."""
    return max(1, usable_cores() // accelerator.num_processes)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as under SLURM or taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
