"""Before training, checks that the model built can train on the run's images and batches: that it takes
square images of each training size (a ViT's fixed patch grid) and its patches divide them, and that its
BatchNorm layers see more than one value per channel in batches of one image. Each refusal is one line naming
the flag to change, given before the run folder holds anything rather than as a traceback at the first batch."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import timm
import torch

from monkeytrain.config import MIN_IMAGE_SIZE
from monkeytrain.data.augment import train_resolution
from monkeytrain.errors import UserError
from monkeytrain.model import built_for_one_size


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
    model.size_options), its patch grid is size // patch: the convolution leaves out the last size % patch
    pixels of every row and column, silently. timm pads instead only when built with dynamic_img_pad."""
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
    """What to give instead of a size the model refused: a model built for --image-size (see model.size_options)
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
    except Exception:  # a model built for one input size (see model.size_options) refuses any other
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
