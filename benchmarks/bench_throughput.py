"""Throughput on Fashion-MNIST (issue 2): data-handling share of an epoch, plain vs nasty training,
and the speed-up from caching a frozen network's outputs. All ratios come from the same process,
measured alternately (ABAB...) so that load on the machine affects both sides alike.

    python benchmarks/bench_throughput.py --repeats 3 --subset 12000 --json docs/bench/throughput.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nasty.config import defaults
from nasty.data import iterate_batches, load_dataset
from nasty.defenses.nasty import NastyTeacher
from nasty.losses import kd_loss
from nasty.models import create_model
from nasty.train import Frozen, TrainConfig, make_optimizer


def one_epoch(model, objective, x, y, batch_size: int, seed: int) -> tuple[float, float]:
    """Seconds for one epoch, and the seconds spent producing batches."""
    opt = make_optimizer(model.parameters(), TrainConfig(lr=0.01))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t_data = 0.0
    t0 = time.perf_counter()
    it = iterate_batches(x, y, batch_size, gen, "none")
    while True:
        t1 = time.perf_counter()
        batch = next(it, None)
        t_data += time.perf_counter() - t1
        if batch is None:
            break
        loss = objective(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0, t_data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subset", type=int, default=12000, help="training images per timed epoch")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist")
    x, y = data.x_train[: args.subset], data.y_train[: args.subset]
    mk = lambda spec: create_model(spec, 10, 1, (28, 28))  # noqa: E731
    adversary, teacher = mk("cnn").eval(), mk("cnn").eval()

    def plain(m, b):
        return F.cross_entropy(m(b.x), b.y)

    defense_cfg = {**defaults()["defense"], "tau": 4.0, "omega": 0.1}

    def nasty_with(frozen):
        objective = NastyTeacher(defense_cfg).objective([frozen])  # exactly what train-defended runs
        return lambda m, b: objective(m, b, 0)[0]

    def kd_with(frozen):
        return lambda m, b: kd_loss(m(b.x), frozen(b), b.y, 4.0, 0.9)[0]

    cached_adv = Frozen(adversary, len(y))
    cached_teacher = Frozen(teacher, len(y))
    one_epoch(mk("cnn"), nasty_with(cached_adv), x, y, args.batch_size, 0)  # fill the caches (epoch 1)
    one_epoch(mk("mlp:hidden=32"), kd_with(cached_teacher), x, y, args.batch_size, 0)
    cases = {
        "teacher cnn, plain CE": ("cnn", plain),
        "teacher cnn, nasty, adversary cached": ("cnn", nasty_with(cached_adv)),
        "teacher cnn, nasty, adversary run every step": ("cnn", nasty_with(Frozen(adversary, len(y), cache=False))),
        "student mlp:hidden=32, KD, teacher cached": ("mlp:hidden=32", kd_with(cached_teacher)),
        "student mlp:hidden=32, KD, teacher run every step": ("mlp:hidden=32", kd_with(Frozen(teacher, len(y), cache=False))),
        "student cnn:width=0.25, KD, teacher cached": ("cnn:width=0.25", kd_with(cached_teacher)),
        "student cnn:width=0.25, KD, teacher run every step": ("cnn:width=0.25", kd_with(Frozen(teacher, len(y), cache=False))),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    data_share: list[float] = []
    for r in range(args.repeats):
        for name, (spec, obj) in cases.items():
            torch.manual_seed(r)
            sec, t_data = one_epoch(mk(spec), obj, x, y, args.batch_size, r)
            times[name].append(sec)
            if name == "teacher cnn, plain CE":
                data_share.append(t_data / sec)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "machine": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}",
        "images_per_epoch": len(y), "batch_size": args.batch_size, "repeats": args.repeats,
        "seconds_per_epoch": times,
        "images_per_second_median": {k: len(y) / v for k, v in med.items()},
        "data_handling_share_cnn": {"median": statistics.median(data_share), "max": max(data_share)},
        "ratios": {
            "nasty (cached) / plain": med["teacher cnn, nasty, adversary cached"] / med["teacher cnn, plain CE"],
            "nasty (uncached) / plain": med["teacher cnn, nasty, adversary run every step"] / med["teacher cnn, plain CE"],
            "nasty speed-up from caching": med["teacher cnn, nasty, adversary run every step"] / med["teacher cnn, nasty, adversary cached"],
            "KD mlp speed-up from caching": med["student mlp:hidden=32, KD, teacher run every step"] / med["student mlp:hidden=32, KD, teacher cached"],
            "KD cnn-0.25 speed-up from caching": med["student cnn:width=0.25, KD, teacher run every step"] / med["student cnn:width=0.25, KD, teacher cached"],
        },
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
