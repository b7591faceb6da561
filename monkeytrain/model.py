"""Building a timm classifier, from scratch or from pretrained weights."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Optional

import timm
import torch
from safetensors.torch import load_file

from monkeytrain.errors import UserError
from monkeytrain.storage import mark_used

HUB = "hub"
# Wrappers that prefix state-dict keys: DDP ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def create_model(name: str, num_classes: int, pretrained: Optional[str] = None) -> torch.nn.Module:
    """A timm model with a `num_classes` head; `pretrained` is None, "hub" or a file path."""
    check_model_choice(name, pretrained)
    if pretrained == HUB:
        return _create_from_hub(name, num_classes)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if pretrained:
        load_weights_file(model, Path(pretrained))
    return model


def check_model_choice(name: str, pretrained: Optional[str] = None) -> None:
    """A timm model name and, unless None or "hub", a weights file that exists: config validation calls
    this too, so that a typo costs one line at start-up, not after minutes of reading the data."""
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'; pick a name from timm.list_models(), e.g. resnet18.")
    if pretrained and pretrained != HUB:
        check_weights_file(Path(pretrained))


def check_weights_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist; check --pretrained.")


def _create_from_hub(name: str, num_classes: int) -> torch.nn.Module:
    try:
        with hub_warnings_held_back():
            return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as error:  # hub, network and cache failures all end the same way for the user
        raise UserError(
            f"could not fetch pretrained weights for '{name}' from the Hugging Face hub "
            f"({error.__class__.__name__}); check the network and HF_HUB_OFFLINE, or pass "
            "--pretrained PATH.safetensors."
        ) from None


@contextlib.contextmanager
def hub_warnings_held_back():
    """Offline, huggingface_hub logs a warning of its own for each request it fails ("... thrown while
    requesting HEAD https://..."), above the one line that says what to do."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes, however nested (compile over DDP gives `_orig_mod.module.`)."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def load_weights_file(model: torch.nn.Module, path: Path) -> None:
    """Load a local .safetensors file, replacing the head when its class count differs."""
    check_weights_file(path)
    try:
        weights = strip_wrapper_prefixes(load_file(str(path)))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path} is not a readable .safetensors file ({error}); pass a valid weights file.")
    own = model.state_dict()
    compatible = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    head = model.pretrained_cfg.get("classifier", "fc") + "."
    body_missing = [k for k in own if k not in compatible and not k.startswith(head)]
    if body_missing:
        raise UserError(
            f"weights in {path} do not fit the model (no matching '{body_missing[0]}'); "
            "pass weights saved for the same --model."
        )
    model.load_state_dict(compatible, strict=False)


@torch.no_grad()
def check_input_sizes(model: torch.nn.Module, name: str, sizes: list[int], device: torch.device) -> None:
    """Fail before training, in one line, when the model cannot take square images of one of `sizes`
    (a ViT with a fixed patch grid, say), instead of with a traceback at the first batch of that size."""
    model.eval()
    for size in sizes:
        try:
            model(torch.zeros(1, 3, size, size, device=device))
        except Exception as error:  # timm models refuse sizes in their own ways (assertions, shape errors)
            fixed = model.pretrained_cfg.get("input_size", (3, "?", "?"))[-1]
            raise UserError(f"--model {name} cannot take {size}-pixel images ({str(error).splitlines()[0]}); "
                            f"give --image-size (and --min-train-size) it accepts, e.g. {fixed}.") from None
    model.train()


def compiled(model: torch.nn.Module, enabled: bool, cache_dir: Path) -> torch.nn.Module:
    """`torch.compile(model)` when enabled, with Inductor's caches kept in `cache_dir`, so a
    second run loads the compiled kernels instead of compiling again."""
    if not enabled:
        return model
    mark_used(cache_dir / "inductor")  # kept by `monkeytrain cache --clear --unused-days N`
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return torch.compile(model)
