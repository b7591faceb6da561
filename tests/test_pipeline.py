"""monkeytrain.data.pipeline: device-resident and streaming batches of stored views, on the CPU."""

from __future__ import annotations

import gc
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from conftest import write_image_folder
from forked import exit_codes, printed, run_in, start

from monkeytrain.data import layout, pipeline
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.pipeline import ResidentPipeline, StreamPipeline, choose_pipeline
from monkeytrain.data.views import decode_views, view_bytes
from monkeytrain.errors import UserError

IMAGE, SIDE = 16, 18
PER_CLASS = 7  # 3 classes: 21 images per split, divisible neither by 2 nor by 4


class FakeRank:
    """The parts of an Accelerator that ResidentPipeline reads, for one rank of a fake world."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")
        self.is_local_main_process = rank == 0

    def wait_for_everyone(self):
        pass  # one process plays every rank in turn


@pytest.fixture
def seedable_accelerator():
    """A CPU Accelerator configured as train.py configures its own (seedable samplers)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    AcceleratorState._reset_state(True)


@pytest.fixture
def root(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "d", layout="train-val", classes=3, per_class=PER_CLASS, size=20)


def splits_of(root, val_fraction: float = 0.0):
    return discover_splits(layout.folders_from_root(root), val_fraction, 0, False)


def resident(splits, accelerator, tmp_path, batch_size: int = 4, seed: int = 0) -> ResidentPipeline:
    return ResidentPipeline(splits, IMAGE, batch_size, seed, tmp_path / "cache", accelerator)


def sample_ids(files) -> dict[bytes, int]:
    """Each image's stored view (its bytes) -> its index in `files`: identifies samples in batches."""
    images, _ = decode_views(files, IMAGE)
    ids = {images[i].numpy().tobytes(): i for i in range(len(files))}
    assert len(ids) == len(files)  # every view differs (conftest adds noise)
    return ids


def identify(batches, ids: dict[bytes, int], files) -> list[int]:
    """The sample indices of a run of batches, checking each label belongs to its image."""
    seen = []
    for images, labels in batches:
        for image, label in zip(images, labels.tolist()):
            index = ids[image.cpu().numpy().tobytes()]
            assert files[index].label == label
            seen.append(index)
    return seen


def concatenated(batches) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


# --- ResidentPipeline: training epochs --------------------------------------------------------

def test_train_epoch_yields_full_uint8_batches_on_the_device(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    rp = resident(splits, cpu_accelerator, tmp_path, batch_size=4)
    assert rp.mode == "resident" and rp.batches_per_epoch == 5  # 21 // 4
    batches = list(rp.train_epoch(1))
    assert len(batches) == 5
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.shape == (4, 3, SIDE, SIDE)
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert images.device == cpu_accelerator.device and labels.device == cpu_accelerator.device
    identify(batches, sample_ids(splits.train), splits.train)  # labels go with their images


def epochs_of(rp: ResidentPipeline, epochs: int, ids, files) -> list[int]:
    """The samples of epochs 1 .. `epochs`, in training order."""
    return [index for epoch in range(1, epochs + 1) for index in identify(rp.train_epoch(epoch), ids, files)]


def passes(stream: list[int], size: int) -> list[list[int]]:
    return [stream[start:start + size] for start in range(0, len(stream) - size + 1, size)]


def test_epochs_cut_one_stream_of_shuffled_passes(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    ids = sample_ids(splits.train)
    rp = resident(splits, cpu_accelerator, tmp_path)  # 21 images, batches of 4: 5 batches, 1 image over
    first = identify(rp.train_epoch(1), ids, splits.train)
    assert len(first) == 20 and len(set(first)) == 20
    # 21 epochs of 20 images are exactly 20 passes of 21: each pass every image once, in its own order
    stream = epochs_of(rp, 21, ids, splits.train)
    assert stream[:20] == first
    orders = passes(stream, 21)
    assert len(orders) == 20 and all(sorted(order) == list(range(21)) for order in orders)
    assert len({tuple(order) for order in orders}) == 20
    # the same seed and epoch repeat, in a new pipeline too; another seed does not
    assert identify(rp.train_epoch(1), ids, splits.train) == first
    assert identify(resident(splits, cpu_accelerator, tmp_path).train_epoch(1), ids, splits.train) == first
    assert identify(resident(splits, cpu_accelerator, tmp_path, seed=1).train_epoch(1), ids, splits.train) != first


def test_a_batch_wraps_from_one_pass_into_the_next_and_stays_full(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    ids = sample_ids(splits.train)
    rp = resident(splits, cpu_accelerator, tmp_path)
    second = list(rp.train_epoch(2))  # images 20 .. 39 of the stream: its first batch crosses into pass 2
    assert [images.shape[0] for images, _ in second] == [4] * 5
    stream = epochs_of(resident(splits, cpu_accelerator, tmp_path), 2, ids, splits.train)
    assert identify(second, ids, splits.train) == stream[20:40]


def test_a_resumed_epoch_trains_the_batches_it_had_left(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    ids = sample_ids(splits.train)
    rp = resident(splits, cpu_accelerator, tmp_path)
    whole = identify(rp.train_epoch(3), ids, splits.train)
    assert identify(rp.train_epoch(3, skip=2), ids, splits.train) == whole[8:]
    # cut short: epochs of 2 batches still follow one another along the stream
    short = [identify(rp.train_epoch(epoch, 2), ids, splits.train) for epoch in (1, 2)]
    assert short[0] + short[1] == epochs_of(rp, 1, ids, splits.train)[:16]


def test_a_batch_larger_than_the_data_gives_one_batch_of_everything_a_rank_has(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    rp = resident(splits, cpu_accelerator, tmp_path, batch_size=64)
    batches = list(rp.train_epoch(1))
    assert rp.batches_per_epoch == 1 and len(batches) == 1
    assert sorted(identify(batches, sample_ids(splits.train), splits.train)) == list(range(21))


@pytest.mark.parametrize("batch_size", [4, 64])
def test_two_ranks_train_on_disjoint_equal_shards_of_each_pass(root, tmp_path, batch_size):
    splits = splits_of(root)
    ids = sample_ids(splits.train)
    ranks = [resident(splits, FakeRank(rank, 2), tmp_path, batch_size=batch_size) for rank in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == (2 if batch_size == 4 else 1)
    for epoch in (1, 2):
        batch_counts = [len(list(r.train_epoch(epoch))) for r in ranks]
        assert batch_counts == [ranks[0].batches_per_epoch] * 2
    streams = [epochs_of(r, 5, ids, splits.train) for r in ranks]  # 40 images each: 4 passes of 10
    assert len(streams[0]) == len(streams[1]) == (40 if batch_size == 4 else 50)
    for mine, theirs in zip(passes(streams[0], 10), passes(streams[1], 10)):
        assert len(set(mine)) == len(set(theirs)) == 10
        assert not set(mine) & set(theirs)


def test_fewer_training_images_than_processes_is_one_clear_error(root, tmp_path, make_image_folder):
    tiny = make_image_folder(tmp_path / "tiny", layout="train-val", classes=2, per_class=1, size=20)
    with pytest.raises(UserError, match="cannot give each of 3 processes one"):
        resident(splits_of(tiny), FakeRank(0, 3), tmp_path)


# --- ResidentPipeline: evaluation shards ------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 4])
def test_eval_batches_of_all_ranks_cover_every_sample_once(root, tmp_path, monkeypatch, world):
    monkeypatch.setattr(pipeline, "EVAL_BATCH", 4)  # shards of 21 / world are not multiples of 4
    splits = splits_of(root)
    ids = sample_ids(splits.test)
    seen = []
    for rank in range(world):
        batches = list(resident(splits, FakeRank(rank, world), tmp_path).eval_batches("test"))
        assert all(images.shape[0] <= 4 and images.dtype == torch.uint8 for images, _ in batches)
        seen += identify(batches, ids, splits.test)
    assert Counter(seen) == Counter(range(21))


def test_eval_batches_keep_the_file_order_on_one_rank(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    images, labels = concatenated(resident(splits, cpu_accelerator, tmp_path).eval_batches("test"))
    expected, expected_labels = decode_views(splits.test, IMAGE)
    assert torch.equal(images, expected) and torch.equal(labels, expected_labels)


def test_validation_on_the_test_split_is_held_once(root, tmp_path, cpu_accelerator):
    splits = splits_of(root, val_fraction=0.0)
    assert splits.selection_on_test
    rp = resident(splits, cpu_accelerator, tmp_path)
    assert rp.resident_bytes == view_bytes(len(splits.train) + len(splits.test), IMAGE)
    val, test = concatenated(rp.eval_batches("val")), concatenated(rp.eval_batches("test"))
    assert torch.equal(val[0], test[0]) and torch.equal(val[1], test[1])
    assert len(list((tmp_path / "cache" / "views").glob("*.pt"))) == 2  # train and test only


def test_a_held_out_validation_split_is_held_too(root, tmp_path, cpu_accelerator):
    splits = splits_of(root, val_fraction=0.3)
    assert not splits.selection_on_test and splits.val
    rp = resident(splits, cpu_accelerator, tmp_path)
    assert rp.resident_bytes == view_bytes(len(splits.train) + len(splits.val) + len(splits.test), IMAGE)
    val_images, val_labels = concatenated(rp.eval_batches("val"))
    expected, expected_labels = decode_views(splits.val, IMAGE)
    assert torch.equal(val_images, expected) and torch.equal(val_labels, expected_labels)
    assert rp.batches_per_epoch == len(splits.train) // 4


# --- StreamPipeline ---------------------------------------------------------------------------

@pytest.mark.parametrize("val_fraction", [0.0, 0.3])
def test_streamed_eval_batches_equal_the_resident_ones(root, tmp_path, cpu_accelerator, val_fraction):
    splits = splits_of(root, val_fraction)
    stream = StreamPipeline(splits, IMAGE, 4, 0, 0, cpu_accelerator)
    rp = resident(splits, cpu_accelerator, tmp_path)
    assert stream.mode == "stream" and stream.resident_bytes == 0
    for name in ("train", "val", "test"):
        streamed, resident_views = concatenated(stream.eval_batches(name)), concatenated(rp.eval_batches(name))
        assert streamed[0].dtype == torch.uint8 and streamed[0].shape[1:] == (3, SIDE, SIDE)
        assert streamed[0].device == cpu_accelerator.device
        assert torch.equal(streamed[0], resident_views[0]) and torch.equal(streamed[1], resident_views[1])


def test_streamed_training_batches_are_full_uint8_views(root, tmp_path, cpu_accelerator):
    splits = splits_of(root)
    stream = StreamPipeline(splits, IMAGE, 4, 0, 0, cpu_accelerator)
    batches = list(stream.train_epoch(1))
    assert stream.batches_per_epoch == len(batches) == 5  # the last partial batch is dropped
    assert all(images.shape == (4, 3, SIDE, SIDE) and images.dtype == torch.uint8 for images, _ in batches)
    seen = identify(batches, sample_ids(splits.train), splits.train)
    assert len(set(seen)) == 20


# --- choosing a pipeline ----------------------------------------------------------------------

@pytest.mark.parametrize("requested", ["resident", "stream"])
def test_an_explicit_pipeline_is_kept(root, cpu_accelerator, requested):
    assert choose_pipeline(requested, splits_of(root), IMAGE, cpu_accelerator) == requested


def test_auto_keeps_the_views_in_host_memory_on_the_cpu_when_they_fit(root, cpu_accelerator, monkeypatch):
    splits = splits_of(root)
    needed = view_bytes(sum(len(files) for files in splits.distinct_splits().values()), IMAGE)
    share = pipeline.RESIDENT_SHARE_OF_FREE_MEMORY
    monkeypatch.setattr(pipeline, "free_memory", lambda accelerator: int(needed / share) + 1)
    assert choose_pipeline("auto", splits, IMAGE, cpu_accelerator) == "resident"
    monkeypatch.setattr(pipeline, "free_memory", lambda accelerator: int(needed / share) - 1)
    assert choose_pipeline("auto", splits, IMAGE, cpu_accelerator) == "stream"


def test_free_host_memory_is_shared_among_the_processes(cpu_accelerator):
    import psutil

    available = psutil.virtual_memory().available
    assert 0.5 * available < pipeline.free_memory(cpu_accelerator) <= 1.5 * available


def test_free_host_memory_is_shared_among_the_processes_on_this_machine_alone(monkeypatch):
    import psutil

    class TwoNodesOfEight:  # what free_memory reads of an Accelerator: rank 3 of 16, on a machine with 8
        device, num_processes = torch.device("cpu"), 16

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    available = psutil.virtual_memory().available
    assert 0.5 * available / 8 < pipeline.free_memory(TwoNodesOfEight()) <= 1.5 * available / 8


def test_default_workers_fit_the_cores_this_process_may_use(cpu_accelerator, monkeypatch):
    for name in ("SLURM_CPUS_ON_NODE", "SLURM_STEP_ID"):  # the suite run inside a Slurm job: its share counts too
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert pipeline.default_workers(cpu_accelerator) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert pipeline.default_workers(cpu_accelerator) == pipeline.MAX_AUTO_WORKERS


@pytest.mark.parametrize("seedable", [False, True])
def test_streamed_epochs_are_shuffled_afresh(root, request, seedable):
    accelerator = request.getfixturevalue("seedable_accelerator" if seedable else "cpu_accelerator")
    splits = splits_of(root)
    ids = sample_ids(splits.train)
    stream = StreamPipeline(splits, IMAGE, 4, 0, 0, accelerator)
    first = identify(stream.train_epoch(1), ids, splits.train)
    second = identify(stream.train_epoch(2), ids, splits.train)
    assert len(first) == len(second) == 20 and first != second


@pytest.mark.parametrize("steps", ["all", 2])
def test_streamed_epochs_cut_short_or_not_are_shuffled_afresh(root, seedable_accelerator, steps):
    splits = splits_of(root)
    ids = sample_ids(splits.train)
    stream = StreamPipeline(splits, IMAGE, 4, 0, 0, seedable_accelerator)
    steps = stream.batches_per_epoch if steps == "all" else steps
    # as train.py asks for them, and the engine consumes them: to the end
    first = identify(stream.train_epoch(1, steps), ids, splits.train)
    second = identify(stream.train_epoch(2, steps), ids, splits.train)
    assert len(first) == len(second) == 4 * steps and first != second


def keep_a_streaming_pipeline_alive_past_the_end(folder: Path) -> None:
    """In a child process, as a run uses it: a stream pipeline with two workers per loader, one
    training and one evaluation batch drawn, then kept alive to the exit by a reference cycle that
    the garbage collector never reaches."""
    run_in(folder, "output.txt")
    gc.disable()
    splits = splits_of(write_image_folder(folder / "d", layout="train-val", classes=3, per_class=4, size=20))
    stream = StreamPipeline(splits, IMAGE, 4, 0, 2, Accelerator(cpu=True))
    next(iter(stream.train_epoch(1)))
    next(stream.eval_batches("test"))
    cycle: dict = {"pipeline": stream}
    cycle["itself"] = cycle


def test_a_stream_pipeline_alive_at_exit_does_not_keep_its_process_waiting_for_its_workers(tmp_path):
    """Its workers ignore SIGTERM, which is how multiprocessing's exit handler ends them: unless the
    loaders end them first, the process waits for them forever."""
    [ended] = exit_codes([start(keep_a_streaming_pipeline_alive_past_the_end, tmp_path)], seconds=60)
    assert ended == 0, printed(tmp_path / "output.txt")
