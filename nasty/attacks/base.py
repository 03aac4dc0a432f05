"""What every attack shares: the teacher's query interface (``Oracle``), the attacker's resources,
and the ``Attack`` base class that declares what an attack needs and trains a student.

Threat model: an attack states which teacher *access* it can work with (``logits``, ``probs``,
``topk:K``, ``label``, ``weights``) and whether it needs ground-truth labels. ``run_attack``
refuses to run it otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataBundle, load_dataset
from ..errors import NastyError
from ..params import Param
from ..registry import Registry, with_defaults
from ..frozen import Frozen
from ..models import create_model
from ..resume import Checkpointing
from ..metrics import predict_logits
from ..train import Member, TrainConfig, fit, fit_group, seed_everything
from ..errors import TrainingDiverged
from .augment import Mixer

ACCESS_LEVELS = ("weights", "logits", "probs", "topk", "label")  # most to least revealing

EXPLODE = 10.0  # an attack's student whose epoch loss exceeds 10x its first epoch's has diverged: failed, never scored
TUNE_ALPHAS = (0.3, 0.6, 0.9)  # with alpha 0 (labels only): the honest thief's grid, chosen on its validation split
TUNE_TEMPERATURES = (1.0, 4.0, 10.0)
TUNE = Param("bool", False, "Tune the attack's settings and the epoch on the thief's own validation split, every candidate in "
             "one pass over the data (soft-output attacks: alpha 0, 0.3, 0.6, 0.9 (0 = labels only) x temperature 1, 4, 10; "
             "hard-label: label smoothing 0, 0.1, 0.3; confidence-label: its confidence use x exponent; confidence-curriculum: "
             "its schedule x label smoothing); the audit and the "
             "probe always tune.")

ATTACKS = Registry("attack")
register_attack = ATTACKS.register
get_attack = ATTACKS.lookup


def parse_access(query: str) -> tuple[str, int | None]:
    """``"topk:3"`` -> ``("topk", 3)``; validates the name."""
    name, _, k = query.partition(":")
    if name not in ACCESS_LEVELS:
        raise NastyError(f"unknown --query {query!r} (choose logits, probs, topk:K, label or weights)")
    if name == "topk":
        if not k.isdigit() or int(k) < 1:
            raise NastyError(f"--query topk needs a positive K, e.g. topk:2 (got {query!r})")
        return name, int(k)
    if k:
        raise NastyError(f"--query {name} takes no argument (got {query!r})")
    return name, None


class Oracle:
    """The teacher as the attacker sees it. Returns *logit-like* scores: raw logits for
    ``logits``/``weights``; ``log p`` for ``probs`` (logits up to a constant, so any temperature can
    be re-applied); ``log p`` of the top-K with ``-inf`` elsewhere for ``topk``; 0/-inf one-hot for
    ``label``. ``post`` is an output defense applied to the teacher's probabilities first.
    Counts the queries it answers."""

    def __init__(self, model: nn.Module, query: str = "logits",
                 post: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model.eval()
        self.access, self.k = parse_access(query)
        self.post = post
        self.queries = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += len(x)
        z = self.model(x)
        if self.post is None and self.access in ("logits", "weights"):
            return z
        p = F.softmax(z, dim=1)
        if self.post is not None:
            p = self.post(p)
        if self.access == "topk":
            k = min(self.k or 1, p.shape[1])
            top = p.topk(k, dim=1)
            p = torch.zeros_like(p).scatter_(1, top.indices, top.values)
        elif self.access == "label":
            p = F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)
        return torch.log(p.clamp_min(0))  # log 0 = -inf marks classes the oracle did not reveal

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)

    @property
    def serves_log_probs(self) -> bool:
        """Whether the answers are ``log p`` of the served probabilities (probs, top-k, label, or any
        output defense) rather than raw logits: see :func:`served_probs`."""
        return self.post is not None or self.access not in ("logits", "weights")


def served_probs(scores: torch.Tensor, log_probs: bool) -> torch.Tensor:
    """The probabilities the teacher served from an oracle's answers: ``exp`` of its ``log p`` (0 where a
    top-k answer hid a class, so a served top-1 probability is not renormalised to 1), or the softmax of
    raw logits."""
    return scores.exp() if log_probs else F.softmax(scores, dim=1)


@dataclass
class AttackContext:
    """Everything an attack may use. ``teachers`` are oracles (several for ``ensemble``)."""

    data: DataBundle  # the attacker's data (train/val) and the test split for scoring
    teachers: list[Oracle]
    student: str
    train: TrainConfig
    params: dict[str, Any]
    run_dir: Any = None
    log: Callable[[str], None] | None = None
    labels_available: bool = True
    cache_teacher: bool = True
    info: dict = field(default_factory=dict)
    teacher_cache: Any = None  # nasty.frozen.TeacherOutputCache: outputs shared across run_attack calls
    augment: str = "none"  # distillation-time augmentation: none, mixup[:ALPHA], cutmix[:ALPHA]
    notes: list[str] = field(default_factory=list)  # caveats an attack reports (copied into the result)
    checkpointing: Checkpointing = field(default_factory=Checkpointing)  # save each training's state / resume from it
    share_frozen: bool = False  # one Frozen per oracle for every objective built (a tuning grid's candidates share it)
    late_ties: bool = False  # epoch selection: the latest of equally accurate epochs (thief's regime, tuning)
    _frozen_memo: dict = field(default_factory=dict, repr=False)

    @property
    def teacher(self) -> Oracle:
        return self.teachers[0]

    def frozen_teacher(self, oracle: Oracle | None = None, n: int | None = None) -> Frozen:
        x = self.data.x_train
        key = (id(oracle or self.teacher), n or len(x))
        if self.share_frozen and key in self._frozen_memo:
            return self._frozen_memo[key]
        frozen = None
        if self.teacher_cache is not None and self.cache_teacher:
            frozen = self.teacher_cache.frozen(oracle or self.teacher, x, n or len(x))
        if frozen is None:
            frozen = Frozen(oracle or self.teacher, n or len(x), cache=self.cache_teacher)
        if self.share_frozen:
            self._frozen_memo[key] = frozen
        return frozen

    def train_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images the student trains on and their labels (``-1`` where the attacker has none)."""
        return self.data.x_train, self.data.y_train

    def mixer(self) -> Mixer:
        """The distillation-time augmentation of this run (identity for ``none``), seeded by the run's seed."""
        return Mixer(self.augment, self.train.seed)

    def fit(self, model: nn.Module, objective, *, eval_model: nn.Module | None = None, desc: str = "", cfg: TrainConfig | None = None,
            subdir: str | None = None, select_from: int = 1):
        """The one training loop on the attacker's data (``nasty.train.fit``), logging through ``log``.
        ``subdir`` keeps an auxiliary run's metrics apart from the main run's (``run_dir/subdir``)."""
        x, y = self.train_split()
        run_dir = None if self.run_dir is None else (Path(self.run_dir) / subdir if subdir else self.run_dir)
        return fit(model, objective, self.data, cfg or self.train, eval_model=eval_model, run_dir=run_dir, desc=desc,
                   x_train=x, y_train=y, explode=EXPLODE, late_ties=self.late_ties, select_from=select_from, **({"log": self.log} if self.log else {}), **self.checkpointing.fit_args())


class Attack:
    """Base class. Subclasses set the class attributes and implement :meth:`objective`, or override
    :meth:`train` for attacks that do more than plug a loss into the one training loop."""

    name: ClassVar[str]
    summary: ClassVar[str]
    accepts: ClassVar[tuple[str, ...]] = ("weights", "logits", "probs", "topk")
    needs_labels: ClassVar[bool] = True  # refuses to run without ground-truth labels
    uses_labels: ClassVar[bool] = True  # reads them when present (False: teacher outputs only)
    needs_teacher: ClassVar[bool] = True
    min_teachers: ClassVar[int] = 1
    max_teachers: ClassVar[int | None] = 1  # None: any number (ensemble)
    supports_augment: ClassVar[bool] = False  # mixup/cutmix of the distillation batches (soft-label attacks)
    labels_view: ClassVar[bool] = False  # in the thief's regime, train on its labelled images alone (as the label-only floors)
    floor: ClassVar[bool] = False  # a floor of the thief's regime (hard-label), not an attack: 'all' leaves it out
    floor_params: ClassVar[dict[str, Any]] = {}  # a floor's own settings in the thief's regime (its tuning starts there); the user's win
    params: ClassVar[dict[str, Any]] = {}  # name -> default, or -> Param (checked, with a help text and a CLI flag)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every parameter's default (``params`` maps a name to its default or to a :class:`nasty.params.Param`)."""
        return {k: getattr(p, "default", p) if isinstance(p, Param) else p for k, p in cls.params.items()}

    def __init__(self, **params: Any):
        self.p = with_defaults(f"attack {self.name}", self.params, params)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`NastyError` for out-of-range parameters."""

    def objective(self, ctx: AttackContext, student: nn.Module):
        raise NotImplementedError

    def build_student(self, ctx: AttackContext) -> nn.Module:
        d = ctx.data
        return create_model(ctx.student, d.num_classes, d.in_channels, d.image_size)

    def train(self, ctx: AttackContext) -> tuple[nn.Module, dict]:
        """Train and return the student (the module evaluated on the test split) and extra results."""
        if self.p.get("tune"):
            return self.train_tuned(ctx)
        student = self.build_student(ctx)
        res = ctx.fit(student, self.objective(ctx, student), desc=f"{self.name}:{ctx.student}")
        return student, {"best_epoch": res.best_epoch, "val_accuracy": res.best_val_accuracy}

    def tuning_grid(self, labels: bool = True) -> list[dict[str, Any]]:
        """The honest thief's candidates, each a dict of parameter values (every candidate sets the same
        keys): alpha 0 (labels only) and every alpha x temperature of the grid; without labels (the KD
        term alone) only the temperatures. An attack tuning other settings overrides this."""
        if not labels:
            return [{"alpha": self.p["alpha"], "temperature": t} for t in TUNE_TEMPERATURES]
        return [{"alpha": 0.0, "temperature": 1.0}] + [{"alpha": a, "temperature": t} for a in TUNE_ALPHAS for t in TUNE_TEMPERATURES]

    def train_tuned(self, ctx: AttackContext) -> tuple[nn.Module, dict]:
        """Every candidate of :meth:`tuning_grid` in one pass over the thief's data (the teacher answers
        once for all), each with its own best epoch; the candidate with the best accuracy on the thief's
        validation split wins (ties: the lower validation cross-entropy), except that the attack's own
        settings (the published ones by default) are kept while they are within one binomial standard
        error of the best: a split of a few dozen images cannot tell those apart, and picking the noisiest
        winner makes a thief weaker, not stronger. Diverged candidates are left out; when all diverge, the
        attack has failed (:class:`TrainingDiverged`). ``tuned`` in the result holds the chosen values of
        the grid's keys."""
        grid = self.tuning_grid(ctx.labels_available)
        x, y = ctx.train_split()
        members, shared = [], ctx.share_frozen
        ctx.share_frozen = True
        try:
            for g in grid:
                sub = type(self)(**{**self.p, **g, "tune": False})
                seed_everything(ctx.train.seed, ctx.train.deterministic)  # every candidate starts from the same weights
                student = sub.build_student(ctx)
                tag = _tag(g)
                run_dir = None if ctx.run_dir is None else Path(ctx.run_dir) / "tune" / tag.replace(",", "-")
                members.append(Member(student, sub.objective(ctx, student), desc=f"{self.name}:{ctx.student}:{tag}", run_dir=run_dir,
                                      y_train=y, explode=EXPLODE, late_ties=True))
        finally:
            ctx.share_frozen = shared
        fits = fit_group(members, ctx.data, ctx.train, x_train=x, errors="collect", log=None, **ctx.checkpointing.fit_args())
        rows, best = [], None
        for g, m, f in zip(grid, members, fits):
            if isinstance(f, Exception):
                rows.append({**g, "failed": str(f).splitlines()[0]})
                continue
            z = predict_logits(m.model, ctx.data.x_val)
            nll = float(F.cross_entropy(z, ctx.data.y_val)) if len(ctx.data.y_val) else float("nan")
            rows.append({**g, "val_accuracy": f.best_val_accuracy, "val_nll": nll, "best_epoch": f.best_epoch})
            if best is None or (f.best_val_accuracy, -nll) > (rows[best[0]]["val_accuracy"], -rows[best[0]]["val_nll"]):
                best = (len(rows) - 1, m.model, f)
        if best is None:
            raise TrainingDiverged(f"{self.name}: every tuning candidate diverged ({rows[0].get('failed', '')})")
        n_val = max(1, len(ctx.data.y_val))
        top = min(max(rows[best[0]]["val_accuracy"] / 100, 1 / n_val), 1 - 1 / n_val) if n_val > 1 else 0.5
        se = 100 * (top * (1 - top) / n_val) ** 0.5
        for j, (g, m, f) in enumerate(zip(grid, members, fits)):
            own = all(g[k] == self.p[k] for k in g)
            if own and "val_accuracy" in rows[j] and rows[best[0]]["val_accuracy"] - rows[j]["val_accuracy"] <= se:
                best = (j, m.model, f)
                rows[j]["kept_within_noise"] = round(se, 2)
        i, model, f = best
        chosen = {k: rows[i][k] for k in grid[i]}
        if ctx.log:
            ctx.log(f"[{self.name}:{ctx.student}] tuned on {len(ctx.data.y_val)} validation images: {_tag(chosen, ', ', ' ')}, "
                    f"epoch {f.best_epoch} (val {f.best_val_accuracy:.2f}%; {len(grid)} candidates, "
                    f"{sum('failed' in r for r in rows)} failed)")
        if chosen.get("alpha") == 0:
            ctx.notes.append("tuning: the thief's validation split says labels alone win (alpha 0 chosen)")
        extra = {"best_epoch": f.best_epoch, "val_accuracy": f.best_val_accuracy, "tuned": chosen, "tuning": rows}
        if self.floor:  # a floor is judged as its whole family: every candidate that trained is a floor of its own
            extra["_variants"] = {self.variant_name(g): m.model for g, m, f in zip(grid, members, fits) if not isinstance(f, Exception)}
        return model, extra

    def variant_name(self, values: dict[str, Any]) -> str:
        """A tuning candidate as a floor of its own (``hard-label:ls=0.1``); see :data:`nasty.pipelines.leakage.FLOORS`."""
        return f"{self.name}:{_tag(values)}"


_SHORT = {"temperature": "T"}


def _tag(values: dict[str, Any], sep: str = ",", eq: str = "=") -> str:
    """``alpha=0.3,T=10``: a tuning candidate's name (its run folder, its description, the log)."""
    return sep.join(f"{_SHORT.get(k, k)}{eq}{v:g}" if isinstance(v, float) else f"{_SHORT.get(k, k)}{eq}{v}" for k, v in values.items())


def check_temperature_alpha(p: dict) -> None:
    if not p["temperature"] > 0:
        raise NastyError(f"temperature must be positive, got {p['temperature']}")
    if not 0 <= p["alpha"] <= 1:
        raise NastyError(f"alpha must be in [0, 1], got {p['alpha']}")


# ----------------------------------------------------------------------------------------------
# pieces shared by the attacks: per-sample KD, stage hooks, white-box teacher features


def kd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(sigma_T(z_T) || sigma_T(z_S))`` per sample (classes the oracle hid, ``p_T = 0``, count 0)."""
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    pt = log_pt.exp()
    keep = pt > 0
    per = (pt * (torch.where(keep, log_pt, 0.0) - torch.where(keep, log_ps, 0.0))).sum(1)
    return temperature**2 * per


def stage_names(model: nn.Module, what: str = "model") -> list[str]:
    names = list(getattr(model, "stage_names", []) or [])
    if not names:
        raise NastyError(f"{what} {type(model).__name__} exposes no stage_names; feature attacks need them")
    return names


def resolve_stage(model: nn.Module, index: int, what: str) -> str:
    """1-based stage index (negative counts from the end) -> the stage's submodule name."""
    names = stage_names(model, what)
    if isinstance(index, bool) or not isinstance(index, int) or index == 0 or abs(index) > len(names):
        raise NastyError(f"{what} stage {index!r} out of range: it has {len(names)} stages ({', '.join(names)}); "
                         f"use 1..{len(names)} or a negative index")
    return names[index - 1] if index > 0 else names[index]


class FeatureTap:
    """Forward hooks that keep the latest output of named submodules (a model's stages)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.feats: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in dict.fromkeys(names):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise NastyError(f"{type(model).__name__} has no submodule {name!r}") from None
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.feats[name] = output

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.feats[name]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.feats = [], {}


class TappedStudent(nn.Module):
    """A student plus trainable extras (auxiliary heads, adapters) that ``fit`` optimises together.

    ``forward`` returns the student's own logits; the outputs of the tapped stages are in
    ``tap[name]`` afterwards. Call :meth:`release` after training: it removes the hooks and returns
    the bare student (what gets evaluated and saved).
    """

    def __init__(self, student: nn.Module, stages: list[str], extra: nn.ModuleDict):
        super().__init__()
        self.student = student
        self.extra = extra
        self.tap = FeatureTap(student, stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def release(self) -> nn.Module:
        self.tap.remove()
        return self.student


@torch.no_grad()
def probe_shapes(model: nn.Module, stages: list[str], in_channels: int, image_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of ``stages``' outputs, from one forward pass on zeros."""
    tap = FeatureTap(model, stages)
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, in_channels, *image_size))
        return {s: tuple(tap[s].shape[1:]) for s in stages}
    finally:
        tap.remove()
        model.train(was_training)


class TeacherFeatures:
    """White-box teacher: logits and stage outputs flattened into one tensor so :class:`Frozen` caches them.

    ``unpack`` turns a cached row block back into ``(logits, [features per stage])``. Counts one
    query per image on the oracle.
    """

    def __init__(self, oracle: Oracle, stages: list[str], in_channels: int, image_size: tuple[int, int]):
        self.oracle, self.stages = oracle, list(stages)
        self.model, self.access, self.k, self.post = oracle.model, f"weights:{','.join(self.stages)}", None, None  # Frozen.identity
        model = oracle.model
        self.shapes = [probe_shapes(model, self.stages, in_channels, image_size)[s] for s in self.stages]
        with torch.no_grad():
            model.eval()
            self.num_classes = int(model(torch.zeros(1, in_channels, *image_size)).shape[1])
        self.sizes = [self.num_classes] + [int(torch.tensor(s).prod()) for s in self.shapes]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        model = self.oracle.model
        model.eval()
        self.oracle.queries += len(x)
        tap = FeatureTap(model, self.stages)
        try:
            z = model(x)
            return torch.cat([z] + [tap[s].flatten(1) for s in self.stages], 1)
        finally:
            tap.remove()

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        parts = flat.split(self.sizes, dim=1)
        return parts[0], [p.reshape(len(flat), *s) for p, s in zip(parts[1:], self.shapes)]


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two ``(..., H, W)`` maps to the smaller's size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])

    def pool(t: torch.Tensor) -> torch.Tensor:
        if t.shape[-2:] == (h, w):
            return t
        lead = t.shape[:-2]
        return F.adaptive_avg_pool2d(t.reshape(-1, 1, *t.shape[-2:]), (h, w)).reshape(*lead, h, w)

    return pool(a), pool(b)


def load_surrogate(spec: str, data_root: str | None, like: DataBundle, *, val_fraction: float = 0.1, split_seed: int = 0,
                   download: bool = False) -> DataBundle:
    """Another dataset's images as unlabelled queries (KnockoffNets), normalised like the teacher's
    inputs; its training split is the query pool, its validation split selects the epoch."""
    s = load_dataset(spec, data_root, val_fraction=val_fraction, split_seed=split_seed, download=download,
                     normalization=(like.mean, like.std), labelled=False)
    if s.in_channels != like.in_channels or s.image_size != like.image_size:
        raise NastyError(f"surrogate {spec} gives {s.in_channels}x{s.image_size[0]}x{s.image_size[1]} images but the teacher takes "
                         f"{like.in_channels}x{like.image_size[0]}x{like.image_size[1]}")
    return s
