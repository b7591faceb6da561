"""Train, select the best epoch, reload it and evaluate on the test split.

    accelerate launch monkeytrain/train.py [flags]      # any Accelerate setup
    python -m monkeytrain.train --debug                  # one process, quick check

This file is wiring: parse the config, create the one Accelerator, build the
data, hand it to the trainer, write the results, and always close.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts monkeytrain/ itself first on sys.path; put the
    # project root there instead so only absolute `monkeytrain.` imports resolve.
    _package_dir = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _package_dir]
    sys.path.insert(0, str(_package_dir.parent))

from typing import Callable

from accelerate.utils import set_seed

from monkeytrain.config import TrainConfig, parse_config, recorded_config
from monkeytrain.data.dataset import usable_cache_dir
from monkeytrain.data.loaders import end_live_workers
from monkeytrain.data.prepare import prepare_data
from monkeytrain.distributed import make_accelerator, processes_on
from monkeytrain.errors import exits_cleanly_on_user_error
from monkeytrain.pace import PhaseTimes, start_up_seconds
from monkeytrain.preemption import Preemption, requeue_or_exit, rerun_continues, stopped_exit_status
from monkeytrain.results import checkpoint_named_on_a_full_disk, score
from monkeytrain.rundir import (RESULTS_NAME, check_resumed_run, claimed, prepare_run_dir, write_results,
                               write_run_records)
from monkeytrain.statestore import given_state
from monkeytrain.tracking import make_run_log
from monkeytrain.trainer import RunContext, Trainer


@exits_cleanly_on_user_error
def main(argv: list[str] | None = None, on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Parse flags, train, and return results.json's results; `on_epoch`: see Trainer (tune prunes with it)."""
    config = parse_config(argv)
    accelerator = make_accelerator(config)
    try:
        return run(config, accelerator, on_epoch)
    finally:
        end_live_workers()  # not left to the garbage collector (see there), which a worker's error would do
        accelerator.end_training()  # without it, gloo ranks can abort at exit


def run(config: TrainConfig, accelerator, on_epoch: Callable | None = None) -> dict:
    phases = PhaseTimes()
    # From the start (a SIGUSR1 would kill us unsaved), and before the run is named (see rerun_continues)
    stop = Preemption(config.save_every_minutes, rerun_continues=rerun_continues(config))
    set_seed(config.seed)
    cache_dir = usable_cache_dir(config, warn=accelerator.is_main_process)  # before the run directory is made
    if config.resume and config.resume != "auto":
        given_state(config.resume)  # and a wrong --resume path neither
    run_dir = prepare_run_dir(config, accelerator)
    with claimed(run_dir, accelerator):  # no other run in it meanwhile; removed after if left empty (bad data)
        check_resumed_run(run_dir, config, accelerator)  # before config.yaml is written again, and W&B started
        log = make_run_log(run_dir, accelerator.is_main_process, config.report_to, recorded_config(config),
                           config.log_checkpoint)
        run = RunContext(config, accelerator, run_dir, log, phases)
        phases.add("start_up", start_up_seconds(phases))
        try:
            return train_and_report(run, cache_dir, stop, on_epoch)
        finally:
            log.close()


def train_and_report(run: RunContext, cache_dir: Path, stop: Preemption, on_epoch: Callable | None) -> dict:
    config, accelerator, log = run.config, run.accelerator, run.log
    with run.phases.timing("data"):
        data = prepare_data(config, accelerator, cache_dir, log)
    log.info(f"{data.summary()}; {processes_on(accelerator)}; {config.recipe} recipe; run directory {run.run_dir}")
    with run.phases.timing("model"):
        trainer = Trainer(run, data, stop, on_epoch)
    # Once the model is built: a flag it refuses (--model, --batch-size, --tta-shift, ...) leaves no run folder
    write_run_records(log, config, data.splits.manifest())  # config.yaml, data_manifest.json: every rank ends alike
    log.start_tracking()  # and no W&B run either
    if trainer.fit():  # a stop signal ended it, its state saved if it trained
        log.close()  # before a requeue, which ends this job at once
        requeue_or_exit(log, accelerator, stop, trainer.unsaved_stop)
        return {"stopped": True, "exit_status": stopped_exit_status(stop.received)}
    with checkpoint_named_on_a_full_disk(run, data.splits, trainer.best):  # what is left, not a resume
        with run.phases.timing("test"), trainer.saved_on_a_fixable_stop():  # an image gone: resume scores
            results, figure = score(run, data, trainer.best)
        results.update(wall_seconds=round(run.phases.elapsed(), 2), phase_seconds=run.phases.summary())
        write_results(log, results)  # last: it marks the run finished (every rank ends alike)
    log.info(f"{figure} (best epoch {trainer.best.epoch}); results in {run.run_dir / RESULTS_NAME}")
    return results


if __name__ == "__main__":
    sys.exit(main().get("exit_status", 0))  # a stopped run is not a finished one (see stopped_exit_status)
