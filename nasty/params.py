"""One declaration per parameter: :class:`Param` holds a knob's type, default, allowed values and help.

The config schema (:mod:`nasty.config`), the validation of configs and of a defense's or an attack's
parameters, their error messages, and the command-line options are all generated from these
declarations (:func:`click_option`), so adding a knob is one edit in one file: the defense's or
attack's ``params``, or the schema's section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import click

from .errors import NastyError

KINDS = ("int", "float", "str", "bool", "list[int]", "list[float]", "list[str]", "train", "table", "any")

# Every number a parameter takes is bounded before anything runs: by the declaration's own ``lo``/``hi``
# or else by these, so that no value (1e308, -1e308) can start a training that overflows later.
FLOAT_LIMIT = 1e6
INT_LIMIT = 10**9


@dataclass(frozen=True)
class Param:
    """A parameter. ``kind``: one of :data:`KINDS`, with a ``?`` suffix when it may be empty (``None``);
    ``check``/``expect``: a range check and its wording (``"positive"``); ``choices``: the allowed strings;
    ``flag``: the CLI flag (default ``--key-with-dashes``; ``""``: none); ``repeat``: a list option is
    given by repeating the flag instead of comma-separated; ``metavar``: the CLI placeholder;
    ``lo``/``hi``: the smallest and largest number allowed (of each item of a list), inclusive; by
    default +-:data:`FLOAT_LIMIT` for floats, +-:data:`INT_LIMIT` for integers (see :func:`check_bounds`)."""

    kind: str
    default: Any = None
    help: str = ""
    check: Callable[[Any], bool] | None = None
    expect: str = ""
    choices: tuple[str, ...] = ()
    flag: str | None = None
    repeat: bool = False
    metavar: str | None = None
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if self.kind.rstrip("?") not in KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}")

    @property
    def nullable(self) -> bool:
        return self.kind.endswith("?")

    def validate(self, where: str, value: Any) -> Any:
        """``value`` converted to this kind (an int where a float is declared becomes a float) and
        checked; a one-line :class:`NastyError` naming ``where`` otherwise."""
        value = convert(where, self.kind, value)
        if value is None:
            return None
        check_bounds(where, value, self.lo, self.hi)
        if self.choices and value not in self.choices:
            raise NastyError(f"{where} must be {_either(self.choices)}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise NastyError(f"{where} must be {self.expect}, got {value!r}")
        return value

    def flag_name(self, key: str) -> str:
        return self.flag if self.flag is not None else "--" + key.replace("_", "-")


def check_bounds(where: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    """Every number in ``value`` (a number, or a list of them) within ``[lo, hi]`` (default: the kind's
    limit, :data:`FLOAT_LIMIT` or :data:`INT_LIMIT`); a one-line :class:`NastyError` otherwise. The
    one bound check of parameters: declarations (:meth:`Param.validate`) and plain defaults
    (:func:`nasty.registry.check_param`)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        limit = INT_LIMIT if isinstance(v, int) else FLOAT_LIMIT
        low, high = (-limit if lo is None else lo), (limit if hi is None else hi)
        name = f"{where}[{i}]" if isinstance(value, (list, tuple)) else where
        if not math.isfinite(v):
            raise NastyError(f"{name} must be a finite number, got {v!r}")
        if v > high:
            raise NastyError(f"{name} must be at most {high:g}, got {v:g}")
        if v < low:
            raise NastyError(f"{name} must be at least {low:g}, got {v:g}")


def _either(options: tuple[str, ...]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def convert(where: str, kind: str, value: Any) -> Any:
    """Type-check ``value`` against ``kind`` (see :class:`Param`); finite numbers only."""
    base = kind.rstrip("?")
    if value is None:
        if kind.endswith("?"):
            return None
        raise NastyError(f"{where} must not be empty")
    if base == "any":
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise NastyError(f"{where} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NastyError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML allows nan and inf
            raise NastyError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise NastyError(f"{where} must be a string, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise NastyError(f"{where} must be true or false, got {value!r}")
        return value
    if base.startswith("list["):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise NastyError(f"{where} must be a list, got {value!r}")
        items = [convert(f"{where}[{i}]", base[5:-1], v) for i, v in enumerate(value)]
        for i, v in enumerate(items):
            if isinstance(v, str) and not v.strip():
                raise NastyError(f"{where}[{i}] is empty")
        return items
    if not isinstance(value, dict):  # train, table
        raise NastyError(f"{where} must be a table")
    return value


def _comma_list(param: Param, flag: str, text: str | None) -> list | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if "" in parts:
        raise NastyError(f"{flag}: empty item in {text!r} (give comma-separated values, none empty)")
    if param.kind.startswith("list[float]"):
        out = []
        for part in parts:
            try:
                v = float(part)
            except ValueError:
                raise NastyError(f"{flag}: {part!r} is not a number") from None
            if not math.isfinite(v):
                raise NastyError(f"{flag}: {part!r} is not a finite number")
            out.append(v)
        return out
    if param.kind.startswith("list[int]"):
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise NastyError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    return parts


def click_option(key: str, param: Param, dest: str | None = None) -> Callable:
    """The click option of ``param`` (unset by default, so the config file's value or the declared
    default applies); list values are comma-separated unless ``repeat``. Values are checked by the
    declaration when the config is built (:func:`nasty.cli` calls :meth:`Param.validate` with the flag)."""
    flag = param.flag_name(key)
    base = param.kind.rstrip("?")
    kw: dict[str, Any] = {"help": param.help + _default_text(param), "default": None}
    if param.metavar:
        kw["metavar"] = param.metavar
    if base == "bool" and param.default is True:  # on by default: --x/--no-x
        return click.option(f"{flag}/--no-{flag[2:]}", dest or key, help=param.help + _default_text(param), default=None)
    if base == "bool":
        kw.update(is_flag=True)
    elif base == "int":
        kw["type"] = int
    elif base == "float":
        kw["type"] = float
    elif base.startswith("list[") and param.repeat:
        kw.update(multiple=True, default=())
    elif param.choices:  # checked by the declaration (one message for the CLI, config files and Python)
        kw.setdefault("metavar", "[" + "|".join(param.choices) + "]")
    return click.option(flag, dest or key, **kw)


def _default_text(param: Param) -> str:
    """``"  [default: 5]"`` for the help text (nothing for an empty or false default)."""
    d = param.default
    if d is None or d is False or d == [] or d == {}:
        return ""
    text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in d) if isinstance(d, list) else \
        ("yes" if d is True else f"{d:g}" if isinstance(d, float) else str(d))
    return f"  [default: {text}]"


def option_value(key: str, param: Param, value: Any) -> Any:
    """What the CLI gave for ``param`` as a config value (``None``: not given)."""
    base = param.kind.rstrip("?")
    if base.startswith("list["):
        if param.repeat:
            return list(value) or None
        return _comma_list(param, param.flag_name(key), value)
    return value
