"""Where batches of stored views come from: resident tensors or streaming DataLoaders.

Both pipelines yield (uint8 views [B, 3, S, S], labels [B]) already on the
training device; `augment.Augmenter` does the rest. `--data-pipeline auto`
keeps the decoded views resident in the training device's memory (GPU memory,
or host memory on a CPU run) when they fit comfortably in what is free, and
streams them otherwise.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from monkeytrain.data.dataset import DatasetSplits
from monkeytrain.data.loaders import (batches_read_everywhere, ending_workers_at_exit, read_everywhere, sharded_loader,
                                      shuffled_loader)
from monkeytrain.data.views import cached_views, view_bytes, view_dataset
from monkeytrain.distributed import (all_ranks_agree, cores_per_process, local_main_first, processes_on_this_machine,
                                     shard_indices)
from monkeytrain.errors import UserError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# The resident views may take at most this share of the device memory free at start
# (on a CPU run: of the host memory available, shared among the run's processes).
RESIDENT_SHARE_OF_FREE_MEMORY = 0.3
MAX_AUTO_WORKERS = 8
EVAL_BATCH = 256


def choose_pipeline(requested: str, splits: DatasetSplits, image_size: int, accelerator) -> str:
    """'resident' or 'stream', the same on every rank."""
    if requested != "auto":
        return requested
    needed = view_bytes(sum(len(f) for f in splits.distinct_splits().values()), image_size)
    fits = needed < RESIDENT_SHARE_OF_FREE_MEMORY * free_memory(accelerator)
    return "resident" if all_ranks_agree(fits, accelerator.device) else "stream"


def free_memory(accelerator) -> int:
    """Bytes this process may fill: free GPU memory, or its share of the available host memory (shared
    with the run's processes on this machine)."""
    if accelerator.device.type == "cuda":
        return torch.cuda.mem_get_info(accelerator.device)[0]
    import psutil  # an Accelerate dependency

    return psutil.virtual_memory().available // processes_on_this_machine(accelerator)


def default_workers(accelerator) -> int:
    """DataLoader workers per rank: the cores this process may use, shared among the ranks, at most 8
    (more than the machine has only slows it down, and torch warns about it)."""
    return min(MAX_AUTO_WORKERS, cores_per_process(accelerator))


class ResidentPipeline:
    """Every split's stored views held on the training device (GPU or CPU); epochs shuffled there."""

    mode = "resident"

    def __init__(self, splits: DatasetSplits, image_size: int, batch_size: int, seed: int,
                 cache_dir: Path, accelerator):
        self.device, self.seed = accelerator.device, seed
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.per_rank = images_per_rank(len(splits.train), self.world)  # before the decode: an error costs none
        # Every rank decodes where it finds no cache (another node's disk, a cache it could not write), so
        # an image may be gone for one rank alone: then every rank stops there, none waits on in a collective
        self.splits = read_everywhere(lambda: self.views_of(splits, image_size, cache_dir, accelerator), accelerator)
        self.resident_bytes = sum(images.numel() for images, _ in self.splits.values())
        self.splits.setdefault("val", self.splits["test"])
        self.train_batch = min(batch_size, self.per_rank)  # a batch larger than a share: the whole share
        self.batches_per_epoch = self.per_rank // self.train_batch
        self._shard: tuple[int | None, torch.Tensor | None] = (None, None)  # the pass last drawn, and its share

    def views_of(self, splits: DatasetSplits, image_size: int, cache_dir: Path,
                 accelerator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each distinct split's (views, labels) on the device; validation may *be* the test split
        (--val-fraction 0): held once."""
        held = {}
        with local_main_first(accelerator):  # one decode per node; the others load the cache
            for name, files in splits.distinct_splits().items():
                images, labels = cached_views(files, image_size, cache_dir)
                held[name] = (images.to(self.device), labels.to(self.device))
        return held

    def train_epoch(self, epoch: int, max_batches: int | None = None,
                    skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of one epoch: `max_batches` full batches at most, the first `skip` of them
        left out (to continue an epoch after a resume).

        Batches are cut from an endless stream of passes over the data, each pass one device-side
        permutation of which every rank takes its own equal share. A batch may wrap from one pass into
        the next, so every batch is full (one static shape, as CUDA graphs need) and no image is
        dropped for not filling a last batch: each pass shows every image once (but for the few left
        over when the images do not share evenly among the ranks, other ones each pass).
        Where a batch starts depends only on (epoch, batch), so a resumed run trains the same batches.
        """
        images, labels = self.splits["train"]
        per_epoch = min(max_batches or self.batches_per_epoch, self.batches_per_epoch)
        for batch in range(skip, per_epoch):
            index = self.stream_slice(((epoch - 1) * per_epoch + batch) * self.train_batch)
            yield images[index], labels[index]

    def stream_slice(self, start: int) -> torch.Tensor:
        """Indices of the `train_batch` samples at `start` of this rank's stream of passes."""
        first_pass, offset = divmod(start, self.per_rank)
        shard = self.pass_shard(first_pass)
        if offset + self.train_batch > self.per_rank:  # wraps into the next pass
            shard = torch.cat([shard, self.pass_shard(first_pass + 1)])
        return shard[offset:offset + self.train_batch]

    def pass_shard(self, number: int) -> torch.Tensor:
        """This rank's share of pass `number` (0, 1, ...): its slice of one seeded permutation."""
        if self._shard[0] != number:
            generator = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + number + 1)
            order = torch.randperm(len(self.splits["train"][1]), generator=generator, device=self.device)
            self._shard = (number, order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank])
        return self._shard[1]

    def eval_batches(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's disjoint, unpadded shard of a split, in order."""
        images, labels = self.splits[name]
        mine = torch.tensor(shard_indices(len(labels), self.rank, self.world), device=self.device)
        for start in range(0, len(mine), EVAL_BATCH):
            index = mine[start:start + EVAL_BATCH]
            yield images[index], labels[index]


class StreamPipeline:
    """Stored views made by DataLoader workers each epoch, from the image files.

    Several processes read their batches in step (batches_read_everywhere), in every loop: training,
    validation, the channel statistics and the test split. An image that one rank alone can no longer
    read then stops every rank at the same batch with the same line, where the others would die in
    their next collective, waiting for a rank that has ended."""

    mode = "stream"
    resident_bytes = 0

    def __init__(self, splits: DatasetSplits, image_size: int, batch_size: int, seed: int,
                 num_workers: int, accelerator):
        self.accelerator, self.num_workers = accelerator, num_workers
        # As resident: a batch larger than a rank's share is the whole share. Accelerate deals whole batches
        # round the ranks and drops a last round that is not full, so a batch of more than the share would
        # leave every rank an epoch of no batch at all.
        train_batch = min(batch_size, images_per_rank(len(splits.train), accelerator.num_processes))
        self.datasets = {name: view_dataset(files, image_size) for name, files in splits.named_splits().items()}
        self.train_loader = ending_workers_at_exit(accelerator.prepare(
            shuffled_loader(self.datasets["train"], train_batch, num_workers, seed)))
        self.batches_per_epoch = len(self.train_loader)
        self.eval_loaders: dict[str, DataLoader] = {}

    def train_epoch(self, epoch: int, max_batches: int | None = None, skip: int = 0) -> Batches:
        """Accelerate shards, shuffles and moves to the device; `max_batches` batches at most,
        the first `skip` left out (decoded but not trained on, so the order is the same)."""
        # Accelerate only advances its sampler's epoch when a loop runs past the
        # last batch, so set it: each epoch gets its own order, even if cut short.
        self.train_loader.set_epoch(epoch)
        # Run to the loader's end when possible, so Accelerate's end-of-loader bookkeeping runs.
        end = None if max_batches is None or max_batches >= self.batches_per_epoch else max_batches
        return self.in_step(self.train_loader if end is None and skip == 0
                            else itertools.islice(self.train_loader, skip, end))

    def eval_batches(self, name: str) -> Batches:
        """This rank's disjoint, unpadded shard of a split, in order, on the device."""
        if name not in self.eval_loaders:
            self.eval_loaders[name] = sharded_loader(
                self.datasets[name], EVAL_BATCH // 4, self.num_workers,
                self.accelerator.process_index, self.accelerator.num_processes)
        device = self.accelerator.device
        return self.in_step((images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
                            for images, labels in self.eval_loaders[name])

    def in_step(self, batches: Batches) -> Batches:
        """`batches`, read in step with the other ranks when there are any (one small reduction a batch)."""
        if self.accelerator.num_processes == 1:
            return batches
        return batches_read_everywhere(batches, self.accelerator)


def images_per_rank(training_images: int, world: int) -> int:
    """Each rank's equal share of the training images (at least one, or a clear error)."""
    if training_images < world:
        raise UserError(f"{training_images} training image(s) cannot give each of {world} processes "
                        "one; add images or start fewer processes.")
    return training_images // world


def build_pipeline(config, splits: DatasetSplits, cache_dir: Path, accelerator):
    mode = choose_pipeline(config.data_pipeline, splits, config.image_size, accelerator)
    if mode == "resident":
        return ResidentPipeline(splits, config.image_size, config.batch_size, config.seed, cache_dir, accelerator)
    workers = default_workers(accelerator) if config.num_workers is None else config.num_workers
    return StreamPipeline(splits, config.image_size, config.batch_size, config.seed, workers, accelerator)
