"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

import errno
import re

# Operating-system errors that the path a user gave explains (a name too long, a file where a folder
# must be, no permission, a read-only file system, a loop of links): bad input, exit code 2, like any
# other bad input. The CLI (nasty.cli.main) maps a raw OSError with one of these to exit 2; a failed
# write (nasty.safe_io.WriteFailed) takes its exit code from the same set. Other OS errors (disk
# full, I/O error) mean the run could not complete: exit 3.
USER_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                              errno.EROFS, errno.ELOOP})


class NastyError(Exception):
    """Bad input or configuration: printed as one line, exit code 2."""

    exit_code = 2


class InputShapeError(NastyError):
    """A model cannot take the dataset's input shape (a config checked before its data is loaded
    defers this check to :func:`nasty.config.check_model_specs` with the real shape)."""


class TrainingDiverged(NastyError):
    """A loss became NaN/inf; the last good checkpoint is kept (exit code 3)."""

    exit_code = 3


class AuditIncomplete(NastyError):
    """An audit could not complete (exit code 3)."""

    exit_code = 3


def short_paths(line: str) -> str:
    """``line`` with every word over 200 characters (an over-long path) cut to its start and end."""
    return re.sub(r"\S{201,}", lambda m: f"{m[0][:80]}...{m[0][-40:]} ({len(m[0])} characters)", line)


def error_line(e: BaseException) -> str:
    """The one line the CLI prints for error ``e`` (after ``error: ``)."""
    return short_paths(str(e).splitlines()[0] if str(e) else type(e).__name__)
