"""Memory layout of convolutional training (nasty.train.use_channels_last): one epoch of the real
training loop (`nasty.train.fit`) in the default NCHW layout vs channels-last, per architecture, on a
Fashion-MNIST subset. Both layouts alternate (ABAB...) in one process, so machine load hits both alike.

    OMP_NUM_THREADS=1 python benchmarks/bench_layout.py --subset 6000 --repeats 3 --json docs/bench/layout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from nasty.data import load_dataset
from nasty.models import create_model
from nasty.train import TrainConfig, ce_objective, fit

SPECS = ["cnn", "cnn:width=0.25", "resnet20:width=0.5", "mlp:hidden=128"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", type=int, default=6000, help="training images per timed epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--specs", nargs="*", default=SPECS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    data = load_dataset("fashion-mnist", train_subset=args.subset)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.05, seed=0)
    times: dict[str, dict[str, list[float]]] = {s: {"nchw": [], "channels_last": []} for s in args.specs}
    accs: dict[str, dict[str, list[float]]] = {s: {"nchw": [], "channels_last": []} for s in args.specs}
    for r in range(args.repeats):
        for spec in args.specs:
            for layout, env in (("nchw", "0"), ("channels_last", "1")):
                os.environ["NASTY_CHANNELS_LAST"] = env
                torch.manual_seed(r)
                model = create_model(spec, data.num_classes, data.in_channels, data.image_size)
                t0 = time.perf_counter()
                res = fit(model, ce_objective(), data, cfg, log=None)
                times[spec][layout].append(time.perf_counter() - t0)
                accs[spec][layout].append(res.best_val_accuracy)
    out = {"machine": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}", "images": len(data.y_train),
           "batch_size": args.batch_size, "repeats": args.repeats, "seconds_per_epoch": times, "val_accuracy": accs,
           "speedup_channels_last_median": {s: statistics.median(t["nchw"]) / statistics.median(t["channels_last"])
                                            for s, t in times.items()}}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
