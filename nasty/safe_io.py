"""Every file nasty writes goes through this module (``tests/test_safe_io.py`` checks the source for
any other writer).

The rules, in one place:

- a write never follows a symbolic link and never replaces something that is not a regular file
  (a link, FIFO, device, socket or directory at the target is refused: one line, exit code 2);
- a file is written to a short temporary name in the target's own folder (``.nasty-tmp-XXXXXXXX.tmp``,
  so a legal 255-byte target name still works), synced to disk, then renamed over the target: the old
  file is gone only once the new one is durable, and a failure leaves it intact;
- only temporary files this module created are deleted on failure;
- a run folder replaced with ``--force`` is set aside (renamed) and deleted only when the command
  succeeded; when it fails, the previous folder is put back.
"""

from __future__ import annotations

import atexit
import errno
import io
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from .distributed import is_main
from .errors import USER_PATH_ERRNOS, NastyError

TMP_PREFIX = ".nasty-tmp-"
TMP_SUFFIX = ".tmp"
ASIDE_PREFIX = ".nasty-old-"


class WriteFailed(NastyError):
    """Writing a file failed; the previous file is intact. ``errno`` is the operating system's error
    number; exit code 2 when the path given explains it (:data:`nasty.errors.USER_PATH_ERRNOS`: a name
    too long, no permission, a read-only file system), else 3 (disk full: the run could not complete)."""

    exit_code = 3

    def __init__(self, msg: str, err: int | None = None) -> None:
        super().__init__(msg)
        self.errno = err
        self.exit_code = 2 if err in USER_PATH_ERRNOS else 3


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def is_temporary(p: Path) -> bool:
    """Whether ``p`` is named like a temporary file of this module (a killed write's leftover)."""
    return p.name.startswith(TMP_PREFIX) and (p.name.endswith(TMP_SUFFIX) or p.name.endswith(TMP_SUFFIX + ".bak"))


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_target(path: str | Path) -> None:
    """Refuse (one line, exit 2) a write target that exists and is not a regular file; a symbolic link
    is refused whatever it points to. A missing target is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise NastyError(f"cannot write {path}: a part of the path is not a directory") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise NastyError(f"refusing to write {path}: it is {_kind(st.st_mode)}, not a regular file")


def _failed(path: Path, e: OSError, plural: bool = False) -> WriteFailed:
    return WriteFailed(f"cannot write {path}: {e.strerror or e}; the previous file{'s are' if plural else ' is'} unchanged", e.errno)


def _new_temporary(path: Path) -> tuple[int, str]:
    """Create an empty temporary file beside ``path`` (its folder created with its parents)."""
    check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
    except OSError as e:
        raise _failed(path, e) from None
    return fd, tmp


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files that killed writes of this module left anywhere under ``folder``
    (regular files named like :func:`is_temporary`, nothing else)."""
    for p in Path(folder).rglob(f"{TMP_PREFIX}*"):
        if is_temporary(p) and not p.is_symlink() and p.is_file():
            _unlink(p)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage(path: Path, data: bytes) -> str:
    """Write ``data`` to a synced temporary file beside ``path``; return its name."""
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp makes 0600 files; outputs are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _unlink(tmp)
        if isinstance(e, OSError):
            raise _failed(path, e) from None
        raise
    return tmp


def _replace(tmp: str, dst: Path) -> None:
    """Rename ``tmp`` over ``dst`` after checking (again, just before) that ``dst`` is not a link or
    special file; the rename itself replaces a link rather than following it."""
    check_target(dst)
    os.replace(tmp, dst)


def write_files(files: list[tuple[Path, bytes]]) -> None:
    """Write several files so that either all are replaced or none is.

    Every file is first written to a synced temporary file beside its target; the temporaries are
    then renamed over the targets. If a rename fails (disk full, permissions), the targets already
    replaced are restored from hard-linked backups, so a failed save never leaves a new weights file
    beside an old sidecar. Raises :class:`WriteFailed`, or :class:`NastyError` for a target that is
    not a regular file. Under torchrun only rank 0 writes.
    """
    if not is_main():
        return
    for path, _ in files:
        check_target(path)
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            staged.append((_stage(Path(path), data), Path(path)))
    except BaseException:
        for tmp, _ in staged:
            _unlink(tmp)
        raise
    backups: dict[Path, str | None] = {}
    done: list[Path] = []
    try:
        for tmp, dst in staged:
            if len(staged) > 1:
                backups[dst] = None
                if dst.is_file():
                    bak = f"{tmp}.bak"
                    try:
                        os.link(dst, bak)
                    except OSError:
                        shutil.copy2(dst, bak)
                    backups[dst] = bak
            _replace(tmp, dst)
            done.append(dst)
    except (OSError, NastyError) as e:
        for dst in reversed(done):
            bak = backups.get(dst)
            try:
                if bak is not None:
                    os.replace(bak, dst)
                else:
                    os.unlink(dst)
            except OSError:
                pass
        for tmp, _ in staged:
            _unlink(tmp)
        if isinstance(e, NastyError):
            raise
        raise _failed(staged[len(done)][1], e, plural=True) from None
    finally:
        for bak in backups.values():
            if bak is not None:
                _unlink(bak)
    for folder in {dst.parent for _, dst in staged}:
        _fsync_dir(folder)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: a crash leaves the old file intact."""
    write_files([(Path(path), data)])


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def npy_bytes(arr: Any) -> bytes:
    """``arr`` in the ``.npy`` format, without pickle."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_with(path: str | Path, produce: Callable[[str], None], error: Callable[[Exception], NastyError] | None = None) -> None:
    """Write ``path`` with a tool that wants a file name (an exporter): ``produce(tmp)`` writes the
    temporary file, which is then synced and renamed over ``path``. An exception of ``produce`` is
    turned into ``error(e)`` when given (a :class:`NastyError` passes through); the temporary file is
    removed whatever happens."""
    path = Path(path)
    fd, tmp = _new_temporary(path)
    os.close(fd)
    try:
        try:
            produce(tmp)
        except NastyError:
            raise
        except Exception as e:
            if error is None:
                raise
            raise error(e) from None
        try:
            os.chmod(tmp, FILE_MODE)
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _replace(tmp, path)
        except OSError as e:
            raise _failed(path, e) from None
        _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            _unlink(tmp)


def _open_regular(path: Path, flags: int) -> int:
    """``os.open`` that refuses links (``O_NOFOLLOW``), FIFOs (``O_NONBLOCK`` while opening, so a FIFO
    without a reader cannot block) and anything else that is not a regular file."""
    check_target(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), FILE_MODE | 0o600)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise NastyError(f"refusing to write {path}: it is not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NastyError(f"refusing to write {path}: it is {_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def open_log(path: str | Path, initial: bytes = b"") -> IO[str]:
    """A text file to append lines to (``metrics.jsonl``): first replaced atomically by ``initial``
    (the history of a resumed run), then opened for appending without following a link."""
    path = Path(path)
    write_bytes(path, initial)
    try:
        return os.fdopen(_open_regular(path, os.O_WRONLY | os.O_APPEND), "a")
    except OSError as e:
        raise _failed(path, e) from None


def open_lock(path: str | Path) -> int:
    """The file descriptor of lock file ``path`` (created with its folder if missing; a link or special
    file is refused with a :class:`NastyError`; an ``OSError`` otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _open_regular(path, os.O_RDWR | os.O_CREAT)


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Copy the regular files under folder ``src`` into ``dst`` (merging, each file written as above);
    links and special files in ``src``, and this module's temporary files, are skipped."""
    src, dst = Path(src), Path(dst)
    for root, dirs, names in os.walk(src):
        rel = Path(root).relative_to(src)
        for n in names:
            p = Path(root) / n
            if is_temporary(p) or p.is_symlink() or not p.is_file():
                continue
            write_bytes(dst / rel / n, p.read_bytes())
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]


# -- folders replaced with --force: deleted only once the command succeeded

_ASIDE: list[tuple[Path, Path]] = []  # (original place, where the old folder waits)


def set_aside(path: str | Path) -> None:
    """Move folder ``path`` out of the way (a rename in its parent, no copy, no space needed); it is
    deleted by :func:`settle` when the command succeeds, put back when it fails."""
    path = Path(path)
    try:
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=ASIDE_PREFIX))
        os.replace(path, aside)  # replaces the new empty folder
    except OSError as e:
        raise NastyError(f"cannot clear output directory {path}: {e.strerror or e}") from None
    _ASIDE.append((path, aside))


_FRESH: list[tuple[Path, bool, frozenset]] = []  # (run folder, whether this command created it, what it may remove)


def track_fresh(path: str | Path, created: bool, removable: set[str]) -> None:
    """Run folder ``path`` was empty (``created``: made) for this command: if the command fails while the
    folder holds nothing but the files named in ``removable`` (its ``run.json``, its lock: refused before
    any work), :func:`settle` removes them (and the folder it made), so that the retry is not refused."""
    _FRESH.append((Path(path), created, frozenset(removable)))


def settle(ok: bool) -> list[Path]:
    """At the end of a command: delete the folders set aside (``ok``), or put them back in place of the
    failed command's folders; a failed command's fresh run folder that holds no work is emptied again
    (:func:`track_fresh`). Returns the folders put back."""
    while _FRESH:
        path, created, removable = _FRESH.pop()
        try:
            names = set(os.listdir(path)) if not ok and path.is_dir() and not path.is_symlink() else None
            if names is not None and names <= removable:
                for n in names:
                    os.unlink(path / n)  # never follows a link: unlinks the name itself
                if created:
                    os.rmdir(path)
        except OSError:
            pass
    restored = []
    while _ASIDE:
        path, aside = _ASIDE.pop()
        try:
            if ok:
                shutil.rmtree(aside)
            else:
                if os.path.lexists(path) and not path.is_symlink():
                    shutil.rmtree(path)
                os.replace(aside, path)
                restored.append(path)
        except OSError:
            pass
    return restored


atexit.register(settle, True)  # used as a library (no CLI to settle): the old behaviour, deleted at the latest at exit
