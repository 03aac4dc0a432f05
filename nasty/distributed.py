"""Data-parallel training under ``torchrun`` (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node=N -m nasty train-teacher ...`` (and ``train-defended``, ``attack``) runs
the one training loop on N processes: nccl on GPUs, gloo on CPU. Only the trained network is
wrapped in DDP; frozen networks (adversary, teacher) are not. Every rank draws the same global
batch (same batch generator seed), takes its contiguous shard, and the loss is rescaled so that the
averaged gradient is the gradient of the global-batch mean: N processes with batch B compute what
one process with batch B computes, up to floating-point summation order (and BatchNorm statistics,
which are per shard). Validation counts are summed across ranks; only rank 0 writes files and logs;
the global RNG (dropout and the like) is seeded ``seed + rank``. See ``docs/distributed.md``.

Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a cheap no-op.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import NastyError


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def enabled() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and always without torchrun): the process that writes files and logs."""
    return rank() == 0


def init() -> bool:
    """Join the process group torchrun describes (idempotent). Returns whether DDP is on."""
    if not enabled():
        return False
    import torch.distributed as dist

    if not dist.is_available():
        raise NastyError("this PyTorch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and os.environ.get("NASTY_DDP_BACKEND", "") != "gloo"
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:
            raise NastyError(f"cannot join the torchrun process group ({backend}): {str(e).splitlines()[0]}") from None
        atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def device() -> torch.device:
    """The device a rank computes on: its GPU under nccl, else the CPU."""
    import torch.distributed as dist

    if enabled() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if enabled():
        import torch.distributed as dist

        init()
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place on a copy placed on the communication device)."""
    if not enabled():
        return t
    import torch.distributed as dist

    buf = t.detach().to(device(), dtype=torch.float64 if t.is_floating_point() else t.dtype).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (every rank gets the same answer)."""
    if not enabled():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


@dataclass
class Shard:
    """This rank's part of a global batch: ``sl`` into it, and the weight of its mean in the global mean."""

    sl: slice
    weight: float
    empty: bool


def shard(n: int) -> Shard:
    """Contiguous, near-equal split of a global batch of ``n`` samples. A rank left without samples
    (``n`` < world size) gets one duplicate sample with weight 0, so it still joins the all-reduce."""
    w, r = world_size(), rank()
    if w == 1:
        return Shard(slice(0, n), 1.0, False)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    size = base + (1 if r < extra else 0)
    if size == 0:
        return Shard(slice(0, 1), 0.0, True)
    return Shard(slice(start, start + size), size * w / n, False)


def wrap(model: nn.Module) -> nn.Module:
    """DDP around the trained network (rank 0's initial weights are broadcast to all ranks)."""
    if not enabled():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    init()
    dev = device()
    model.to(dev)
    find_unused = os.environ.get("NASTY_DDP_FIND_UNUSED", "0") == "1"  # set it for objectives that leave parameters unused
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=find_unused)
