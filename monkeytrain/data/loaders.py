"""Loaders of image files: decoded on demand, shuffled for training or sharded for evaluation."""

from __future__ import annotations

import os
import weakref
from multiprocessing.util import Finalize
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from monkeytrain.data.imagefiles import DECODE_ERRORS, ImageFile, decode_failure, load_rgb
from monkeytrain.distributed import first_problem_of_any_rank, shard_indices, sum_across_ranks
from monkeytrain.errors import UserError, first_line
from monkeytrain.preemption import ignore_stop_signals

T = TypeVar("T")


# The workers of every loader here ignore stop signals (preemption.ignore_stop_signals): the trainer
# ends them. A loader that a reference cycle keeps alive until the process exits would still have
# its workers then, and multiprocessing's exit handler, which SIGTERMs a process's children and then
# waits for them, would wait forever. That handler first runs the finalizers given a priority: the
# one below ends the workers of every loader of the process still alive. Per process: a child of
# multiprocessing starts with no finalizers, and must not touch loaders it inherited.
_live_loaders: tuple[int, "weakref.WeakSet[DataLoader]"] = (-1, weakref.WeakSet())


def ending_workers_at_exit(loader: DataLoader) -> DataLoader:
    """`loader`, its workers ended before the process waits for its children: call it on the loader
    that is iterated (the one Accelerate's `prepare` returns holds a new DataLoader)."""
    global _live_loaders
    iterated = getattr(loader, "base_dataloader", loader)  # Accelerate's wrapper iterates this one
    if iterated.num_workers > 0:
        if _live_loaders[0] != os.getpid():
            _live_loaders = (os.getpid(), weakref.WeakSet())
            Finalize(None, _end_workers_of_live_loaders, args=(_live_loaders[1],), exitpriority=100)
        _live_loaders[1].add(iterated)
    return loader


def end_live_workers() -> None:
    """End the workers of every loader of this process still alive, now: a run does as it ends, however it
    ends. A worker's error leaves the run's loaders to the garbage collector (DataLoader raises it again from
    a frame that holds it, a reference cycle), which closes an iterator's queues before the iterator ends
    its workers: it cannot tell them to end then, and SIGTERMs them, which they ignore."""
    pid, loaders = _live_loaders
    if pid == os.getpid():
        _end_workers_of_live_loaders(loaders)


def _end_workers_of_live_loaders(loaders: "weakref.WeakSet[DataLoader]") -> None:
    for loader in list(loaders):
        iterator = loader._iterator  # persistent workers live in the loader's iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()  # what DataLoader's own cleanup calls; it has no public one
        loader._iterator = None  # a later pass starts new workers


class ImageGone(UserError):
    """An image that was fine when the data was scanned and can no longer be read (deleted, replaced, a
    network disk gone). A DataLoader worker's exception reaches the main process as one of its type whose
    message holds the worker's traceback: the message is cut back to the one line raised."""

    def __init__(self, message: str):
        super().__init__(message.rpartition(f"{type(self).__name__}: ")[2].strip())


def batches_read_everywhere(batches: Iterable, accelerator) -> Iterator:
    """`batches`, each yielded once every rank has read its own; an image that one rank can no longer read
    (ImageGone) raises on every rank at the same batch, with that rank's message, so that all of them stop
    (and save) together, where the others would wait in their next collective for a rank that has ended.
    A rank whose share has ended (evaluation shards differ by one batch) votes on until every one has.
    The cost: one tiny reduction a batch, a device sync on a GPU."""
    batches, done = iter(batches), False
    while True:
        batch, gone = None, None
        if not done:
            try:
                batch = next(batches)
            except StopIteration:
                done = True
            except ImageGone as error:
                gone = error
        vote = torch.tensor([gone is not None, batch is not None], dtype=torch.int64, device=accelerator.device)
        failed, reading = sum_across_ranks(vote).tolist()
        if failed:
            raise ImageGone(first_problem_of_any_rank(str(gone) if gone else None)) from None
        if not reading:
            return
        if batch is not None:
            yield batch


def read_everywhere(read: Callable[[], T], accelerator) -> T:
    """What `read()` returns on this rank, once it has returned on every rank; an image that one rank can no
    longer read raises on every rank, as batches_read_everywhere does for a single batch."""
    [result] = batches_read_everywhere((read() for _ in range(1)), accelerator)  # read() inside the vote
    return result


class ImageListDataset(Dataset):
    """(transformed image, label) for a list of checked image files."""

    def __init__(self, files: list[ImageFile], transform: Callable, min_side: Optional[int] = None):
        self.files = files
        self.transform = transform
        self.min_side = min_side  # the transform's smallest output side: large JPEGs decode faster

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        item = self.files[index]
        try:
            return self.transformed(index), item.label
        except DECODE_ERRORS as error:
            raise ImageGone(f"{item.path} can no longer be read as an image ({first_line(error)}): it changed or "
                            "went away after the data was scanned; put it back, or run again to scan the data "
                            "anew.") from None

    def transformed(self, index: int):
        """The transformed image of file `index`; raises what Pillow raises for a file that does not decode."""
        return self.transform(load_rgb(self.files[index].path, self.min_side))


class DecodedOrWhyNot(Dataset):
    """(transformed image, its ImageFile, "") or (None, its ImageFile, why it did not decode) for each of a list
    of image files that were only glanced at (imagefiles.glance_at_files): a damaged image, found only now, is
    the caller's to report."""

    def __init__(self, images: ImageListDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images.files[index]
        try:
            return self.images.transformed(index), image, ""
        except DECODE_ERRORS as error:
            return None, image, decode_failure(error)


def as_list(items: list) -> list:
    """A DataLoader's collate_fn that keeps a batch as the list of its items (an item may hold None)."""
    return items


def shuffled_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """A shuffling loader; Accelerate's `prepare` shards it across ranks (and the caller passes what
    that returns to `ending_workers_at_exit`).

    The last partial batch is dropped (when there is a full one): a batch of one
    image would make batch norm fail, and tiny batches add noise, not signal.
    """
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        drop_last=len(dataset) >= batch_size,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=ignore_stop_signals,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )


def sharded_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int, world_size: int, collate_fn=None
) -> DataLoader:
    """This rank's disjoint, unpadded shard, in order: every sample is seen exactly once
    across ranks, so sums of per-shard results are exact whatever the dataset size."""
    shard = Subset(dataset, shard_indices(len(dataset), rank, world_size))
    # Its own generator: iterating a loader draws a seed, and drawing it from the
    # global RNG would make training depend on how often we evaluated (or
    # whether channel statistics came from the cache).
    return ending_workers_at_exit(DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available()))
