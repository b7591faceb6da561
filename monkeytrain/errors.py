"""User-facing errors: one sentence, exit status 2, never a traceback."""

from __future__ import annotations

import argparse
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


def exits_cleanly_on_user_error(main: F) -> F:
    """Wrap an entry point so a `UserError`, or an OSError of the user's files and disks, prints one line
    and exits with status 2; and an interrupt that reaches it (a second Ctrl-C), one line and 130."""

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
        except OSError as error:
            if error.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f" ({error.filename})" if error.filename else ""
            fail(f"{error.strerror or error}{where}; check that path and the disk it is on, then run again.",
                 USAGE_EXIT_CODE)
        except KeyboardInterrupt:
            fail("interrupted (a training run continues from its last saved state with --resume auto and its "
                 "--run-name).", INTERRUPTED_EXIT_CODE)

    return wrapper  # type: ignore[return-value]


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


def fail(message: str, status: int) -> None:
    to_stderr("error", message)
    sys.exit(status)


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

    def __init__(self, *args, other_names: dict[str, str] | None = None, **kwargs):
        """other_names: what other trainers call some flags (timm's --amp, --opt), by field name, so that
        the hint names ours rather than whichever is spelled closest."""
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.other_names = other_names or {}

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but flags a subcommand does not know are reported by that subcommand's
        parser (argparse hands them up to the top one, which knows only the subcommands)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            getattr(parsed, "parser", self).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def error(self, message: str):
        raise UserError(f"{message}{self.near_flags(message)}; see `{self.prog} --help`.")

    def near_flags(self, message: str) -> str:
        """' (did you mean --epochs?)' for an unknown --epoch. Python 3.14's suggest_on_error does
        this; our oldest supported Python (3.10) has nothing like it."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        near = [flag for flag in map(self.near_flag, re.findall(r"--[\w-]+", message)) if flag]
        return f" (did you mean {', '.join(near)}?)" if near else ""

    def near_flag(self, flag: str) -> str | None:
        ours = self.other_names.get(flag[2:].replace("-", "_"))
        if ours:
            return "--" + ours.replace("_", "-")
        match = difflib.get_close_matches(flag, list(self._option_string_actions), n=1)
        return match[0] if match else None
