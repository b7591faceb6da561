"""monkeytrain predict and evaluate (monkeytrain.predict) on unusual inputs: one answer per image,
one line and status 2 for what cannot be used.

The checkpoint is an untrained tiny model saved once for the module (what it predicts does not
matter here, only what is predicted and what is refused)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

import pytest
import torch

from conftest import command_error as error_of, write_image_folder
from monkeytrain import cli
from monkeytrain import predict as predict_module
from monkeytrain.checkpoint import CheckpointInfo, save_checkpoint
from monkeytrain.config import TrainConfig
from monkeytrain.model import create_model

TINY = "test_resnet"


def tiny_checkpoint(folder: Path, class_names: list[str], class_folders: tuple = ("n0", "n1", "n2"),
                    image_size: int = 32) -> Path:
    """best.safetensors of an untrained tiny model whose classes are three folders, n0, n1, n2 by default."""
    torch.manual_seed(0)
    info = CheckpointInfo(TINY, class_names, list(class_folders), [0.5] * 3, [0.25] * 3, image_size, 1, 0.5,
                          TrainConfig(model=TINY, image_size=image_size).to_dict())
    return save_checkpoint(folder, create_model(TINY, 3).eval(), info)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run"), ["common name 0", "common name 1", "common name 2"])


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A folder of class subfolders n0, n1, n2 of two images each."""
    return write_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=2) / "validation" / "validation"


def predicted_paths(argv: list[str], capsys) -> list[str]:
    capsys.readouterr()
    cli.main(["predict", "--cpu", "--json", *argv])
    return [answer["path"] for answer in json.loads(capsys.readouterr().out)]


def test_a_file_named_twice_or_in_a_folder_given_too_is_predicted_once(checkpoint, split, capsys):
    image = split / "n0" / "n0_000.png"
    other = split / "n0" / "n0_001.png"
    assert predicted_paths(["--checkpoint", str(checkpoint), str(image), f"{split}/./n0/n0_000.png",
                            os.path.relpath(image), str(split / "n0")], capsys) == [str(image), str(other)]


def test_a_named_file_that_is_no_image_says_what_it_is(checkpoint, split, capsys, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "moved.png")
    expected = {empty: f"{empty} is an empty file; pass an image file.",
                dangling: f"{dangling} is a link to {tmp_path / 'moved.png'}, which does not exist",
                # a pipe would be read once, or wait for a writer forever; a device, like a pipe, is no file
                Path(os.devnull): f"{os.devnull} is not a regular file (a pipe or a device)"}
    for named, message in expected.items():
        assert message in error_of(["predict", "--cpu", "--checkpoint", str(checkpoint), str(split), str(named)],
                                   capsys)


def test_evaluate_says_which_folder_to_give_when_the_classes_are_not_where_it_looks(checkpoint, split, capsys,
                                                                                      tmp_path):
    (tmp_path / "cased" / "N0").mkdir(parents=True)
    evaluate = ["evaluate", "--cpu", "--checkpoint", str(checkpoint)]
    expected = {
        tmp_path / "missing": f"{tmp_path / 'missing'} does not exist; pass a folder of class subfolders.",
        split.parent: f"{split.parent} holds the class folders one level down, in {split}; pass that folder.",
        split / "n1": f"{split / 'n1'} has no class subfolders; pass a folder of them, named as the checkpoint's "
                      "classes' folders or names: n0 (common name 0), n1 (common name 1), n2 (common name 2); "
                      "it is itself the class folder 'n1', so pass the folder that holds it.",
        tmp_path / "cased": "has class folder 'N0' and the checkpoint 'n0': they differ only in letter case",
    }
    for folder, message in expected.items():
        assert message in error_of([*evaluate, str(folder)], capsys)


def test_evaluate_given_a_dataset_root_names_its_test_split(checkpoint, split, capsys, tmp_path, make_image_folder):
    """`evaluate data/10-monkey-species` said that the checkpoint did not know a class folder 'training'."""
    kaggle = split.parent.parent
    three_splits = make_image_folder(tmp_path / "three", layout="train-val-test", classes=3, per_class=1)
    evaluate = ["evaluate", "--cpu", "--checkpoint", str(checkpoint)]
    for root, test_split in ((kaggle, split), (three_splits, three_splits / "test")):
        assert error_of([*evaluate, str(root)], capsys) == (
            f"monkeytrain: error: {root} is a dataset root, not a folder of class subfolders; pass the folder of its "
            f"test split, {test_split} (the split that a run on it is tested on).")


def test_evaluate_takes_class_folders_named_by_class_name_and_says_which_folder_is_which(checkpoint, split,
                                                                                       capsys, tmp_path):
    """New photos sorted by species (`mantled howler/`) where training had Kaggle's n0 ... n9."""
    shutil.copytree(split / "n1", tmp_path / "by-name" / "common name 1")
    shutil.copytree(split / "n2", tmp_path / "by-name" / "n2")
    capsys.readouterr()
    cli.main(["evaluate", "--cpu", "--json", "--checkpoint", str(checkpoint), str(tmp_path / "by-name")])
    scored = json.loads(capsys.readouterr().out)
    assert scored["images"] == 4 and [sum(row) for row in scored["confusion_matrix"]] == [0, 2, 2]
    assert scored["class_names"] == ["common name 0", "common name 1", "common name 2"]  # the matrix's order
    cli.main(["evaluate", "--cpu", "--checkpoint", str(checkpoint), str(tmp_path / "by-name")])
    text = capsys.readouterr().out.splitlines()
    per_class = scored["per_class_accuracy"]
    assert text[0].endswith(f", balanced accuracy {(per_class['common name 1'] + per_class['common name 2']) / 2:.2%}")
    assert text[1:] == ["  common name 0                n/a (no images)",
                        f"  common name 1                {per_class['common name 1']:6.1%} of 2",
                        f"  common name 2                {per_class['common name 2']:6.1%} of 2"]
    (tmp_path / "by-name" / "common name 1").rename(tmp_path / "by-name" / "common_name_1")
    assert ("has class folder 'common_name_1' that the checkpoint does not know; expected subfolders named as its "
            "classes' folders or names: n0 (common name 0), n1 (common name 1), n2 (common name 2).") in error_of(
        ["evaluate", "--cpu", "--checkpoint", str(checkpoint), str(tmp_path / "by-name")], capsys)


def test_evaluate_gives_its_accuracy_with_a_95_percent_interval_as_results_json_does(checkpoint, split, capsys):
    """Six images leave the figure uncertain by tens of points: the interval says how much (Wilson's)."""
    from test_results import wilson_by_quadratic

    capsys.readouterr()
    cli.main(["evaluate", "--cpu", "--json", "--checkpoint", str(checkpoint), str(split)])
    printed = capsys.readouterr().out
    scored = json.loads(printed)
    right = round(scored["accuracy"] * scored["images"])
    assert scored["accuracy_ci95"] == pytest.approx(wilson_by_quadratic(right, 6))
    low, high = scored["accuracy_ci95"]
    assert f'  "accuracy_ci95": [{low}, {high}],' in printed.splitlines()
    cli.main(["evaluate", "--cpu", "--checkpoint", str(checkpoint), str(split)])
    assert capsys.readouterr().out.startswith(
        f"accuracy {scored['accuracy']:.2%} (95% CI {100 * low:.1f}-{100 * high:.1f}%) on 6 images (loss ")


def test_evaluate_names_a_class_folder_spelled_with_other_unicode_code_points(split, capsys, tmp_path):
    """A folder unzipped on a Mac may spell café decomposed (NFD) where the checkpoint has it composed."""
    cafe = unicodedata.normalize("NFC", "café")
    accented = str(tiny_checkpoint(tmp_path, [cafe, "n1", "n2"], (cafe, "n1", "n2")))
    folder = tmp_path / "mac"
    shutil.copytree(split / "n0", folder / unicodedata.normalize("NFD", "café"))
    assert "they print alike but are spelled with different Unicode code points" in error_of(
        ["evaluate", "--cpu", "--checkpoint", accented, str(folder)], capsys)


def test_classes_that_share_a_name_are_told_apart_by_their_folders(split, capsys, tmp_path):
    """monkey_labels.txt may give two folders one common name: no class may hide another in the output."""
    shared = str(tiny_checkpoint(tmp_path, ["macaque", "macaque", "howler"]))
    capsys.readouterr()
    cli.main(["evaluate", "--cpu", "--json", "--checkpoint", shared, str(split)])
    assert list(json.loads(capsys.readouterr().out)["per_class_accuracy"]) == ["macaque (n0)", "macaque (n1)",
                                                                                "howler"]
    cli.main(["predict", "--cpu", "--json", "--top-k", "3", "--checkpoint", shared, str(split / "n0" / "n0_000.png")])
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert sorted(answer["class"] for answer in top) == ["howler", "macaque (n0)", "macaque (n1)"]


def test_a_pattern_the_shell_left_as_it_was_names_the_files_it_matches(checkpoint, split, capsys):
    """`monkeytrain predict '*.png'` in quotes, or from a shell that does not expand patterns."""
    flags = ["--checkpoint", str(checkpoint)]
    assert predicted_paths([*flags, str(split / "n0" / "*.png")], capsys) == [
        str(split / "n0" / "n0_000.png"), str(split / "n0" / "n0_001.png")]
    assert len(predicted_paths([*flags, str(split / "**" / "*_000.png")], capsys)) == 3
    assert f"{split / 'n0' / '*.jpg'} matches no file" in error_of(
        ["predict", *flags, str(split / "n0" / "*.jpg")], capsys)


def test_a_url_is_one_line_that_says_what_to_do(checkpoint, capsys):
    flags = ["predict", "--checkpoint", str(checkpoint)]
    assert error_of([*flags, "https://example.com/monkey.jpg"], capsys).endswith(
        "https://example.com/monkey.jpg is a URL, and predict reads local files only; download the image and pass "
        "its path, or pipe it in: curl -s 'https://example.com/monkey.jpg' | monkeytrain predict --checkpoint CKPT -")


class StandardInput:
    """sys.stdin with `data` piped in, or a terminal (nothing piped in)."""

    def __init__(self, data: bytes = b"", terminal: bool = False):
        self.buffer, self.terminal = io.BytesIO(data), terminal

    def isatty(self) -> bool:
        return self.terminal


def test_an_image_piped_to_standard_input_is_answered_as_a_file_is_and_named_dash(checkpoint, split, capsys,
                                                                                 monkeypatch, tmp_path):
    """`curl URL | monkeytrain predict --checkpoint CKPT -` was refused: save the image to a file first."""
    image = split / "n1" / "n1_000.png"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the piped image is kept meanwhile
    monkeypatch.setattr(sys, "stdin", StandardInput(image.read_bytes()))
    cli.main(["predict", "--cpu", "--json", "--checkpoint", str(checkpoint), "-", str(image), "-"])
    piped, named = json.loads(capsys.readouterr().out)  # `-` twice is one image, as a file named twice
    assert (piped["path"], named["path"]) == ("-", str(image)) and piped["top"] == named["top"]
    monkeypatch.setattr(sys, "stdin", StandardInput(image.read_bytes()))
    cli.main(["predict", "--cpu", "--checkpoint", str(checkpoint), "-"])
    assert capsys.readouterr().out.startswith("-: ")
    assert list(tmp_path.iterdir()) == []  # the saved copy is gone


def test_standard_input_that_holds_no_image_is_refused_as_a_named_file_is(checkpoint, split, capsys, monkeypatch):
    flags = ["predict", "--cpu", "--checkpoint", str(checkpoint), "-"]
    cut = (split / "n0" / "n0_000.png").read_bytes()[:200]  # its header is whole, its pixels are not
    expected = {
        StandardInput(terminal=True): "- stands for an image piped to standard input, but standard input is a "
                                      "terminal here; pipe one in (`curl URL | monkeytrain predict",
        StandardInput(b""): "standard input (-) is empty; pipe an image into it",
        StandardInput(b"<!DOCTYPE html><html>Not Found</html>"): "standard input (-) is an HTML page, not an image",
        StandardInput(cut): "standard input (-) is a damaged or truncated image",
    }
    for stdin, message in expected.items():
        monkeypatch.setattr(sys, "stdin", stdin)
        assert message in error_of(flags, capsys)


def test_a_wrong_checkpoint_is_told_before_the_images_are_read(split, capsys, monkeypatch):
    """Reading 10,000 images takes tens of seconds: a mistyped --checkpoint should not wait for it."""
    monkeypatch.setattr(predict_module, "glance_at_files", lambda *args: pytest.fail("images read first"))
    assert "missing.safetensors does not exist" in error_of(
        ["predict", "--checkpoint", "missing.safetensors", str(split)], capsys)


class ReaderGone:
    """The stdout of `monkeytrain predict ... | head -1`: the reader goes once the first answer is written."""

    def __init__(self, batches_prepared: list):
        self.batches_prepared, self.at_first_answer = batches_prepared, None

    def write(self, text: str) -> int:
        if "n0_000.png" in text:
            self.at_first_answer = sum(self.batches_prepared)  # images
            raise BrokenPipeError
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("output, images_before_it", [([], 1), (["--json"], 2)])  # JSON: the next, for the comma
def test_answers_are_written_as_they_come_and_a_reader_that_goes_stops_the_work(checkpoint, split, monkeypatch,
                                                                               output, images_before_it):
    monkeypatch.setattr(predict_module, "PREDICT_BATCH_SIZE", 1)
    batches = []  # the images of each batch prepared for the model
    prepared = predict_module.inference

    def counted(model, info):
        prepare, forward = prepared(model, info)
        return lambda views: batches.append(len(views)) or prepare(views), forward

    monkeypatch.setattr(predict_module, "inference", counted)
    monkeypatch.setattr("sys.stdout", ReaderGone(batches))
    with pytest.raises(BrokenPipeError):  # cli.main ends it quietly with status 1 (test_cli)
        cli.run_command(["predict", "--cpu", *output, "--checkpoint", str(checkpoint), str(split)])
    assert sys.stdout.at_first_answer == images_before_it and sum(batches) == images_before_it  # of 6


def decoded_files(monkeypatch) -> list:
    """The image files Pillow decodes from here on (a file object per decode; an opened header is none)."""
    from PIL import ImageFile as PillowImageFile

    decoded, load = [], PillowImageFile.ImageFile.load

    def counted(image):
        if image.tile:  # still to decode: later calls on the same image find the pixels there
            decoded.append(image.filename or image.fp)
        return load(image)

    monkeypatch.setattr(PillowImageFile.ImageFile, "load", counted)
    return decoded


def test_each_image_is_decoded_once(checkpoint, split, capsys, monkeypatch):
    """10,000 images were decoded twice: in full by a scan (for a digest predict never uses), then to predict."""
    decoded = decoded_files(monkeypatch)
    assert len(predicted_paths(["--checkpoint", str(checkpoint), str(split)], capsys)) == 6
    assert len(decoded) == 6


def truncated_copy(image: Path, to: Path) -> Path:
    """`image` cut short: its header is whole, its pixels are not."""
    to.write_bytes(image.read_bytes()[:200])
    return to


def test_an_image_damaged_past_its_header_is_skipped_in_a_folder_and_an_error_when_named(checkpoint, split, capsys,
                                                                                          tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(split / "n0", folder)
    cut = truncated_copy(split / "n1" / "n1_000.png", folder / "cut.png")
    flags = ["--checkpoint", str(checkpoint)]
    assert predicted_paths([*flags, str(folder)], capsys) == [str(folder / "n0_000.png"), str(folder / "n0_001.png")]
    # capsys was read by predicted_paths: run again for the warning
    cli.main(["predict", "--cpu", *flags, str(folder)])
    assert capsys.readouterr().err.splitlines() == [
        f"monkeytrain: warning: skipping {cut}: a damaged or truncated image (image file is truncated)."]
    assert f"{cut} is a damaged or truncated image" in error_of(["predict", "--cpu", *flags, str(cut)], capsys)


def predicted_and_told(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """(exit status, the paths answered in --json's array, the lines on stderr) of `monkeytrain predict ARGV`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["predict", "--cpu", "--json", *argv])
        raise SystemExit(0)
    printed, told = capsys.readouterr()
    return stopped.value.code, [answer["path"] for answer in json.loads(printed)], told.splitlines()


def test_named_files_that_are_no_images_are_each_told_in_turn_and_the_rest_answered(checkpoint, split, capsys,
                                                                                    tmp_path):
    """`predict ok.png cut.png notes.txt other.png` said only that notes.txt was no image (the header check ran
    first, the decoding after) and answered none: every good one is answered, each bad one named in its turn,
    and the status is 2 at the end, for a script to notice."""
    good, other = split / "n0" / "n0_000.png", split / "n1" / "n1_000.png"
    cut = truncated_copy(split / "n2" / "n2_000.png", tmp_path / "cut.png")  # found when decoded
    notes = tmp_path / "notes.txt"  # found by its header
    notes.write_text("not an image")
    status, answered, told = predicted_and_told(["--checkpoint", str(checkpoint), str(good), str(cut), str(notes),
                                                 str(other)], capsys)
    assert status == 2 and answered == [str(good), str(other)]
    assert told == [f"monkeytrain: error: {cut} is a damaged or truncated image (image file is truncated); pass an "
                    "image file.",
                    f"monkeytrain: error: {notes} is not an image in any format Pillow reads; pass an image file."]
    status, answered, told = predicted_and_told(["--checkpoint", str(checkpoint), str(notes), str(cut)], capsys)
    assert status == 2 and answered == [] and [line.split()[2] for line in told] == [str(notes), str(cut)]


def test_a_pattern_skips_what_is_no_image_as_a_folder_does(checkpoint, split, capsys, tmp_path):
    """`predict 'photos/*'` stopped at the first damaged file it matched, where `predict photos/` skips it."""
    folder = tmp_path / "photos"
    shutil.copytree(split / "n0", folder)
    cut = truncated_copy(split / "n1" / "n1_000.png", folder / "cut.png")
    (folder / "notes.txt").write_text("not an image")
    for given in (folder / "*", folder):
        status, answered, told = predicted_and_told(["--checkpoint", str(checkpoint), str(given)], capsys)
        assert status == 0 and answered == [str(folder / "n0_000.png"), str(folder / "n0_001.png")]
        assert told == [f"monkeytrain: warning: skipping {folder / 'notes.txt'}: not an image in any format Pillow "
                        "reads.",
                        f"monkeytrain: warning: skipping {cut}: a damaged or truncated image (image file is "
                        "truncated)."]


def test_a_folder_of_images_that_are_all_damaged_is_an_error_after_a_warning_for_each(checkpoint, split, capsys,
                                                                                       tmp_path):
    cut = [truncated_copy(split / "n0" / "n0_000.png", tmp_path / name) for name in ("a.png", "b.png")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["predict", "--cpu", "--checkpoint", str(checkpoint), str(tmp_path)])
    *warnings, error = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and [w.split(": ")[2] for w in warnings] == [f"skipping {path}" for path in cut]
    assert error.startswith("monkeytrain: error: none of the files given is an image that could be read")
    status, answered, told = predicted_and_told(["--checkpoint", str(checkpoint), str(tmp_path)], capsys)
    assert status == 2 and answered == [] and told[-1].startswith("monkeytrain: error: none of the files")  # was `[`


def test_evaluate_decodes_each_image_once_and_skips_one_damaged_past_its_header(checkpoint, split, capsys,
                                                                                monkeypatch, tmp_path):
    folder = tmp_path / "scored"
    shutil.copytree(split, folder)
    cut = truncated_copy(split / "n1" / "n1_000.png", folder / "n1" / "cut.png")
    decoded = decoded_files(monkeypatch)
    capsys.readouterr()
    cli.main(["evaluate", "--cpu", "--json", "--checkpoint", str(checkpoint), str(folder)])
    scored, warnings = capsys.readouterr()
    assert json.loads(scored)["images"] == 6 and len(decoded) == 7  # the damaged one too, once
    assert warnings.splitlines() == [
        f"monkeytrain: warning: skipping {cut}: a damaged or truncated image (image file is truncated)."]
    for image in folder.rglob("*.png"):
        truncated_copy(image, image)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["evaluate", "--cpu", "--checkpoint", str(checkpoint), str(folder)])
    *_, error = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and error == (f"monkeytrain: error: {folder} has no readable images (each is "
                                                 "named above); add images to its class subfolders.")


def readme_timm_snippet() -> str:
    """The README's Python block that runs a run's folder with timm alone (local-dir:, no monkeytrain)."""
    blocks = (Path(__file__).resolve().parent.parent / "README.md").read_text().split("```python\n")[1:]
    [snippet] = [code for code in (block.split("```")[0] for block in blocks) if '"local-dir:runs/NAME"' in code]
    return snippet


def test_the_readmes_timm_snippet_gives_predicts_answers(split, capsys, tmp_path):
    """timm's own loading and transform differ from predict's (alpha dropped, a large JPEG decoded whole, one
    centre crop instead of two): the README's block must not. At 40 px the stored view is 45 px (46 if rounded
    to the nearest), an odd margin, where the two centre crops differ from one for some shapes."""
    from PIL import Image

    (tmp_path / "run").mkdir()
    checkpoint = tiny_checkpoint(tmp_path / "run", ["common name 0", "common name 1", "common name 2"],
                                 image_size=40)

    source = Image.open(sorted(split.rglob("*.png"))[0]).convert("RGB")
    half_clear = source.convert("RGBA").resize((300, 200))
    half_clear.putalpha(Image.linear_gradient("L").resize((300, 200)))
    half_clear.save(tmp_path / "clear.png")
    source.resize((900, 700)).save(tmp_path / "large.jpg", quality=90)
    source.resize((570, 285)).save(tmp_path / "wide.png")
    source.resize((73, 99)).save(tmp_path / "tall.png")
    capsys.readouterr()
    cli.main(["predict", "--cpu", "--json", "--top-k", "1", "--checkpoint", str(checkpoint), str(split),
              *(str(tmp_path / name) for name in ("clear.png", "large.jpg", "wide.png", "tall.png"))])
    answers = json.loads(capsys.readouterr().out)
    snippet = readme_timm_snippet().replace("runs/NAME", str(checkpoint.parent))
    assert len(answers) == 10
    for answer in answers:
        scope: dict = {}
        exec(snippet.replace("photo.jpg", answer["path"]), scope)
        [top] = answer["top"]
        assert capsys.readouterr().out == f"{top['class']} {top['probability']:.1%}\n"
        assert scope["probabilities"].max().item() == pytest.approx(top["probability"], abs=1e-6)


@pytest.fixture(scope="module")
def one_folder_run(tmp_path_factory) -> dict:
    """A tiny run on one folder of class subfolders, its test split held out of it (--test-fraction)."""
    from conftest import train_here

    root = tmp_path_factory.mktemp("one-folder")
    data = write_image_folder(root / "pets", layout="image-folder", classes=3, per_class=10)
    train_here(["--data", str(data), "--model", TINY, "--cpu", "--epochs", "1", "--max-batches-per-epoch", "2",
                "--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
                "--run-name", "pets"], root, MONKEYTRAIN_CACHE=str(root / "cache"))
    run_dir = root / "runs" / "pets"
    return {"data": data, "checkpoint": run_dir / "best.safetensors", "run_dir": run_dir,
            "manifest": json.loads((run_dir / "data_manifest.json").read_text()),
            "results": json.loads((run_dir / "results.json").read_text())}


def test_evaluate_refuses_the_one_folder_a_run_trained_on_and_counts_its_training_images(one_folder_run, capsys):
    """`evaluate runs/x/best.safetensors data` of a run whose test split was held out of data scored 354 images,
    80% of them the training images, as if it were a test figure (86% where the run's honest figure was 84%)."""
    data, run_dir, results = one_folder_run["data"], one_folder_run["run_dir"], one_folder_run["results"]
    trained = len(one_folder_run["manifest"]["files"]["train"])
    assert 0 < trained < 30
    for spelled in (data, Path(f"{data}/"), data / "." / "n0" / ".."):
        assert error_of(["evaluate", "--cpu", "--checkpoint", str(one_folder_run["checkpoint"]), str(spelled)],
                        capsys) == (
            f"monkeytrain: error: {trained} of the 30 images in {spelled} trained this checkpoint, so their accuracy "
            f"would be no test figure; its run's figure is {results['test_accuracy']:.2%} on its "
            f"{results['test_images']} test images ({run_dir / 'results.json'}), and a folder of images the "
            "checkpoint never saw gives a new one (--allow-training-images scores these anyway, as a check of how "
            "well it fits them).")


def test_evaluate_scores_a_runs_training_images_when_allowed_and_says_it_is_no_test_figure(one_folder_run,
                                                                                          capsys):
    data, checkpoint = one_folder_run["data"], str(one_folder_run["checkpoint"])
    trained = len(one_folder_run["manifest"]["files"]["train"])
    capsys.readouterr()
    cli.main(["evaluate", "--cpu", "--json", "--allow-training-images", "--checkpoint", checkpoint, str(data)])
    printed, warned = capsys.readouterr()
    scored = json.loads(printed)
    assert scored["images"] == 30 and scored["training_images"] == trained
    assert warned == (f"monkeytrain: warning: {trained} of the 30 images in {data} trained this checkpoint: the "
                      "accuracy below is how well it fits them, not a test figure.\n")
    cli.main(["evaluate", "--cpu", "--allow-training-images", "--checkpoint", checkpoint, str(data)])
    assert capsys.readouterr().out.splitlines()[0].endswith(
        f"; not a test figure: {trained} of these 30 images trained the checkpoint")


def test_evaluate_scores_a_runs_data_moved_elsewhere_or_images_it_never_saw(one_folder_run, capsys, tmp_path):
    """Only the folder the run trained on is refused: a copy of it elsewhere (the data moved, the header's path
    no longer there) is scored, and so is a folder of other images."""
    moved = shutil.copytree(one_folder_run["data"], tmp_path / "moved")
    fresh = write_image_folder(tmp_path / "fresh", layout="image-folder", classes=3, per_class=2, seed=7)
    checkpoint = str(one_folder_run["checkpoint"])
    for folder, images in ((moved, 30), (fresh, 6)):
        capsys.readouterr()
        cli.main(["evaluate", "--cpu", "--json", "--checkpoint", checkpoint, str(folder)])
        printed, warned = capsys.readouterr()
        assert json.loads(printed)["images"] == images and "training_images" not in json.loads(printed)
        assert warned == ""


def test_evaluate_refuses_a_runs_training_split_folder_without_its_run_folder(split, capsys, tmp_path,
                                                                             make_image_folder):
    """A checkpoint copied away from its run (no data manifest to count from) still records the data it trained
    on: the training split of a train/ + test/ root, here through a link, is refused; its test/ is scored."""
    root = make_image_folder(tmp_path / "data", layout="train-test", classes=3, per_class=2)
    (tmp_path / "alone").mkdir()
    info = CheckpointInfo(TINY, ["a", "b", "c"], ["n0", "n1", "n2"], [0.5] * 3, [0.25] * 3, 32, 1, 0.5,
                          {**TrainConfig(model=TINY, image_size=32).to_dict(), "data": str(root)})
    checkpoint = str(save_checkpoint(tmp_path / "alone", create_model(TINY, 3).eval(), info))
    (tmp_path / "linked").symlink_to(root / "train")
    assert error_of(["evaluate", "--cpu", "--checkpoint", checkpoint, str(tmp_path / "linked")], capsys) == (
        f"monkeytrain: error: most of the 6 images in {tmp_path / 'linked'} trained this checkpoint (its run trained "
        "on it), so their accuracy would be no test figure; its run's results.json holds its figure on its test "
        "split, which it never trained on, and a folder of images the checkpoint never saw gives a new one "
        "(--allow-training-images scores these anyway, as a check of how well it fits them).")
    capsys.readouterr()
    cli.main(["evaluate", "--cpu", "--json", "--checkpoint", checkpoint, str(root / "test")])
    assert json.loads(capsys.readouterr().out)["images"] == 6
