"""Every human-readable output is escaped for its format (issue 22, class 1): one function per sink in
nasty/escape.py, property-tested on hostile strings, and end to end: an image folder whose class folders
are named like HTML and Markdown, trained, audited and evaluated; a crafted audit.json re-rendered."""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nasty import escape as esc

HOSTILE_PIECES = ["\n", "\r", "\r\n", "|", "`", "```", "<", ">", "&", "[", "]", "](javascript:alert(1))", "#", "# ", "\n# H",
                  "\x1b[31m", "\x1b]0;title\x07", "\x00", "\x7f", "\x85", "\x0b", "\x0c", "\u2028", "\u2029", "\u202e", "\u200b",
                  "*", "_", "~~", "!", "\\", "<script>", "<img src=x onerror=alert(1)>", "&lt;", "javascript:", "\t", "'", '"',
                  "\ud800"]
hostile = st.lists(st.one_of(st.sampled_from(HOSTILE_PIECES), st.text(max_size=4)), max_size=12).map("".join)

BAD_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")


def _no_control(out: str) -> None:
    assert len(out.splitlines()) <= 1, out
    assert not any(unicodedata.category(c) in BAD_CATEGORIES for c in out), out
    assert "\x1b" not in out


def _unescaped(out: str, ch: str) -> list[int]:
    """Positions of ``ch`` in Markdown ``out`` not preceded by an odd number of backslashes."""
    bad = []
    for m in re.finditer(re.escape(ch), out):
        k, i = 0, m.start() - 1
        while i >= 0 and out[i] == "\\":
            k, i = k + 1, i - 1
        if k % 2 == 0:
            bad.append(m.start())
    return bad


@settings(max_examples=400, deadline=None)
@given(hostile)
def test_terminal_sink(s):
    out = esc.term(s)
    _no_control(out)
    assert esc.term(out) == out  # idempotent: escaping twice shows the same text
    if s.isprintable() and s.isascii():
        assert out == s  # ordinary names are untouched


@settings(max_examples=400, deadline=None)
@given(hostile)
def test_markdown_sink(s):
    out = esc.md(s)
    _no_control(out)
    assert "<" not in out and ">" not in out  # no raw tag, no autolink
    for ch in "|`*_[]#~!":  # no cell break, code span, emphasis, link or image, heading, strikethrough
        assert not _unescaped(out, ch), (s, out, ch)
    assert not re.search(r"&(?!amp;|lt;|gt;)", out)  # every & starts one of our entities
    row = f"| {out} | x |"  # the string stays one cell of one row
    assert len(_unescaped(row, "|")) == 3 and len(row.splitlines()) == 1


@settings(max_examples=400, deadline=None)
@given(hostile)
def test_html_sink(s):
    out = esc.html(s)
    _no_control(out)
    assert not set("<>\"'") & set(out)
    assert not re.search(r"&(?!amp;|lt;|gt;|quot;|#x27;)", out)


# ---------------------------------------------------------------------------------------------- end to end

IMG = "<img src=x onerror=alert(1)>"
FORGED = "c2\n# Forged heading"
ANSI = "c3\x1b[31m\rerror: forged"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """An image folder whose class folders carry HTML, a newline + heading, and an ANSI escape + CR; a tiny
    teacher trained on it and a one-seed audit of it (the real path from folder names to the reports)."""
    from PIL import Image

    from nasty.cli import main

    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 6)):
        for k, c in enumerate((IMG, FORGED, ANSI)):
            (root / "ds" / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (8, 8)) + 60 * k
                Image.fromarray(img.astype(np.uint8), "L").save(root / "ds" / split / c / f"{i}.png")
    ds = f"imagefolder:{root / 'ds'}"
    assert main(["train-teacher", "--dataset", ds, "--model", "mlp", "--epochs", "2", "--out", str(root / "t")]) == 0
    rc = main(["audit", str(root / "t"), "--attacks", "kd", "--students", "mlp", "--seeds", "1", "--epochs", "1",
               "--batch-size", "64", "--out", str(root / "a")])
    assert rc == 0
    return root


def _check_markdown(md: str, allowed_headings: int | None = None) -> None:
    assert "<" not in md and "\x1b" not in md and "\r" not in md and "\u2028" not in md
    assert not re.search(r"(?<!\\)\]\(", md)  # no inline link
    for line in md.splitlines():  # no forged heading or line: the hostile text stays inside its own line
        assert not line.startswith(("# Forged", "## forged", "# wiped", "error:", "| forged")), line
        assert "Forged" not in line or not line.startswith("#") or "\\# Forged" in line, line
    tables = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert tables
    # every table row has as many unescaped pipes as its header
    block: list[str] = []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            block.append(ln)
        elif block:
            n = len(_unescaped(block[0], "|"))
            assert all(len(_unescaped(r, "|")) == n for r in block), block
            block = []


def _check_html(html: str) -> None:
    body = html.split("<body>", 1)[1]
    assert "<img src=x" not in body and "<script" not in body and "<a " not in body and "href" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body and "\x1b" not in body and "\r" not in body


def test_hostile_class_folders_trained_and_audited(hostile_run):
    a = json.loads((hostile_run / "a" / "audit.json").read_text())
    assert a["dataset"]["classes"] == sorted([IMG, FORGED, ANSI])  # JSON keeps the raw data
    md = (hostile_run / "a" / "audit.md").read_text()
    _check_markdown(md)
    assert "&lt;img src=x onerror=alert(1)&gt;" in md and "c2\\\\n\\# Forged heading" in md  # renders as c2\\n# Forged heading
    _check_html((hostile_run / "a" / "audit.html").read_text())


def test_eval_prints_one_line_per_class(hostile_run, run_cli):
    rc, out, err = run_cli("eval", hostile_run / "t")
    assert rc == 0, err
    lines = out.splitlines()
    C = 3
    assert len(lines) == 1 + C + 1 + C, lines  # header, one line per class, matrix title, one row per class
    assert not any(ln.startswith(("error", "#")) for ln in lines) and "\x1b" not in out and "\r" not in out
    assert any("c2\\n# Forged heading" in ln for ln in lines[1:1 + C])


def test_hostile_audit_json_renders_escaped(hostile_run, run_cli, tmp_path):
    """Attack keys, students, notes, paths, reasons and problems of a crafted audit.json, through `nasty report`."""
    a = json.loads((hostile_run / "a" / "audit.json").read_text())
    bad_attack = "kd|<script>alert(1)</script>\r\n## forged"
    bad_student = "mlp\n| forged | row |"
    att = a["targets"]["teacher"]["attacks"].pop("kd")
    att["students"] = {bad_student: att["students"]["mlp"]}
    att["threshold"] += " [x](javascript:alert(1))"
    a["targets"]["teacher"]["attacks"][bad_attack] = att
    a["targets"]["teacher"]["attacks"]["skipped`<b>"] = {**att, "status": "skipped", "reason": "\x1b[2J\u2028# wiped",
                                                           "transferred_classes": [], "transferred_count": 0}
    a["notes"].append("[click](javascript:alert(1))\u2029# Forged note")
    a["config"]["teacher"] = "/tmp/`x`\x1b[31m<svg onload=alert(1)>"
    a["config"]["students"] = [bad_student]
    a["status"], a["problems"] = "incomplete", ["run failed\nerror: forged"]
    a["method"]["<i>x</i>"] = "line1\n# Forged method"
    a["gate"] = {"fail_on": 0, "failed": True, "failing_attacks": [bad_attack]}
    f = tmp_path / "audit.json"
    f.write_text(json.dumps(a))
    rc, out, err = run_cli("report", f)
    assert rc == 0, err
    md = (tmp_path / "audit.md").read_text()
    _check_markdown(md)
    assert "kd\\|&lt;script&gt;" in md and "\\[click\\]" in md
    _check_html((tmp_path / "audit.html").read_text())
    html = (tmp_path / "audit.html").read_text()
    assert "<svg" not in html and "<i>x</i>" not in html
    # the terminal table: one line per row, nothing forged
    assert "\x1b" not in out and "\r" not in out and "\u2028" not in out
    assert not any(ln.startswith(("error", "#", "|")) for ln in out.splitlines()), out
