"""One exception type for bad input, and the wrapper that turns it into one line for the user."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input or a fault the user can fix: shown as one line, without a traceback."""


def exit_on_user_error(fn: F) -> F:
    """Wrap an entry point so that a UserError prints `error: ...` and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
