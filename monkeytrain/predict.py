"""Using a finished checkpoint (best.safetensors or its .onnx export): top-k predictions for images,
and scoring an image folder."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from monkeytrain.checkpoint import CheckpointInfo, load_model
from monkeytrain.data import layout
from monkeytrain.data.augment import Augmenter, AugmentSettings, EvalViews
from monkeytrain.data.imagefiles import (
    ImageFile, SkippedFile, candidate_files, glance_at_files, scan_labelled_files,
)
from monkeytrain.data.loaders import DecodedOrWhyNot, as_list, sharded_loader
from monkeytrain.data.views import view_dataset
from monkeytrain.engine import EvalResult, evaluate
from monkeytrain.errors import UserError, to_stderr
from monkeytrain.runrecords import DATA_RECORD, from_its_root


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def collect_images(inputs: list[str], scratch: Path | None = None
                   ) -> tuple[list[ImageFile | Unreadable], list[SkippedFile]]:
    """Images among files, folders and patterns given, in the order given, each once (a file named twice, or
    named and in a folder given too, is one image: one answer); in its place, a named file that is no image,
    as an Unreadable for predict to tell in its turn. Files found in a folder, or by a pattern the shell left
    as it was ('*.jpg' in quotes, as a folder's files), that are no images come apart, to warn of and skip.
    `-` is the image piped to standard input, saved in `scratch` (see `scratch_for`) once the other inputs are
    found. Judged by their headers alone: `predict` decodes each image once, and tells of one damaged past its
    header then."""
    found = {item: expanded(item) for item in inputs if item != STANDARD_INPUT}  # a typo told before the read
    piped = saved_standard_input(scratch) if STANDARD_INPUT in inputs else None
    named = [name for item in inputs for name in (found[item] if item != STANDARD_INPUT else [str(piped)])]
    named_files = {Path(item) for item, paths in found.items() if paths == [item]}  # a pattern's matches are not
    named_files |= {piped} if piped else set()
    once = {}  # by absolute path, first spelling kept: `a.jpg ./a.jpg` is one file
    for path in (path for item in map(Path, named) for path in files_of(item, item in named_files)):
        once.setdefault(os.path.abspath(path), path)
    images, skipped = glance_at_files([(p, -1) for p in once.values()])  # each is decoded once, by predict
    unreadable = [Unreadable(bad.path, not_an_image(bad, piped=bad.path == piped))
                  for bad in skipped if bad.path in named_files]
    if not once:  # files that are all no images end in predict, after a line naming each
        raise UserError(f"no files in {', '.join(inputs)}; pass image files or folders of images.")
    position = {path: index for index, path in enumerate(once.values())}
    given = sorted([*(as_given(image, named_files, piped) for image in images), *unreadable],
                   key=lambda item: position[item.path])
    return given, [bad for bad in skipped if bad.path not in named_files]


@dataclass(frozen=True)
class Unreadable:
    """A file the user named (or `-`) that holds no image predict can read: told in its turn among the answers,
    and the command ends with status 2, so that a script notices (the answers for the others are not lost)."""
    path: Path
    message: str


class NamedImage(ImageFile):
    """An image file the user named (not one found in a folder): should it not decode, that is an error."""


class PipedImage(NamedImage):
    """The image piped to standard input, read from the file it was saved to (decoding reads files)."""


STANDARD_INPUT = "-"  # as for cat and most commands: `curl URL | monkeytrain predict --checkpoint CKPT -`


def as_given(image: ImageFile, named_files: set[Path], piped: Path | None) -> ImageFile:
    """`image` as the user gave it: piped in, named, or found in a folder given."""
    kind = PipedImage if image.path == piped else NamedImage if image.path in named_files else None
    return kind(*vars(image).values()) if kind else image


def shown_path(image: ImageFile) -> Path:
    """Where an answer says its image came from: its path as given, or `-` for the one piped in."""
    return Path(STANDARD_INPUT) if isinstance(image, PipedImage) else image.path


def not_an_image(bad: SkippedFile, piped: bool = False) -> str:
    if piped:
        return f"standard input (-) is {bad.reason}; pipe an image into it, or pass an image file."
    return f"{bad.path} is {bad.reason}; pass an image file."


@contextlib.contextmanager
def scratch_for(inputs: list[str]) -> Iterator[Path | None]:
    """A temporary folder for the image piped to standard input while the block predicts, where `-` is
    among `inputs`; None where it is not (no temporary folder needed, none made)."""
    if STANDARD_INPUT not in inputs:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="monkeytrain-stdin-") as folder:
        yield Path(folder)


def saved_standard_input(scratch: Path) -> Path:
    """All of standard input, as a file in `scratch`: a pipe can be read once, and the first look at an image
    and its decoding each read its file from the start. A terminal (nothing piped) or an empty input is refused."""
    if sys.stdin is None or sys.stdin.isatty():
        what = "closed" if sys.stdin is None else "a terminal here"
        itself = "; for the file named -, pass ./-" if os.path.lexists(STANDARD_INPUT) else ""
        raise UserError(f"- stands for an image piped to standard input, but standard input is {what}; pipe one "
                        "in (`curl URL | monkeytrain predict --checkpoint CKPT -`) or pass image files" + itself + ".")
    saved = scratch / "standard-input"
    with open(saved, "wb") as copy:
        shutil.copyfileobj(getattr(sys.stdin, "buffer", sys.stdin), copy)
    if not saved.stat().st_size:
        raise UserError("standard input (-) is empty; pipe an image into it (`monkeytrain predict --checkpoint "
                        "CKPT - < photo.jpg`), or pass image files.")
    return saved


URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
PATTERN = re.compile(r"[*?[]")  # what makes a word a pattern to the shell and to glob


def expanded(item: str) -> list[str]:
    """The paths an input names: itself where it exists, else the files that it matches as a pattern;
    what names nothing is an error that says what it is (Path() would already have turned https://
    into https:/)."""
    if os.path.lexists(item):  # a file named '*.jpg' is itself, as in the shell
        return [item]
    if URL.match(item):
        raise UserError(f"{item} is a URL, and predict reads local files only; download the image and pass "
                        f"its path, or pipe it in: curl -s '{item}' | monkeytrain predict --checkpoint CKPT -")
    if PATTERN.search(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise UserError(f"{item} matches no file; pass image files, folders of images or a pattern that "
                            "matches some.")
        return matches
    raise UserError(f"{item} does not exist; pass image files or folders of images.")


def files_of(item: Path, named: bool = True) -> list[Path]:
    """The files an input names: every file below a folder, or the file itself. A pipe or a device that a
    pattern matched is left out, as in a folder; one named is an error."""
    if item.is_dir():
        return candidate_files(item)
    if item.is_file() or item.is_symlink():  # a link to nothing too, for the scan to say where it points
        return [item]
    if not named:
        return []
    # reading a named pipe would wait for a writer forever; a pipe can be read only once
    raise UserError(f"{item} is not a regular file (a pipe or a device); pass an image file.")


def preparer(info: CheckpointInfo) -> Callable:
    """uint8 stored views -> the normalised centre crops that the checkpoint's model takes."""
    return Augmenter(AugmentSettings(), info.image_size, info.mean, info.std, generator=None).eval


def inference(model: Callable, info: CheckpointInfo) -> tuple[Callable, Callable]:
    """(prepare uint8 stored views, model forward) exactly as the checkpoint's run evaluated,
    with its test-time views."""
    views = EvalViews.of_config(info.config, info.image_size, info.mean, info.std)
    return views.prepare, views.averaged(model)


def load_classifier(checkpoint: Path, device: torch.device | str) -> tuple[Callable, CheckpointInfo]:
    """The checkpoint's forward (normalised images -> logits, both on `device`) and its header.

    A `.onnx` file (from `monkeytrain export`) runs in ONNX Runtime, anything else is
    a best.safetensors for PyTorch; both headers are the same, so is all that follows."""
    if is_onnx_model(checkpoint):
        from monkeytrain.export import load_onnx  # only ONNX users need onnxruntime

        return load_onnx(checkpoint)
    return load_model(checkpoint, device)


def is_onnx_model(path: Path) -> bool:
    """Whether predict and evaluate run `path` in ONNX Runtime: they tell an ONNX model by its suffix."""
    return path.suffix.lower() == ".onnx"


PREDICT_BATCH_SIZE = 32


def predict(classifier: tuple[Callable, CheckpointInfo], given: list[ImageFile | Unreadable], top_k: int = 3,
            device: str = "cpu") -> Iterator[Prediction | Unreadable]:
    """Top-k class names and probabilities for each image of `collect_images`, from a `load_classifier`
    checkpoint alone, in the order given, yielded batch by batch: a caller prints the first answers of 10,000
    images at once, and a reader that stops reading (`| head`) stops the work. A named file that is no image
    (found by its header, or now by its decoding) is an Unreadable in its place; one found in a folder is
    skipped, with a warning."""
    answers = answers_to(classifier, [item for item in given if isinstance(item, ImageFile)], top_k, device)
    told = 0
    for item in given:
        result = item if isinstance(item, Unreadable) else next(answers)
        if result is not None:
            told += 1
            yield result
    if not told:
        raise UserError("none of the files given is an image that could be read (each is named above); pass "
                        "image files or folders of images.")


@torch.no_grad()  # on a generator, torch turns gradients off for each step of it, not for its caller
def answers_to(classifier: tuple[Callable, CheckpointInfo], images: list[ImageFile], top_k: int,
               device: str) -> Iterator[Prediction | Unreadable | None]:
    """For each of `images` in turn: its Prediction, an Unreadable for a named one that does not decode, or
    None for one found in a folder that does not (after a warning); batch by batch, as they are asked for."""
    model, info = classifier
    prepare, forward = inference(model, info)
    loader = torch.utils.data.DataLoader(DecodedOrWhyNot(view_dataset(images, info.image_size)),
                                         batch_size=PREDICT_BATCH_SIZE, collate_fn=as_list)
    k, names = min(top_k, info.num_classes), shown_class_names(info)
    for batch in loader:
        views = [view for view, _, why_not in batch if not why_not]
        ranked = iter(top_classes(forward(prepare(torch.stack(views).to(device))), k) if views else [])
        for _, image, why_not in batch:
            if why_not:
                yield undecoded(image, why_not)
                continue
            indices, probabilities = next(ranked)
            yield Prediction(shown_path(image), [(names[i], p) for i, p in zip(indices, probabilities)])


def top_classes(logits: torch.Tensor, k: int) -> list[tuple[list[int], list[float]]]:
    """For each row of `logits`, its k most likely classes and their probabilities, most likely first."""
    probabilities, indices = logits.float().softmax(dim=1).cpu().topk(k, dim=1)
    return list(zip(indices.tolist(), probabilities.tolist()))


def undecoded(image: ImageFile, why_not: str) -> Unreadable | None:
    """An image that did not decode (damaged past its header, which is all the first look read): an Unreadable
    if the user named it, else (found in a folder) None, after one warning, as for the first look's findings."""
    if isinstance(image, NamedImage):
        return Unreadable(image.path, not_an_image(SkippedFile(image.path, why_not), isinstance(image, PipedImage)))
    warn_skipping(image.path, why_not)
    return None


def warn_skipping(path: Path, why_not: str) -> None:
    to_stderr("warning", f"skipping {path}: {why_not}.")


def decoded(batch: list) -> tuple[list[ImageFile], torch.Tensor] | None:
    """A DecodedOrWhyNot batch of a folder's images as those that decoded and their stacked views (None if none
    did); one that did not is skipped, with a warning."""
    for _, image, why_not in batch:
        if why_not:
            warn_skipping(image.path, why_not)
    pairs = [(image, view) for view, image, why_not in batch if not why_not]
    if not pairs:
        return None
    return [image for image, _ in pairs], torch.stack([view for _, view in pairs])


def shown_class_names(info: CheckpointInfo) -> list[str]:
    """The class names to show, each once, also for a checkpoint made before names were made distinct."""
    return layout.distinct_names(info.class_names, info.class_folders)


def labelled_folder(folder: Path, info: CheckpointInfo,
                    scan: Callable = scan_labelled_files) -> tuple[list[ImageFile], list[SkippedFile]]:
    """Images of a folder of class subfolders, labelled by the checkpoint's class folders or names; `scan`
    judges the files (glance_at_files: by their headers alone)."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{folder} {what}; pass a folder of class subfolders.")
    labels = subfolder_labels(info)
    names = layout.class_folders(folder)
    unknown = [n for n in names if n not in labels]
    if not names:
        itself = (f"; it is itself the class folder '{folder.name}', so pass the folder that holds it"
                  if folder.name in labels else "")
        raise UserError(f"{folder} has no class subfolders; pass a folder of them, named as the checkpoint's "
                        f"classes' folders or names: {known_subfolders(info)}{itself}.")
    if unknown:
        raise UserError(unknown_class_folder(folder, unknown[0], info))
    labelled = [(p, labels[n]) for n in names for p in candidate_files(folder / n)]
    images, skipped = scan(labelled)
    if not images:
        raise UserError(f"{folder} has no readable images; add images to its class subfolders.")
    return images, skipped


def subfolder_labels(info: CheckpointInfo) -> dict[str, int]:
    """The label of each subfolder name a labelled folder may use: a class's folder in training (n0), or
    its name (mantled howler: new photos sorted by species), unless two classes share that name."""
    named = {}
    for label, name in enumerate(info.class_names):
        named[name] = label if name not in named else None
    folders = {folder: label for label, folder in enumerate(info.class_folders)}
    return {**{name: label for name, label in named.items() if label is not None}, **folders}  # folders win


def known_subfolders(info: CheckpointInfo) -> str:
    """The class folders in words, each with its name where that differs: n0 (mantled howler), n1 ..."""
    return ", ".join(folder if name == folder else f"{folder} ({name})"
                     for folder, name in zip(info.class_folders, info.class_names))


def unknown_class_folder(folder: Path, name: str, info: CheckpointInfo) -> str:
    """Why a subfolder named `name` is no class of the checkpoint's, and what to do: often the split folder
    one level too high (Kaggle's validation/validation), or a name that differs only in letter case."""
    test_split = test_split_of(folder)
    if test_split is not None:
        return (f"{folder} is a dataset root, not a folder of class subfolders; pass the folder of its test split, "
                f"{test_split} (the split that a run on it is tested on).")
    known = list(subfolder_labels(info))
    below = layout.class_folders(folder / name)
    if below and all(n in known for n in below):
        return f"{folder} holds the class folders one level down, in {folder / name}; pass that folder."
    alike = layout.spelled_alike(name, known)
    if alike:
        return f"{folder} has class folder '{name}' and the checkpoint '{alike[0]}': they {alike[1]}; rename it."
    return (f"{folder} has class folder '{name}' that the checkpoint does not know; expected subfolders "
            f"named as its classes' folders or names: {known_subfolders(info)}.")


def test_split_of(folder: Path) -> Path | None:
    """The test split's folder where `folder` is a dataset root, as training finds its splits (Kaggle's
    validation/validation), else None."""
    if not any(name.lower() in layout.SPLIT_NAMES for name in layout.class_folders(folder)):
        return None
    try:
        return layout.folders_from_root(folder).test
    except UserError:  # split folders, but no layout training takes: the unknown folder is told as such
        return None


def evaluate_folder(checkpoint: Path, folder: Path, accelerator, batch_size: int = 32,
                    allow_training_images: bool = False
                    ) -> tuple[EvalResult, CheckpointInfo, list[SkippedFile], TrainingImages | None]:
    """Score a checkpoint on a folder of class subfolders (any split, any rank count). Each image is decoded
    once, in the evaluation: one damaged past its header is skipped then, with a warning. The folder its run
    trained on is refused (its figure would be no test figure), unless `allow_training_images`: then the last
    item says how many of the images trained it, for the caller to say so."""
    classifier, info = load_classifier(checkpoint, accelerator.device)
    images, skipped = labelled_folder(folder, info, scan=glance_at_files)
    trained = training_images_among(checkpoint, info, folder, images)
    if trained and not allow_training_images:
        raise UserError(trained.refusal())
    loader = sharded_loader(DecodedOrWhyNot(view_dataset(images, info.image_size)), batch_size, 0,
                            accelerator.process_index, accelerator.num_processes, collate_fn=as_list)
    batches = (views_and_labels(images_and_views, accelerator.device)
               for images_and_views in filter(None, map(decoded, loader)))
    prepare, forward = inference(classifier, info)
    result = evaluate(forward, batches, prepare, accelerator, info.num_classes)
    if not result.count:  # the same on every rank: a sum over all of them
        raise UserError(f"{folder} has no readable images (each is named above); add images to its class "
                        "subfolders.")
    return result, info, skipped, trained


@dataclass(frozen=True)
class TrainingImages:
    """Images given to evaluate that trained the checkpoint: `count` of the `total` in `folder`, or None
    where no data manifest of its run lies beside it to count them (the folder is the one it trained on)."""
    folder: Path
    count: int | None
    total: int
    honest_figure: str  # where the run's figure on its test split is, with that figure where known

    def how_many(self) -> str:
        if self.count is None:
            return f"most of the {self.total} images in {self.folder} trained this checkpoint (its run trained on it)"
        return f"{self.count} of the {self.total} images in {self.folder} trained this checkpoint"

    def refusal(self) -> str:
        return (f"{self.how_many()}, so their accuracy would be no test figure; {self.honest_figure}, and a folder "
                "of images the checkpoint never saw gives a new one (--allow-training-images scores these anyway, "
                "as a check of how well it fits them).")

    def warning(self) -> str:
        return f"{self.how_many()}: the accuracy below is how well it fits them, not a test figure."


def training_images_among(checkpoint: Path, info: CheckpointInfo, folder: Path,
                          images: list[ImageFile]) -> TrainingImages | None:
    """Which of a folder's `images` trained the checkpoint, where the folder is the one its run trained on
    (by resolved path: a link or another spelling is the same folder): counted from the run's data manifest
    beside the checkpoint, else (a checkpoint copied away) all taken for training images. None where none did."""
    trained_on = training_folder(info, folder)
    if trained_on is None or not is_same_folder(folder, trained_on):
        return None
    count = counted_in_manifest(checkpoint.parent / DATA_RECORD, info, folder, images)
    if count == 0:  # the folder holds other images now than those the run listed
        return None
    return TrainingImages(folder, count, len(images), honest_figure(checkpoint.parent))


def honest_figure(run_dir: Path) -> str:
    """Where the run's accuracy on the test split it held out is to be read, in words, with that figure where
    the run's results.json lies beside the checkpoint."""
    from monkeytrain.rundir import RESULTS_NAME  # here: rundir imports this module, through results

    results = run_dir / RESULTS_NAME
    try:
        scored = json.loads(results.read_text())
        accuracy, images = scored["test_accuracy"], scored["test_images"]
        return f"its run's figure is {accuracy:.2%} on its {images} test images ({results})"
    except (OSError, ValueError, KeyError, TypeError):  # none there, or a tune trial's, never tested (null)
        return "its run's results.json holds its figure on its test split, which it never trained on"


def training_folder(info: CheckpointInfo, folder: Path) -> Path | None:
    """The folder of class subfolders the checkpoint's run trained on, as its header records it: --train-dir,
    or the training split of --data (--data itself where it holds no split folders); None for the built-in
    synthetic set. The layout of --data is read only where `folder` lies in it: reading it may warn of folders."""
    config = info.config
    if config.get("train_dir"):
        return Path(config["train_dir"])
    data = config.get("data")
    if info.synthetic_data or not isinstance(data, str) or not is_within(folder, Path(data)):
        return None
    try:
        return layout.folders_from_root(Path(data)).train
    except UserError:  # no layout that training takes now: the data changed since, so the folder itself
        return Path(data)


def is_within(folder: Path, root: Path) -> bool:
    resolved, root = folder.resolve(), root.resolve()
    return resolved == root or root in resolved.parents


def is_same_folder(folder: Path, other: Path) -> bool:
    return folder.resolve() == other.resolve()


def counted_in_manifest(record: Path, info: CheckpointInfo, folder: Path, images: list[ImageFile]) -> int | None:
    """How many of `images` (in `folder`, the run's training folder) the run's data manifest lists among its
    training files; None without a readable manifest of this checkpoint's classes at `record`. Its paths are
    as training was given them, so each is taken relative to its training folder (its `root`)."""
    try:
        manifest = json.loads(record.read_text())
        listed = {os.path.normpath(path) for path in from_its_root(manifest)["files"]["train"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if manifest.get("class_folders") != info.class_folders:  # another run's
        return None
    return sum(os.path.normpath(os.path.relpath(image.path, folder)) in listed for image in images)


def views_and_labels(images_and_views: tuple[list[ImageFile], torch.Tensor], device) -> tuple[torch.Tensor, ...]:
    """`decoded`'s images and views as (views, labels) on `device`."""
    images, views = images_and_views
    return views.to(device), torch.tensor([image.label for image in images], dtype=torch.int64, device=device)
