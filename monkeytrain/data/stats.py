"""Per-channel mean and std of the training split, computed across all ranks.

Each rank sums its disjoint shard (no padding duplicates) of the training
images as evaluation sees them (resized and centre-cropped, not augmented):
pixel count, sum and sum of squares per channel, in float64. Pixel values are
summed as integers 0..255, which float64 holds exactly up to 2**53, so the
all-reduced totals, and therefore mean and std, are bit-identical to a
single-process pass whatever the shard order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from monkeytrain.data.imagefiles import ImageFile, content_key
from monkeytrain.data.views import centre_crop, stored_size
from monkeytrain.distributed import all_ranks_agree, sum_across_ranks
from monkeytrain.errors import to_stderr
from monkeytrain.storage import mark_used, write_cache

STATS_VERSION = 3  # 3: a constant channel gets std 1, not 0


@dataclass(frozen=True)
class ChannelStats:
    mean: list[float]
    std: list[float]

    @property
    def one_flat_colour(self) -> bool:
        """Whether every training pixel is (within a grey level) one colour: each channel left unscaled. No
        channel that varies can have a std of 1 (255 grey levels; 0.5 at most), so cached figures tell it too."""
        return all(std == 1.0 for std in self.std)


def pixel_sums(batches: Iterable, image_size: int, device: torch.device) -> torch.Tensor:
    """[pixel count, sum R, G, B, sum of squares R, G, B] of the centre crops of uint8 views."""
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    for views, _ in batches:
        pixels = centre_crop(views.to(device), image_size).double()  # N, 3, H, W in 0..255
        totals[0] += pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
        totals[1:4] += pixels.sum(dim=(0, 2, 3))
        totals[4:7] += (pixels * pixels).sum(dim=(0, 2, 3))
    return totals


def stats_from_sums(totals: torch.Tensor) -> ChannelStats:
    """Mean and (population) std in 0..1 units from summed pixel totals."""
    count, sums, squares = totals[0], totals[1:4], totals[4:7]
    mean = sums / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    # A channel that (nearly) never varies, such as the blue of two-colour microscopy saved as RGB, would be
    # divided by 0 (NaN inputs, NaN losses): it is left unscaled instead, as it carries no information.
    std = torch.where(std < 1, torch.full_like(std, 255), std)
    return ChannelStats((mean / 255).tolist(), (std / 255).tolist())


def cache_key(files: list[ImageFile], image_size: int) -> str:
    """Keyed by every file's path and content, the resolution and the stored views' side it is cropped from (one
    pixel less at 32 or 96 px since views are framed as timm frames them: other pixels, other figures)."""
    framing = f"v{STATS_VERSION} {image_size} of {stored_size(image_size)}"
    return content_key(framing, sorted(files, key=lambda f: os.path.abspath(f.path)))


def read_cached(path: Path) -> Optional[ChannelStats]:
    try:
        saved = json.loads(path.read_text())
        stats = ChannelStats([float(v) for v in saved["mean"]], [float(v) for v in saved["std"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mark_used(path)
    return stats


def write_cached(path: Path, stats: ChannelStats) -> None:
    """Best effort: on a full disk or an unwritable folder, warn and go on without the cache."""
    write_cache(path, json.dumps({"mean": stats.mean, "std": stats.std}).encode())


def channel_stats(
    files: list[ImageFile], train_views: Iterable, image_size: int, cache_dir: Path, accelerator
) -> tuple[ChannelStats, bool]:
    """(stats, came from cache). `train_views` yields this rank's disjoint shard of the
    training split's stored views; ranks agree on using the cache, so none skips the collective."""
    cache_file = cache_dir / "stats" / f"{cache_key(files, image_size)}.json"
    cached = read_cached(cache_file)
    if all_ranks_agree(cached is not None, accelerator.device):
        stats, from_cache = cached, True
    else:
        totals = sum_across_ranks(pixel_sums(train_views, image_size, accelerator.device))
        stats, from_cache = stats_from_sums(totals), False
        if accelerator.is_main_process:
            write_cached(cache_file, stats)
    if stats.one_flat_colour and accelerator.is_main_process:  # from the cache too: the files are as they were
        to_stderr("warning", flat_colour_warning(stats))
    return stats, from_cache


def flat_colour_warning(stats: ChannelStats) -> str:
    """Images that all decode to one colour (black frames, or a bit depth misread) train a model on nothing, and
    the run would end at chance with no other sign."""
    colour = ", ".join(str(round(mean * 255)) for mean in stats.mean)
    return (f"every training image decodes to one flat colour (RGB {colour}), so the model can learn nothing from "
            "them; check the image files' content and bit depth, and what `monkeytrain inspect-data` finds in them.")
