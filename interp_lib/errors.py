"""Errors that cross layers, and how an exception is shown in one line.

``UsageError`` is bad input to a command (``interp-lib ...``): ``interp_lib.cli.main`` prints
``error: <message>`` and returns 2. ``RunInputError`` is the runner's kind of it (unknown
notebook, undeclared parameter, unwritable folder, Ray missing), raised before anything runs.
Both live here, below the runner and the command line, so that neither has to import the other.
"""

from __future__ import annotations

__all__ = ["UsageError", "RunInputError", "first_line"]


class UsageError(Exception):
    """Bad command-line input found by a subcommand: ``main`` prints ``error: <message>`` on
    stderr and returns 2."""


class RunInputError(UsageError):
    """Bad input to ``run_series`` (unknown notebook, undeclared parameter, unwritable folder):
    reported as one ``error: ...`` line and exit status 2, before anything is executed."""


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message (or of a text), cut to ``limit`` characters
    with ``...`` at the end when longer."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."
