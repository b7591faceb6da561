"""Building a timm classifier, from scratch or from pretrained weights."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from monkeytrain.data.augment import train_resolution
from monkeytrain.errors import UserError, first_line
from monkeytrain.storage import mark_used

HUB = "hub"
# timm's prefixes for a model whose definition lives outside its registry (a hub repository, a folder)
OUTSIDE_REGISTRY = ("hf-hub:", "local-dir:")
# Wrappers that prefix state-dict keys: DDP ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MIN_IMAGE_SIZE = 16  # the smallest --image-size and --min-train-size that config validation accepts


def create_model(name: str, num_classes: int, pretrained: Optional[str] = None, image_size: Optional[int] = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A timm model with a `num_classes` head; `pretrained` is None, "hub" or a file path. A model whose
    input size is fixed when it is built (a ViT) is built for `image_size`-pixel images, when given. `drop_rate`
    and `drop_path_rate` are timm's: dropout before the classifier, and stochastic depth (the last block's rate)."""
    check_model_choice(name, pretrained)
    options = {"num_classes": num_classes, **size_options(name, image_size),
               **regularisation_options(drop_rate, drop_path_rate)}
    if pretrained == HUB:
        return _create_from_hub(name, options)
    model = built(name, options)
    if pretrained:
        load_weights_file(model, Path(pretrained))
    return model


def regularisation_options(drop_rate: float, drop_path_rate: float) -> dict:
    """timm's `drop_rate=` and `drop_path_rate=`, each only where not 0: a model built without them is built as
    before they were flags, and an architecture without stochastic depth (VGG, Inception) takes no drop_path_rate."""
    rates = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}
    return {option: rate for option, rate in rates.items() if rate}


def built(name: str, options: dict, pretrained: bool = False) -> torch.nn.Module:
    """timm.create_model(name, pretrained, **options); an option the architecture does not take
    (--drop-path-rate for VGG) is one line, not timm's TypeError."""
    try:
        return timm.create_model(name, pretrained=pretrained, **options)
    except TypeError as error:
        refused = [option for option in REGULARISATION_FLAGS if option in options and option in str(error)]
        if not refused:
            raise
        raise UserError(f"--model {name} has no {REGULARISATION_FLAGS[refused[0]]} (timm's {refused[0]}); leave the "
                        "flag out, or pick a model that has it.") from None


REGULARISATION_FLAGS = {"drop_rate": "--drop-rate", "drop_path_rate": "--drop-path-rate"}


def size_options(name: str, image_size: Optional[int]) -> dict:
    """timm's `img_size=` for a model its registry marks `fixed_input_size` (ViT, DeiT, Swin, ...), whose
    position embeddings are made for one patch grid: as timm does for the size of its own weights. Hub
    weights made for another size are resampled to it by timm as they load; a local file by load_weights_file."""
    return {"img_size": image_size} if image_size and built_for_one_size(name) else {}


def built_for_one_size(name: str) -> bool:
    """Whether timm builds the model for one input size (its registry's `fixed_input_size`): timm's
    config.json must then say so, or timm's own loader builds it for its default size."""
    try:
        return bool(timm.models.get_pretrained_cfg_value(name, "fixed_input_size"))
    except RuntimeError:  # timm has no config for the name (a checkpoint of a model registered by its user)
        return False


def check_model_choice(name: str, pretrained: Optional[str] = None) -> None:
    """A timm model name and, unless None or "hub", a weights file that exists: config validation calls
    this too, so that a typo costs one line at start-up, not after minutes of reading the data."""
    if name.startswith(OUTSIDE_REGISTRY):
        raise UserError(outside_registry(name))
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'; {closest_names(name)}")
    check_pretrained_tag(name)
    if pretrained and pretrained != HUB:
        check_weights_file(Path(pretrained))


def outside_registry(name: str) -> str:
    """Why --model takes no hub or folder model (a run's checkpoint must rebuild its model from the name
    alone, offline), and the name to give instead."""
    repository = name.split(":", 1)[1]
    owner, _, model = repository.rpartition("/")
    if owner == "timm" and timm.is_model(model):  # the timm organisation's repositories are timm's own names
        return (f"--model {name} names a model on the Hugging Face hub, which predict could not rebuild "
                f"offline; give timm's own name for it: --model {model} --pretrained.")
    return (f"--model {name} names a model outside timm's registry, which predict could not rebuild offline; "
            "give the timm architecture it is built on (its config.json's 'architecture') as --model, "
            "and its weights as --pretrained PATH.safetensors.")


def closest_names(name: str) -> str:
    """The end of the unknown-model line: registered names that begin as `name` does (vit_tiny), else
    those most like it (Resnet18, efficientnet-b0), where there are any."""
    names, typed = timm.list_models(), name.lower().replace("-", "_")
    close = [known for known in names if known.startswith(typed)][:3] or difflib.get_close_matches(typed, names, n=3)
    if not close:
        return "pick a name from timm.list_models(), e.g. resnet18."
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f"did you mean {listed}? (timm.list_models() lists them all)"


def check_pretrained_tag(name: str) -> None:
    """timm accepts a tag after the architecture (resnet18.a1_in1k: which pretrained weights), and
    raises a RuntimeError of its own, a traceback at start-up, for one it does not know."""
    architecture, tag = timm.models.split_model_name_tag(name)
    if tag and f"{architecture}.{tag}" not in timm.list_pretrained(architecture + ".*"):
        tags = [known.split(".", 1)[1] for known in timm.list_pretrained(architecture + ".*")]
        known = f"its tags: {', '.join(tags)}" if tags else "it has none"
        raise UserError(f"--model {name}: timm has no weights tagged '{tag}' for {architecture} ({known}); "
                        f"give one of them, or {architecture} alone.")


def check_weights_file(path: Path) -> None:
    """A --pretrained file that exists and reads as weights: checked with the flags, before the data is read.
    Cheaply: a .safetensors file's header, a torch.save file mapped rather than read (where it is a zip)."""
    if not path.is_file():
        raise UserError(f"pretrained weights file {path} does not exist; check --pretrained.")
    if is_torch_save_file(path):
        torch_save_weights(path)
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise UserError(not_safetensors(path, error)) from None


def not_safetensors(path: Path, error: Exception) -> str:
    return (f"{path} is neither a readable .safetensors file ({first_line(error)}) nor a torch.save file; pass "
            "a .safetensors file, or weights saved with torch.save (timm's train.py's .pth.tar).")


def is_torch_save_file(path: Path) -> bool:
    """Whether `path` starts as torch.save writes: a zip archive (since torch 1.6), or a bare pickle before,
    whose first byte a .safetensors file may start with too (its header's length)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start == b"PK\x03\x04" or start[:1] == b"\x80" and not reads_as_safetensors(path)


def reads_as_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:  # safetensors raises its own error types for damaged files
        return False
    return True


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


def _create_from_hub(name: str, options: dict) -> torch.nn.Module:
    try:
        with hub_warnings_held_back(), offline_where_the_hub_does_not_answer() as silence:
            return built(name, options, pretrained=True)
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

    try:
        get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # any transport error (no route, no name, refused, timed out, a proxy's)
        kind = error.__class__.__name__
        within = f" within HF_HUB_ETAG_TIMEOUT={constants.HF_HUB_ETAG_TIMEOUT} s" if "Timeout" in kind else ""
        return f"{constants.ENDPOINT} did not answer{within} ({kind})"
    return None


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
    """Load a local .safetensors or torch.save file, replacing the head when its class count differs."""
    if not path.is_file():  # checked with the flags already, when given as --pretrained; gone since?
        raise UserError(f"pretrained weights file {path} does not exist; check --pretrained.")
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


@torch.no_grad()
def check_input_sizes(model: torch.nn.Module, name: str, sizes: list[int], device: torch.device) -> None:
    """Fail before training, in one line, when the model cannot take square images of one of `sizes`
    (a ViT with a fixed patch grid, say), instead of with a traceback at the first batch of that size;
    or when it would leave out pixels of them (see patches_of_the_image)."""
    model.eval()
    for size in sizes:
        with patches_of_the_image(model, size) as uneven:
            try:
                model(torch.zeros(1, 3, size, size, device=device))
            except Exception as error:  # timm models refuse sizes in their own ways (assertions, shape errors)
                if not uneven:
                    raise UserError(f"--model {name} cannot take {size}-pixel images ({str(error).splitlines()[0]}); "
                                    f"{accepted_sizes(model, name, size, max(sizes))}.") from None
        if uneven:
            flag = "--image-size" if size == max(sizes) else "--min-train-size"
            raise UserError(patches_leave_pixels_out(name, size, uneven[0], flag))
    model.train()


@contextlib.contextmanager
def patches_of_the_image(model: torch.nn.Module, size: int) -> Iterator[list[int]]:
    """Yields the patch sides of the model's patch embeddings (timm's PatchEmbed: ViT, DeiT, BEiT, EVA, Swin, ...)
    that a forward pass inside cuts `size`-pixel images with and that do not divide them. timm refuses such
    an image where the model is built for any size, and where it is built for this one (`img_size`, see
    size_options), its patch grid is size // patch: the convolution leaves out the last size % patch pixels of
    every row and column, silently. timm pads instead only when built with dynamic_img_pad."""
    uneven: list[int] = []

    def record(module, inputs):
        side, patch = inputs[0].shape[-1], module.patch_size[-1]
        if inputs[0].shape[-2:] == (size, size) and side % patch and not module.dynamic_img_pad:
            uneven.append(patch)

    hooks = [module.register_forward_pre_hook(record) for module in model.modules()
             if isinstance(module, timm.layers.PatchEmbed)]
    try:
        yield uneven
    finally:
        for hook in hooks:
            hook.remove()


def patches_leave_pixels_out(name: str, size: int, patch: int, flag: str) -> str:
    """The line for `size`-pixel images that `patch`-pixel patches do not divide, naming the nearest sizes they do."""
    below, above = size // patch * patch, (size // patch + 1) * patch
    nearest = f"{below} or {above}" if below >= MIN_IMAGE_SIZE else str(above)
    return (f"--model {name} cuts images into {patch}-pixel patches, which would leave out the last {size % patch} "
            f"pixels of each row and column of a {size}-pixel image; give {flag} {nearest} (a multiple of {patch}).")


def accepted_sizes(model: torch.nn.Module, name: str, refused: int, image_size: int) -> str:
    """What to give instead of a size the model refused: a model built for --image-size (see size_options)
    takes no smaller training crops; any other, a size it was made for."""
    if refused < image_size and built_for_one_size(name):
        return f"give --image-size {image_size} alone, without --min-train-size: the model is built for that size"
    made_for = model.pretrained_cfg.get("input_size", (3, "?", "?"))[-1]
    return f"give --image-size (and --min-train-size) it accepts, e.g. {made_for}"


def check_batch_norm_batches(model: torch.nn.Module, config, training_images: int, accelerator) -> None:
    """Fail before training, in one line, when each process's training batches hold one image (--batch-size
    1, or one image per process) and a BatchNorm layer of the model then sees one value per channel, which
    torch refuses in training: before the run folder holds anything, rather than at the first batch. Both
    data pipelines train on batches of min(--batch-size, the process's share) images, never fewer."""
    processes = accelerator.num_processes
    if min(config.batch_size, training_images // processes) > 1:
        return  # two images give every channel two values at least
    # The first epoch's crops are the smallest (progressive resizing only grows them), and so are its features
    size = train_resolution(1, config.epochs, config.min_train_size, config.image_size, config.full_size_fraction)
    if fewest_batch_norm_values(model, size, accelerator.device) != 1:
        return
    raise UserError(one_image_batches_refused(model, config, size, training_images, accelerator))


def one_image_batches_refused(model: torch.nn.Module, config, size: int, training_images: int, accelerator) -> str:
    """Why batches of one `size`-pixel image cannot train, and what to give: more images a batch, or a size
    that trains (the smallest, where the model takes it)."""
    processes = accelerator.num_processes
    why = (f"with --batch-size 1, {config.model} cannot train on {size}-pixel images" if config.batch_size == 1 else
           f"{training_images} training images shared by {processes} processes leave each batches of one image, "
           f"on which {config.model} cannot train at {size} pixels")
    fix = ("give --batch-size 2 or more" if config.batch_size == 1 else
           f"give at least {2 * processes} training images, start fewer processes")
    trainable = smallest_size_batch_norm_trains(model, size, accelerator.device)
    if trainable is None:
        larger = "give larger images (--image-size, --min-train-size)"
    elif size < config.image_size and trainable <= config.image_size:
        larger = f"--min-train-size {trainable} or more"
    else:
        larger = f"--image-size {trainable} or more" + (" (and no smaller --min-train-size)" if size < config.image_size
                                                        else "")
    return f"{why} (a BatchNorm layer would see one value per channel); {fix}, or {larger}."


def smallest_size_batch_norm_trains(model: torch.nn.Module, size: int, device: torch.device) -> Optional[int]:
    """The smallest image side above `size` at which every BatchNorm layer of the model sees more than one value
    per channel for one image, found by bisection (features never shrink as images grow); None for a model that
    takes no other size, or not even 4 times this one."""
    low, high = size, size * 2
    try:
        while fewest_batch_norm_values(model, high, device) == 1:
            if high >= 4 * size:
                return None
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fewest_batch_norm_values(model, middle, device) == 1 else (low, middle)
    except Exception:  # a model built for one input size (see size_options) refuses any other
        return None
    return high


BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


@torch.no_grad()
def fewest_batch_norm_values(model: torch.nn.Module, size: int, device: torch.device) -> Optional[int]:
    """The fewest values per channel that a BatchNorm layer of the model sees for one `size`-pixel image (1
    where a ResNet's last features are 1x1); None for a model without one. B images give each B times as many.
    Measured in evaluation mode, which leaves the running statistics as they are."""
    seen: list[int] = []

    def record(module, inputs):
        seen.append(inputs[0].numel() // inputs[0].shape[1])  # batch x spatial positions, per channel

    hooks = [module.register_forward_pre_hook(record) for module in model.modules() if isinstance(module, BATCH_NORMS)]
    was_training = model.training
    try:
        model.eval()(torch.zeros(1, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return min(seen, default=None)


def compiled(model: torch.nn.Module, enabled: bool, cache_dir: Path) -> torch.nn.Module:
    """`torch.compile(model)` when enabled, with Inductor's caches kept in `cache_dir`, so a
    second run loads the compiled kernels instead of compiling again."""
    if not enabled:
        return model
    mark_used(cache_dir / "inductor")  # kept by `monkeytrain cache --clear --unused-days N`
    use_inductor_cache_dir(cache_dir / "inductor")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return torch.compile(model)


def use_inductor_cache_dir(folder: Path) -> None:
    """Have Inductor keep its kernels in `folder`, unless the user chose a folder (TORCHINDUCTOR_CACHE_DIR).
    Inductor reads the variable at each compile; but importing torchvision (through timm) already sets it to
    Inductor's default, /tmp/torchinductor_<user>, which is therefore taken as unset (a user who sets it to that
    very folder gets the run's, where the kernels are kept as well)."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not chosen or os.path.abspath(chosen) == inductor_default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())


def inductor_default_cache_dir() -> Optional[str]:
    """Where Inductor keeps its kernels unless told (None where this torch does not say)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # torch's own, private
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())
