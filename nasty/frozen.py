"""Frozen networks' outputs, computed once: the one cache of frozen outputs and its one identity rule.

A frozen network (the nasty teacher's adversary, a distilling student's teacher) is consulted through
:class:`Frozen`, which runs it in eval mode under no-grad and, on un-augmented batches, computes each
training sample's output once. Outputs are shared at two wider scopes, with the same key
(:func:`query_key` of what is queried, and the identity of the image tensor):

- within one step of :func:`nasty.train.fit_group`: members querying the same network on the same
  (augmented) batch share one forward pass (:class:`StepMemo`);
- across runs: an audit's :class:`TeacherOutputCache` answers every run's un-augmented training images
  and the test split once.

Within a process the key is the queried objects' identity; across processes (a resumed training) a
frozen network is recognised by the SHA-256 of its weights and of how it is queried
(:meth:`Frozen.identity`), so a resumed run refuses a different adversary or teacher.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn as nn

from .data import Batch
from .metrics import predict_logits


def query_key(fn: object) -> tuple:
    """What identifies a queried network in every output cache: for an oracle, the network, its access
    mode and output defense; for a bare module, the module. Keys are compared with ``is`` checks on the
    cached objects, so a recycled ``id`` never returns another network's outputs."""
    model = getattr(fn, "model", None)
    if model is not None and hasattr(fn, "access"):
        return ("oracle", id(model), fn.access, getattr(fn, "k", None), id(getattr(fn, "post", None)))
    return ("module", id(fn))


class Frozen:
    """A frozen network's outputs, cached per training index on un-augmented batches.

    ``fn`` maps an input batch to outputs (a module, or a query oracle around one). ``n`` is the
    size of the training split the batches index into; ``cache=False`` turns caching off.
    ``samples_run`` counts how many samples ``fn`` actually processed (for tests and benchmarks).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n: int, cache: bool = True):
        if isinstance(fn, nn.Module):
            fn.eval()
            for p in fn.parameters():
                p.requires_grad_(False)
        self.fn, self.n, self.cache = fn, n, cache
        self._store: torch.Tensor | None = None
        self._filled = torch.zeros(n, dtype=torch.bool)
        self.samples_run = 0
        self.step_memo: dict | None = None  # set by fit_group for the length of one step (see StepMemo)

    @classmethod
    def from_outputs(cls, outputs: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "Frozen":
        """A frozen network whose outputs on every training index are already known (``outputs``,
        row i for training index i), e.g. computed on images while training runs on their features.
        ``fn`` answers augmented batches (none: refused)."""

        def refuse(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("precomputed outputs cannot answer augmented batches")

        f = cls(fn or refuse, len(outputs))
        f._store = outputs.detach().clone()
        f._filled[:] = True
        return f

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        memo = self.step_memo  # inside fit_group: answers already computed for this batch by another member
        key = None
        if memo is not None:
            key = (query_key(self.fn), id(x))
            hit = memo.get(key)
            if hit is not None and hit[0] is x:
                if hasattr(self.fn, "queries"):
                    self.fn.queries += len(x)  # still this attacker's queries
                return hit[1]
        if isinstance(self.fn, nn.Module):
            self.fn.eval()
        self.samples_run += len(x)
        out = self.fn(x)
        if key is not None:
            memo[key] = (x, out)
        return out

    def __call__(self, batch: Batch) -> torch.Tensor:
        if not self.cache or batch.augmented:
            return self.run(batch.x)
        missing = ~self._filled[batch.idx]
        if missing.any():
            out = self.run(batch.x[missing])
            if self._store is None:
                self._store = torch.zeros((self.n, *out.shape[1:]), dtype=out.dtype, device=out.device)
            self._store[batch.idx[missing]] = out
            self._filled[batch.idx[missing]] = True
        assert self._store is not None
        return self._store[batch.idx]

    def to(self, device: torch.device) -> "Frozen":
        """Move the frozen network (and the cache) to ``device`` (DDP on GPUs)."""
        module = self.fn if isinstance(self.fn, nn.Module) else getattr(self.fn, "model", None)
        if isinstance(module, nn.Module):
            module.to(device)
        if self._store is not None:
            self._store = self._store.to(device)
        return self

    def identity(self) -> str:
        """SHA-256 of the frozen network's weights and of how it is queried; a resumed run refuses
        to continue against a different network."""
        if getattr(self, "_identity", None) is None:
            module = self.fn if isinstance(self.fn, nn.Module) else getattr(self.fn, "model", None)
            h = hashlib.sha256()
            if isinstance(module, nn.Module):
                h.update(repr(getattr(module, "nasty_spec", type(module).__name__)).encode())
                for k, v in sorted(module.state_dict().items()):
                    t = v.detach().cpu().contiguous()
                    h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(f"unhashable:{type(self.fn).__module__}.{type(self.fn).__qualname__}".encode())
            for attr in ("access", "k"):
                h.update(f"{attr}={getattr(self.fn, attr, None)!r}".encode())
            post = getattr(self.fn, "post", None)
            if post is not None:
                h.update(repr(getattr(post, "describe", lambda: type(post).__qualname__)()).encode())
            self._identity = h.hexdigest()
        return self._identity

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The output cache, so that a resumed run reuses exactly the outputs the interrupted one had."""
        out = {"filled": self._filled}
        if self._store is not None:
            out["store"] = self._store
        return out

    def load_state_tensors(self, t: dict[str, torch.Tensor]) -> None:
        if "filled" in t and t["filled"].shape == self._filled.shape:
            self._filled = t["filled"].clone()
            self._store = t["store"].clone() if "store" in t else None
            if self._store is None:
                self._filled.zero_()


class StepMemo:
    """The answers of frozen networks on the current batch, shared by the members of one
    :func:`nasty.train.fit_group` step: ``with StepMemo(frozen):`` hands every listed :class:`Frozen`
    the same empty memo, and takes it back at the end of the step."""

    def __init__(self, frozen: list["Frozen"]):
        self.frozen = frozen

    def __enter__(self) -> dict:
        memo: dict = {}
        for f in self.frozen:
            f.step_memo = memo
        return memo

    def __exit__(self, *exc: object) -> None:
        for f in self.frozen:
            f.step_memo = None


class TeacherOutputCache:
    """Shared store of oracle outputs (training images) and teacher outputs (test split)."""

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
        key = (query_key(oracle), id(x))
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

    def test_logits(self, model, x: torch.Tensor) -> torch.Tensor:
        """The teacher's outputs on ``x`` (the test split), computed once."""
        key = (query_key(model), id(x))
        hit = self._test.get(key)
        if hit is not None and hit[0] is model and hit[1] is x:
            return hit[2]
        z = predict_logits(model, x)
        self.samples_run += len(x)
        self._test[key] = (model, x, z)
        return z

    def test_pred(self, model, x: torch.Tensor) -> torch.Tensor:
        """The teacher's argmax predictions on ``x`` (the test split), computed once."""
        return self.test_logits(model, x).argmax(1)
