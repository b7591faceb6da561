"""The study's journal: an entry a full disk refused leaves no half line behind."""

from __future__ import annotations

import optuna
import pytest

from monkeytrain.storage import DiskFull
from monkeytrain.tune_study import STORAGE_NAME, study_storage
from test_storage import fill_to_the_brim, full_disk  # noqa: F401  (a real 2 MiB tmpfs)


def test_a_journal_entry_the_disk_has_room_for_half_of_leaves_the_study_readable(full_disk):
    """Optuna appends to its journal with a buffered write: a full disk kept half a line, the next entry, once
    there was room, was joined onto it, and the study could no longer be read (all its trials lost)."""
    study = optuna.create_study(study_name="s", storage=study_storage(full_disk))
    study.set_user_attr("first", "x" * 2900)  # most of a 4 KiB page: the next entry fits only in part
    fill_to_the_brim(full_disk)
    with pytest.raises(DiskFull, match=f"of {full_disk} to write {STORAGE_NAME} "):
        study.set_user_attr("refused", "y" * 1500)
    (full_disk / "brim").unlink()
    study.set_user_attr("after", "z")
    reread = optuna.load_study(study_name="s", storage=study_storage(full_disk))
    assert reread.user_attrs == {"first": "x" * 2900, "after": "z"}
