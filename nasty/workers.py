"""Independent trainings on several CPU cores: each task runs in a forked worker process with one
intra-op thread, and sends back bytes (a JSON header and safetensors weights, never a pickle) through
a pipe. ``jobs=1`` runs the tasks here, one after the other, also with one thread, so a result does
not depend on how many workers trained it (tests/test_workers.py checks it bit for bit).

Small students gain little from a second intra-op thread and much from a second process: on two
cores two students train in about the time of one (docs/results.md, the cost benchmark).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import sys
import traceback
from typing import Callable, Iterator, Sequence

import torch
from safetensors.torch import load as tensors_from_bytes, save as tensors_to_bytes  # bytes in memory, never a file

Task = Callable[[], tuple[dict, dict[str, torch.Tensor]]]  # -> (JSON-able header, tensors)


def default_jobs() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op thread (a student's numbers then do not depend on where it trained)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encode(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    h = json.dumps(header).encode()
    body = tensors_to_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}) if tensors else b""
    return len(h).to_bytes(8, "little") + h + body


def decode(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    return header, (tensors_from_bytes(body) if body else {})


def run_tasks(tasks: Sequence[Task], jobs: int = 1) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """Every task's ``(header, tensors)``, in order. With ``jobs > 1`` (and a platform that forks), up to
    ``jobs`` tasks run at once in forked workers; an exception in a task is raised here as
    ``RuntimeError`` with the worker's traceback (a task reports expected failures in its header)."""
    if jobs <= 1 or len(tasks) <= 1 or not hasattr(os, "fork"):
        out = []
        with one_thread():
            for t in tasks:
                out.append(decode(encode(*t())))  # the same round trip as a worker's: the same tensors either way
        return out
    results: list[bytes | None] = [None] * len(tasks)
    pending = list(range(len(tasks)))
    running: dict[int, tuple[int, int, bytearray]] = {}  # read fd -> (task index, pid, bytes so far)
    sel = selectors.DefaultSelector()
    errors: list[str] = []
    try:
        while pending or running:
            while pending and len(running) < jobs and not errors:
                i = pending.pop(0)
                r, w = os.pipe()
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:  # the worker: run the task, send its bytes, leave without running the parent's exit handlers
                    os.close(r)
                    code = 0
                    try:
                        torch.set_num_threads(1)
                        payload = b"\x00" + encode(*tasks[i]())
                    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises it
                        payload, code = b"\x01" + traceback.format_exc().encode(), 1
                    try:
                        view = memoryview(payload)
                        while view:
                            view = view[os.write(w, view):]
                        os.close(w)
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
                os.close(w)
                running[r] = (i, pid, bytearray())
                sel.register(r, selectors.EVENT_READ)
            if not running:
                break
            for key, _ in sel.select():
                fd = key.fd
                chunk = os.read(fd, 1 << 20)
                if chunk:
                    running[fd][2].extend(chunk)
                    continue
                sel.unregister(fd)
                os.close(fd)
                i, pid, buf = running.pop(fd)
                os.waitpid(pid, 0)
                if not buf or buf[:1] != b"\x00":
                    errors.append(bytes(buf[1:]).decode(errors="replace") or f"worker {pid} died without an answer")
                else:
                    results[i] = bytes(buf[1:])
            if errors and not running:
                break
    finally:
        for fd, (_, pid, _) in running.items():
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            with contextlib.suppress(OSError, KeyError, ValueError):
                sel.unregister(fd)
                os.close(fd)
        sel.close()
    if errors:
        raise RuntimeError(f"a worker failed:\n{errors[0]}")
    return [decode(b) for b in results]  # type: ignore[arg-type]
