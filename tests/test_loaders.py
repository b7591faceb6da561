"""monkeytrain.data.loaders: decoding image files on demand, sharded evaluation loaders, and workers
that end with their process."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from forked import exit_codes, printed, run_in, start
from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.loaders import ImageListDataset, sharded_loader, shuffled_loader


def test_image_list_dataset_applies_the_transform_and_returns_labels(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=2, size=12)
    splits = discover_splits(layout.folders_from_root(root), 0.0, 0, False)
    dataset = ImageListDataset(splits.train, lambda image: torch.tensor(np.asarray(image)))
    assert len(dataset) == 4
    pixels, label = dataset[3]
    assert pixels.shape == (12, 12, 3) and label == splits.train[3].label
    expected = np.asarray(Image.open(splits.train[3].path).convert("RGB"))
    assert np.array_equal(pixels.numpy(), expected)


@pytest.mark.parametrize("size, world", [(10, 3), (7, 2), (2, 4)])
def test_sharded_loaders_see_every_item_exactly_once(size, world):
    dataset = [(torch.tensor(i), 0) for i in range(size)]
    seen = []
    for rank in range(world):
        for items, _ in sharded_loader(dataset, batch_size=2, num_workers=0, rank=rank, world_size=world):
            seen += items.tolist()
    assert sorted(seen) == list(range(size))


def keep_a_loader_alive_past_the_end(folder: Path) -> None:
    """In a child process: a loader with two workers, one batch drawn, then kept alive to the exit by a
    reference cycle that the garbage collector never reaches."""
    run_in(folder, "output.txt")
    gc.disable()
    loader = shuffled_loader(TensorDataset(torch.arange(8)), batch_size=2, num_workers=2, seed=0)
    next(iter(loader))
    cycle: dict = {"loader": loader}
    cycle["itself"] = cycle


def test_a_loader_alive_at_exit_does_not_keep_its_process_waiting_for_its_workers(tmp_path):
    """Its workers ignore SIGTERM, which is how multiprocessing's exit handler ends them: without the
    loaders' own finalizer, the child would wait for them forever."""
    [ended] = exit_codes([start(keep_a_loader_alive_past_the_end, tmp_path)], seconds=60)
    assert ended == 0, printed(tmp_path / "output.txt")
