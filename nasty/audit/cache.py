"""Teacher outputs computed once per audit and shared by all its ``run_attack`` calls.

``run_attack(..., teacher_cache=cache)`` hands the cache to the :class:`AttackContext`; an attack
that asks ``ctx.frozen_teacher()`` for the teacher's outputs on the attacker's un-augmented
training images gets a :class:`nasty.train.Frozen` whose store is already filled. The oracle's
answers are computed once per (teacher, access mode, output defense, image tensor), whatever the
number of attacks, students and seeds. Every attack still *counts* the queries it would have
made (one per training image), so its ``resources.queries`` is the same as in a standalone run.
"""

from __future__ import annotations

import torch

from ..metrics import predict_logits
from ..train import Frozen


class TeacherOutputCache:
    """Shared store of oracle outputs (training images) and teacher predictions (test split)."""

    def __init__(self, batch_size: int = 1024):
        self.batch_size = batch_size
        self._train: dict[tuple, tuple[object, torch.Tensor, torch.Tensor]] = {}
        self._test: dict[tuple, tuple[object, torch.Tensor, torch.Tensor]] = {}
        self.samples_run = 0  # samples the teacher actually processed through this cache
        self.hits = 0

    def frozen(self, oracle, x: torch.Tensor, n: int) -> Frozen | None:
        """A pre-filled :class:`Frozen` for ``oracle`` on all of ``x``; ``None`` when ``n`` does not cover ``x``."""
        if n != len(x):
            return None
        key = (id(oracle.model), oracle.access, oracle.k, id(oracle.post), id(x))
        hit = self._train.get(key)
        if hit is not None and hit[0] is oracle.model and hit[1] is x:
            out = hit[2]
            oracle.queries += n  # answered from the cache, still n queries of the attacker's budget
            self.hits += 1
        else:
            out = torch.cat([oracle(x[i : i + self.batch_size]) for i in range(0, n, self.batch_size)])
            self.samples_run += n
            self._train[key] = (oracle.model, x, out)
        f = Frozen(oracle, n, cache=True)
        f._store = out  # noqa: SLF001  (pre-filled cache: every index known)
        f._filled[:] = True  # noqa: SLF001
        return f

    def test_pred(self, model, x: torch.Tensor) -> torch.Tensor:
        """The teacher's argmax predictions on ``x`` (the test split), computed once."""
        key = (id(model), id(x))
        hit = self._test.get(key)
        if hit is not None and hit[0] is model and hit[1] is x:
            return hit[2]
        pred = predict_logits(model, x).argmax(1)
        self.samples_run += len(x)
        self._test[key] = (model, x, pred)
        return pred
