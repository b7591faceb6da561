"""Pretrained weights: reading a --pretrained file (.safetensors, or a state dict or training checkpoint saved
with torch.save), fitting it to the model built (wrapper prefixes stripped, timm's conversions, a new head for
another class count), and fetching timm's own from the Hugging Face hub, offline at once where the hub does not
answer. Building the model itself is model.py's."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from monkeytrain.errors import UserError, first_line
from monkeytrain.reachable import why_no_answer

# Wrappers that prefix state-dict keys: DDP ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def check_weights_file(path: Path) -> None:
    """A --pretrained file that exists and reads as weights: checked with the flags, before the data is read.
    Cheaply: a .safetensors file's header, a torch.save file mapped rather than read (where it is a zip)."""
    check_exists(path)
    if is_torch_save_file(path):
        torch_save_weights(path)
        return
    problem = safetensors_header_problem(path)
    if problem:
        raise UserError(not_safetensors(path, problem))


def check_exists(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist; check --pretrained.")


def not_safetensors(path: Path, error: Exception) -> str:
    return (f"{path} is neither a readable .safetensors file ({first_line(error)}) nor a torch.save file; pass "
            "a .safetensors file, or weights saved with torch.save (timm's train.py's .pth.tar).")


def is_torch_save_file(path: Path) -> bool:
    """Whether `path` starts as torch.save writes: a zip archive (since torch 1.6), or a bare pickle before,
    whose first byte a .safetensors file may start with too (its header's length)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80" and safetensors_header_problem(path) is not None


def safetensors_header_problem(path: Path) -> Optional[Exception]:
    """Why `path`'s header does not read as a .safetensors file's; None where it does."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error types for damaged files
        return error
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors file or of a torch.save file (see torch_save_weights), without the
    prefixes that wrappers give its keys."""
    if is_torch_save_file(path):
        return strip_wrapper_prefixes(torch_save_weights(path))
    try:
        return strip_wrapper_prefixes(load_file(str(path)))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(not_safetensors(path, error)) from None


# Where a checkpoint of timm's train.py (and of DeiT, MAE, ...) keeps its weights, in the order timm's
# load_checkpoint takes them: the EMA's first, as its --initial-checkpoint does.
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def torch_save_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a torch.save file: a state dict, or a training checkpoint holding one (see STATE_DICT_KEYS).
    Unpickled with weights_only, which runs no code from the file; timm's train.py saves its flags with the
    weights (an argparse.Namespace), which is allowed too. Memory-mapped where the file is a zip (torch 1.6 on)."""
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch 2.5 on
    try:
        with allowed([argparse.Namespace]) if allowed else contextlib.nullcontext():
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # pickle's, torch's and zipfile's own types, for any file they cannot read
        raise UserError(f"{path} is a torch.save file that could not be read as weights ({first_line(error)}); "
                        "save the model's state_dict() (a whole pickled model is not unpickled: it could run "
                        "code), or pass a .safetensors file.") from None
    holder = next((key for key in STATE_DICT_KEYS if isinstance(saved, dict) and isinstance(saved.get(key), dict)),
                  None)
    weights = saved[holder] if holder else saved
    if not isinstance(weights, dict) or not weights or not all(isinstance(value, torch.Tensor)
                                                                for value in weights.values()):
        raise UserError(f"{path} holds no state dict of weights (as torch.save(model.state_dict()) or timm's train.py "
                        "write); pass such a file, or a .safetensors file.")
    return weights


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes, however nested (compile over DDP gives `_orig_mod.module.`)."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def load_weights_file(model: torch.nn.Module, path: Path) -> None:
    """Load a local .safetensors or torch.save file, replacing the head when its class count differs."""
    check_exists(path)  # checked with the flags already, when given as --pretrained; gone since?
    weights, own = converted_for(model, read_weights(path)), model.state_dict()
    compatible = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    body_missing = [k for k in own if k not in compatible and not k.startswith(head_prefixes(model))]
    if body_missing:
        trained_as = checkpoint_architecture(path)
        if trained_as:
            given = getattr(model, "pretrained_cfg", {}).get("architecture") or "this model"
            raise UserError(f"{path} is a monkeytrain checkpoint of {trained_as}, which does not fit --model {given} "
                            f"(no matching '{body_missing[0]}'); give --model {trained_as} to train from it.")
        raise UserError(
            f"weights in {path} do not fit the model (no matching '{body_missing[0]}'); "
            "pass weights saved for the same --model."
        )
    model.load_state_dict(compatible, strict=False)


def checkpoint_architecture(path: Path) -> Optional[str]:
    """The model a monkeytrain checkpoint was trained as (its header's architecture); None for other weights."""
    from monkeytrain.checkpoint import FORMAT  # here: checkpoint imports this module

    if is_torch_save_file(path):
        return None
    with safe_open(str(path), framework="pt") as handle:  # read whole already: a readable .safetensors file
        header = handle.metadata() or {}
    return header.get("architecture") if header.get("format") == FORMAT else None


def head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The key prefixes of the classifier, which another class count replaces: one ("fc.", "head.fc."), two
    for a distilled model (DeiT's "head." and "head_dist.", LeViT's, CrossViT's), none for a model timm
    names no classifier for."""
    classifier = model.pretrained_cfg.get("classifier", "fc")
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    return tuple(name + "." for name in names)


def converted_for(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as timm converts pretrained weights for this architecture as they load from its hub (its
    module's checkpoint_filter_fn): position embeddings resampled to the size the model was built for (ViT
    weights of 224 px for a 64 px run), relative position tables to its windows (Swin). Weights the model
    takes as they are stay so; architectures without a conversion (ResNets) get them unchanged."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return weights
    try:
        return convert(weights, model)
    except Exception:  # a conversion written for other layouts: the fit check that follows judges the weights
        return weights


def fetched_from_hub(name: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """build(): timm building `name` with its pretrained weights, which it fetches from the Hugging Face hub
    (or its local cache); a failure to fetch them is one line."""
    try:
        with hub_warnings_held_back(), offline_where_the_hub_does_not_answer() as silence:
            return build()
    except UserError:
        raise
    except Exception as error:  # hub, network and cache failures all end the same way for the user
        if silence:
            raise UserError(f"could not fetch pretrained weights for '{name}': the Hugging Face hub at {silence}, "
                            "and they are not in its local cache; check the network (or its proxy: HTTPS_PROXY), "
                            "or pass --pretrained PATH.safetensors.") from None
        raise UserError(
            f"could not fetch pretrained weights for '{name}' from the Hugging Face hub "
            f"({error.__class__.__name__}); check the network and HF_HUB_OFFLINE, or pass "
            "--pretrained PATH.safetensors."
        ) from None


@contextlib.contextmanager
def offline_where_the_hub_does_not_answer():
    """huggingface_hub in offline mode (as HF_HUB_OFFLINE=1) while inside, where its endpoint does not
    answer one request: it would otherwise retry each file for about 25 s (its backoff, which no setting
    shortens) before failing, on a compute node without internet, say. Weights in its cache still load.
    Yields why the hub is taken as offline ('https://huggingface.co did not answer (ConnectError)'), else
    None (it answered, or HF_HUB_OFFLINE was set)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    silence = None if offline else hub_silence()
    constants.HF_HUB_OFFLINE = offline or silence is not None  # read on each request, not only at import
    try:
        yield silence
    finally:
        constants.HF_HUB_OFFLINE = offline


def hub_silence() -> Optional[str]:
    """Why the hub's endpoint (HF_ENDPOINT) does not answer one HEAD request, else None. Asked through
    huggingface_hub's own HTTP session, so through the proxy it would use (HTTPS_PROXY), and given the
    time it gives its own first request (HF_HUB_ETAG_TIMEOUT, 10 s), so that a slow network still passes.
    Any answer, an error status too, says the hub is reachable: huggingface_hub then handles it."""
    from huggingface_hub import constants, get_session

    # No error counts as an answer (W&B's probe takes a refused certificate as one): this session is the one
    # huggingface_hub fetches with, so a certificate it refuses fails the fetch too, and offline the cache serves.
    return why_no_answer(constants.ENDPOINT,
                         lambda: get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT),
                         f"HF_HUB_ETAG_TIMEOUT={constants.HF_HUB_ETAG_TIMEOUT} s")


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
