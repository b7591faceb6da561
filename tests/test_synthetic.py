"""monkeytrain.data.synthetic: the deterministic fallback dataset."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.synthetic import SIZE_AT_LEAST, VERSION, ensure_synthetic_dataset
from monkeytrain.errors import UserError
from monkeytrain.storage import DiskFull, folder_size, human_size
from test_storage import full_disk  # noqa: F401  (a real 2 MiB tmpfs: the data set takes more)


def file_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("cache"))


def test_two_generations_are_byte_identical(synthetic_root, tmp_path):
    again = ensure_synthetic_dataset(tmp_path / "other-cache")
    assert again != synthetic_root
    first, second = file_digests(synthetic_root), file_digests(again)
    assert len(first) > 100
    assert first == second


def test_ten_classes_in_train_val_and_test(synthetic_root):
    folders = layout.folders_from_root(synthetic_root)
    assert folders.layout == "train-val-test"
    classes = layout.check_same_classes(folders)
    assert len(classes) == 10
    for split in ("train", "val", "test"):
        counts = {c: len(list((synthetic_root / split / c).iterdir())) for c in classes}
        assert len(set(counts.values())) == 1 and min(counts.values()) > 0, (split, counts)
    assert len(list((synthetic_root / "train" / classes[0]).iterdir())) > \
        len(list((synthetic_root / "val" / classes[0]).iterdir()))


def test_every_image_is_readable_unique_and_rgb(synthetic_root):
    splits = discover_splits(layout.folders_from_root(synthetic_root), 0.1, 0, strict=True)
    assert splits.skipped == [] and splits.leaks == []
    all_files = splits.train + splits.val + splits.test
    assert len({f.digest for f in all_files}) == len(all_files)
    with Image.open(all_files[0].path) as image:
        assert image.mode == "RGB" and image.size[0] == image.size[1] >= 32


def test_classes_differ_in_colour(synthetic_root):
    """Averaged over a class, the shape's hue shows: class mean colours must differ."""
    means = []
    for folder in sorted((synthetic_root / "train").iterdir()):
        pixels = [np.asarray(Image.open(p), dtype=np.float64).mean(axis=(0, 1)) for p in sorted(folder.iterdir())]
        means.append(np.mean(pixels, axis=0))
    distances = [np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1:]]
    assert min(distances) > 3


def test_an_existing_complete_dataset_is_reused(tmp_path):
    root = ensure_synthetic_dataset(tmp_path)
    marker = root / "train" / "marker.txt"
    marker.write_text("left alone")
    before = file_digests(root)
    assert ensure_synthetic_dataset(tmp_path) == root
    assert marker.read_text() == "left alone" and file_digests(root) == before


def test_an_incomplete_dataset_is_regenerated(tmp_path):
    root = ensure_synthetic_dataset(tmp_path)
    expected = file_digests(root)
    (root / ".complete").unlink()
    next((root / "train").iterdir()).joinpath("junk.png").write_bytes(b"half written")
    assert ensure_synthetic_dataset(tmp_path) == root
    assert file_digests(root) == expected
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no staging folder left behind


def test_the_size_a_full_disk_is_told_is_no_more_than_the_data_set_takes(synthetic_root):
    assert folder_size(synthetic_root) >= SIZE_AT_LEAST


def test_a_full_disk_leaves_no_half_made_folder_and_names_the_cache_folder_and_the_space(full_disk):
    cache = full_disk / "cache"
    with pytest.raises(DiskFull) as raised:
        ensure_synthetic_dataset(cache)
    assert str(raised.value) == (f"no space left on the device of {cache} to write {VERSION} (at least "
                                 f"{human_size(SIZE_AT_LEAST)} needed); free some space or pick another --cache-dir.")
    assert list(cache.iterdir()) == []  # the half-made .synthetic-v2.<pid> folder is gone


CHILD_WITH_A_READ_ONLY_CACHE = """
import json, sys
from pathlib import Path
from monkeytrain.storage import told_read_only
from monkeytrain.data.synthetic import ensure_synthetic_dataset
from test_synthetic import file_digests

told_read_only(Path(sys.argv[1]))  # as usable_cache_folder does for a folder it cannot write
root = ensure_synthetic_dataset(Path(sys.argv[1]))
print(json.dumps([str(root), file_digests(root)]))
"""


def test_a_read_only_cache_folder_gets_the_set_in_a_temporary_folder_removed_at_exit(synthetic_root, tmp_path):
    """What the read-only warning promises (made again each run, nothing written to the folder) rather than
    'cannot write synthetic-v2 ...'. In a process of its own, to see the folder go when that exits."""
    child = subprocess.run([sys.executable, "-c", CHILD_WITH_A_READ_ONLY_CACHE, str(tmp_path)], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr
    root, digests = json.loads(child.stdout)
    assert digests == file_digests(synthetic_root)  # the same set, complete
    assert not Path(root).is_relative_to(tmp_path) and os.listdir(tmp_path) == []  # nothing in the cache folder
    assert not Path(root).exists()  # gone with the process


def test_a_run_on_the_synthetic_set_names_it_so_that_its_config_yaml_trains_on_it_again(
        tmp_path, monkeypatch, make_image_folder, cpu_accelerator):
    """config.yaml said `data: null`, which --config of it read as no --data: in a shell with $MONKEYTRAIN_DATA
    set, or beside a data/10-monkey-species, the repeat trained on that data instead, without a word."""
    from conftest import RecordedLog
    from monkeytrain.config import config_yaml, parse_config
    from monkeytrain.data.dataset import resolve_dataset
    from monkeytrain.data.synthetic import DATA_NAME

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MONKEYTRAIN_DATA", raising=False)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(parse_config(["--cpu", "--cache-dir", str(tmp_path / "cache")])))
    assert saved.read_text().startswith(f"data: {DATA_NAME}\n")
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(make_image_folder(tmp_path / "monkeys", classes=2, per_class=4)))
    repeated = parse_config(["--config", str(saved)])
    log = RecordedLog()
    splits = resolve_dataset(repeated, cpu_accelerator, log)
    assert splits.synthetic and len(splits.class_names) == 10
    assert log.warnings[0].startswith(f"--data {DATA_NAME}: training on a generated SYNTHETIC dataset in ")
    assert config_yaml(repeated) == saved.read_text()  # and its own config.yaml says the same


def test_a_built_in_data_set_this_version_does_not_make_is_one_line_naming_the_one_it_does():
    from monkeytrain.data.synthetic import DATA_NAME, names_synthetic_set

    assert names_synthetic_set(DATA_NAME) and not names_synthetic_set("data/builtin") and not names_synthetic_set(None)
    with pytest.raises(UserError, match=f"^--data builtin:synthetic-v1 names no data set built into this version "
                                        f"of monkeytrain; its synthetic set is --data {DATA_NAME} "):
        names_synthetic_set("builtin:synthetic-v1")
