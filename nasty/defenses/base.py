"""What every training-time defense shares: the :class:`Defense` base class and the defense registry."""

from __future__ import annotations

import sys
from typing import Any, Callable, ClassVar

from ..errors import NastyError
from ..params import Param
from ..registry import Registry

DEFENSES = Registry("defense")
PAPER_OMEGA = 0.04  # omega when none is given and none is chosen on validation (Ma et al. 2021, CIFAR-10)
register_defense = DEFENSES.register
list_defenses = DEFENSES.summaries
get_defense = DEFENSES.lookup


class Defense:
    """A training-time defense: validates its ``[defense]`` config and builds an objective.

    ``params`` declares the ``[defense]`` keys the class adds (inherited by subclasses): the config
    schema, the ``nasty train-defended`` options and the checks of their values come from it."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}

    @classmethod
    def declared(cls) -> dict[str, Param]:
        """Every parameter this defense reads: its own ``params`` and its base classes'."""
        out: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            out.update(vars(klass).get("params", {}))
        return out

    def __init__(self, cfg: dict[str, Any], data=None, *, reference_curve: list[float] | None = None,
                 log: Callable[[str], None] | None = None):
        """``cfg``: the ``[defense]`` table; ``data``: the dataset (its validation split); ``reference_curve``:
        the normal model's per-epoch validation accuracy, when known; ``log``: where progress goes (default stderr)."""
        if "omega" in cfg and cfg["omega"] is None:  # not chosen on validation: the paper's value
            cfg = {**cfg, "omega": PAPER_OMEGA}
        cfg = {**cfg, **{k: p.validate(f"defense.{k}", cfg[k]) for k, p in self.declared().items() if k in cfg}}
        check_defense_keys(type(self), cfg)
        self.cfg = cfg
        self.data = data
        self.reference_curve = reference_curve
        self.log = log
        self.validate()

    def validate(self) -> None:
        pass

    def objective(self, adversaries: list):
        raise NotImplementedError

    def train_config(self, tcfg):
        """Adjust the defended phase's :class:`TrainConfig` (e.g. gradient clipping); default unchanged."""
        return tcfg

    def finish(self, model) -> dict:
        """Called after training (e.g. to pick the epoch to keep); returns facts for ``result.json``."""
        return {}


def split_model_specs(text: str | None) -> list[str]:
    """``"cnn,mlp"`` -> ``["cnn", "mlp"]``; options stay with their model: ``"cnn:width=0.5,depth=2,mlp"``
    -> ``["cnn:width=0.5,depth=2", "mlp"]`` (a part holding ``=`` but no ``:`` belongs to the previous spec;
    commas inside brackets, ``mlp:hidden=[64,32]``, do not split)."""
    parts, depth, cur = [], 0, ""
    for ch in text or "":
        depth += ch in "[("
        depth -= ch in "])"
        if ch == "," and depth <= 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    specs: list[str] = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if "=" in part and ":" not in part and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def defense_params() -> dict[str, Param]:
    """The ``[defense]`` keys of every registered defense (a key declared by several is one declaration)."""
    out: dict[str, Param] = {}
    for cls in DEFENSES.values():
        for k, p in cls.declared().items():
            if out.setdefault(k, p) is not p:
                raise ValueError(f"defense parameter {k} is declared twice, differently ({cls.name})")
    return out


def check_defense_keys(cls: type[Defense], dcfg: dict[str, Any]) -> None:
    """A key that another defense reads but ``cls`` does not is refused when set (never silently ignored)."""
    mine = cls.declared()
    for key, p in defense_params().items():
        if key in mine or key not in dcfg or dcfg[key] == p.default:
            continue
        owners = [c.name for c in DEFENSES.values() if key in c.declared()]
        raise NastyError(f"defense {cls.name} does not use {key} (set to {dcfg[key]!r}); it belongs to --defense {' or '.join(owners)}")
