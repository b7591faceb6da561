"""The study's journal: Optuna's journal file, appended a whole line or nothing.

Optuna's JournalFileBackend appends with a buffered "ab" write: a disk that fills up (or a quota) mid-line
leaves half a line. Its reader passes over a last line without its newline, but the next append, once
there is room again, joins its line onto that half, and the study can no longer be read ("move it away").
Here each append goes through `storage.append_line`, which cuts the file back to where it was should the
write fail, under the same lock Optuna would take.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from monkeytrain.storage import append_line


class WholeLineJournal(JournalFileBackend):
    def __init__(self, path: Path):
        # Optuna's own default lock, kept here because appending takes it ourselves: its symlink is
        # created atomically on NFS, where a SLURM array's workers meet.
        self.lock = JournalFileSymlinkLock(str(path))
        self.path = path
        super().__init__(str(path), lock_obj=self.lock)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        self.lock.acquire()
        try:
            append_line(self.path, lines, flag="--study-dir", durable=True)
        finally:
            self.lock.release()
