"""What a decision-locked teacher serves: one function, :func:`serve`, used by eager serving
(:class:`nasty.models.locked.LockedTeacher`), by the nasty head's training through the lock
(:class:`nasty.defenses.lock.ServedHead`) and by the exported graph (``nasty export``).

``serve(z, normal, ...)`` takes the nasty part's logits ``z`` and the normal model's logits
``normal`` (N, C) and returns served log-probabilities (softmax of them = the served
probabilities). The decision is ``d = normal.argmax(1)``. Guarantee, on every row: the served
probability of ``d`` is at least every other class's plus :data:`MIN_GAP` (1e-3), so the served
argmax is the decision with a real gap, whatever the nasty logits are (random, tied, huge, tiny,
all equal, NaN, +-inf). Steps:

1. **Sanitise** the nasty logits: a row with a NaN becomes all zeros (the nasty part says nothing:
   the other classes share the rest evenly); +-inf and anything beyond +-1e30 are clipped to +-1e30.
2. **Lock rule** (``lock``), the order imposed on the nasty logits: ``swap`` exchanges ``z[d]`` with
   the largest logit (a permutation of the row), ``margin`` raises ``z[d]`` to at least
   ``max_{j != d} z[j] + margin`` (the rest is kept).
3. **Keep** (``keep``), what the served top probability is: ``decision``: the locked row's own
   softmax (the nasty part's distribution, with the decision on top); ``confidence``: the normal
   model's top probability ``p_max`` exactly, the rest ``1 - p_max`` shared among the other classes
   in proportion to the locked row's softmax over them; ``confidence:bins=B``: the same with
   ``p_max`` replaced by the held-out accuracy of its calibration bin (``bin_edges``, B - 1 inner
   edges, and ``bin_values``, B values; a bin holds the ``p_max`` at or above its lower edge).
   ``bins=1`` serves one value, the decisions' accuracy on the calibration images, as every top probability:
   calibrated on average and carrying nothing beyond the decision.
   ``top=K`` (after any kind: ``decision:top=5``, ``confidence:bins=3,top=5``): the served K most probable
   classes are the normal model's K (useful top-K answers), ordered within and after the set by the
   locked nasty logits; the other classes' shares are the nasty part's shares, permuted so that the K - 1
   largest go to the set (:func:`top_set_shares`). The set is the normal model's similarity structure:
   a thief reads it as it would read the normal teacher (docs: measured leakage).
4. **Gap rule**, the same for every kind: with ``t`` the top probability and ``r`` the other
   classes' shares of ``1 - t``, when ``t < (1 - t) max(r) + gap`` the top is first raised to at
   least ``t_min = (1 + gap (C - 1)) / C`` (the least top that can lead uniform others by the gap),
   then ``r`` is mixed with the uniform share ``u = 1 / (C - 1)``, ``r' = (1 - l) r + l u``, with
   the least ``l`` in [0, 1] for which ``t = (1 - t) max(r') + gap``: the others keep their order
   and the top leads them by the gap. ``gap`` is :data:`MIN_GAP` plus 1e-5 of allowance for float
   rounding. Rows that already lead by the gap are served unchanged.

Only graph-exportable operations (no ``nextafter``, no Python branch on data), so the exported
file computes the same numbers. The served top probability is at most :data:`TOP_MAX` for the
confidence kinds (so no class is served exactly zero mass from ``1 - p_max``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_GAP = 1e-3  # the served decision leads every other class by at least this much probability
_GAP = MIN_GAP + 1e-5  # what the gap rule aims at (the allowance covers float32 rounding)
TOP_MAX = 1.0 - 1e-6  # the largest top probability the confidence kinds serve
CLIP = 1e30  # nasty logits are clipped to +-CLIP
LOCKS = ("swap", "margin")
KEEPS = ("decision", "confidence")
MAX_BINS = 1000
MAX_TOP = 1000
KEEP_EXPECT = (f"decision, confidence or confidence:bins=B (B an integer in 1..{MAX_BINS}), optionally followed by top=K "
               f"(K an integer in 2..{MAX_TOP}, at most the number of classes; after a colon or a comma: decision:top=5, "
               "confidence:bins=3,top=5)")


class Keep(NamedTuple):
    """A parsed ``keep``: its kind, its bins (``confidence:bins=B``) and its top set size (``top=K``)."""
    kind: str
    bins: int | None = None
    top: int | None = None


def parse_keep(text: object) -> Keep:
    """``"decision"`` -> ``Keep("decision")``; ``"confidence:bins=10"`` -> ``Keep("confidence", 10)``;
    ``"confidence:bins=3,top=5"`` -> ``Keep("confidence", 3, 5)``. Raises ValueError (one line) on anything else."""
    bad = ValueError(f"keep must be {KEEP_EXPECT}, got {text!r}")
    if not isinstance(text, str):
        raise bad
    kind, colon, rest = text.strip().partition(":")
    if kind not in KEEPS or (colon and not rest.strip()):
        raise bad
    found: dict[str, int] = {}
    for item in rest.split(",") if colon else []:
        key, eq, val = (v.strip() for v in item.partition("="))
        limit = {"bins": (1, MAX_BINS), "top": (2, MAX_TOP)}.get(key)
        if (limit is None or not eq or key in found or not val.isascii() or not val.isdigit()
                or not limit[0] <= int(val) <= limit[1] or (key == "bins" and kind != "confidence")):
            raise bad
        found[key] = int(val)
    return Keep(kind, found.get("bins"), found.get("top"))


def keep_ok(text: object) -> bool:
    try:
        parse_keep(text)
    except ValueError:
        return False
    return True


def check_keep_classes(keep: str, num_classes: int) -> None:
    """ValueError (one line) when ``keep``'s top set is larger than the ``num_classes`` classes."""
    top = parse_keep(keep).top
    if top is not None and top > num_classes:
        raise ValueError(f"--keep {keep}: top={top} is more than the {num_classes} classes")


def top_floor(num_classes: int, gap: float = _GAP) -> float:
    """The least top probability that can lead ``num_classes - 1`` equal others by ``gap``."""
    return (1.0 + gap * (num_classes - 1)) / num_classes


def sanitise(z: torch.Tensor) -> torch.Tensor:
    """Rows with a NaN -> zeros; everything else clipped to [-CLIP, CLIP] (+-inf included)."""
    nan_row = torch.isnan(z).any(1, keepdim=True)
    return torch.where(nan_row, torch.zeros_like(z), z.clamp(-CLIP, CLIP))


def lock_rule(z: torch.Tensor, d: torch.Tensor, lock: str, margin: float) -> torch.Tensor:
    """``z`` (N, C) with the order of ``lock`` imposed for the decided class ``d`` (N, 1); ties are left
    to the gap rule."""
    zd = z.gather(1, d)
    if lock == "swap":
        top = z.argmax(1, keepdim=True)
        return z.scatter(1, top, zd).scatter(1, d, z.gather(1, top))
    if lock == "margin":
        others = z.scatter(1, d, float("-inf")).amax(1, keepdim=True)
        return z.scatter(1, d, torch.maximum(zd, others + margin))
    raise ValueError(f"lock must be one of {', '.join(LOCKS)}, got {lock!r}")


def bin_of(p: torch.Tensor, bin_edges: torch.Tensor) -> torch.Tensor:
    """Index of each ``p`` (N, 1) among the bins of the inner ``bin_edges`` (B - 1,): how many edges are <= p."""
    return (p >= bin_edges.to(p.dtype)[None, :]).long().sum(1, keepdim=True)


def _rank(first: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Per row, each class's position (0 = first) when the classes are ordered by ``first`` (larger
    first), then by ``key`` (larger first), then by index; pairwise comparisons only (exportable, no sort)."""
    c = key.shape[1]
    idx = torch.arange(c, device=key.device)
    f_j, f_i, k_j, k_i = first[:, :, None], first[:, None, :], key[:, :, None], key[:, None, :]
    before = (f_j > f_i) | ((f_j == f_i) & ((k_j > k_i) | ((k_j == k_i) & (idx[:, None] < idx[None, :]))))
    return before.sum(1)


def top_set_shares(log_r: torch.Tensor, zl: torch.Tensor, normal: torch.Tensor, d: torch.Tensor, top: int) -> torch.Tensor:
    """``keep ... top=K``: the other classes' log shares ``log_r`` (-inf at the decision ``d``) given to the
    classes so that the normal model's ranks 2..K get the K - 1 largest, in the nasty order ``zl`` among them,
    and the rest the others in the nasty order among the rest (a permutation of the shares)."""
    c = zl.shape[1]
    is_d = torch.zeros_like(zl).scatter(1, d, 1.0)
    in_set = (_rank(normal.scatter(1, d, float("inf")), torch.zeros_like(zl)) < top).to(zl.dtype)  # ties: the lower index
    position = _rank(is_d * 2 + in_set, zl)  # the decision 0, its set 1..K-1, the rest K..C-1
    by_size = torch.zeros_like(log_r).scatter(1, _rank(1 - is_d, log_r), log_r)  # the shares, largest first (-inf last)
    return by_size.gather(1, (position - 1).clamp_min(0)).scatter(1, d, float("-inf"))


def serve(z: torch.Tensor, normal: torch.Tensor, lock: str = "swap", margin: float = 0.0, keep: str = "decision",
          bin_edges: torch.Tensor | None = None, bin_values: torch.Tensor | None = None) -> torch.Tensor:
    """Served log-probabilities (N, C) for nasty logits ``z`` and normal logits ``normal`` (see the module
    docstring). ``bin_edges``/``bin_values``: the calibration bins of ``keep="confidence:bins=B"``."""
    kind, bins, top = parse_keep(keep)
    dtype = torch.promote_types(z.dtype, torch.float32)
    c = z.shape[1]
    d = normal.argmax(1, keepdim=True)
    zl = lock_rule(sanitise(z.to(dtype)), d, lock, margin)
    is_d = torch.zeros_like(zl).scatter(1, d, 1.0) > 0
    log_r = F.log_softmax(torch.where(is_d, torch.full_like(zl, float("-inf")), zl), 1)  # the others' shares, -inf at d
    if top is not None:
        if top > c:
            raise ValueError(f"keep={keep!r}: top={top} is more than the {c} classes")
        log_r = top_set_shares(log_r, zl, sanitise(normal.to(dtype)), d, top)
    r = log_r.exp()
    floor = top_floor(c)
    if kind == "decision":
        base = F.log_softmax(zl, 1)
        log_t = base.gather(1, d)
        t = log_t.exp()
        if top is not None:
            # log((1 - t) / t) as a log-sum-exp over the others, shifted by their largest (never -inf, even
            # where exp underflows); torch.logsumexp does not export
            others = torch.where(is_d, torch.full_like(zl, float("-inf")), zl)
            m = others.amax(1, keepdim=True)
            log_rest = m - zl.gather(1, d) + torch.log((others - m).exp().sum(1, keepdim=True))
            base = log_rest - F.softplus(log_rest) + log_r  # log(1 - t) + the shares (the lock puts d on top)
    else:
        t = F.softmax(sanitise(normal.to(dtype)), 1).amax(1, keepdim=True)
        if bins is not None:
            if bin_edges is None or bin_values is None:
                raise ValueError(f"keep={keep!r} needs bin_edges and bin_values")
            t = bin_values.to(dtype).gather(0, bin_of(t, bin_edges)[:, 0])[:, None]
        t = t.clamp(floor, TOP_MAX)
        log_t = torch.log(t)
        base = torch.log(1.0 - t) + log_r
    # the gap rule (rows that lead by the gap keep ``base``)
    runner = torch.where(is_d, torch.full_like(base, float("-inf")), base).amax(1, keepdim=True).exp()
    ok = t - runner >= _GAP
    tc = t.clamp_min(floor)
    m = r.amax(1, keepdim=True)
    u = 1.0 / max(c - 1, 1)
    bound = (tc - _GAP) / (1.0 - tc).clamp_min(1e-12)  # the largest share of the rest any other class may have
    den = m - u
    lam = torch.where(den > 0, (m - bound) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den)).clamp(0.0, 1.0)
    capped = torch.log(((1.0 - tc) * ((1.0 - lam) * r + lam * u)).clamp_min(torch.finfo(dtype).tiny))
    out = torch.where(ok, base, capped)
    return out.scatter(1, d, torch.where(ok, log_t, torch.log(tc)))


def served_gap(p: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
    """Per row of probabilities ``p``: the decided class's probability minus the best other's."""
    d = decision.reshape(-1, 1)
    return p.gather(1, d)[:, 0] - p.scatter(1, d, float("-inf")).amax(1)


def fit_bins(normal_logits: torch.Tensor, y: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram binning of the normal model's top probability on a held-out split (``normal_logits``,
    labels ``y``): ``bins`` equal-mass bins (inner edges at the quantiles k / bins); a bin's value is
    the accuracy of the normal model's decisions in it (an empty bin: its edges' midpoint), clipped to
    [t_min, TOP_MAX] (t_min: see :func:`top_floor`). Returns (inner edges (bins - 1,), values (bins,))."""
    c = normal_logits.shape[1]
    p = F.softmax(sanitise(normal_logits.double()), 1)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    lo, hi = 1.0 / c, 1.0
    if len(conf):
        edges = torch.quantile(conf, torch.arange(1, bins, dtype=torch.float64) / bins)
    else:
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:-1]
    idx = bin_of(conf[:, None], edges)[:, 0]
    bounds = torch.cat([torch.tensor([lo], dtype=torch.float64), edges, torch.tensor([hi], dtype=torch.float64)])
    values = torch.empty(bins, dtype=torch.float64)
    for b in range(bins):
        sel = idx == b
        values[b] = correct[sel].mean() if sel.any() else (bounds[b] + bounds[b + 1]) / 2
    return edges.float(), values.clamp(top_floor(c), TOP_MAX).float()


class Served(nn.Module):
    """The served function's settings (and, for ``confidence:bins=B``, its bins as buffers, so that
    ``load_state_dict`` restores them): ``forward(z, normal)`` = :func:`serve`."""

    def __init__(self, num_classes: int, lock: str = "swap", margin: float = 0.0, keep: str = "decision"):
        super().__init__()
        if lock not in LOCKS:
            raise ValueError(f"lock must be one of {', '.join(LOCKS)}, got {lock!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 100:
            raise ValueError(f"margin must be a number in [0, 100], got {margin!r}")
        kind, bins, top = parse_keep(keep)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"a locked teacher needs at least 2 classes, got {num_classes!r}")
        check_keep_classes(keep, num_classes)
        self.num_classes, self.lock, self.margin, self.keep = num_classes, lock, float(margin), keep.strip()
        self.kind, self.bins, self.top = kind, bins, top
        if bins is not None:  # until fitted: equal-width bins over [1/C, 1] valued at their midpoints (no recalibration)
            grid = torch.linspace(1.0 / num_classes, 1.0, bins + 1)
            self.register_buffer("bin_edges", grid[1:-1].clone())
            self.register_buffer("bin_values", ((grid[:-1] + grid[1:]) / 2).clamp(top_floor(num_classes), TOP_MAX))

    def set_bins(self, edges: torch.Tensor, values: torch.Tensor) -> None:
        self.bin_edges.copy_(edges)
        self.bin_values.copy_(values)

    def forward(self, z: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        return serve(z, normal, self.lock, self.margin, self.keep, getattr(self, "bin_edges", None), getattr(self, "bin_values", None))

    def extra_repr(self) -> str:
        return f"lock={self.lock}, margin={self.margin:g}, keep={self.keep}"

