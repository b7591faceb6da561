"""monkeytrain.trainability: the checks, before training, that the model can train on the run's batches
(its image sizes: test_model_zoo.py, on the models that refuse some)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from monkeytrain.config import parse_config
from monkeytrain.errors import UserError
from monkeytrain.model import create_model
from monkeytrain.trainability import check_batch_norm_batches, fewest_batch_norm_values

# timm's tiny test network keeps these tests fast.
TINY = "test_resnet"


def states_equal(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_batch_norm_values_per_image_are_measured_without_touching_the_model():
    model = create_model(TINY, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fewest_batch_norm_values(model, 32, torch.device("cpu")) == 1  # its last features are 1x1
    assert fewest_batch_norm_values(model, 64, torch.device("cpu")) == 4
    assert model.training and states_equal(model.state_dict(), before, before)  # running statistics as they were
    no_batch_norm = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
    assert fewest_batch_norm_values(no_batch_norm, 32, torch.device("cpu")) is None


def refusal(flags: list[str], processes: int, images: int) -> str | None:
    """check_batch_norm_batches's line for a run of the tiny model with `flags`, else None."""
    try:
        check_batch_norm_batches(create_model(TINY, 3), parse_config(["--cpu", "--model", TINY, *flags]), images,
                                 SimpleNamespace(num_processes=processes, device=torch.device("cpu")))
    except UserError as error:
        return str(error)
    return None


@pytest.mark.parametrize("flags, processes, images, expected", [
    (["--batch-size", "1", "--image-size", "32"], 1, 30,
     f"with --batch-size 1, {TINY} cannot train on 32-pixel images (a BatchNorm layer would see one value per "
     "channel); give --batch-size 2 or more, or --image-size 33 or more."),
    (["--batch-size", "8", "--image-size", "32"], 2, 3,  # one image each: 3 // 2
     f"3 training images shared by 2 processes leave each batches of one image, on which {TINY} cannot train at "
     "32 pixels (a BatchNorm layer would see one value per channel); give at least 4 training images, start fewer "
     "processes, or --image-size 33 or more."),
    (["--batch-size", "1", "--image-size", "64", "--min-train-size", "16", "--epochs", "4"], 1, 30,
     f"with --batch-size 1, {TINY} cannot train on 16-pixel images (a BatchNorm layer would see one value per "
     "channel); give --batch-size 2 or more, or --min-train-size 33 or more."),
    (["--batch-size", "1", "--image-size", "32", "--min-train-size", "16", "--epochs", "4"], 1, 30,
     f"with --batch-size 1, {TINY} cannot train on 16-pixel images (a BatchNorm layer would see one value per "
     "channel); give --batch-size 2 or more, or --image-size 33 or more (and no smaller --min-train-size)."),
    (["--batch-size", "2", "--image-size", "32"], 1, 30, None),  # two values per channel: enough
    (["--batch-size", "1", "--image-size", "64"], 1, 30, None),  # 2x2 features
    (["--batch-size", "8", "--image-size", "32"], 2, 4, None),   # two images each
])
def test_batches_of_one_image_that_batch_norm_cannot_train_on_are_refused_before_training(flags, processes, images,
                                                                                           expected):
    """Refused at the first batch, the run folder kept the config.yaml and data_manifest.json of a run that never
    trained; refused as the model is built (train.py), nothing is written."""
    assert refusal(flags, processes, images) == expected
