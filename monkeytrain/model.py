"""Building a timm classifier: checking the model name, timm's options for the run (its image size, dropout,
stochastic depth), and torch.compile with Inductor's kernels kept in the cache folder. Pretrained weights, a
file's or the hub's, are weights.py's; whether the model built can train on the run's images is
trainability.py's."""

from __future__ import annotations

import difflib
import os
from functools import partial
from pathlib import Path
from typing import Optional

import timm
import torch

from monkeytrain.errors import UserError
from monkeytrain.storage import mark_used
from monkeytrain.weights import check_weights_file, fetched_from_hub, load_weights_file

HUB = "hub"
# timm's prefixes for a model whose definition lives outside its registry (a hub repository, a folder)
OUTSIDE_REGISTRY = ("hf-hub:", "local-dir:")


def create_model(name: str, num_classes: int, pretrained: Optional[str] = None, image_size: Optional[int] = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A timm model with a `num_classes` head; `pretrained` is None, "hub" or a file path. A model whose
    input size is fixed when it is built (a ViT) is built for `image_size`-pixel images, when given. `drop_rate`
    and `drop_path_rate` are timm's: dropout before the classifier, and stochastic depth (the last block's rate)."""
    check_model_choice(name, pretrained)
    options = {"num_classes": num_classes, **size_options(name, image_size),
               **regularisation_options(drop_rate, drop_path_rate)}
    if pretrained == HUB:
        return fetched_from_hub(name, partial(built, name, options, pretrained=True))
    model = built(name, options)
    if pretrained:
        load_weights_file(model, Path(pretrained))
    elif timm.models.is_model_in_modules(name, TF_INIT_MODULES):
        start_as_a_resnet(model)
    return model


# timm builds the models of these modules (EfficientNet, MobileNetV2/V3, MnasNet, ...) with TensorFlow's
# initialisation: a classifier drawn from +-1/sqrt(classes), ten times larger for 10 classes than for ImageNet's
# 1,000, and residual blocks that start as more than the identity. From scratch at the recipes' lr the first
# gradients were 7-13x ResNet-18's and the validation loss 8e3-7e4, at any lr down to 0.01; started as timm starts
# a ResNet, they trained at lr 0.1 (benchmarks/RESULTS.md, 2026-12-03).
TF_INIT_MODULES = ("efficientnet", "mobilenetv3")


def start_as_a_resnet(model: torch.nn.Module) -> None:
    """A small classifier (std 0.01, bias 0) and each residual block's last batch norm scale at 0, so that the
    block starts as the identity: timm's ResNet and RegNet start so."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual

    last_norm = {DepthwiseSeparableConv: "bn2", EdgeResidual: "bn2", InvertedResidual: "bn3"}
    for module in model.modules():
        kind = next((kind for kind in last_norm if isinstance(module, kind)), None)  # CondConvResidual is an IR
        if kind and module.has_skip:
            torch.nn.init.zeros_(getattr(module, last_norm[kind]).weight)
    classifier = model.get_classifier()
    torch.nn.init.normal_(classifier.weight, std=0.01)
    torch.nn.init.zeros_(classifier.bias)


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
    weights made for another size are resampled to it by timm as they load; a local file's by
    weights.load_weights_file."""
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
