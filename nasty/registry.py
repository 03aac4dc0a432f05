"""One registry type for everything looked up by name (models, attacks, defenses, output defenses).

A :class:`Registry` is a ``dict`` from name to object whose failed lookups raise a one-line
:class:`NastyError` with a "did you mean" hint.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import difflib
import math
import re
from typing import Any, Iterable

from .errors import NastyError
from .params import Param, check_bounds


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``options`` to ``name``, or ``""``: the one hint of every error."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


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
            raise NastyError(f"unknown {self.kind} {name!r}{did_you_mean(name, [*self, *also])} (known: {', '.join(sorted(self))})")
        return self[name]

    def summaries(self) -> dict[str, str]:
        return {k: v.summary for k, v in sorted(self.items())}


def with_defaults(owner: str, declared: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The declared defaults updated with ``given``; an unknown key is a one-line error naming ``owner``.
    ``declared`` maps a name to its default, or to a :class:`nasty.params.Param` that also checks its value."""
    defaults = {k: d.default if isinstance(d, Param) else d for k, d in declared.items()}
    given = {k: declared[k].validate(f"{owner} {k}", v) if isinstance(declared.get(k), Param) else v for k, v in given.items()}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise NastyError(f"{owner} has no parameter {unknown[0]!r}{did_you_mean(unknown[0], defaults)} "
                         f"(parameters: {', '.join(defaults) or 'none'})")
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
    check_bounds(f"{owner} parameter {key}", value)
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


def slug(text: str, empty: str = "x") -> str:
    """A name safe in a file path: ``"cnn:width=0.25"`` -> ``"cnn-width-0.25"`` (``empty`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or empty


def parse_value(owner: str, key: str, text: str) -> Any:
    """The value of a ``KEY=VALUE`` option: a Python literal (number, string, list ...) or else the text
    itself; NaN/inf anywhere in it is refused (the owner's declaration checks the rest)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    check_param(owner, key, value, None)
    return value


def parse_assignment(item: str, flag: str, example: str = "KEY=VALUE") -> tuple[str, Any]:
    """``"temperature=8"`` -> ``("temperature", 8)``; a one-line error naming ``flag`` otherwise."""
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise NastyError(f"{flag} {item!r} is not {example}")
    return key.strip(), parse_value(flag, key.strip(), text)


def import_all(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (by name; ``_private`` ones excepted) so that their
    ``@register_...`` decorators run: adding a model, attack or defense is one new file."""
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
