"""Issue 22, class 2: no write follows a link or replaces a non-regular file, and every file nasty
writes goes through ``nasty/safe_io.py`` (checked on the source, so a new writer elsewhere fails here)."""

from __future__ import annotations

import ast
import errno
import json
import os
import stat
from pathlib import Path

import pytest

import nasty
from nasty import safe_io
from nasty.errors import NastyError

ROOT = Path(nasty.__file__).parent

# -- the source: no module but safe_io writes, renames, copies or deletes files

BANNED_ATTRS = {"write_text", "write_bytes", "save", "savez", "savez_compressed", "savetxt", "tofile", "unlink",
                "mkstemp", "mkdtemp", "NamedTemporaryFile", "rename", "symlink_to", "hardlink_to", "touch"}
BANNED_MODULE_CALLS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "remove"), ("os", "unlink"),
                       ("os", "link"), ("os", "symlink"), ("os", "truncate"), ("os", "mknod"), ("os", "mkfifo"),
                       ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "copytree"),
                       ("shutil", "move"), ("shutil", "rmtree"), ("shutil", "copyfileobj"), ("onnx", "export"),
                       ("onnx", "save"), ("np", "save"), ("numpy", "save"), ("torch", "save")}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
# Functions that write only the temporary file nasty.safe_io.write_with hands them (it checks the target,
# syncs and renames): the exporters of torch, which want a file name.
ALLOWED = {("export.py", "_export_onnx"), ("export.py", "_export_torchscript")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _mode(call: ast.Call, position: int) -> str | None:
    """The mode argument of an ``open`` call: its text, ``"?"`` when not a constant, None when absent."""
    node = call.args[position] if len(call.args) > position else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if node is None:
        return None
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "?"


def writers(source: str) -> list[tuple[str, int, str]]:
    """(function, line, call) of every call in ``source`` that writes, renames or deletes a file."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Call):
                f, text = child.func, _dotted(child.func)
                bad = False
                if isinstance(f, ast.Name) and f.id == "open":
                    mode = _mode(child, 1)
                    bad = mode is not None and (mode == "?" or any(c in mode for c in "wax+"))
                elif isinstance(f, ast.Attribute):
                    base = _dotted(f.value).split(".")[-1]
                    if f.attr == "open" and base == "os":
                        flags = ast.dump(child.args[1]) if len(child.args) > 1 else ""
                        bad = any(fl in flags for fl in WRITE_FLAGS) and _dotted(child.args[0]) != "os.devnull"
                    elif f.attr == "open":  # Path.open(mode), ZipFile.open(name, mode), gzip.open(name, mode)
                        modes = [_mode(child, i) for i in (0, 1)]
                        bad = any(m and m != "?" and set(m) <= set("rwabxt+") and set(m) & set("wax+") for m in modes)
                    else:
                        bad = f.attr in BANNED_ATTRS or (base, f.attr) in BANNED_MODULE_CALLS
                if bad:
                    found.append((func, child.lineno, text))
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def test_every_write_goes_through_safe_io():
    """The invariant cannot regress silently: a module that opens a file for writing, saves, copies,
    renames or deletes one by itself fails here (seen failing on the former ``open(..., "w")`` of
    ``metrics.jsonl`` in train.py and the ``shutil.copytree`` of audit/execute.py)."""
    offenders = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT).as_posix()
        if rel == "safe_io.py":
            continue
        for func, line, call in writers(p.read_text()):
            if (rel, func) not in ALLOWED:
                offenders.append(f"nasty/{rel}:{line} {call} (in {func or 'module level'})")
    assert not offenders, "write through nasty.safe_io instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize("code", [
    "open(p, 'w')", "open(p, mode='a')", "open(p, m)", "Path(p).open('wb')", "p.write_text('x')", "p.write_bytes(b'')",
    "torch.save(x, p)", "np.save(p, a)", "shutil.copy(a, b)", "shutil.copytree(a, b)", "shutil.rmtree(a)",
    "os.replace(a, b)", "os.open(p, os.O_WRONLY | os.O_CREAT)", "torch.onnx.export(m, x, p)", "traced.save(p)",
    "p.unlink()", "tempfile.mkstemp()", "os.remove(p)",
])
def test_the_scan_sees_each_kind_of_writer(code):
    assert writers(f"def f():\n    {code}\n"), code


@pytest.mark.parametrize("code", ["open(p)", "open(p, 'rb')", "zf.open(info)", "Image.open(f)", "s.replace('a', 'b')",
                                  "os.open(p, os.O_RDONLY)", "os.open(os.devnull, os.O_WRONLY)", "d.copy()"])
def test_the_scan_lets_readers_be(code):
    assert not writers(f"def f():\n    {code}\n"), code


# -- every writer of safe_io, over every kind of target that is not a regular file

VICTIM = b"precious\n"


def _plant(kind: str, target: Path, victim: Path) -> None:
    if kind == "symlink":
        target.symlink_to(victim)
    elif kind == "dangling symlink":
        target.symlink_to(victim.parent / "nowhere")
    elif kind == "symlink to a directory":
        target.symlink_to(victim.parent)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device":
        os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of its own


KINDS = ["symlink", "dangling symlink", "symlink to a directory", "fifo", "directory"] + (["device"] if os.geteuid() == 0 else [])
WRITERS = {
    "write_bytes": lambda p: safe_io.write_bytes(p, b"new"),
    "write_json": lambda p: safe_io.write_json(p, {"a": 1}),
    "write_files": lambda p: safe_io.write_files([(p.parent / "other.json", b"1"), (p, b"2")]),
    "write_with": lambda p: safe_io.write_with(p, lambda tmp: Path(tmp).write_bytes(b"new")),
    "open_log": lambda p: safe_io.open_log(p, b"row\n").close(),
    "open_lock": lambda p: os.close(safe_io.open_lock(p)),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("kind", KINDS)
def test_no_writer_follows_a_link_or_replaces_a_special_file(tmp_path, writer, kind):
    """Seen failing with the ``check_target`` calls removed (the link was replaced, the victim kept only
    by the rename; with ``O_NOFOLLOW`` removed from the log's open, the victim was appended to)."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "metrics.jsonl"
    _plant(kind, target, victim)
    before = os.lstat(target)
    with pytest.raises(NastyError) as e:
        WRITERS[writer](target)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and "not a regular file" in msg
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert victim.read_bytes() == VICTIM
    assert not [p.name for p in folder.iterdir() if p.name != "metrics.jsonl"]  # nothing staged is left behind


def test_a_link_planted_between_the_check_and_the_append_is_refused(tmp_path, monkeypatch):
    """The append itself opens with O_NOFOLLOW: a link swapped in after the check is not followed."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    target = tmp_path / "metrics.jsonl"
    real = safe_io.check_target
    monkeypatch.setattr(safe_io, "write_bytes", lambda p, data: (Path(p).unlink(missing_ok=True), Path(p).symlink_to(victim)))
    monkeypatch.setattr(safe_io, "check_target", lambda p: None)
    with pytest.raises(NastyError):
        safe_io.open_log(target, b"")
    monkeypatch.setattr(safe_io, "check_target", real)
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("writer", ["write_bytes", "write_with", "open_log"])
def test_a_legal_255_byte_name_can_be_written(tmp_path, writer):
    """The temporary name is short (``.nasty-tmp-XXXXXXXX.tmp``), not derived from the target's."""
    target = tmp_path / ("n" * 255)
    WRITERS[writer](target)
    assert target.is_file() and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_regular_files_are_replaced_and_failures_keep_them(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    safe_io.write_json(target, [1])
    assert json.loads(target.read_text()) == [1]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(safe_io.WriteFailed) as e:
        safe_io.write_bytes(target, b"new")
    assert e.value.exit_code == 3 and json.loads(target.read_text()) == [1] and os.listdir(tmp_path) == ["a.json"]


def test_only_its_own_temporaries_are_removed(tmp_path):
    keep = [tmp_path / ".notes.tmp", tmp_path / "x.tmp", tmp_path / ".nasty-tmp-dir"]
    for p in keep[:2]:
        p.write_text("mine")
    keep[2].mkdir()
    (tmp_path / ".nasty-tmp-abc123.tmp").write_text("leftover")
    (tmp_path / ".nasty-tmp-link.tmp").symlink_to(keep[0])
    safe_io.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(p.name for p in keep), ".nasty-tmp-link.tmp"])
    assert keep[0].read_text() == "mine"


# -- the commands

FAST = ["--model", "mlp:hidden=4", "--epochs", "1", "--batch-size", "256"]


def one_error(err: str) -> str:
    """The error line of a refused command (progress lines may precede it; no traceback)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def test_resume_refuses_a_link_planted_at_metrics_jsonl(run_cli, tmp_path):
    """Was exit 0 with the link's target truncated and overwritten (``open(..., "w")`` in train.py)."""
    out = tmp_path / "run"
    assert run_cli("train-teacher", "--out", out, *FAST)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    (out / "result.json").unlink()
    rc, o, err = run_cli("train-teacher", "--out", out, "--resume", *FAST)
    assert rc == 2 and "not a regular file" in one_error(err), err
    assert victim.read_bytes() == VICTIM and (out / "metrics.jsonl").is_symlink()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from nasty.cli import main

    out = tmp_path_factory.mktemp("safe_io") / "teacher"
    assert main(["train-teacher", "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "directory"])
def test_export_refuses_a_special_out_even_with_force(run_cli, teacher, tmp_path, kind):
    """Was: a character device replaced by a regular file with ``--force``."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    target = tmp_path / "model.pt"
    _plant(kind, target, victim)
    before = os.lstat(target)
    rc, o, err = run_cli("export", teacher, "--format", "torchscript", "--out", target, "--force")
    line = one_error(err)
    assert rc == 2 and ("not a regular file" in line or "is a directory" in line), err
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
    assert victim.read_bytes() == VICTIM


def test_export_writes_a_255_byte_name(run_cli, teacher, tmp_path):
    target = tmp_path / ("m" * 252 + ".pt")
    rc, o, err = run_cli("export", teacher, "--format", "torchscript", "--out", target)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_force_keeps_the_old_run_until_the_new_one_exists(run_cli, tmp_path, monkeypatch):
    """``--force`` over a good run on a full disk: the old run was deleted before the new one existed.
    Now it is set aside, deleted only after success and put back after a failure."""
    out = tmp_path / "run"
    assert run_cli("train-teacher", "--out", out, *FAST)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real = safe_io._stage

    def disk_full(path, data):
        if Path(path).name == "model.safetensors":
            raise safe_io.WriteFailed(f"cannot write {path}: No space left on device; the previous file is unchanged", errno.ENOSPC)
        return real(path, data)

    monkeypatch.setattr(safe_io, "_stage", disk_full)
    rc, o, err = run_cli("train-teacher", "--out", out, "--force", *FAST)
    assert rc == 3 and "No space left" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing set aside is left over
    monkeypatch.undo()
    assert run_cli("train-teacher", "--out", out, "--force", "--seed", "1", *FAST)[0] == 0
    assert json.loads((out / "run.json").read_text())["config"]["train"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- issue 22, class 7: operating-system limits on the paths given are bad input (exit 2, one line)

def _long_paths(tmp_path: Path) -> dict[str, Path]:
    return {"300-character name": tmp_path / ("n" * 300),
            "5000-character path": tmp_path.joinpath(*["d" * 200] * 25),
            "file as a folder": tmp_path / "victim.txt" / "out"}


@pytest.mark.parametrize("which", ["300-character name", "5000-character path", "file as a folder"])
@pytest.mark.parametrize("command", ["train-teacher", "export", "audit"])
def test_os_limits_on_out_are_bad_input(run_cli, teacher, tmp_path, command, which):
    """Were exit 3 (an internal error); seen failing again with the OSError mapping of nasty.cli.main removed."""
    (tmp_path / "victim.txt").write_bytes(VICTIM)
    out = _long_paths(tmp_path)[which]
    args = {"train-teacher": ["train-teacher", *FAST], "export": ["export", teacher, "--format", "torchscript"],
            "audit": ["audit", teacher, "--attacks", "kd", "--seeds", "1", "--epochs", "1", "--students", "mlp:hidden=4"]}[command]
    rc, o, err = run_cli(*args, "--out", out)
    line = one_error(err)
    assert rc == 2 and len(line) < 400, err
    assert any(s in line for s in ("too long", "Not a directory", "not a directory", "File exists")), line
    assert (tmp_path / "victim.txt").read_bytes() == VICTIM


@pytest.mark.parametrize("err,code", [(errno.ENAMETOOLONG, 2), (errno.EACCES, 2), (errno.EROFS, 2), (errno.ENOTDIR, 2),
                                      (errno.ENOSPC, 3), (errno.EIO, 3)])
def test_write_failures_take_their_exit_code_from_the_cause(tmp_path, monkeypatch, err, code):
    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    import tempfile
    monkeypatch.setattr(tempfile, "mkstemp", fail)
    with pytest.raises(safe_io.WriteFailed) as e:
        safe_io.write_bytes(tmp_path / "x", b"1")
    assert e.value.exit_code == code and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["train-teacher", "audit"])
def test_a_legal_255_byte_out_folder_works(run_cli, teacher, tmp_path, command):
    """The audit's lock file beside its folder was ``.NAME.nasty.lock``: over NAME_MAX for a 255-byte name."""
    out = tmp_path / ("o" * 255)
    args = {"train-teacher": ["train-teacher", *FAST],
            "audit": ["audit", teacher, "--attacks", "kd", "--seeds", "2", "--epochs", "1", "--students", "mlp:hidden=4"]}[command]
    rc, o, err = run_cli(*args, "--out", out)
    assert rc in (0, 1), err
    assert out.is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(safe_io.TMP_PREFIX)]
