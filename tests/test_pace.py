"""monkeytrain.pace: the time-left estimate, when it is printed, and the advice for long CPU runs."""

from __future__ import annotations

import time

import psutil
import pytest

from conftest import RecordedLog
from monkeytrain import pace
from monkeytrain.pace import (PhaseTimes, RemainingTime, estimate_line, format_duration, long_cpu_run_advice,
                             report_time_left, start_up_seconds)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, text", [
    (0.4, "0 s"), (45, "45 s"), (59.6, "1 min 00 s"), (245, "4 min 05 s"), (3600, "1 h 00 min"),
    (7830, "2 h 10 min"),
])
def test_durations_read_like_a_person_would_say_them(seconds, text):
    assert format_duration(seconds) == text


def test_estimate_after_the_first_epoch_then_every_tenth_of_the_run():
    clock = FakeClock()
    pace = RemainingTime(1, 40, clock)
    due = {}
    for epoch in range(1, 41):
        clock.now += 6.0  # every epoch takes 6 s
        left = pace.due(epoch)
        if left is not None:
            due[epoch] = left
    assert list(due) == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36]  # none after the last epoch
    assert due[1] == pytest.approx(39 * 6.0) and due[20] == pytest.approx(20 * 6.0)


def test_estimate_uses_the_mean_of_the_epochs_run_by_this_process():
    clock = FakeClock()
    pace = RemainingTime(11, 20, clock)  # resumed at epoch 11: epochs 1-10 do not count
    clock.now += 8.0
    assert pace.due(11) == pytest.approx(9 * 8.0) and pace.is_first(11)
    clock.now += 2.0
    assert pace.due(12) == pytest.approx(8 * 5.0) and not pace.is_first(12)


def test_an_epoch_a_resume_found_trained_is_not_counted():
    clock = FakeClock()
    pace = RemainingTime(5, 20, clock)  # resumed at the end of epoch 5: only its validation runs
    clock.now += 0.5
    pace.start_after(5)
    assert pace.due(5) is None
    clock.now += 8.0
    assert pace.due(6) == pytest.approx(14 * 8.0)


def test_a_short_run_estimates_after_every_epoch():
    clock = FakeClock()
    pace = RemainingTime(1, 3, clock)
    assert [pace.due(epoch) is not None for epoch in (1, 2, 3)] == [True, True, False]


def test_estimate_line_names_the_time_and_the_epochs_left():
    assert estimate_line(250, 39) == "about 4 min 10 s left (39 more epochs)"
    assert estimate_line(5, 1) == "about 5 s left (1 more epoch)"


def test_a_cpu_run_over_an_hour_names_the_faster_recipe():
    assert long_cpu_run_advice(3599, "gpu") is None
    advice = long_cpu_run_advice(2 * 3600, "gpu")
    assert "2 h 00 min" in advice and "--recipe cpu" in advice
    assert "--recipe" not in long_cpu_run_advice(2 * 3600, "cpu")  # already the fast one: fewer epochs
    assert "--epochs" in long_cpu_run_advice(2 * 3600, "cpu")


@pytest.mark.parametrize("on_cpu, recipe, warned", [(True, "gpu", True), (True, "cpu", True), (False, "gpu", False)])
def test_training_prints_the_estimate_and_warns_once_about_a_long_cpu_run(on_cpu, recipe, warned):
    clock = FakeClock()
    pace, log = RemainingTime(1, 150, clock), RecordedLog()
    for epoch in range(1, 16):
        clock.now += 45.0  # 45 s an epoch: 150 epochs take almost two hours
        report_time_left(pace, epoch, log, on_cpu, recipe)
    assert log.infos == ["about 1 h 51 min left (149 more epochs)", "about 1 h 41 min left (135 more epochs)"]
    assert len(log.warnings) == int(warned)  # after the first epoch only
    if warned:
        assert ("--recipe cpu" in log.warnings[0]) == (recipe == "gpu")


def test_phase_times_add_up_each_phase_over_its_visits_and_round_to_centiseconds():
    clock = FakeClock()
    phases = PhaseTimes(clock)
    for seconds in (2.0, 3.004):
        with phases.timing("training"):
            clock.now += seconds
    with pytest.raises(RuntimeError), phases.timing("test"):  # a phase that fails still counts
        clock.now += 1.5
        raise RuntimeError
    phases.add("first_epoch", 2.0)
    assert phases.summary() == {"training": 5.0, "test": 1.5, "first_epoch": 2.0}
    assert phases.elapsed() == pytest.approx(6.504)


def test_start_up_counts_the_process_start_once_per_process(monkeypatch):
    monkeypatch.setattr(pace, "_process_start_counted", False)
    clock = FakeClock()
    phases = PhaseTimes(clock)
    clock.now += 0.25
    first = start_up_seconds(phases)  # since this test process started: imports and all
    age = time.time() - psutil.Process().create_time()
    assert first == pytest.approx(max(age, 0.25), abs=0.1)
    assert start_up_seconds(phases) == pytest.approx(0.25)  # a second run in the same process: its own wait
