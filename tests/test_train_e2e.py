"""Whole runs: train, reload, predict, evaluate, repeat from config.yaml, and under `accelerate launch`.

The runs are train.main in this process (`train_here`), except the one under
`accelerate launch`: how each launch form starts and stops a run is tested in
test_launchers. Only the default-command test trains the default model
(resnet18); the others check the same wiring with a tiny timm model on one
thread, and the tests that only read a finished run share one (`trained`).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import train_here
from monkeytrain import cli
from monkeytrain.checkpoint import read_checkpoint
from monkeytrain.data import synthetic

PROJECT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = PROJECT / "monkeytrain" / "train.py"
TINY_MODEL = "resnet10t"
# One thread: on a model this small a second one only adds waiting, and on a busy machine much more.
SMALL = ["--cpu", "--model", TINY_MODEL, "--image-size", "32", "--batch-size", "8", "--num-workers", "0",
         "--cpu-threads", "1"]


def run(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MONKEYTRAIN_DATA"}
    environment.update(OMP_NUM_THREADS="2", **env)
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def monkeytrain(*arguments: str, capsys) -> str:
    """What `monkeytrain ARGUMENTS` prints, run by this process."""
    capsys.readouterr()
    cli.main(list(arguments))
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """A MONKEYTRAIN_CACHE for the runs on the synthetic set: the first run generates the set, later ones reuse it."""
    return tmp_path_factory.mktemp("synthetic-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding data/ (3 classes x 10 images, Kaggle layout) and runs/a: a finished two-epoch
    run of the tiny model on it."""
    from conftest import write_image_folder

    workdir = tmp_path_factory.mktemp("trained")
    data = write_image_folder(workdir / "data", classes=3, per_class=10)
    train_here(["--data", str(data), *SMALL, "--epochs", "2", "--run-name", "a", "--cache-dir",
                str(workdir / "cache")], workdir)
    return workdir


def test_a_bf16_runs_test_figures_are_those_evaluate_gives_its_checkpoint(tmp_path, synthetic_cache, capsys):
    """The run trains in bf16 (as every GPU run does); predict, evaluate and the ONNX export run its checkpoint in
    fp32. Scored under the training's autocast, results.json's confusion matrix differed from evaluate's."""
    train_here(["--debug", "--image-size", "32", "--mixed-precision", "bf16", "--run-name", "bf16"], tmp_path,
               MONKEYTRAIN_CACHE=str(synthetic_cache))
    run_dir = tmp_path / "runs" / "bf16"
    results = json.loads((run_dir / "results.json").read_text())
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["mixed_precision"] == "bf16"
    scored = json.loads(monkeytrain("evaluate", "--checkpoint", str(run_dir / "best.safetensors"), "--json",
                                    str(synthetic_cache / synthetic.VERSION / "test"), capsys=capsys))
    assert scored["confusion_matrix"] == results["confusion_matrix"]


def test_default_command_trains_on_synthetic_data_then_predicts(tmp_path, synthetic_cache, capsys):
    done = train_here(["--debug", "--image-size", "32", "--run-name", "demo"], tmp_path,
                      MONKEYTRAIN_CACHE=str(synthetic_cache))
    assert "SYNTHETIC" in done.stderr
    assert "cpu recipe" in done.stdout and "left (1 more epoch)" in done.stdout  # the time-left estimate
    run_dir = tmp_path / "runs" / "demo"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["synthetic_data"] is True and results["test_images"] == 100
    with safe_open(str(run_dir / "best.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    assert json.loads(header["synthetic_data"]) is True
    assert header["architecture"] == "resnet18"  # the default model

    test_folder = synthetic_cache / synthetic.VERSION / "test"
    predicted = json.loads(monkeytrain("predict", "--checkpoint", str(run_dir / "best.safetensors"),
                                       "--top-k", "2", "--json", str(test_folder / "star"), capsys=capsys))
    assert len(predicted) == 10
    assert all(len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"] for p in predicted)
    assert {t["class"] for p in predicted for t in p["top"]} <= set(results["class_names"])

    scored = json.loads(monkeytrain("evaluate", "--checkpoint", str(run_dir / "best.safetensors"),
                                    "--json", str(test_folder), capsys=capsys))
    # The same checkpoint on the same test split: the same figures as the run's own final evaluation.
    assert scored["images"] == 100
    assert scored["accuracy"] == results["test_accuracy"]
    assert scored["confusion_matrix"] == results["confusion_matrix"]
    assert scored["balanced_accuracy"] == results["balanced_accuracy"]
    assert scored["per_class_images"] == results["per_class_test_images"]
    # and the same 95% interval, which the log's last line gives too
    assert scored["accuracy_ci95"] == results["test_accuracy_ci95"] and results["test_accuracy_ci95"][1] <= 1
    low, high = results["test_accuracy_ci95"]
    assert f"test accuracy {results['test_accuracy']:.2%} (95% CI {100 * low:.1f}-{100 * high:.1f}%" in done.stdout


def test_run_directory_records_config_metrics_and_checkpoint(trained):
    run_dir = trained / "runs" / "a"

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy", "lr",
            "images_per_second", "epoch_seconds", "train_size"} <= set(metrics[0])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run_name"] == "a" and config["epochs"] == 2 and config["data"] == str(trained / "data")

    with safe_open(str(run_dir / "best.safetensors"), framework="pt") as handle:
        header = handle.metadata()
        keys = list(handle.keys())
    assert header["architecture"] == TINY_MODEL and header["num_classes"] == "3"
    assert json.loads(header["class_names"]) == ["common name 0", "common name 1", "common name 2"]
    assert json.loads(header["config"])["run_name"] == "a"
    assert len(json.loads(header["mean"])) == 3 and header["image_size"] == "32"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)

    results_text = (run_dir / "results.json").read_text()
    results = json.loads(results_text)
    assert "    [" + ", ".join(map(str, results["confusion_matrix"][0])) + "]," in results_text.splitlines()  # a row
    best = max(metrics, key=lambda m: (m["val_balanced_accuracy"], -m["val_loss"]))  # chosen on it by default
    assert results["best_epoch"] == best["epoch"] == int(header["epoch"])
    assert (header["selected_on"], float(header["val_balanced_accuracy"])) == ("balanced-accuracy",
                                                                               best["val_balanced_accuracy"])
    assert (results["selected_on"], results["best_val_balanced_accuracy"]) == ("balanced-accuracy",
                                                                               best["val_balanced_accuracy"])
    assert results["selection_biased"] is False
    assert sum(map(sum, results["confusion_matrix"])) == results["test_images"] == 30
    phases = results["phase_seconds"]
    assert set(phases) == {"start_up", "data", "model", "training", "first_epoch", "validation", "test"}
    # start_up may round to 0 here, a later run in this process (test_pace and test_benchmarks check it).
    assert min(v for k, v in phases.items() if k != "start_up") > 0 and phases["start_up"] >= 0
    assert phases["first_epoch"] <= phases["training"]
    inside_the_run = sum(phases.values()) - phases["first_epoch"] - phases["start_up"]  # disjoint phases
    assert inside_the_run <= results["wall_seconds"] + 0.03  # six figures, each rounded to 0.01 s
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 30


def test_names_that_are_not_utf8_train_plot_and_checkpoint(tmp_path):
    """Folder and file names in another encoding (a zip made on Windows, say): Python holds their odd bytes
    as surrogates, which a cache key, a plot or a JSON file cannot take as they are."""
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=4)
    for split in ("train", "val"):
        folder = os.fsencode(data / split)
        os.rename(folder + b"/n1", folder + b"/caf\xe9")
    os.rename(os.fsencode(data / "train" / "n0" / "n0_000.png"), os.fsencode(data / "train" / "n0") + b"/\xff.png")
    train_here(["--data", str(data), *SMALL, "--epochs", "1", "--run-name", "odd", "--cache-dir",
                str(tmp_path / "cache")], tmp_path)
    run = tmp_path / "runs" / "odd"
    assert json.loads((run / "results.json").read_text())["class_names"] == ["caf\ufffd", "n0"]
    assert (run / "confusion_matrix.png").is_file() and (run / "curves.png").is_file()
    _, info = read_checkpoint(run / "best.safetensors")
    assert info.class_folders == [os.fsdecode(b"caf\xe9"), "n0"]  # the folder itself, to find it again


def test_same_seed_repeats_bit_for_bit_and_config_file_reproduces(trained):
    # Run a again from its own config.yaml, then with another seed.
    train_here(["--config", "runs/a/config.yaml", "--run-name", "b"], trained)
    train_here(["--config", "runs/a/config.yaml", "--run-name", "c", "--seed", "1"], trained)
    a, b, c = (load_file(str(trained / "runs" / n / "best.safetensors")) for n in "abc")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a)


def test_accelerate_launch_runs_the_script_as_written(tmp_path, synthetic_cache):
    accelerate = Path(sys.executable).with_name("accelerate")
    run([str(accelerate), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT),
         "--debug", "--image-size", "32", "--model", TINY_MODEL, "--cpu-threads", "1", "--run-name", "launched",
         "--mixed-precision", "bf16", "--grad-accum-steps", "2"], tmp_path, MONKEYTRAIN_CACHE=str(synthetic_cache))
    results = json.loads((tmp_path / "runs" / "launched" / "results.json").read_text())
    assert results["test_images"] == 100
    config = yaml.safe_load((tmp_path / "runs" / "launched" / "config.yaml").read_text())
    assert config["mixed_precision"] == "bf16" and config["grad_accum_steps"] == 2


def fill_the_disk_at_results_json(monkeypatch) -> None:
    """Writes go on as usual, but results.json finds the disk full."""
    from monkeytrain import storage

    write_file = storage._write_file

    def results_json_on_a_full_disk(path: Path, *args) -> None:
        if path.name.startswith(".results.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write_file(path, *args)

    monkeypatch.setattr(storage, "_write_file", results_json_on_a_full_disk)


def test_a_full_disk_once_training_has_ended_says_to_score_the_checkpoint_it_left(tmp_path, monkeypatch):
    """results.json is the last file a run writes: a disk full by then leaves best.safetensors, which
    evaluate scores, where a resume (no state is saved at the end) or another --output-dir trains again."""
    from conftest import run_here, write_image_folder
    from monkeytrain import storage, train

    data = write_image_folder(tmp_path / "data", classes=3, per_class=10)  # Kaggle's layout: its own test folder
    fill_the_disk_at_results_json(monkeypatch)
    with pytest.raises(storage.DiskFull) as failed:
        run_here(train.main.__wrapped__, ["--data", str(data), *SMALL, "--epochs", "1", "--run-name", "full",
                                          "--cache-dir", str(tmp_path / "cache")], tmp_path)
    checkpoint = Path("runs") / "full" / "best.safetensors"
    assert str(failed.value).endswith(
        f"; training had ended, and {checkpoint} (epoch 1) is saved: free some space and score it on the test split "
        f"with `monkeytrain evaluate --checkpoint {checkpoint} {data / 'validation' / 'validation'}` rather than "
        "train again.")
    assert (tmp_path / checkpoint).is_file() and not (tmp_path / "runs" / "full" / "results.json").exists()


def test_a_run_left_unscored_names_its_test_folder_from_any_working_directory(tmp_path, monkeypatch):
    """A run given --data data in project/, results.json never written (a full disk): its name reused from another
    folder offers `monkeytrain evaluate` of its test folder, by a path that names that folder from there too."""
    from conftest import run_here, write_image_folder
    from monkeytrain import storage, train
    from monkeytrain.errors import UserError

    write_image_folder(tmp_path / "project" / "data", classes=3, per_class=10)  # Kaggle's layout
    fill_the_disk_at_results_json(monkeypatch)
    flags = [*SMALL, "--epochs", "1", "--run-name", "full", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(storage.DiskFull):
        run_here(train.main.__wrapped__, ["--data", "data", *flags], tmp_path / "project")
    monkeypatch.undo()
    with pytest.raises(UserError) as refused:
        run_here(train.main.__wrapped__, ["--data", "project/data", "--output-dir", "project/runs", *flags], tmp_path)
    folder = tmp_path / "project" / "data" / "validation" / "validation"
    assert f"`monkeytrain evaluate --checkpoint {Path('project', 'runs', 'full', 'best.safetensors')} {folder}`" \
        in str(refused.value)
