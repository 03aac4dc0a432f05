"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class NastyError(Exception):
    """Bad input or configuration: printed as one line, exit code 2."""

    exit_code = 2


class TrainingDiverged(NastyError):
    """A loss became NaN/inf; the last good checkpoint is kept (exit code 3)."""

    exit_code = 3


class AuditIncomplete(NastyError):
    """An audit could not complete (exit code 3)."""

    exit_code = 3
