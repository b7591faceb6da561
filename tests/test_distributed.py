"""Two real processes (gloo on CPU) through torchrun: collectives, evaluation, training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_checks import IMAGE_SIZE, stats_and_test_evaluation

from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.data.pipeline import StreamPipeline

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
    reference = stats_and_test_evaluation(StreamPipeline(splits, IMAGE_SIZE, 4, 0, 0, cpu_accelerator),
                                          splits, tmp_path / "cache1", cpu_accelerator)
    assert not reference["cached"] and reference["count"] == 27
    for rank in ranks:
        assert rank["world"] == 2
        for mode in ("stream", "resident"):  # both pipelines, resident on CPU tensors here
            seen = rank[mode]
            assert not seen["cached"]
            assert seen["mean"] == reference["mean"] and seen["std"] == reference["std"]  # bit-identical
            assert seen["count"] == 27
            assert seen["confusion"] == reference["confusion"]
            assert seen["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for mode in ("stream", "resident"):
        assert [r[mode]["shard"] for r in ranks] == [14, 13]  # disjoint shards, no padding


def test_training_ranks_agree_and_only_rank0_writes(odd_dataset, tmp_path):
    output = tmp_path / "runs"
    ranks = run_two_ranks(
        "train", str(output), "--data", str(odd_dataset), "--cpu", "--model", "resnet10t", "--image-size", "32",
        "--epochs", "3",
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
