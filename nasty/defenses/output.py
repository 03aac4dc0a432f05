"""Output defenses: post-processors applied to a teacher's probabilities when it is queried.

In the style of the IBM Adversarial Robustness Toolbox's postprocessors: each maps a batch of
probability rows ``p`` (N, C) to perturbed rows, row by row (batch safe), and they compose left
to right. ``parse_output_defense("topk:2,round:3")`` builds a chain from a spec; every piece and
the chain have ``describe()``, a canonical spec that parses back to the same chain.

Spec: items separated by ``,``; each ``name`` or ``name:ARG:ARG`` with positional values or
``key=value`` (e.g. ``reverse-sigmoid:beta=1:gamma=0.2``, ``noise:0.05``).

- ``topk:k`` (alias ``stingy``), Ma et al. 2022 "Sparse Logits Suffice to Fail Knowledge
  Distillation": keep the k largest probabilities, zero the rest, renormalise (the softmax of the
  top-k logits with the others at -inf).
- ``round:decimals``: round to d decimals (ART ``Rounded``); the row's top class keeps at least
  ``10**-d`` more than any other class (so a row never becomes all zeros, and rounding never ties
  the top class with another).
- ``label``: class label only, the one-hot of *each row's own* argmax (ART ``ClassLabels``).
- ``reverse-sigmoid:beta:gamma`` (alias ``rsig``), Lee et al. 2018 "Defending Against NN Model
  Stealing Attacks Using Deceptive Perturbations", as in ART: ``r = beta * (s(gamma * logit(p)) - 1/2)``
  with ``logit(p) = log(p / (1 - p))`` (``p`` clipped to ``[1e-9, 1 - 1e-9]``),
  ``p' = clip(p - r, 0, 1)`` renormalised to sum 1.
- ``noise:scale:seed`` (alias ``gaussian``): add N(0, scale^2) noise, clip at 0, renormalise (ART
  ``GaussianNoise``); a seeded generator makes a run reproducible.
- ``cutoff:threshold`` (alias ``high-confidence``): zero every probability below the threshold (ART
  ``HighConfidence``), except the row's top class.
- ``template:top:decoy:shift``: the decision ``d`` mapped to one fixed soft vector per class: ``top`` on
  ``d``, ``decoy`` on class ``(d + shift) mod C`` and the rest spread evenly. It says nothing beyond
  the decision (a reference point: any attack on it is a label-only attack) and misleads plain KD.

A row that a perturbation would leave with no mass at all falls back to the one-hot of its
argmax.

After a decision-locked teacher (:class:`nasty.models.locked.LockedTeacher`, whose decision leads
by a real gap) only output defenses that keep each row's top class on top with a gap
(``keeps_decision``: ``topk``, ``round``, ``label``, ``cutoff``, and ``template`` when its ``top``
leads its other values by the gap for the number of classes) may follow; :func:`check_after_lock`
refuses the others by name (``reverse-sigmoid`` and ``noise`` can move the decision). :class:`DefendedModel` wraps any classifier so that its outputs are the defended
``log p`` (logits up to a constant, ``-inf`` for withheld classes): the public API.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NastyError
from ..models.locked import LockedTeacher
from ..models.served import MIN_GAP
from ..params import Param
from ..registry import Registry, with_defaults

OUTPUT_DEFENSES = Registry("output defense")
_ALIASES: dict[str, str] = {}


def register_output_defense(cls):
    OUTPUT_DEFENSES.register(cls)
    for a in cls.aliases:
        _ALIASES[a] = cls.name
    return cls


def _argmax_onehot(p: torch.Tensor) -> torch.Tensor:
    """One-hot of each row's own argmax (index per row)."""
    return F.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype)


def _renormalise(q: torch.Tensor, fallback_from: torch.Tensor) -> torch.Tensor:
    s = q.sum(dim=1, keepdim=True)
    empty = (s <= 0).squeeze(1)
    out = q / torch.where(s > 0, s, torch.ones_like(s))
    if empty.any():
        out[empty] = _argmax_onehot(fallback_from[empty])
    return out


class OutputDefense:
    """Base class: ``params`` declares the parameters (:class:`nasty.params.Param`) in positional order;
    ``apply`` does the work."""

    name: ClassVar[str]
    summary: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[dict[str, Param]] = {}
    keeps_decision: ClassVar[bool] = False  # keeps each row's top class on top, with a gap: may follow a locked teacher

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {k: p.default for k, p in cls.params.items()}

    def __init__(self, **kw: Any):
        self.p = with_defaults(f"output defense {self.name}", self.params, kw)
        self.validate()

    def validate(self) -> None:
        pass

    def apply(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decision_problem(self, num_classes: int) -> str | None:
        """Why this defense with these parameters cannot keep a decision on ``num_classes`` classes, or ``None``."""
        return None if self.keeps_decision else "it can move a locked teacher's decision"

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        if p.ndim != 2:
            raise NastyError(f"output defense {self.name} needs probabilities of shape (N, C), got {tuple(p.shape)}")
        return self.apply(p)

    def describe(self) -> str:
        return self.name + "".join(f":{k}={v}" for k, v in self.p.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


@register_output_defense
class TopK(OutputDefense):
    name = "topk"
    aliases = ("stingy",)
    summary = "stingy teacher (Ma et al. 2022): only the top-k classes, renormalised"
    keeps_decision = True
    params = {"k": Param("int", 2, "classes kept", lambda v: v >= 1, "a positive integer")}

    def apply(self, p):
        k = min(self.p["k"], p.shape[1])
        top = p.topk(k, dim=1)
        return _renormalise(torch.zeros_like(p).scatter_(1, top.indices, top.values), p)


@register_output_defense
class Round(OutputDefense):
    name = "round"
    summary = "round probabilities to d decimals (ART Rounded); the top class stays 10**-d above the others"
    params = {"decimals": Param("int", 3, "decimals kept", lambda v: 0 <= v <= 12, "an integer in 0..12")}
    keeps_decision = True

    def apply(self, p):
        scale = 10.0 ** self.p["decimals"]
        q = torch.round(p * scale) / scale
        top = p.argmax(dim=1, keepdim=True)
        others = q.scatter(1, top, float("-inf")).amax(1, keepdim=True)
        return q.scatter(1, top, torch.maximum(q.gather(1, top).clamp_min(1.0 / scale), others + 1.0 / scale))


@register_output_defense
class Label(OutputDefense):
    name = "label"
    aliases = ("labels", "argmax")
    summary = "class label only: one-hot of each row's argmax (ART ClassLabels)"
    keeps_decision = True

    def apply(self, p):
        return _argmax_onehot(p)


@register_output_defense
class ReverseSigmoid(OutputDefense):
    name = "reverse-sigmoid"
    aliases = ("rsig",)
    summary = "reverse sigmoid perturbation (Lee et al. 2018; ART ReverseSigmoid), beta, gamma"
    params = {"beta": Param("float", 1.0, "strength", lambda v: v > 0, "positive"),
              "gamma": Param("float", 0.1, "slope", lambda v: v > 0, "positive")}

    def apply(self, p):
        eps = 1e-9
        pc = p.clamp(eps, 1 - eps)
        r = self.p["beta"] * (torch.sigmoid(self.p["gamma"] * torch.log(pc / (1 - pc))) - 0.5)
        return _renormalise((p - r).clamp(0.0, 1.0), p)


@register_output_defense
class GaussianNoise(OutputDefense):
    name = "noise"
    aliases = ("gaussian",)
    summary = "Gaussian noise of std scale, clipped at 0 and renormalised (ART GaussianNoise)"
    params = {"scale": Param("float", 0.05, "noise std", lambda v: v >= 0, ">= 0"), "seed": Param("int", 0, "noise seed")}

    def validate(self):
        self.generator = torch.Generator().manual_seed(self.p["seed"])

    def apply(self, p):
        noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float64).to(p.dtype) * self.p["scale"]
        return _renormalise((p + noise.to(p.device)).clamp_min(0.0), p)


@register_output_defense
class HighConfidence(OutputDefense):
    name = "cutoff"
    aliases = ("high-confidence",)
    summary = "zero probabilities below a threshold, keeping the top class (ART HighConfidence)"
    keeps_decision = True
    params = {"threshold": Param("float", 0.25, "smallest probability kept", lambda v: 0 < v < 1, "in (0, 1)")}

    def apply(self, p):
        keep = (p >= self.p["threshold"]) | _argmax_onehot(p).bool()
        return torch.where(keep, p, torch.zeros_like(p))


@register_output_defense
class Template(OutputDefense):
    name = "template"
    summary = "the decision mapped to one fixed, misleading soft vector per class (leaks nothing beyond the decision)"
    params = {"top": Param("float", 0.5, "probability of the decided class"), "decoy": Param("float", 0.45, "probability of the decoy class"),
              "shift": Param("int", 1, "decoy = decided class + shift", lambda v: v >= 1, "a positive integer")}
    keeps_decision = True

    def decision_problem(self, num_classes: int) -> str | None:
        top, decoy = self.p["top"], self.p["decoy"]
        second = max(decoy, (1.0 - top - decoy) / (num_classes - 2)) if num_classes > 2 else 1.0 - top
        if top < second + MIN_GAP:
            return f"its top {top:g} does not lead its other values ({second:g}) by {MIN_GAP:g} on {num_classes} classes"
        return None

    def validate(self):
        top, decoy = self.p["top"], self.p["decoy"]
        if not (0 < decoy < top < 1 and top + decoy <= 1):
            raise NastyError(f"template needs 0 < decoy < top < 1 and top + decoy <= 1, got top={top!r}, decoy={decoy!r}")

    def apply(self, p):
        n, c = p.shape
        top, decoy = self.p["top"], self.p["decoy"]
        d = p.argmax(1, keepdim=True)
        decoy_class = (d + (self.p["shift"] % (c - 1) or 1)) % c
        rest = (1.0 - top - decoy) / (c - 2) if c > 2 else 0.0
        out = torch.full_like(p, rest)
        if c == 2:
            decoy = 1.0 - top
        return out.scatter(1, decoy_class, decoy).scatter(1, d, top)


class Compose:
    """Apply output defenses left to right."""

    def __init__(self, parts: list[Callable[[torch.Tensor], torch.Tensor]]):
        if not parts:
            raise NastyError("an output defense chain needs at least one part")
        self.parts = list(parts)

    @torch.no_grad()
    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            p = part(p)
        return p

    def describe(self) -> str:
        return ",".join(getattr(part, "describe", lambda: repr(part))() for part in self.parts)

    def __repr__(self) -> str:
        return f"Compose({self.describe()})"


def check_after_lock(chain: Compose | Callable[[torch.Tensor], torch.Tensor], num_classes: int) -> None:
    """Refuse (one line, exit 2) an output defense chain after a locked teacher when a part of it can move
    the decision: a part not declared ``keeps_decision`` (or not an output defense at all), or one
    whose parameters cannot keep a gap on ``num_classes`` classes. Named by its spec."""
    for part in getattr(chain, "parts", [chain]):
        name = getattr(part, "describe", lambda: repr(part))()
        problem = part.decision_problem(num_classes) if isinstance(part, OutputDefense) else "it is not a declared output defense"
        if problem:
            raise NastyError(f"output defense {name} can move a locked teacher's decision ({problem}); refused "
                             "(after a lock: topk, round, label, cutoff or template)")


def check_chain_for(model: nn.Module, chain: Compose | Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """:func:`check_after_lock` when ``model`` is a locked teacher; nothing for other models."""
    if chain is not None and isinstance(model, LockedTeacher):
        check_after_lock(chain, model.num_classes)


def _value(raw: str, default: Any, where: str) -> Any:
    try:
        if isinstance(default, bool):
            raise ValueError
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise NastyError(f"{where}: {raw!r} is not {'an integer' if isinstance(default, int) else 'a number'}") from None
    return raw


def make_output_defense(name: str, **params: Any) -> OutputDefense:
    return OUTPUT_DEFENSES.lookup(_ALIASES.get(name, name), also=_ALIASES)(**params)


def parse_output_defense(spec: str) -> Compose:
    """``"topk:2,round:3"`` -> a :class:`Compose` of ``TopK(k=2)`` then ``Round(decimals=3)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise NastyError("empty --output-defense spec (e.g. topk:2,round:3)")
    parts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise NastyError(f"empty item in --output-defense {spec!r}")
        name, *args = [a.strip() for a in item.split(":")]
        cls = OUTPUT_DEFENSES.get(_ALIASES.get(name, name))
        if cls is None:
            make_output_defense(name)  # raises the did-you-mean error
        names = list(cls.params)
        if len(args) > len(names):
            raise NastyError(f"output defense {cls.name} takes at most {len(names)} values ({', '.join(names) or 'none'}), got {item!r}")
        params: dict[str, Any] = {}
        for i, a in enumerate(args):
            key, eq, val = a.partition("=")
            if not eq:
                key, val = names[i], a
            elif key not in cls.params:
                make_output_defense(cls.name, **{key: None})  # raises the unknown-parameter error
            if key in params:
                raise NastyError(f"output defense {cls.name}: {key} given twice in {item!r}")
            params[key] = _value(val, cls.defaults()[key], f"output defense {cls.name} {key}")
        parts.append(cls(**params))
    return Compose(parts)


class DefendedModel(nn.Module):
    """Any classifier behind an output defense: ``forward`` returns the defended ``log p``.

    ``defense`` is a spec (``"topk:2,round:3"``) or any callable on probabilities. The result
    is logit-like (softmax gives back the defended probabilities; ``-inf`` marks withheld
    classes), so the wrapper drops in wherever a teacher model is expected.
    """

    def __init__(self, model: nn.Module, defense: str | Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.defense = parse_output_defense(defense) if isinstance(defense, str) else defense
        check_chain_for(model, self.defense)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.defense(F.softmax(self.model(x), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.probabilities(x).clamp_min(0))

    def describe(self) -> str:
        return getattr(self.defense, "describe", lambda: repr(self.defense))()
