"""monkeytrain.errors: what an entry point prints when it fails, and its exit status."""

from __future__ import annotations

import errno
import sys

import pytest

from monkeytrain.errors import exits_cleanly_on_user_error


class FullDisk:
    """The standard output of `monkeytrain predict ... > /dev/full`, or of `> answers.txt` on a full disk."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass


@exits_cleanly_on_user_error
def prints_an_answer() -> None:
    print("n0_000.png: mantled howler 91.0%", flush=True)


def test_a_standard_output_that_cannot_be_written_is_named_as_such(monkeypatch, capsys):
    full = FullDisk()
    monkeypatch.setattr(sys, "stdout", full)
    with pytest.raises(SystemExit) as stopped:
        prints_an_answer()
    assert stopped.value.code == 2 and sys.stdout is full  # put back as it was
    assert capsys.readouterr().err == ("monkeytrain: error: standard output could not be written (No space left "
                                       "on device); free space where it goes, or send it elsewhere.\n")


def test_a_closed_pipe_is_left_to_the_entry_point_that_ends_quietly_on_it(monkeypatch):
    class ClosedPipe(FullDisk):
        def write(self, text: str) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with pytest.raises(BrokenPipeError):  # cli.main catches it: status 1, no message (test_cli)
        prints_an_answer()
