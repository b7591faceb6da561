"""monkeytrain.export: an .onnx that ONNX Runtime runs as PyTorch runs the checkpoint, for any timm model.

One tiny model of another family than ResNet (timm's test_vit) is trained once,
by the real train.main, and exported once; the tests use both files.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import onnx
import pytest
import torch
from safetensors import safe_open

from conftest import command_error as error_of
from monkeytrain import cli, export
from monkeytrain.checkpoint import CheckpointInfo, load_model, save_checkpoint
from monkeytrain.config import TrainConfig
from monkeytrain.data.views import decode_views
from monkeytrain.export import load_onnx
from monkeytrain.model import create_model
from monkeytrain.predict import labelled_folder, preparer

OTHER_FAMILY = "test_vit"  # a transformer: no convolutions, no BatchNorm, its head is `head`, not `fc`
TINY_TRAINING = ["--cpu", "--epochs", "1", "--max-batches-per-epoch", "2", "--image-size", "32",
                 "--batch-size", "4", "--num-workers", "0", "--report-to", "none"]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A test_vit run trained by train.main, then exported by `monkeytrain export`."""
    from conftest import train_here, write_image_folder

    root = tmp_path_factory.mktemp("export")
    data = write_image_folder(root / "data", classes=3, per_class=4)
    train_here(["--data", str(data), "--model", OTHER_FAMILY, *TINY_TRAINING, "--run-name", "vit"], root,
               MONKEYTRAIN_CACHE=str(root / "cache"))
    checkpoint = root / "runs" / "vit" / "best.safetensors"
    test_split = data / "validation" / "validation"
    with redirect_stdout(io.StringIO()) as printed:
        cli.main(["export", "--checkpoint", str(checkpoint), "--check-data", str(test_split)])
    return {"checkpoint": checkpoint, "onnx": checkpoint.with_suffix(".onnx"), "test": test_split,
            "printed": printed.getvalue(), "root": root}


def output_of(argv: list[str], capsys) -> str:
    capsys.readouterr()
    cli.main(argv)
    return capsys.readouterr().out


def test_export_checks_on_the_given_images_then_writes_beside_the_checkpoint(run):
    checked, wrote = run["printed"].splitlines()
    assert checked.startswith(f"checked in ONNX Runtime against PyTorch on 12 images of {run['test']}: "
                              "largest logit difference ")
    assert checked.endswith("top-1 agreement 100.0%")
    assert wrote.startswith(f"wrote {run['onnx']} (") and wrote.endswith("output logits [batch, 3]")
    assert "input float32 [batch, 3, 32, 32] normalised as its metadata says" in wrote
    assert run["onnx"].is_file()


def test_onnx_runtime_agrees_with_pytorch_at_any_batch_size(run):
    model, info = load_model(run["checkpoint"])
    onnx_forward, onnx_info = load_onnx(run["onnx"])
    assert onnx_info == info and info.architecture == OTHER_FAMILY
    assert onnx_forward.session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    views, _ = decode_views(labelled_folder(run["test"], info)[0], info.image_size)
    images = preparer(info)(views)
    for batch in (images[:1], images[:5], images):
        with torch.no_grad():
            expected = model(batch)
        actual = onnx_forward(batch)
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max() < 1e-4
        assert torch.equal(actual.argmax(dim=1), expected.argmax(dim=1))


def test_onnx_metadata_is_the_checkpoint_header_word_for_word(run):
    with safe_open(str(run["checkpoint"]), framework="pt") as handle:
        header = handle.metadata()
    metadata = {entry.key: entry.value for entry in onnx.load(str(run["onnx"])).metadata_props}
    assert metadata == header
    assert {"class_names", "mean", "std", "image_size", "crop_pct", "architecture"} <= set(metadata)


def test_the_onnx_model_says_in_words_how_to_make_its_input(run):
    """The metadata's numbers alone leave a deployer to guess the channel order, the scale and the two crops."""
    forward, info = load_onnx(run["onnx"])
    description = forward.session.get_modelmeta().description
    assert f"A {OTHER_FAMILY} image classifier trained by monkeytrain" in description
    for words in ("[batch, 3, 32, 32], RGB channels first", "laid over white", "shorter side is 36 pixels",
                  "centre 36-pixel square, that square's centre 32 pixels", "pixel values / 255",
                  "'logits': [batch, 3] logits", "the image and its mirror image."):
        assert words in description


def test_predict_gives_the_same_top_k_from_both_files(run, capsys):
    answers = [json.loads(output_of(["predict", "--checkpoint", str(run[kind]), "--json", "--top-k", "3", "--cpu",
                                     str(run["test"])], capsys)) for kind in ("checkpoint", "onnx")]
    from_torch, from_onnx = answers
    assert len(from_torch) == 12
    for torch_answer, onnx_answer in zip(from_torch, from_onnx):
        assert torch_answer["path"] == onnx_answer["path"]
        assert [t["class"] for t in torch_answer["top"]] == [t["class"] for t in onnx_answer["top"]]
        for t, o in zip(torch_answer["top"], onnx_answer["top"]):
            assert o["probability"] == pytest.approx(t["probability"], abs=1e-5)


def readme_deploy_snippet() -> str:
    """The README's Python block that runs an exported model with ONNX Runtime, Pillow and NumPy alone."""
    blocks = README.read_text().split("```python\n")[1:]
    [snippet] = [block.split("```")[0] for block in blocks if "ort.InferenceSession" in block]
    return snippet


def test_the_readmes_onnx_runtime_snippet_gives_predicts_answers(run, capsys, tmp_path):
    """A deployer copies it: its preprocessing, names and test-time views must be predict's, also for a
    transparent PNG (over white), a JPEG large enough to be decoded at a reduced scale and a 3:1 panorama
    (714 x 238: resized to 36 px, its longer side is 108 px; side / 238 * 714 in floats is 107.99999)."""
    from PIL import Image

    photos = sorted(run["test"].rglob("*.png"))
    half_clear = Image.open(photos[0]).convert("RGBA").resize((300, 200))
    half_clear.putalpha(Image.linear_gradient("L").resize((300, 200)))
    half_clear.save(tmp_path / "clear.png")
    Image.open(photos[1]).convert("RGB").resize((900, 700)).save(tmp_path / "large.jpg", quality=90)
    Image.open(photos[2]).convert("RGB").resize((714, 238)).save(tmp_path / "wide.png")
    extra = [str(tmp_path / name) for name in ("clear.png", "large.jpg", "wide.png")]
    answers = json.loads(output_of(["predict", "--checkpoint", str(run["onnx"]), "--json", "--top-k", "1",
                                    str(run["test"]), *extra], capsys))
    snippet = readme_deploy_snippet().replace("runs/demo/best.onnx", str(run["onnx"]))
    assert len(answers) == 15
    for answer in answers:
        scope: dict = {}
        exec(snippet.replace("photo.jpg", answer["path"]), scope)
        logits = torch.from_numpy(scope["logits"][0])
        [top] = answer["top"]
        assert capsys.readouterr().out == f"{top['class']} {top['probability']:.1%}\n"
        assert logits.softmax(0).max().item() == pytest.approx(top["probability"], abs=1e-5)


def test_evaluate_gives_the_same_figures_from_both_files(run, capsys):
    from_torch, from_onnx = [json.loads(output_of(["evaluate", "--checkpoint", str(run[kind]), "--json", "--cpu",
                                                   str(run["test"])], capsys)) for kind in ("checkpoint", "onnx")]
    assert from_onnx["images"] == from_torch["images"] == 12
    assert from_onnx["accuracy"] == from_torch["accuracy"]
    assert from_onnx["confusion_matrix"] == from_torch["confusion_matrix"]
    assert from_onnx["loss"] == pytest.approx(from_torch["loss"], abs=1e-5)


def test_a_damaged_or_foreign_onnx_file_is_one_line_and_status_2(run, capsys, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(run["onnx"].read_bytes()[:4000])
    renamed = tmp_path / "renamed.onnx"
    renamed.write_bytes(run["checkpoint"].read_bytes())
    for bad in (truncated, renamed):
        for command in (["predict", str(run["test"])], ["evaluate", str(run["test"])]):
            message = error_of([*command, "--cpu", "--checkpoint", str(bad)], capsys)
            assert f"{bad} is not a readable ONNX model" in message and "monkeytrain export" in message
    plain = onnx.load(str(run["onnx"]))
    del plain.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(plain, str(foreign))
    predicted = ["predict", "--checkpoint", str(foreign), str(run["test"])]
    assert "has no monkeytrain metadata" in error_of(predicted, capsys)
    header = {prop.key: prop.value for prop in onnx.load(str(run["onnx"])).metadata_props}
    header["class_names"] = json.dumps(["only", "two"])  # our header on a model of three classes
    header["class_folders"] = json.dumps(["n0", "n1"])  # one per class, or the header itself is damaged
    onnx.helper.set_model_props(plain, header)
    onnx.save(plain, str(foreign))
    message = error_of(["evaluate", "--checkpoint", str(foreign), str(run["test"])], capsys)
    assert f"{foreign} has an output of shape ['batch', 3], where its metadata needs ['N', 2]" in message
    assert "missing.onnx does not exist" in error_of(
        ["predict", "--checkpoint", str(tmp_path / "missing.onnx"), str(run["test"])], capsys)


@pytest.fixture
def exported_again(run, monkeypatch):
    """Export reuses the module's ONNX model instead of exporting it again (seconds saved)."""
    monkeypatch.setattr(export, "onnx_model", lambda model, info, header, opset=None: onnx.load(str(run["onnx"])))
    return ["export", "--checkpoint", str(run["checkpoint"])]


def test_export_refuses_what_it_cannot_run_and_writes_nothing(run, exported_again, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(export, "serialized", lambda proto, info: b"not a protobuf at all")
    output = tmp_path / "model.onnx"
    message = error_of([*exported_again, "--output", str(output)], capsys)
    assert f"the ONNX export of {run['checkpoint']} is not a readable ONNX model" in message
    assert not output.exists()


def test_a_tolerance_breach_is_one_line_and_writes_nothing(exported_again, monkeypatch, capsys, tmp_path):
    running = export.OnnxForward.__call__
    monkeypatch.setattr(export.OnnxForward, "__call__", lambda self, images: running(self, images) + 0.01)
    output = tmp_path / "models" / "v2" / "model.onnx"
    message = error_of([*exported_again, "--output", str(output), "--tolerance", "1e-3"], capsys)
    assert "ONNX Runtime and PyTorch disagree on 16 synthetic images (seed 0)" in message
    assert "exceeds --tolerance 0.001" in message and "nothing was written" in message
    assert list(tmp_path.iterdir()) == []  # nor the folders made to hold it
    printed = output_of([*exported_again, "--output", str(output), "--tolerance", "0.05"], capsys)
    assert "largest logit difference 1.0e-02" in printed and output.is_file()


def test_export_flags_are_checked(exported_again, capsys, tmp_path):
    assert "must end in .onnx" in error_of([*exported_again, "--output", "model.bin"], capsys)
    assert "has no name before .onnx; name the file" in error_of([*exported_again, "--output", "runs/.onnx"], capsys)
    (tmp_path / "models.onnx").mkdir()
    assert "is a folder; name the .onnx file" in error_of([*exported_again, "--output", str(tmp_path / "models.onnx")],
                                                          capsys)
    assert "--tolerance must be 0 or more" in error_of([*exported_again, "--tolerance", "-1"], capsys)
    for opset in ("17", "1000"):
        assert f"--opset {opset} is outside 18 to " in error_of([*exported_again, "--opset", opset], capsys)


def test_export_writes_the_operator_set_asked_for(run, capsys, tmp_path):
    """An older ONNX Runtime may refuse the exporter's own choice (opset 20 with torch 2.14), but load 18."""
    output = tmp_path / "opset18.onnx"
    printed = output_of(["export", "--checkpoint", str(run["checkpoint"]), "--opset", "18", "--output", str(output)],
                        capsys)
    assert f"wrote {output} (" in printed and "ONNX opset 18)" in printed
    assert export.opset_of(onnx.load(str(output))) == 18
    assert load_onnx(output)[1] == load_model(run["checkpoint"])[1]


@pytest.mark.parametrize("package", ["onnxruntime", "onnxscript"])
def test_a_missing_package_names_the_export_extra(run, package, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail as if not installed
    command = (["export", "--checkpoint", str(run["checkpoint"])] if package == "onnxscript"
               else ["predict", "--checkpoint", str(run["onnx"]), str(run["test"])])
    message = error_of(command, capsys)
    assert f"'{package}'" in message and 'pip install -e ".[export]"' in message


@pytest.mark.parametrize("architecture, exported", [("resnet50", True), ("resnet101", False)])
def test_deeper_resnets_build_save_reload_and_export(architecture, exported, tmp_path):
    """Untrained, at 32 px: resnet101 is only saved and reloaded, its export would take ten seconds more."""
    torch.manual_seed(0)
    info = CheckpointInfo(architecture, ["a", "b"], ["a", "b"], [0.5] * 3, [0.25] * 3, 32, 1, 0.5,
                          TrainConfig(model=architecture, image_size=32).to_dict())
    checkpoint = save_checkpoint(tmp_path, create_model(architecture, 2).eval(), info)
    model, reloaded = load_model(checkpoint)
    assert reloaded == info and model.pretrained_cfg["architecture"] == architecture
    if exported:
        done = export.export_checkpoint(checkpoint)
        assert done.path == tmp_path / "best.onnx" and done.agreement.top1_agreement == 1.0
        assert load_onnx(done.path)[1] == info


class BranchesOnItsInput(torch.nn.Module):
    """A model that torch.export cannot capture: which way it goes depends on the pixels."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = images.mean(dim=(2, 3))
        return pooled if images.sum() > 0 else -pooled


def test_a_model_the_exporter_cannot_take_is_one_line_that_names_the_reason(run, monkeypatch, capsys, tmp_path):
    """torch.onnx prints pages of graphs and warnings as it fails, and its error's first line says only that
    step 1 of 3 failed, in terminal colours: the line should say why, and be all that is printed."""
    monkeypatch.setattr(export, "model_with_weights", lambda weights, info: BranchesOnItsInput().eval())
    output = tmp_path / "model.onnx"
    message = error_of(["export", "--checkpoint", str(run["checkpoint"]), "--output", str(output)], capsys)
    assert f"the timm model '{OTHER_FAMILY}' could not be exported to ONNX (GuardOnDataDependentSymNode: " in message
    assert "\x1b" not in message and not output.exists()


def test_exporting_an_onnx_file_again_says_it_is_one(run, capsys):
    message = error_of(["export", "--checkpoint", str(run["onnx"])], capsys)
    assert f"--checkpoint {run['onnx']} is already an ONNX model; export takes the best.safetensors" in message


def test_the_onnx_description_names_the_shift_predict_moves_its_views_by():
    """A checkpoint saved with the largest --tta-shift of views rounded to the nearest pixel (7 at 96 px) is
    predicted with today's 6-pixel margin: the description says 6, as predict does."""
    config = {**TrainConfig(model="test_resnet", image_size=96).to_dict(), "tta_shift": 7}
    info = CheckpointInfo("test_resnet", ["a", "b"], ["a", "b"], [0.5] * 3, [0.25] * 3, 96, 1, 0.5, config)
    assert "with its crop moved 6 pixels each way" in export.preprocessing_in_words(info)
