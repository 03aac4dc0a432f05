"""One registry type for everything looked up by name (models, attacks, defenses, output defenses).

A :class:`Registry` is a ``dict`` from name to object whose failed lookups raise a one-line
:class:`NastyError` with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

from .errors import NastyError


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, obj: Any, name: str | None = None) -> Any:
        """Add ``obj`` under ``name`` (default ``obj.name``); usable as a class decorator."""
        key = name or obj.name
        if key in self:
            raise ValueError(f"{self.kind} {key} registered twice")
        self[key] = obj
        return obj

    def lookup(self, name: str, also: Iterable[str] = ()) -> Any:
        """The object registered as ``name``; a one-line error with a suggestion otherwise."""
        if name not in self:
            close = difflib.get_close_matches(name, [*self, *also], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise NastyError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self))})")
        return self[name]

    def summaries(self) -> dict[str, str]:
        return {k: v.summary for k, v in sorted(self.items())}


def with_defaults(owner: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``given``; an unknown key is a one-line error naming ``owner``."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise NastyError(f"{owner} has no parameter {unknown[0]!r}{hint} (parameters: {', '.join(defaults) or 'none'})")
    for k, v in given.items():
        check_param(owner, k, v, defaults[k])
    return {**defaults, **given}


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_finite(a) for a in v)
    if isinstance(v, dict):
        return all(_finite(a) for a in v.values())
    return True


def check_param(owner: str, key: str, value: Any, default: Any) -> None:
    """A parameter has its default's kind (a number where the default is a number, and so on) and no
    NaN/inf anywhere: such a value would otherwise fail only after training, or not at all."""
    if not _finite(value):
        raise NastyError(f"{owner} parameter {key} must be finite, got {value!r}")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif number(default):
        ok, kind = number(value), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise NastyError(f"{owner} parameter {key} must be {kind}, got {value!r}")
