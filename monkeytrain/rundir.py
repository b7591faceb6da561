"""The run directory: one per run, named alike on every rank, checked before anything is written."""

from __future__ import annotations

import time
from pathlib import Path

from monkeytrain.checkpoint import BEST_NAME
from monkeytrain.distributed import broadcast_from_main
from monkeytrain.errors import UserError
from monkeytrain.storage import check_writable_dir

RESULTS_NAME = "results.json"  # written last: a run directory that holds it is finished


def prepare_run_dir(config, accelerator) -> Path:
    """The run directory; a finished run is never reopened, one with a checkpoint only to resume."""
    config.run_name = config.run_name or broadcast_from_main(time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(config.output_dir) / config.run_name
    if (run_dir / BEST_NAME).exists() and not config.resume:
        raise UserError(f"{run_dir} already holds a checkpoint; pick another --run-name, move it away, "
                        "or continue it with --resume auto.")
    if (run_dir / RESULTS_NAME).exists():
        raise UserError(f"{run_dir} holds a finished run (results.json); pick another --run-name.")
    problem = None
    if accelerator.is_main_process:
        try:
            check_writable_dir(run_dir, "--output-dir")  # now, not as a traceback at the first save
        except UserError as error:
            problem = str(error)
    problem = broadcast_from_main(problem)  # every rank stops; none is left waiting for the main one
    if problem:
        raise UserError(problem)
    return run_dir


def remove_if_empty(run_dir: Path) -> None:
    """The run directory goes if nothing was written in it (a run stopped by bad input)."""
    try:
        run_dir.rmdir()
    except OSError:  # it holds a run's files (or is gone already)
        pass
