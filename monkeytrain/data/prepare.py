"""The data a run trains on: its checked splits, their batches on the training device, and
the channel statistics that normalise them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monkeytrain.config import TrainConfig
from monkeytrain.data.dataset import DatasetSplits, resolve_dataset
from monkeytrain.data.pipeline import ResidentPipeline, StreamPipeline, build_pipeline
from monkeytrain.data.stats import ChannelStats, channel_stats


@dataclass
class RunData:
    splits: DatasetSplits
    pipeline: ResidentPipeline | StreamPipeline
    stats: ChannelStats
    stats_cached: bool  # read from the cache rather than computed
    cache_dir: Path

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    def summary(self) -> str:
        splits = self.splits
        return (f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
                f"{self.num_classes} classes; channel mean {fmt(self.stats.mean)} std {fmt(self.stats.std)} "
                f"({'cached' if self.stats_cached else 'computed'}); {self.pipeline.mode} data pipeline")


def prepare_data(config: TrainConfig, accelerator, cache_dir: Path, log) -> RunData:
    """Find and check the splits, put their stored views where training reads them, and measure them."""
    splits = resolve_dataset(config, accelerator, log)
    pipeline = build_pipeline(config, splits, cache_dir, accelerator)
    stats, cached = channel_stats(splits.train, pipeline.eval_batches("train"), config.image_size,
                                  cache_dir, accelerator)
    return RunData(splits, pipeline, stats, cached, cache_dir)


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
