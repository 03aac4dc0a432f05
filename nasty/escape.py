"""One escaping function per human-readable sink: :func:`term` (terminal, logs, stderr), :func:`md`
(Markdown: audit.md) and :func:`html` (HTML text and attribute values: audit.html).

Every string derived from data (class names, attack keys, student specs, paths, notes, reasons, anything
read from a checkpoint, a dataset folder or an audit.json) passes through the function of the sink it
is written to, at the place where it is formatted; static text does not need to. JSON output is not
escaped here: JSON is its own escaper and stays raw data.

- All three first make the string one visible line: control characters (C0, DEL, C1, so also the ANSI
  escape ``\\x1b`` and carriage return), Unicode line and paragraph separators, and invisible format
  characters (bidirectional overrides, zero-width) become visible escapes such as ``\\n``, ``\\x1b``,
  ``\\u2028``. The string then cannot end a line, a table row or a log line, move the cursor, colour the
  terminal or reorder what is shown.
- :func:`md` also makes every Markdown and HTML metacharacter literal: ``< > &`` as entities (no raw tag,
  no autolink), and a backslash before ``\\ ` * _ [ ] # | ~ !`` (no emphasis, code span, link, image,
  heading, table cell break or strikethrough).
- :func:`html` escapes ``& < > " '`` (text and quoted attribute values).
"""

from __future__ import annotations

import html as _html
import re
import unicodedata

__all__ = ["term", "md", "html", "one_line"]

_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~!])")


def _visible(ch: str) -> str:
    o = ord(ch)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000
                                                                   else f"\\U{o:08x}")


def _unsafe(ch: str) -> bool:
    # Cc: C0, DEL and C1 controls (newline, CR, ESC, NEL); Zl/Zp: U+2028/U+2029; Cf: bidi overrides, zero-width
    # characters; Cs: lone surrogates (not encodable)
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def one_line(s: object) -> str:
    """``str(s)`` with every control, line-breaking and invisible format character replaced by a visible escape."""
    s = str(s)
    if s.isprintable() and s.isascii():  # the common case, fast
        return s
    return "".join(_visible(c) if _unsafe(c) else c for c in s)


def term(s: object) -> str:
    """For the terminal, logs and stderr: one visible line, no control or ANSI sequence."""
    return one_line(s)


def md(s: object) -> str:
    """For Markdown (table cells, list items, headings): one line whose every character is literal text."""
    s = one_line(s)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", s)


def html(s: object) -> str:
    """For HTML text and quoted attribute values: one line, ``& < > " '`` as entities."""
    return _html.escape(one_line(s), quote=True)
