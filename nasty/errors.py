"""Errors that the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

import errno

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


class TrainingDiverged(NastyError):
    """A loss became NaN/inf; the last good checkpoint is kept (exit code 3)."""

    exit_code = 3


class AuditIncomplete(NastyError):
    """An audit could not complete (exit code 3)."""

    exit_code = 3
