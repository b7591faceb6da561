"""The deployable checkpoint: weights plus everything needed to use them.

`best.safetensors` holds plain state-dict keys and, in its header, the
architecture, class names, normalisation, image size, the epoch, what chose it
(--select-on) and its validation accuracies, the resolved config and library versions. A `config.json`
beside it follows timm's pretrained-config format, so
`timm.create_model("local-dir:RUN", pretrained=True)` loads the run too, and
`class_map.txt` names the class folders in the model's order, for timm's
`validate.py --class-map` (timm orders folders naturally, 2 before 10; we as text).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from monkeytrain import __version__
from monkeytrain.config import SELECT_ON_CHOICES
from monkeytrain.data.views import CROP_PCT
from monkeytrain.distributed import broadcast_from_main
from monkeytrain.errors import UserError, first_line, to_stderr
from monkeytrain.model import built_for_one_size, create_model
from monkeytrain.selection import BEFORE_SELECT_ON
from monkeytrain.storage import write_atomically
from monkeytrain.weights import is_torch_save_file, strip_wrapper_prefixes

BEST_NAME = "best.safetensors"
CLASS_MAP_NAME = "class_map.txt"
FORMAT = "monkeytrain-1"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says about its model."""

    architecture: str
    class_names: list[str]
    class_folders: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    epoch: int
    val_accuracy: float
    config: dict
    synthetic_data: bool = False
    # What chose the epoch (--select-on) and its balanced figure; a header written before they were recorded
    # gives its config's select_on (accuracy before the flag existed) and no balanced figure (None).
    selected_on: str = BEFORE_SELECT_ON
    val_balanced_accuracy: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata is str -> str: JSON for anything structured."""
        return {
            "format": FORMAT,
            "architecture": self.architecture,
            "num_classes": str(self.num_classes),
            "class_names": json.dumps(self.class_names),
            "class_folders": json.dumps(self.class_folders),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "image_size": str(self.image_size),
            "crop_pct": str(CROP_PCT),
            "epoch": str(self.epoch),
            "val_accuracy": repr(self.val_accuracy),
            "selected_on": self.selected_on,
            "val_balanced_accuracy": json.dumps(self.val_balanced_accuracy),  # repr's digits; null if unknown
            "config": json.dumps(self.config, sort_keys=True),
            "synthetic_data": json.dumps(self.synthetic_data),
            "versions": json.dumps(library_versions()),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: Path | str = "the checkpoint") -> "CheckpointInfo":
        """The header of a file (`source`, for the error) that says it is monkeytrain's; one line if damaged."""
        try:
            return cls._parse(metadata)
        except (KeyError, ValueError, TypeError) as error:  # a field missing, or not what it should be
            raise UserError(f"{source} has damaged monkeytrain metadata ({error.__class__.__name__}: {error}); pass "
                            "a checkpoint written by monkeytrain, unedited.") from None

    @classmethod
    def _parse(cls, metadata: dict[str, str]) -> "CheckpointInfo":
        info = cls(
            architecture=metadata["architecture"],
            class_names=json.loads(metadata["class_names"]),
            class_folders=json.loads(metadata["class_folders"]),
            mean=json.loads(metadata["mean"]),
            std=json.loads(metadata["std"]),
            image_size=int(metadata["image_size"]),
            epoch=int(metadata["epoch"]),
            val_accuracy=float(metadata["val_accuracy"]),
            config=json.loads(metadata["config"]),
            synthetic_data=json.loads(metadata.get("synthetic_data", "false")),
            **selection_of(metadata),
        )
        for field, fits in info._ranges().items():
            if not fits:
                raise ValueError(f"{field} out of range")
        return info

    def _ranges(self) -> dict[str, bool]:
        """Whether each field the header gives holds what predict and evaluate need: an edited one would
        otherwise end in a traceback, NaN probabilities or wrong class names instead of one line."""
        shift = self.config.get("tta_shift", 0) if isinstance(self.config, dict) else None
        return {
            "config": isinstance(self.config, dict) and type(shift) is int and shift >= 0,  # crops move by it
            "image_size": self.image_size > 0,
            "class_names": is_text_list(self.class_names) and len(self.class_names) > 1,
            "class_folders": (is_text_list(self.class_folders) and len(self.class_folders) == len(self.class_names)
                              and len(set(self.class_folders)) == len(self.class_folders)),
            "selected_on": self.selected_on in SELECT_ON_CHOICES,
            "mean": is_rgb(self.mean),
            "std": is_rgb(self.std) and min(self.std) > 0,  # images are divided by it
        }


def selection_of(metadata: dict[str, str]) -> dict:
    """selected_on and val_balanced_accuracy as the header gives them, or as an older one implies."""
    config = json.loads(metadata["config"])
    implied = config.get("select_on", BEFORE_SELECT_ON) if isinstance(config, dict) else BEFORE_SELECT_ON
    balanced = json.loads(metadata.get("val_balanced_accuracy", "null"))
    return {"selected_on": metadata.get("selected_on", implied),
            "val_balanced_accuracy": None if balanced is None else float(balanced)}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_text_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def is_rgb(value) -> bool:
    """Three finite numbers: one per colour channel."""
    return isinstance(value, list) and len(value) == 3 and all(map(is_number, value))


def library_versions() -> dict[str, str]:
    import accelerate
    import safetensors
    import timm

    return {
        "monkeytrain": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "accelerate": accelerate.__version__, "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors under the model's own names (no DDP or compile prefixes)."""
    state = strip_wrapper_prefixes(model.state_dict())
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(run_dir: Path, model: torch.nn.Module, info: CheckpointInfo) -> Path:
    """Write best.safetensors, and timm's config.json and class_map.txt, into `run_dir` (main process only).

    On a full disk this raises `DiskFull` and the previous best.safetensors stays as it was."""
    path = run_dir / BEST_NAME
    write_atomically(path, save(plain_state_dict(model), metadata=info.to_metadata()))
    write_atomically(run_dir / "config.json", json.dumps(timm_config(info), indent=2).encode())
    class_map = timm_class_map(info.class_folders)
    if class_map is not None:
        write_atomically(run_dir / CLASS_MAP_NAME, class_map)
    else:
        warn_no_class_map(run_dir, info.class_folders)
    return path


def timm_class_map(class_folders: list[str]) -> bytes | None:
    """timm's --class-map text file: the class folders one a line, in label order, which timm's folder reader
    then follows instead of its natural sort. None where a name would not read back as written (unmappable)."""
    if unmappable(class_folders):
        return None
    return "".join(f"{name}\n" for name in class_folders).encode("utf-8")


def unmappable(class_folders: list[str]) -> str | None:
    """Why timm's class map cannot hold one of the class folders, naming it (timm reads it as UTF-8 and strips
    each line: its folder reader could not match such a folder anyway); None where it holds them all."""
    for name in class_folders:
        if "\n" in name or "\r" in name:
            return f"class folder {name!r} holds a line break"
        if name != name.strip():
            return f"class folder '{name}' begins or ends with white space, which timm strips from each line"
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a name that is not UTF-8 on disk (a zip made on Windows)
            return f"class folder {name!r} is not UTF-8, which timm reads it as"
    return None


_WARNED_NO_CLASS_MAP: set[str] = set()  # run folders told of: a run saves its best checkpoint many times


def warn_no_class_map(run_dir: Path, class_folders: list[str]) -> None:
    """Say once for a run (by its main process, which saves) that class_map.txt is left out, and why."""
    if str(run_dir) in _WARNED_NO_CLASS_MAP:
        return
    _WARNED_NO_CLASS_MAP.add(str(run_dir))
    to_stderr("warning", f"{CLASS_MAP_NAME} (for timm's validate.py --class-map) is left out of {run_dir}: "
                         f"{unmappable(class_folders)}; config.json's label_names hold the class names.")


class BestCheckpoint:
    """A run's best.safetensors: every rank calls `save` together, the main process writes it."""

    def __init__(self, run_dir: Path, accelerator):
        self.run_dir, self.accelerator = run_dir, accelerator

    def save(self, model: torch.nn.Module, info: CheckpointInfo) -> None:
        """Every rank returns once the file is whole, or raises the same one line when the main process
        could not write it (a full disk): the others would otherwise wait for it at a barrier it never
        reaches, and end in a gloo or NCCL traceback under its line."""
        failure = None
        if self.accelerator.is_main_process:
            try:
                save_checkpoint(self.run_dir, model, info)
            except UserError as error:  # DiskFull, WriteFailed
                failure = error
        problem = broadcast_from_main(str(failure) if failure else None)  # also: none goes on before it is whole
        if failure:
            raise failure
        if problem:
            raise UserError(problem)


def timm_config(info: CheckpointInfo) -> dict:
    """timm's pretrained-config (config.json) for a local-dir or hub-style load."""
    return {
        "architecture": info.architecture,
        "num_classes": info.num_classes,
        "label_names": info.class_names,
        "pretrained_cfg": {
            "input_size": [3, info.image_size, info.image_size],
            "fixed_input_size": built_for_one_size(info.architecture),  # timm then builds a ViT for input_size
            "crop_pct": CROP_PCT,
            "interpolation": "bilinear",
            "mean": info.mean,
            "std": info.std,
            "num_classes": info.num_classes,
        },
    }


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Weights and header of a monkeytrain checkpoint, or a UserError saying what is wrong."""
    weights, header = read_checkpoint_file(path)
    return weights, CheckpointInfo.from_metadata(header, path)


def read_checkpoint_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights and the header word for word (str -> str), which an export copies whole."""
    if not path.is_file():
        raise UserError(not_a_checkpoint_file(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weights = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        if is_torch_save_file(path):
            raise UserError(f"{path} is a torch.save file (.pt/.pth, as timm's train.py writes), not a monkeytrain "
                            "checkpoint, which holds the classes and preprocessing too; pass the best.safetensors "
                            "of a monkeytrain run.") from None
        raise UserError(f"{path} is not a readable .safetensors file ({error}); pass a valid checkpoint.") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} has no monkeytrain metadata; pass a best.safetensors written by monkeytrain.")
    return weights, metadata


def not_a_checkpoint_file(path: Path) -> str:
    """Why `path`, which is not a file, cannot be the checkpoint: a run's folder, or nothing at all."""
    if path.is_dir():
        return f"checkpoint {path} is a folder; pass the best.safetensors (or .onnx) file in it."
    return f"checkpoint {path} does not exist; pass the best.safetensors of a finished run (or its .onnx)."


def model_with_weights(weights: dict[str, torch.Tensor], info: CheckpointInfo) -> torch.nn.Module:
    """A fresh model of the header's architecture holding `weights`, in eval mode, on the CPU."""
    model = create_model(info.architecture, info.num_classes, image_size=info.image_size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        raise UserError(f"the weights of the checkpoint do not fit its architecture {info.architecture} "
                        f"({first_line(error)}); pass a best.safetensors written by monkeytrain.") from None
    return model.eval()


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, CheckpointInfo]:
    """A fresh model with the checkpoint's weights, in eval mode, and its header."""
    weights, info = read_checkpoint(path)
    return model_with_weights(weights, info).to(device), info
