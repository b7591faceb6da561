"""ONNX: export a checkpoint to a self-describing .onnx file checked in ONNX Runtime, and run one.

The .onnx file takes what the PyTorch model takes (normalised float32 NCHW images
at the checkpoint's image size, any batch size) and gives logits. Its
metadata_props are the checkpoint's header word for word, so `predict` and
`evaluate` prepare images for it exactly as for best.safetensors, and any other
ONNX consumer finds the class names, mean, std, image size and crop_pct there; its
description says in words how predict makes an input from an image file.

Nothing is written unchecked: the exported bytes run in ONNX Runtime (through
`load_onnx`, the loader that `predict` uses) beside PyTorch on a batch of images,
and only a model that agrees within the tolerance replaces the output file.

onnx, onnxscript (which torch.onnx's exporter needs) and onnxruntime come with
the `[export]` extra; a missing one is a one-line error naming that extra.
"""

from __future__ import annotations

import importlib
import io
import re
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from monkeytrain.checkpoint import (FORMAT, CheckpointInfo, model_with_weights, not_a_checkpoint_file,
                                    read_checkpoint_file)
from monkeytrain.data.augment import shift_within_todays_margin
from monkeytrain.data.imagefiles import SkippedFile
from monkeytrain.data.views import stored_size, view_dataset
from monkeytrain.errors import UserError, first_line
from monkeytrain.predict import is_onnx_model, labelled_folder, preparer
from monkeytrain.storage import write_atomically, writable_dir_for

INSTALL_EXTRA = 'pip install -e ".[export]"'
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXAMPLE_BATCH = 2  # torch.export specialises a dimension of size 1: trace with 2 to keep the batch axis dynamic
SYNTHETIC_IMAGES, SYNTHETIC_SEED = 16, 0
# torch.onnx's exporter implements operator sets from 18 on; an older one it tries to convert down
# to, and for a ResNet fails, keeping 18 after a page of traceback on stderr.
LOWEST_OPSET = 18
CHECK_BATCH_SIZE = 32


@dataclass(frozen=True)
class Agreement:
    """How ONNX Runtime's logits compare with PyTorch's on the same images."""

    images: int
    largest_difference: float   # the largest |logit difference| over every image and class
    relative_difference: float  # the same, per image divided by its largest |logit| where that exceeds 1
    top1_agreement: float       # the share of images whose top class is the same


@dataclass(frozen=True)
class Export:
    """What `export_checkpoint` wrote, and the check that allowed it."""

    path: Path
    size: int
    opset: int
    info: CheckpointInfo
    checked_on: str  # which images, in words
    agreement: Agreement
    skipped: list[SkippedFile]


def require(module: str, purpose: str):
    """Import a package of the `[export]` extra, or a UserError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(f"{purpose} needs the Python package '{module}', which cannot be imported ({error}); "
                        f"install monkeytrain's export extra: {INSTALL_EXTRA}.") from None


def export_checkpoint(checkpoint: Path, output: Optional[Path] = None, check_data: Optional[Path] = None,
                      tolerance: float = 1e-3, opset: Optional[int] = None) -> Export:
    """Export a best.safetensors to ONNX, check it against PyTorch, then write it atomically.

    `output` defaults to the checkpoint's path with the suffix .onnx, `opset` to the exporter's
    own choice. A UserError, and nothing written, when a logit differs by more than `tolerance`
    (relative where logits exceed 1; see `compare`)."""
    if is_onnx_model(checkpoint):  # else read as a .safetensors, "not readable" would puzzle
        raise UserError(f"--checkpoint {checkpoint} is already an ONNX model; export takes the best.safetensors "
                        "it was exported from.")
    output = output or checkpoint.with_suffix(".onnx")
    if output.name.lower() == ".onnx":  # a hidden file with no suffix to Python, and so to predict
        raise UserError(f"--output {output} has no name before .onnx; name the file, e.g. model.onnx.")
    if not is_onnx_model(output):
        raise UserError(f"--output {output} must end in .onnx: predict and evaluate tell an ONNX model by it.")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; name the .onnx file to write.")
    if not tolerance >= 0:  # also refuses nan
        raise UserError(f"--tolerance must be 0 or more (got {tolerance}); the default is 1e-3.")
    for package in EXPORT_PACKAGES:
        require(package, "monkeytrain export")
    check_opset(opset)
    with writable_dir_for(output.parent, "--output"):  # checked before the seconds that exporting takes
        return checked_export(checkpoint, output, check_data, tolerance, opset)


def check_opset(opset: Optional[int]) -> None:
    """An operator set that the exporter writes and the installed onnx package knows, or a UserError."""
    newest = importlib.import_module("onnx").defs.onnx_opset_version()
    if opset is not None and not LOWEST_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset} is outside {LOWEST_OPSET} to {newest}: torch's ONNX exporter writes "
                        f"operator sets from {LOWEST_OPSET} on, and the installed onnx knows them up to {newest}; "
                        "pick one in between, or leave --opset out for the exporter's own.")


def checked_export(checkpoint: Path, output: Path, check_data: Optional[Path], tolerance: float,
                   opset: Optional[int] = None) -> Export:
    """Export, check, then write: the work of export_checkpoint once its flags are known good."""
    weights, header = read_checkpoint_file(checkpoint)
    info = CheckpointInfo.from_metadata(header)
    model = model_with_weights(weights, info)
    exported = onnx_model(model, info, header, opset)
    data = serialized(exported, info)
    onnx_forward, _ = load_onnx(data, label=f"the ONNX export of {checkpoint}")
    batches, checked_on, skipped = check_batches(info, check_data)
    agreement = compare(model, onnx_forward, batches)
    if not agreement.relative_difference <= tolerance:
        raise UserError(
            f"ONNX Runtime and PyTorch disagree on {checked_on}: the largest logit difference "
            f"{agreement.largest_difference:.1e} (relative {agreement.relative_difference:.1e}) exceeds "
            f"--tolerance {tolerance:g} (top-1 agreement "
            f"{agreement.top1_agreement:.1%}); nothing was written; raise --tolerance if that is close enough, "
            "or update torch, onnxscript and onnxruntime.")
    write_atomically(output, data, flag="--output")
    return Export(output, len(data), opset_of(exported), info, checked_on, agreement, skipped)


def onnx_model(model: torch.nn.Module, info: CheckpointInfo, header: dict[str, str], opset: Optional[int] = None):
    """The model as an onnx.ModelProto with a dynamic batch axis and `header` as its metadata_props, in
    operator set `opset` (None: the exporter's own)."""
    onnx = require("onnx", "monkeytrain export")
    example = torch.zeros(EXAMPLE_BATCH, 3, info.image_size, info.image_size)
    try:
        # dynamo=True: the torch.export-based exporter, torch's default since 2.9 and the one
        # maintained; the TorchScript one (dynamo=False) is deprecated and warns on every call.
        # It needs onnxscript, hence that package in the [export] extra. What it prints (on a failure,
        # pages of graphs and warnings) is for torch's developers: the check against PyTorch that
        # follows judges the result, and a failure is told in one line.
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, verbose=False)
    except Exception as error:  # torch.export and the ONNX translation raise many types
        reason = deepest_cause(error)
        raise UserError(f"the timm model '{info.architecture}' could not be exported to ONNX "
                        f"({reason.__class__.__name__}: {without_colours(first_line(reason))}); update torch and "
                        "onnxscript, or train another --model.") from None
    proto = program.model_proto
    onnx.helper.set_model_props(proto, header)
    proto.doc_string = preprocessing_in_words(info)
    return proto


def preprocessing_in_words(info: CheckpointInfo) -> str:
    """The model's description (ONNX Runtime's `get_modelmeta().description`, Netron's): how to make its input
    from an image file, which the metadata's numbers alone do not say (channel order, scale, the two crops)."""
    side, size = stored_size(info.image_size), info.image_size
    views = "the image and its mirror image" if info.config.get("tta_flip") else "the image"
    shift = shift_within_todays_margin(info.config.get("tta_shift", 0), info.image_size)  # as predict moves them
    views += f", each also with its crop moved {shift} pixels each way" if shift else ""
    return (f"A {info.architecture} image classifier trained by monkeytrain. Input '{INPUT_NAME}': float32 "
            f"[batch, 3, {size}, {size}], RGB channels first, made from each image as monkeytrain predict makes "
            "it: turned by its EXIF orientation, laid over white if transparent, a JPEG decoded at a reduced "
            f"scale of at least {2 * side} pixels a side (Pillow's draft), resized bilinearly (antialiased) so "
            f"that its shorter side is {side} pixels (the longer rounded down), its centre {side}-pixel square, "
            f"that square's centre {size} pixels (offsets rounded as torchvision's CenterCrop), pixel values "
            "/ 255, minus the metadata's mean and divided by its std, per channel. Output "
            f"'{OUTPUT_NAME}': [batch, {info.num_classes}] logits in the order of the metadata's class_names; "
            f"softmax them for probabilities. predict averages the logits of {views}.")


def deepest_cause(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain: torch.onnx wraps the reason (an operator it cannot translate,
    a branch on the data) in a banner whose first line says only which of its steps failed."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def without_colours(text: str) -> str:
    """`text` without the terminal colour codes that torch.onnx puts in its messages."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def serialized(proto, info: CheckpointInfo) -> bytes:
    """The file's bytes: one self-contained file, which protobuf caps at 2 GB."""
    try:
        return proto.SerializeToString()
    except ValueError:  # protobuf's "exceeds maximum protobuf size of 2GB"
        raise UserError(f"the ONNX model of '{info.architecture}' is over ONNX's 2 GB limit for one file; "
                        "export a smaller --model.") from None


def opset_of(proto) -> int:
    """The standard ONNX operator set version the model uses."""
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)


def check_batches(info: CheckpointInfo, folder: Optional[Path]) -> tuple[Iterable[torch.Tensor], str, list]:
    """(normalised image batches, which images in words, unreadable files skipped): the folder's
    images when one is given, else seeded random stored views, prepared as predict prepares them."""
    prepare = preparer(info)
    if folder is None:
        side = stored_size(info.image_size)
        generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
        views = torch.randint(0, 256, (SYNTHETIC_IMAGES, 3, side, side), dtype=torch.uint8, generator=generator)
        return [prepare(views)], f"{SYNTHETIC_IMAGES} synthetic images (seed {SYNTHETIC_SEED})", []
    images, skipped = labelled_folder(folder, info)
    loader = torch.utils.data.DataLoader(view_dataset(images, info.image_size), batch_size=CHECK_BATCH_SIZE)
    return (prepare(views) for views, _ in loader), f"{len(images)} images of {folder}", skipped


@torch.no_grad()
def compare(model: Callable, onnx_forward: Callable, batches: Iterable[torch.Tensor]) -> Agreement:
    """Both forwards on the same batches: logit differences (nan if any is) and top-1 agreement.

    float32 rounding grows with the logits' size (a diverged model's logits of 1e5 differ
    by 0.1), so the tolerance applies to each image's differences over its largest |logit|,
    or over 1 where logits are small: absolute for ordinary logits, relative for large ones."""
    absolute, relative, agreeing, count = [torch.zeros(1)], [torch.zeros(1)], 0, 0
    for images in batches:
        expected, actual = model(images), onnx_forward(images)
        difference = (expected - actual).abs().amax(dim=1)  # amax keeps a nan, Python's max would drop it
        absolute.append(difference)
        relative.append(difference / expected.abs().amax(dim=1).clamp_min(1.0))
        agreeing += int((expected.argmax(dim=1) == actual.argmax(dim=1)).sum())
        count += len(images)
    return Agreement(count, torch.cat(absolute).amax().item(), torch.cat(relative).amax().item(),
                     agreeing / max(count, 1))


class OnnxForward:
    """An ONNX Runtime session called like the PyTorch model: float images in, logits out,
    both on the images' device (the session itself runs on the CPU)."""

    def __init__(self, session):
        self.session, self.input_name = session, session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        inputs = images.detach().float().cpu().contiguous().numpy()
        logits = self.session.run(None, {self.input_name: inputs})[0]
        return torch.from_numpy(logits).to(images.device)


def load_onnx(source: Union[Path, bytes], label: Optional[str] = None) -> tuple[OnnxForward, CheckpointInfo]:
    """The forward and header of an .onnx file (or its bytes) written by `monkeytrain export`."""
    label = label or str(source)
    if isinstance(source, Path) and not source.is_file():
        raise UserError(not_a_checkpoint_file(source))
    ort = require("onnxruntime", "running an .onnx checkpoint")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings would print lines of their own
    try:
        session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own types (InvalidProtobuf, Fail, ...) for damaged files
        raise UserError(f"{label} is not a readable ONNX model ({first_line(error)}); pass an .onnx file "
                        "written by monkeytrain export.") from None
    header = session.get_modelmeta().custom_metadata_map
    if header.get("format") != FORMAT:
        raise UserError(f"{label} has no monkeytrain metadata; pass an .onnx file written by monkeytrain export.")
    info = CheckpointInfo.from_metadata(header, label)
    check_graph_fits(session, info, label)
    return OnnxForward(session), info


def check_graph_fits(session, info: CheckpointInfo, label: str) -> None:
    """The graph takes [batch, 3, size, size] images and gives one logit per class, as its metadata says:
    a header copied onto another model would fail inside ONNX Runtime, or name the wrong classes."""
    expected = {"input": [None, 3, info.image_size, info.image_size], "output": [None, len(info.class_names)]}
    found = {"input": session.get_inputs()[0].shape, "output": session.get_outputs()[0].shape}
    for name in expected:
        fits = len(found[name]) == len(expected[name]) and all(
            not isinstance(have, int) or want is None or have == want  # a named axis takes any size
            for have, want in zip(found[name], expected[name]))
        if not fits:
            raise UserError(f"{label} has an {name} of shape {found[name]}, where its metadata needs "
                            f"{['N' if want is None else want for want in expected[name]]}; pass an .onnx file "
                            "written by monkeytrain export from this checkpoint.")
