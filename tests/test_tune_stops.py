"""A stopped worker (between trials or inside one): the exit status of its signal, and a requeue only after
SLURM's warning."""

from __future__ import annotations

import signal

import pytest

from monkeytrain.tune_stops import stopped


@pytest.mark.parametrize("received, requested", [("SIGUSR1", True), ("SIGTERM", False), ("SIGINT", False)])
def test_a_stopped_worker_asks_for_a_requeue_only_after_slurms_warning(tmp_path, monkeypatch, received, requested):
    request = tmp_path / "job.requeue"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("MONKEYTRAIN_REQUEUE_FILE", str(request))
    assert stopped(received) == 128 + signal.Signals[received]  # not finished, to a shell
    assert request.is_file() == requested  # scancel's SIGTERM ends the task for good
