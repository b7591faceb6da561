"""User-facing errors: one sentence, exit status 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

USAGE_EXIT_CODE = 2

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """A problem with the user's input (a path, a file, a flag) that they can fix.

    The message is a whole sentence naming the problem and what to do about it.
    """


def exits_cleanly_on_user_error(main: F) -> F:
    """Wrap an entry point so a `UserError` prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"monkeytrain: error: {error}", file=sys.stderr, flush=True)
            sys.exit(USAGE_EXIT_CODE)

    return wrapper  # type: ignore[return-value]
