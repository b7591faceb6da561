"""User-facing errors: one sentence, exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import errno
import functools
import os
import re
import sys
from typing import Callable, Iterator, TypeVar

USAGE_EXIT_CODE = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input (a path, a file, a flag) that they can fix.

    The message is a whole sentence naming the problem and what to do about it.
    """


# What the system says of a path or a disk (a name too long, no permission, a read-only or failing disk,
# a file gone): the user's environment, which a traceback would blame on monkeytrain.
ENVIRONMENT_ERRNOS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOSPC,
                      errno.EDQUOT, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EMFILE,
                      errno.ENFILE, errno.ESTALE}
INTERRUPTED_EXIT_CODE = 130  # the shell's for a SIGINT
FAILED_ELSEWHERE_EXIT_CODE = 1  # Python's for an uncaught exception: another process's failure ended this one
# What gloo says of a connection whose other end has gone (a process that ended), at either end of a collective.
LOST_PEER_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def exits_cleanly_on_user_error(main: F) -> F:
    """Wrap an entry point so a `UserError`, or an OSError of the user's files and disks, prints one line
    and exits with status 2; an interrupt that reaches it (a second Ctrl-C), one line and 130; and a
    connection to another process of the run that broke, one line and 1 (see `lost_another_process`).
    Under a launcher, one line for the run: see `fail`."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        printable_on_any_console()
        try:
            with output_failures_told_apart():
                return main(*args, **kwargs)
        except OutputFailed as error:
            discard_standard_output()  # else Python's own flush at exit would fail again, with a traceback
            fail(str(error), USAGE_EXIT_CODE)
        except UserError as error:
            fail(str(error), USAGE_EXIT_CODE)
        except KeyboardInterrupt:
            fail("interrupted (a training run continues from its last saved state, if it saved one, with --resume "
                 "auto and its --run-name).", INTERRUPTED_EXIT_CODE)
        except Exception as error:
            fail_unless_a_bug(error)
            raise

    return wrapper  # type: ignore[return-value]


def fail_unless_a_bug(error: Exception) -> None:
    """One line and exit for an OSError of the user's files and disks, or for a connection to another
    process of the run that broke; return for anything else, a bug that its traceback shows."""
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        where = f" ({error.filename})" if error.filename else ""
        fail(f"{error.strerror or error}{where}; check that path and the disk it is on, then run again.",
             USAGE_EXIT_CODE)
    lost = lost_another_process(error)
    if lost:  # the other process says why; the main process, if it does, says it for this one too
        fail(f"another process of this run ended ({lost}); what it printed says why.", FAILED_ELSEWHERE_EXIT_CODE,
             main_said=lambda _: True)
    if in_a_launch():  # the main process's bug, for the others, which would otherwise wait to hear how it ended
        from monkeytrain.distributed import A_BUG, tell_the_other_processes  # (see fail)
        tell_the_other_processes(A_BUG)


def lost_another_process(error: Exception) -> str | None:
    """What gloo says when the process at the other end of a collective has gone (it failed, and closed its
    connections as it ended), in a few words; None for any other error. Its traceback would only show where
    this process was waiting for it, under the other's own message."""
    if not isinstance(error, RuntimeError) or "gloo" not in str(error):
        return None
    said = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0]  # without the source file and advice
    return said if any(words in said for words in LOST_PEER_WORDS) else None


class OutputFailed(UserError):
    """Standard output could not be written: `> file` on a full disk, `> /dev/full`, a failing disk."""

    def __init__(self, error: OSError):
        super().__init__(f"standard output could not be written ({error.strerror or error}); free space where "
                         "it goes, or send it elsewhere.")


class StandardOutput:
    """sys.stdout, whose failed writes raise OutputFailed. They name no file, so that a full disk behind
    `> answers.txt` would otherwise read as a failure of some other file. A closed pipe (`| head`) is left as
    the BrokenPipeError that its callers end quietly on."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        with output_errors_raised_as_such():
            return self.stream.write(text)

    def flush(self) -> None:
        with output_errors_raised_as_such():
            self.stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer, ...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def output_errors_raised_as_such() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputFailed(error) from error


@contextlib.contextmanager
def output_failures_told_apart() -> Iterator[None]:
    """sys.stdout as a StandardOutput for the block (once: entry points call each other)."""
    if isinstance(sys.stdout, StandardOutput) or sys.stdout is None:
        yield
        return
    stream = sys.stdout
    sys.stdout = StandardOutput(stream)
    try:
        yield
    finally:
        if isinstance(sys.stdout, StandardOutput):  # unless the block replaced it (a test's capture)
            sys.stdout = stream


def discard_standard_output() -> None:
    """Point file descriptor 1 at /dev/null, as Python's documentation advises for a closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stream with no descriptor (a test's capture)
        pass


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none; the system's words
    alone for an OSError, whose path the quoting message names): for a library's error quoted inside
    one of ours, which is one line long."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else error.__class__.__name__


def fail(message: str, status: int, main_said: Callable[[str], bool] | None = None) -> None:
    """`monkeytrain: error: message`, then exit with `status`. Of the processes of a launch, the main one
    says it, and another only when the main process ended otherwise (`main_said(how)` false; by default,
    unless with this very message): an error that every process meets is one line, not one per process."""
    say = functools.partial(to_stderr, "error", message)
    if in_a_launch():
        from monkeytrain.distributed import said_once_per_launch  # here: it imports this module, and torch
        said_once_per_launch(message, say, main_said or message.__eq__)
    else:
        say()
    sys.exit(status)


def in_a_launch() -> bool:
    """Whether this process is one of several that a launcher with a store of its own started (torchrun's
    agent, under `accelerate launch` too)."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"))


def to_stderr(kind: str, message: str) -> None:
    """`monkeytrain: KIND: message` as one write: print() writes the line and its newline apart, so the
    same line from several ranks could come out glued together, followed by an empty one."""
    sys.stderr.write(f"monkeytrain: {kind}: {message}\n")
    sys.stderr.flush()


def printable_on_any_console() -> None:
    """A path whose name is not UTF-8 (a zip made on Windows) holds escaped bytes that a strict console
    (a UTF-8 locale such as en_US.UTF-8) refuses to print, with a traceback in the middle of a warning:
    such characters are printed as escapes (\\udcff) instead."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line naming the bad flag, a near flag when there is
    one, and where the flags are listed; instead of argparse's whole usage (46 lines for train.py)
    followed by the message. Subcommands' parsers are made of this class too.

    A flag must be spelled out: argparse would take --epoch for --epochs, and --image for --image-size,
    and a flag added later could change what a shortened one in a job script means."""

    def __init__(self, *args, other_names: dict[str, str] | None = None, unmatched: dict[str, str] | None = None,
                 **kwargs):
        """other_names: what other trainers call some flags (timm's --amp, --opt), by field name, so that
        the hint names ours rather than whichever is spelled closest. unmatched: flags of other trainers and
        launchers that have no equivalent here (timm's --sched), by field name, each with what to do instead."""
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.other_names = other_names or {}
        self.unmatched = unmatched or {}

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but flags a subcommand does not know are reported by that subcommand's
        parser (argparse hands them up to the top one, which knows only the subcommands)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            getattr(parsed, "parser", self).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def error(self, message: str):
        raise UserError(f"{self.near_choice(message)}{self.near_flags(message)}; see `{self.prog} --help`.")

    def exit(self, status=0, message=None):
        """--help and --version print, then exit here: their text, still buffered, must fail now (one line,
        status 2, from the entry point's wrapper), not in Python's flush at exit (a notice naming no file and
        status 120)."""
        if not status:
            sys.stdout.flush()
        super().exit(status, message)

    def near_flags(self, message: str) -> str:
        """' (did you mean --epochs?)' for an unknown --epoch. Python 3.14's suggest_on_error does
        this; our oldest supported Python (3.10) has nothing like it."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = re.findall(r"--[\w-]+", message)
        explained = [f" ({flag}: {self.unmatched[key_of(flag)]})" for flag in flags if key_of(flag) in self.unmatched]
        near = [flag for flag in map(self.near_flag, flags) if flag]
        return (f" (did you mean {', '.join(near)}?)" if near else "") + "".join(explained)

    def near_choice(self, message: str) -> str:
        """argparse's invalid choice of a flag's value with the choice meant in place of the list, as for a
        mistyped flag: --select-on balanced_accuracy (did you mean balanced-accuracy?). Only a hint: the value
        given is still refused, so that config.yaml, presets and tune spaces spell each choice one way."""
        typed = re.match(r"(argument (.+?): invalid choice: (.+?)) \(choose from .*\)$", message)
        action = self._option_string_actions.get(typed[2].split("/")[0]) if typed else None
        if action is None:  # another error, or a positional argument's (a command: see cli's CommandParser)
            return message
        try:
            value = ast.literal_eval(typed[3])  # argparse quotes it as repr() does
        except (ValueError, SyntaxError):
            return message
        meant = nearest_choice(str(value), [str(choice) for choice in action.choices])
        return f"{typed[1]} (did you mean {meant}?)" if meant else message

    def near_flag(self, flag: str) -> str | None:
        """Ours for another trainer's name, the flag with dashes for underscores (Accelerate's spelling), or one
        spelled much like it: at difflib's 0.8, as for a preset's keys, so that --sched is no hint for --seed."""
        if key_of(flag) in self.unmatched:
            return None
        ours = self.other_names.get(key_of(flag))
        if ours:
            return "--" + ours.replace("_", "-")
        dashed = flag.lower().replace("_", "-")
        if dashed in self._option_string_actions:
            return dashed
        match = difflib.get_close_matches(dashed, list(self._option_string_actions), n=1, cutoff=0.8)
        return match[0] if match else None


def nearest_choice(value: str, choices: list[str]) -> str | None:
    """The choice `value` was meant as: the same in other letters' case or with _ for - (balanced_accuracy), or one
    spelled much like it, at difflib's 0.8 as for flags (adam: adamw; lion: none)."""
    spelled = value.lower().replace("_", "-")
    if spelled in choices:
        return spelled
    match = difflib.get_close_matches(spelled, choices, n=1, cutoff=0.8)
    return match[0] if match else None


def key_of(flag: str) -> str:
    """A flag as a config field would name it: --drop-path and --drop_path are drop_path."""
    return flag.lstrip("-").replace("-", "_").lower()
