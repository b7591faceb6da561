"""A resumed run's own records, kept true to the state it resumes from.

`data_manifest.json`: the run's account of its data, which train.py writes
before training. Each saved state keeps a copy (`kept_with_a_state`), so that a
resume whose data folder gained or lost an image since is refused
(`check_same_data`) instead of going on with other data, batches and
normalisation; the copy also names the order its held-out files were taken
from, which a resume takes them from again (`held_out_by_of`: states saved
before content hashes name none). `metrics.jsonl`: a resume from a state older
than the newest epochs logged trains and logs those epochs again, so their lines
go first (`forget_epochs_from`). The trainer calls these around `StateStore`, which only
saves and loads states. Both records also tell what a run left unfinished holds
(`trained_every_epoch`, `own_test_folder`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError, safe_open

from monkeytrain.checkpoint import BEST_NAME
from monkeytrain.data.splits import CONTENT_HASH, HELD_OUT_BY, ORDERS, SEEDED_SHUFFLE
from monkeytrain.distributed import failing_alike_on_every_rank
from monkeytrain.errors import UserError, first_line
from monkeytrain.storage import write_atomically
from monkeytrain.tracking import METRICS_NAME

DATA_RECORD = "data_manifest.json"


def kept_with_a_state(run_dir: Path) -> list[Path]:
    """The files of the run that a state keeps a copy of: its data record, when it has one."""
    record = run_dir / DATA_RECORD
    return [record] if record.is_file() else []


def check_same_data(state: Path, run_dir: Path, is_main_process: bool) -> None:
    """Refuse a state saved with other data than the run's now: RUN/data_manifest.json, written for this
    run's data before it resumes, against the copy the state keeps (none in older states). On refusal the
    run's record goes back to the data it trained on (written by the main process)."""
    kept, now = state / DATA_RECORD, run_dir / DATA_RECORD
    if not (kept.is_file() and now.is_file()):
        return
    try:
        saved = json.loads(kept.read_text())
    except (OSError, ValueError) as error:  # damaged on disk: as any other file of the state
        raise UserError(f"the saved state {state} cannot be loaded ({first_line(error)}: {kept}); move it away and "
                        "--resume auto takes the newest one left, or start a new run.") from None
    change = data_change(saved, json.loads(now.read_text()))  # train.py has just written it
    if change is None:
        return
    if is_main_process:
        write_atomically(now, kept.read_bytes())
    raise UserError(f"the data changed since {state} was saved ({change}); put the data back as it was to "
                    "resume, or start a new run.")


def data_change(saved: dict, now: dict) -> Optional[str]:
    """How the data of a data manifest differs from the one saved, in words; None when it does not."""
    saved, now = from_its_root(with_its_order(saved)), from_its_root(with_its_order(now))
    for split, files in saved.get("files", {}).items():
        files_now = now.get("files", {}).get(split, [])
        if len(files_now) != len(files):
            return f"its {split} split has {len(files_now)} images, {len(files)} when the state was saved"
        if files_now != files:
            return f"its {split} split holds other files than when the state was saved"
    compared = (saved.keys() | now.keys()) - NOT_TRAINED_ON
    different = [key for key in sorted(compared) if saved.get(key) != now.get(key)]
    return f"its {different[0]} differs" if different else None


# Files passed over never reach training, and which are passed over silently and which are reported as skipped
# changes between versions (Zone.Identifier marks: skipped, now passed over; iCloud placeholders: the other way):
# a resume is not refused for it. A file that stops decoding changes the splits' files, which are compared.
NOT_TRAINED_ON = {"skipped", "skipped_count"}


def with_its_order(manifest: dict) -> dict:
    """A data manifest naming the order its held-out files were taken from: one that names none was written
    before the order was recorded, by the seeded shuffle (a resume of its state holds out by that again)."""
    return {HELD_OUT_BY: SEEDED_SHUFFLE, **manifest}


def held_out_by_of(state: Optional[Path], run_dir: Path) -> str:
    """The order the run that saved `state` took its held-out files from, as its data manifest names it: the
    state's copy, or the run's own for states older than such copies (which are older than content hashes too).
    No state (a new run), or no record (every version writes one before training; check_same_data then checks
    nothing either): by content hash. A damaged copy is left for check_same_data to refuse."""
    found = [record for record in (state / DATA_RECORD, run_dir / DATA_RECORD) if record.is_file()] if state else []
    if not found:
        return CONTENT_HASH
    try:
        order = with_its_order(json.loads(found[0].read_text()))[HELD_OUT_BY]
    except (OSError, ValueError, TypeError):  # unreadable, not JSON, not an object
        return CONTENT_HASH
    if not isinstance(order, str) or order not in ORDERS:
        raise UserError(f"the saved state {state} holds its images out by {order!r}, which this version of "
                        "monkeytrain does not know; resume it with the version that saved it, or start a new run.")
    return order


def from_its_root(manifest: dict) -> dict:
    """A data manifest with its paths relative to its root, and no root: the data folder given as data/x in
    the checkout and as $PWD/data/x in a job script, or from another working directory, is the same data
    (its paths are written as the run was given them)."""
    root = manifest.get("root")
    if not root:
        return manifest

    def relative(path: str) -> str:
        return os.path.relpath(path, root)

    return {**manifest, "root": None,
            "files": {split: [relative(p) for p in files] for split, files in manifest.get("files", {}).items()},
            "skipped": [{**skipped, "path": relative(skipped["path"])} for skipped in manifest.get("skipped", [])],
            **{pairs: [[relative(a), relative(b)] for a, b in manifest.get(pairs, [])]
               for pairs in ("leaks", "conflicts")}}


def forget_epochs_from(run_dir: Path, epoch: int) -> None:
    """Drop the lines of RUN/metrics.jsonl from `epoch` on: a state older than the newest epochs logged (a
    SIGKILL, a power cut or a state moved away, long after the last scheduled save) trains and logs those
    epochs again, and the file must hold each once. A line a kill cut short goes too."""
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if logged_epoch(line) < epoch]
    if kept != lines:
        write_atomically(metrics, "".join(kept).encode())


def forget_epochs_alike(run_dir: Path, epoch: int, is_main_process: bool) -> None:
    """forget_epochs_from by the main process, called on every rank: should its rewrite fail (a disk that filled
    up since config.yaml was written), every rank ends with its line, not the others at their next collective."""
    failing_alike_on_every_rank(lambda: forget_epochs_from(run_dir, epoch) if is_main_process else None)


def trained_every_epoch(run_dir: Path) -> bool:
    """Whether RUN/metrics.jsonl ends with the run's last epoch, validated to a finite loss, and best.safetensors
    holds the last epoch logged as best: training ended (a run that then failed, while its test split was scored
    or results.json written, has its best checkpoint). An epoch's line is logged before its checkpoint is saved,
    so a disk that filled up saving the last epoch's leaves an older best.safetensors behind a whole log."""
    try:
        lines = (run_dir / METRICS_NAME).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    epochs = [json.loads(line) for line in lines if logged_epoch(line) < math.inf]
    if not epochs:
        return False
    last, best = epochs[-1], [epoch["epoch"] for epoch in epochs if epoch.get("is_best")]
    return (isinstance(last.get("epochs"), int) and last["epoch"] >= last["epochs"]
            and "val_loss" not in (last.get("not_finite") or {})  # a diverged last epoch ended the run unscored
            and bool(best) and saved_best_epoch(run_dir) == best[-1])


def saved_best_epoch(run_dir: Path) -> Optional[int]:
    """The epoch in RUN/best.safetensors's header (read alone, not the weights); None without a readable one."""
    try:
        with safe_open(str(run_dir / BEST_NAME), framework="pt") as handle:
            return int((handle.metadata() or {})["epoch"])
    except (OSError, SafetensorError, KeyError, ValueError):  # none, a damaged one, a header without the epoch
        return None


def own_test_folder(run_dir: Path, began: Optional[dict]) -> Optional[Path]:
    """The test split's own folder from RUN/data_manifest.json (Kaggle's validation/validation, --test-dir), as
    results.own_test_folder finds it from the data; None where the test split was held out of the training folder
    (other images of which the model trained on), or the record names none. The record has its paths as the run was
    given them, from the folder it began in: a relative one is told from RUN/config.yaml's absolute paths, `began`,
    for a user in another folder (None where that cannot be told)."""
    try:
        record = json.loads((run_dir / DATA_RECORD).read_text())
        folder = folder_apart_from(record["files"]["test"], record["root"]) if record["root"] else None
    except (OSError, ValueError, KeyError, TypeError):  # no record, a damaged one, no test split
        return None
    if folder is None or folder.is_absolute():
        return folder
    anchors = [Path(path) for path in ((began or {}).get(name) for name in ("test_dir", "data"))
               if isinstance(path, str) and os.path.isabs(path)]  # not the built-in synthetic set's name
    return next((found for anchor in anchors if (found := found_below(anchor, folder))), None)


def found_below(anchor: Path, given: Path) -> Optional[Path]:
    """`given`, a relative path to a folder at or below `anchor`, as absolute: config.yaml records `anchor`
    from / (data/x given as data/x in /home/me is /home/me/data/x there), so the first parts of `given`
    past any ../ are the last of `anchor` (none for a run given . or ..). The longest such overlap that names a
    folder wins; None where none does (the data moved)."""
    parts = given.parts
    tail = parts[next((i for i, part in enumerate(parts) if part != ".."), len(parts)):]
    for overlap in range(min(len(tail), len(anchor.parts) - 1), -1, -1):  # never the root / itself
        if anchor.parts[len(anchor.parts) - overlap:] == tail[:overlap]:
            found = anchor.joinpath(*tail[overlap:])
            if found.is_dir():
                return found
    return None


def folder_apart_from(files: list, root: Path | str) -> Optional[Path]:
    """The folder the files have in common (their class subfolders' parent), or None where it lies inside
    `root`, the training folder: the test split is then held out of it."""
    folder = Path(os.path.commonpath(files))
    # by its path from the root, not by its spelling: ../test is not inside a root given as `.`
    return folder if os.path.relpath(folder, root).split(os.sep)[0] == os.pardir else None


def logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; infinity for one that is not whole."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, TypeError, KeyError):
        return math.inf
