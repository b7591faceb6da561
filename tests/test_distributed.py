"""Two real processes (gloo on CPU) through torchrun: collectives, evaluation, training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monkeytrain.augment import eval_transform
from monkeytrain.data import ImageListDataset, discover_splits, sharded_loader
from monkeytrain.engine import evaluate
from monkeytrain.layout import folders_from_root
from monkeytrain.model import create_model
from monkeytrain.stats import channel_stats

CHECKS = Path(__file__).with_name("distributed_checks.py")
# 27 images a split: divisible neither by the world size (2) nor the batch size (4).
PER_CLASS = {"n0": 9, "n1": 8, "n2": 10}


def run_two_ranks(*arguments: str, cwd: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(CHECKS), *arguments]
    reports = cwd / "rank_reports"
    reports.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_REPORTS": str(reports)}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    return ranks


@pytest.fixture
def odd_dataset(tmp_path, make_image_folder) -> Path:
    return make_image_folder(tmp_path / "data", classes=3, per_class=PER_CLASS, size=40)


def test_stats_and_evaluation_match_one_process(odd_dataset, tmp_path, cpu_accelerator):
    ranks = run_two_ranks("collectives", str(odd_dataset), str(tmp_path / "cache2"), cwd=tmp_path)

    splits = discover_splits(folders_from_root(odd_dataset), 0.0, 0, strict=False)
    single, cached = channel_stats(splits.train, 32, tmp_path / "cache1", cpu_accelerator)
    torch.manual_seed(0)
    model = create_model("resnet18", 3).eval()
    loader = sharded_loader(ImageListDataset(splits.test, eval_transform(32, single.mean, single.std)), 4, 0, 0, 1)
    reference = evaluate(model, loader, cpu_accelerator, 3)

    assert not cached and not any(r["cached"] for r in ranks)
    for rank in ranks:
        assert rank["world"] == 2
        assert rank["mean"] == single.mean and rank["std"] == single.std  # bit-identical
        assert rank["count"] == 27 == reference.count
        assert rank["confusion"] == reference.confusion.tolist()
        assert rank["loss"] == pytest.approx(reference.loss, rel=1e-5)
    assert [r["shard"] for r in ranks] == [14, 13]  # disjoint shards, no padding


def test_training_ranks_agree_and_only_rank0_writes(odd_dataset, tmp_path):
    output = tmp_path / "runs"
    ranks = run_two_ranks(
        "train", str(output), "--data", str(odd_dataset), "--cpu", "--image-size", "32", "--epochs", "3",
        "--batch-size", "4", "--num-workers", "0", "--val-fraction", "0.3", "--run-name", "ddp",
        "--cache-dir", str(tmp_path / "cache"), "--lr", "0.02", cwd=tmp_path,
    )
    main, other = ranks
    assert other["writes"] == []
    written = " ".join(main["writes"])
    for name in ("best.safetensors", "config.json", "results.json", "metrics.jsonl", "data_manifest.json"):
        assert name in written
    assert len(main["decisions"]) == 3 and main["decisions"] == other["decisions"]
    assert main["best_epoch"] == other["best_epoch"]
    assert main["test_images"] == other["test_images"] == 27
    results = json.loads((output / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2 and results["test_accuracy"] == main["test_accuracy"]
    assert len((output / "ddp" / "metrics.jsonl").read_text().splitlines()) == 3
