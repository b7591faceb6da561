"""timm models other than ResNet-18, as users name them: tagged names, hub names, typos, and models whose
input size is fixed when they are built (ViT, Swin), trained at the run's size and fed pretrained weights
of another size.

timm's tiny test networks keep these fast: test_vit is a ViT (its registry marks it `fixed_input_size`, as
vit_tiny_patch16_224), made for 160-pixel images."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from monkeytrain.checkpoint import load_model
from monkeytrain.errors import UserError
from monkeytrain.model import check_model_choice, create_model
from monkeytrain.trainability import check_input_sizes

VIT = "test_vit"
CPU = torch.device("cpu")


def refusal(name: str, pretrained=None) -> str:
    with pytest.raises(UserError) as caught:
        check_model_choice(name, pretrained)
    return str(caught.value)


def test_a_pretrained_tag_timm_does_not_know_is_one_line_naming_the_tags_it_knows():
    # timm.is_model accepts any tag; create_model then raised a RuntimeError, a traceback at start-up
    message = refusal("resnet18.a1_in1kk")
    assert "no weights tagged 'a1_in1kk' for resnet18" in message
    assert "a1_in1k, a2_in1k" in message


def test_known_tags_and_plain_names_are_accepted():
    for name in ("resnet18.a1_in1k", "vit_tiny_patch16_224.augreg_in21k", "resnet10t", VIT):
        check_model_choice(name)


def test_a_hub_name_of_a_timm_model_is_refused_naming_timms_own_name_for_it():
    message = refusal("hf-hub:timm/resnet18.a1_in1k")
    assert "--model resnet18.a1_in1k --pretrained" in message
    assert "unknown" not in message  # it is a model timm knows; predict could not rebuild it offline


@pytest.mark.parametrize("name", ["hf-hub:someone/their-vit", "local-dir:/models/mine"])
def test_a_model_from_outside_timms_registry_is_refused_naming_what_to_give(name):
    message = refusal(name)
    assert "outside timm's registry" in message and "--pretrained PATH.safetensors" in message


@pytest.mark.parametrize("typed, meant", [("Resnet18", "resnet18"), ("efficientnet-b0", "efficientnet_b0"),
                                          ("vit_tiny", "vit_tiny_patch16_224"), ("convnext-atto", "convnext_atto")])
def test_an_unknown_name_suggests_the_registered_names_most_like_it(typed, meant):
    message = refusal(typed)
    assert message.startswith(f"unknown timm model '{typed}'; did you mean ")
    assert meant in message.split("did you mean ")[1].split("?")[0].replace(",", "").split()


def test_an_unknown_name_like_no_model_still_names_where_to_look():
    assert "timm.list_models()" in refusal("zzqqxx")


def test_a_fixed_size_model_is_built_for_the_image_size_given():
    model = create_model(VIT, 3, image_size=32).eval()
    model.patch_embed.strict_img_size = True  # as vit_tiny_patch16_224's: only its own size
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert model.patch_embed.img_size == (32, 32)


def test_a_model_of_any_input_size_is_built_as_before():
    # timm's ResNets take no img_size argument: passing one would be a TypeError
    model = create_model("test_resnet", 3, image_size=32)
    assert isinstance(model, torch.nn.Module)


def test_hub_weights_for_a_fixed_size_model_are_fetched_for_the_image_size(monkeypatch):
    # timm resamples the position embeddings of its weights to the img_size it is given, as it loads them
    asked = {}

    def hub(name, pretrained=False, **options):
        asked.update(options, pretrained=pretrained)
        return torch.nn.Identity()

    monkeypatch.setattr(timm, "create_model", hub)
    create_model(VIT, 3, pretrained="hub", image_size=64)
    assert asked == {"pretrained": True, "num_classes": 3, "img_size": 64}


def test_local_weights_made_for_another_size_are_resampled_to_the_models(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model(VIT, num_classes=10)  # its own 160 px: a 10x10 patch grid
    path = tmp_path / "vit-160.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_model(VIT, 3, pretrained=str(path), image_size=32).state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 4, source.embed_dim)  # the class token and a 2x2 grid
    assert torch.equal(loaded["pos_embed"][:, 0], source.state_dict()["pos_embed"][:, 0])  # class token's kept
    body = [k for k in loaded if not k.startswith(("head.", "pos_embed"))]
    assert all(torch.equal(loaded[k], source.state_dict()[k]) for k in body)
    assert loaded["head.weight"].shape[0] == 3


def test_weights_of_another_model_still_do_not_fit_after_the_conversion(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit2").state_dict().items()}, str(path))
    with pytest.raises(UserError, match="do not fit the model"):
        create_model(VIT, 3, pretrained=str(path), image_size=32)


def test_a_fixed_size_model_refusing_smaller_training_crops_says_to_leave_out_min_train_size():
    model = create_model(VIT, 3, image_size=32)
    model.patch_embed.strict_img_size = True
    with pytest.raises(UserError, match=r"cannot take 16-pixel images .*give --image-size 32 alone, "
                                        r"without --min-train-size"):
        check_input_sizes(model, VIT, [16, 32], CPU)


@pytest.mark.parametrize("strict, sizes, expected", [
    # built for the run's size, as vit_tiny_patch16_224 is: its 2x2 patch grid left out 8 pixels, silently
    (True, [40], "the last 8 pixels of each row and column of a 40-pixel image; give --image-size 32 or 48"),
    # built for any size: timm refused it, and the line named the size of the model's weights (160)
    (False, [40], "the last 8 pixels of each row and column of a 40-pixel image; give --image-size 32 or 48"),
    (False, [40, 64], "the last 8 pixels of each row and column of a 40-pixel image; give --min-train-size 32 or 48"),
    (False, [20], "the last 4 pixels of each row and column of a 20-pixel image; give --image-size 16 or 32"),
])
def test_an_image_size_its_patches_do_not_divide_is_refused_naming_the_nearest_sizes_they_do(strict, sizes,
                                                                                            expected):
    model = create_model(VIT, 3, image_size=max(sizes))
    model.patch_embed.strict_img_size = strict
    with pytest.raises(UserError) as refused:
        check_input_sizes(model, VIT, sizes, CPU)
    assert str(refused.value) == f"--model {VIT} cuts images into 16-pixel patches, which would leave out {expected} " \
                                 "(a multiple of 16)."


def test_sizes_its_patches_divide_are_taken_as_they_are():
    model = create_model(VIT, 3, image_size=48)
    check_input_sizes(model, VIT, [48], CPU)
    assert model.training and model.patch_embed.grid_size == (3, 3)  # every pixel in a patch


def test_a_vit_trains_at_the_runs_size_and_predict_and_timm_rebuild_it_at_that_size(tmp_path):
    # vit_tiny_patch16_224 at 32 px was refused ("cannot take 32-pixel images"); its checkpoint must then load
    # at 32 px in predict, and in timm's own loader (config.json), not be resampled back up to 224
    from conftest import train_here, write_image_folder

    data = write_image_folder(tmp_path / "data", classes=2, per_class=6)
    train_here(["--data", str(data), "--model", "vit_tiny_patch16_224", "--cpu", "--epochs", "1",
                "--max-batches-per-epoch", "2", "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
                "--report-to", "none", "--run-name", "vit", "--cache-dir", str(tmp_path / "cache")], tmp_path)
    run = tmp_path / "runs" / "vit"
    model, info = load_model(run / "best.safetensors")
    rebuilt = timm.create_model("local-dir:" + str(run), pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), rebuilt(images))
    assert info.image_size == 32 and model.patch_embed.img_size == rebuilt.patch_embed.img_size == (32, 32)


@pytest.mark.parametrize("name, heads", [("deit_tiny_distilled_patch16_224", ("head.", "head_dist.")),
                                         ("levit_128s", ("head.linear.", "head_dist.linear."))])
def test_local_weights_of_a_model_with_two_heads_replace_both_for_another_class_count(tmp_path, name, heads):
    # timm names two classifiers for distilled models; joining that pair to "." was a TypeError traceback
    torch.manual_seed(1)
    source = timm.create_model(name, num_classes=10)
    path = tmp_path / "ten.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_model(name, 3, pretrained=str(path)).state_dict()
    assert [loaded[head + "weight"].shape[0] for head in heads] == [3, 3]
    body = [k for k in loaded if not k.startswith(heads)]
    assert all(torch.equal(loaded[k], source.state_dict()[k]) for k in body)
