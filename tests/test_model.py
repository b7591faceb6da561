"""monkeytrain.model: building timm models (name checks, options, compile); their weights are test_weights.py's."""

from __future__ import annotations

import pytest
import timm
import torch

from monkeytrain.errors import UserError
from monkeytrain.model import compiled, create_model


def test_create_model_has_the_requested_number_of_outputs():
    model = create_model("resnet18", 7)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_name_is_a_user_error_naming_it():
    with pytest.raises(UserError, match="resnet_does_not_exist"):
        create_model("resnet_does_not_exist", 3)


def drop_path_rates(model: torch.nn.Module) -> list[float]:
    return [module.drop_prob for module in model.modules() if isinstance(module, timm.layers.DropPath)]


@pytest.mark.parametrize("name", ["resnet18", "test_vit"])
def test_drop_rate_and_drop_path_rate_reach_the_models_modules(name):
    model = create_model(name, 3, image_size=32, drop_rate=0.25, drop_path_rate=0.1)
    dropouts = [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    assert 0.25 in [getattr(model, "drop_rate", None), *dropouts]  # ResNet drops in forward_head, ViT in head_drop
    assert max(drop_path_rates(model)) == pytest.approx(0.1)  # stochastic depth rises to the rate at the last block
    model.train()
    images = torch.randn(4, 3, 32, 32)
    assert not torch.equal(model(images), model(images))  # they drop in training
    model.eval()
    assert torch.equal(model(images), model(images))  # and not in evaluation


def test_without_the_rates_a_model_is_built_as_before():
    """0 passes nothing to timm: the recorded figures of runs before these flags stay valid."""
    model = create_model("resnet18", 3)
    assert model.drop_rate == 0 and drop_path_rates(model) == []
    torch.manual_seed(0)
    before = timm.create_model("resnet18", num_classes=3).state_dict()
    torch.manual_seed(0)
    assert all(torch.equal(before[k], v) for k, v in create_model("resnet18", 3).state_dict().items())


def test_a_model_without_stochastic_depth_refuses_drop_path_rate_in_one_line():
    with pytest.raises(UserError, match=r"^--model ghostnet_050 has no --drop-path-rate \(timm's drop_path_rate\); "):
        create_model("ghostnet_050", 3, drop_path_rate=0.1)


@pytest.fixture
def inductor_cache_dir(monkeypatch):
    """Inductor's cache folder as its own code reads it at compile time; the variables compiled() sets are put
    back after the test."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return cache_dir


@pytest.mark.parametrize("before", ["unset", "torch's default"])
def test_compiled_kernels_go_to_the_runs_cache_dir_unless_the_user_chose_another(inductor_cache_dir, tmp_path,
                                                                                   monkeypatch, before):
    """Importing torchvision (timm does) sets TORCHINDUCTOR_CACHE_DIR to torch's default, /tmp/torchinductor_<user>:
    that is no choice of the user's."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if before != "unset":
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    compiled(torch.nn.Linear(2, 2), True, tmp_path / "cache")
    assert inductor_cache_dir() == str(tmp_path / "cache" / "inductor")


def test_compiled_kernels_go_where_the_user_set_torchinductor_cache_dir(inductor_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiled(torch.nn.Linear(2, 2), True, tmp_path / "cache")
    assert inductor_cache_dir() == str(tmp_path / "mine")


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "efficientnet_b0"])
def test_a_tf_initialised_model_from_scratch_starts_as_a_resnet(name):
    # timm's TensorFlow init gives 10 classes a classifier of std 0.18 and blocks that are not the identity:
    # from scratch at lr 0.1 the validation loss reached 8e3-7e4 (benchmarks/RESULTS.md, 2026-12-03)
    from timm.models._efficientnet_blocks import InvertedResidual

    model = create_model(name, 10)
    assert model.get_classifier().weight.std() < 0.02 and not model.get_classifier().bias.any()
    residual = [block for block in model.modules() if isinstance(block, InvertedResidual) and block.has_skip]
    assert residual and all(not block.bn3.weight.any() for block in residual)
