"""monkeytrain.data.loaders: decoding image files on demand, and sharded evaluation loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.loaders import ImageListDataset, sharded_loader


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
