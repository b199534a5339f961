"""The bottom of the import graph: the one base class for expected failures.

Every error a user can cause (a bad job file, a refused checkpoint, bad tokens, a missing run
directory) subclasses `UserError`, carries a one-line message that says what is wrong and what is
allowed, and is printed by the CLI without a traceback (exit status 2). This module imports
nothing from the project, so any layer may raise these without importing upwards."""

from __future__ import annotations


class UserError(Exception):
    """An expected failure with a one-line message for the user."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the CLI reports as one line: ours, the data pipelines' own, a missing file."""
    from data_pipelines.errors import DataError

    return (UserError, DataError, FileNotFoundError)
