"""monkeytrain.checkpoint: the deployable best.safetensors and timm's config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from monkeytrain.checkpoint import (
    BEST_NAME, CheckpointInfo, load_model, plain_state_dict, read_checkpoint, save_checkpoint,
)
from monkeytrain.config import TrainConfig
from monkeytrain.errors import UserError
from monkeytrain.model import create_model

TINY = "test_resnet"


def make_info(architecture: str = TINY, classes: int = 3, **changes) -> CheckpointInfo:
    values = dict(
        architecture=architecture,
        class_names=[f"common name {i}" for i in range(classes)],
        class_folders=[f"n{i}" for i in range(classes)],
        mean=[0.1 + 0.2, 0.456789123456789, 1 / 3],
        std=[0.229, 2 / 7, 0.225],
        image_size=32,
        epoch=7,
        val_accuracy=0.1 + 0.7,  # not exactly representable: must survive the round trip bit for bit
        config={**TrainConfig(model=architecture, image_size=32).to_dict(), "nested": {"a": [1, 2.5, None]}},
        synthetic_data=True,
        selected_on="balanced-accuracy",
        val_balanced_accuracy=0.1 + 0.6,  # exact too
    )
    values.update(changes)
    return CheckpointInfo(**values)


class Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: keeps the model as `.module`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model(TINY, 3).eval()


def test_metadata_round_trips_every_field(tmp_path, tiny_model):
    info = make_info()
    path = save_checkpoint(tmp_path, tiny_model, info)
    assert path == tmp_path / BEST_NAME
    weights, read_back = read_checkpoint(path)
    assert read_back == info
    assert read_back.num_classes == 3
    for field in ("val_accuracy", "val_balanced_accuracy", "mean", "std"):
        assert getattr(read_back, field) == getattr(info, field)  # exact, not approximate


def test_header_records_format_versions_and_crop(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path, tiny_model, make_info())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"].startswith("monkeytrain")
    assert metadata["num_classes"] == "3"
    assert float(metadata["crop_pct"]) == pytest.approx(0.875)
    versions = json.loads(metadata["versions"])
    assert versions["torch"] == torch.__version__ and versions["timm"] == timm.__version__
    assert {"monkeytrain", "accelerate", "safetensors", "python"} <= set(versions)


def test_header_names_what_chose_the_epoch_and_its_balanced_accuracy(tmp_path, tiny_model):
    """A user reading the header sees why this epoch was kept: its accuracy alone may not be the best one."""
    path = save_checkpoint(tmp_path, tiny_model, make_info(val_accuracy=0.9, val_balanced_accuracy=0.75))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["selected_on"], metadata["val_balanced_accuracy"], metadata["val_accuracy"]) == (
        "balanced-accuracy", "0.75", "0.9")


@pytest.mark.parametrize("select_on, chosen", [(None, "accuracy"), ("balanced-accuracy", "balanced-accuracy")],
                         ids=["before --select-on", "before the header named it"])
def test_an_older_header_without_the_selection_still_loads(tmp_path, tiny_model, select_on, chosen):
    """A checkpoint written before the header named what chose it: its config's --select-on, or accuracy
    before that flag existed, and no balanced figure."""
    config = {key: value for key, value in make_info().config.items() if key != "select_on"}
    metadata = make_info(config={**config, **({"select_on": select_on} if select_on else {})}).to_metadata()
    del metadata["selected_on"], metadata["val_balanced_accuracy"]
    save_file(tiny_model.state_dict(), str(tmp_path / BEST_NAME), metadata=metadata)
    _, info = read_checkpoint(tmp_path / BEST_NAME)
    assert (info.selected_on, info.val_balanced_accuracy) == (chosen, None)


def test_saved_weights_equal_the_model(tmp_path, tiny_model):
    weights, _ = read_checkpoint(save_checkpoint(tmp_path, tiny_model, make_info()))
    expected = tiny_model.state_dict()
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda m: Wrapper(m), id="module."),
    pytest.param(lambda m: torch.compile(m), id="_orig_mod."),
    pytest.param(lambda m: Wrapper(torch.compile(m)), id="module._orig_mod."),
    pytest.param(lambda m: torch.compile(Wrapper(m)), id="_orig_mod.module."),
])
def test_saved_keys_carry_no_wrapper_prefix(tmp_path, tiny_model, wrap):
    wrapped = wrap(tiny_model)
    assert all(k.startswith(("module.", "_orig_mod.")) for k in wrapped.state_dict())  # the premise
    state = plain_state_dict(wrapped)
    assert set(state) == set(tiny_model.state_dict())
    weights, _ = read_checkpoint(save_checkpoint(tmp_path, wrapped, make_info()))
    assert set(weights) == set(tiny_model.state_dict())


def test_write_leaves_no_temporary_file(tmp_path, tiny_model):
    save_checkpoint(tmp_path, tiny_model, make_info())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "class_map.txt", "config.json"]


def test_existing_checkpoint_is_replaced_whole(tmp_path, tiny_model):
    path = tmp_path / BEST_NAME
    path.write_bytes(b"\xff" * (4 * 1024 * 1024))  # an old, larger file
    save_checkpoint(tmp_path, tiny_model, make_info(epoch=3))
    save_checkpoint(tmp_path, tiny_model, make_info(epoch=9))
    _, info = read_checkpoint(path)
    assert info.epoch == 9
    assert path.stat().st_size < 4 * 1024 * 1024
    assert b"\xff" * 64 not in path.read_bytes()[-4096:]  # no tail of the old file


def test_timm_config_json_describes_the_model(tmp_path, tiny_model):
    info = make_info()
    save_checkpoint(tmp_path, tiny_model, info)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == TINY
    assert config["num_classes"] == 3
    assert config["label_names"] == info.class_names
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["mean"] == info.mean and config["pretrained_cfg"]["std"] == info.std


def test_timm_reads_the_class_folders_in_the_models_order_from_class_map_txt(tmp_path, tiny_model):
    """timm's folder reader sorts naturally (2 before 10), where the run sorted as text (10 before 2): given
    class_map.txt (validate.py --class-map), it labels each folder as the model does."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder

    folders = ["1", "10", "2"]  # label order: sorted as text
    data = tmp_path / "data"
    for folder in folders:
        (data / folder).mkdir(parents=True)
        (data / folder / "a.jpg").touch()  # timm lists files here; it reads none
    save_checkpoint(tmp_path, tiny_model, make_info(class_folders=folders))
    assert (tmp_path / "class_map.txt").read_text() == "1\n10\n2\n"
    labels = {Path(path).parent.name: label for path, label in
              ReaderImageFolder(str(data), class_map=str(tmp_path / "class_map.txt")).samples}
    assert labels == {"1": 0, "10": 1, "2": 2}
    assert {Path(path).parent.name: label for path, label in ReaderImageFolder(str(data)).samples}["10"] == 2


@pytest.mark.parametrize("folder, why", [
    ("caf\udcff", "class folder 'caf\\udcff' is not UTF-8, which timm reads it as"),
    (" n0", "class folder ' n0' begins or ends with white space, which timm strips from each line"),
], ids=["not UTF-8", "a space timm strips"])
def test_a_class_folder_that_timm_cannot_read_back_leaves_out_class_map_txt_only_with_one_warning(
        tmp_path, tiny_model, folder, why, capsys):
    """The README's `validate.py --class-map runs/NAME/class_map.txt` then named a missing file, and nothing
    had said so. Told once a run, though each better epoch saves the checkpoint again."""
    for _ in range(2):
        save_checkpoint(tmp_path, tiny_model, make_info(class_folders=[folder, "n1", "n2"]))
    assert not (tmp_path / "class_map.txt").exists()
    assert read_checkpoint(tmp_path / BEST_NAME)[1].class_folders == [folder, "n1", "n2"]
    assert capsys.readouterr().err == (f"monkeytrain: warning: class_map.txt (for timm's validate.py --class-map) is "
                                       f"left out of {tmp_path}: {why}; config.json's label_names hold the class "
                                       "names.\n")


def test_timm_local_dir_loads_the_run_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", 4).eval()
    save_checkpoint(tmp_path, model, make_info("resnet18", classes=4))
    reloaded = timm.create_model("local-dir:" + str(tmp_path), pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
    assert reloaded.pretrained_cfg["mean"] == make_info().mean


def test_load_model_rebuilds_an_equal_model_in_eval_mode(tmp_path, tiny_model):
    save_checkpoint(tmp_path, tiny_model, make_info())
    model, info = load_model(tmp_path / BEST_NAME)
    assert not model.training
    assert info == make_info()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), tiny_model(images))


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "best.safetensors")
    with pytest.raises(UserError, match="is a folder; pass the best.safetensors"):  # a run's folder
        read_checkpoint(tmp_path)


DAMAGED_HEADERS = {
    "a field missing": ({"class_names": None}, "KeyError"),
    "not JSON": ({"class_names": "[not json"}, "JSONDecodeError"),
    "not a number": ({"image_size": "abc"}, "ValueError"),
    "no pixels": ({"image_size": "0"}, "out of range"),
    "config not a mapping": ({"config": '"str"'}, "out of range"),
    # edits that read as JSON but would end in a traceback, NaN probabilities or wrong labels
    "a test-time shift of text": ({"config": '{"tta_shift": "4"}'}, "config out of range"),
    "class names not text": ({"class_names": "[1, 2, 3]"}, "class_names out of range"),
    "a class folder short": ({"class_folders": '["n0", "n1"]'}, "class_folders out of range"),
    "a class folder twice": ({"class_folders": '["n0", "n1", "n1"]'}, "class_folders out of range"),
    "a mean of one channel": ({"mean": "[0.5]"}, "mean out of range"),
    "a std of 0": ({"std": "[0.2, 0, 0.2]"}, "std out of range"),
    "chosen on no known figure": ({"selected_on": "loss"}, "selected_on out of range"),
    "a balanced accuracy of text": ({"val_balanced_accuracy": '"high"'}, "ValueError"),
}


@pytest.mark.parametrize("changes, named", DAMAGED_HEADERS.values(), ids=DAMAGED_HEADERS.keys())
def test_a_damaged_header_is_one_user_error(tmp_path, tiny_model, changes, named):
    path = save_checkpoint(tmp_path, tiny_model, make_info())
    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), **changes}
        weights = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(weights, str(path), metadata={k: v for k, v in metadata.items() if v is not None})
    with pytest.raises(UserError, match=f"{path} has damaged monkeytrain metadata .*{named}"):
        read_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture_are_one_user_error(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path, tiny_model, make_info(classes=2))  # a header of 2 classes, weights of 3
    with pytest.raises(UserError, match="do not fit its architecture"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"this is a text file\n", b"\x80\x02}q\x00." * 20])
def test_non_safetensors_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "best.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=str(path)):
        read_checkpoint(path)


def test_torch_pickle_checkpoint_is_a_user_error(tmp_path, tiny_model):
    path = tmp_path / "model.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(UserError, match=r"model.pth is a torch.save file \(.pt/.pth, as timm's train.py writes\), "
                                        "not a monkeytrain checkpoint"):
        read_checkpoint(path)
    torch.save(tiny_model.state_dict(), path, _use_new_zipfile_serialization=False)  # before torch 1.6
    with pytest.raises(UserError, match="is a torch.save file"):
        read_checkpoint(path)


def test_safetensors_without_monkeytrain_metadata_is_a_user_error(tmp_path, tiny_model):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="monkeytrain"):
        read_checkpoint(path)


@pytest.mark.parametrize("architecture", [TINY, "test_vit"])
def test_a_model_trained_with_dropout_and_stochastic_depth_predicts_alike_from_its_checkpoint(tmp_path, architecture):
    """Neither rate holds a weight, and neither acts in evaluation: the checkpoint's model, built without
    them (as timm's local-dir: loader builds it too), answers as the trained one does."""
    torch.manual_seed(0)
    trained = create_model(architecture, 3, image_size=32, drop_rate=0.3, drop_path_rate=0.2).eval()
    config = {**TrainConfig(model=architecture, image_size=32, drop_rate=0.3, drop_path_rate=0.2).to_dict()}
    path = save_checkpoint(tmp_path, trained, make_info(architecture, config=config))
    loaded, info = load_model(path)
    images = torch.randn(2, 3, 32, 32)
    assert info.config["drop_path_rate"] == 0.2
    assert torch.equal(loaded(images), trained(images))
