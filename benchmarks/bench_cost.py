"""What the defense costs (issue "The defense's cost"): wall time of ``nasty train-teacher`` and of
``nasty train-defended`` (with and without the probe, and per stage) on the same config, and the served
model's latency against the normal model's (PyTorch and ONNX Runtime, batch 1 and 256). Every ratio
comes from one run on one machine.

    python benchmarks/bench_cost.py --configs configs/digits.toml --threads 1 2 --json docs/bench/cost.json

Each command runs as a subprocess with ``OMP_NUM_THREADS`` set and ``--jobs`` equal to it (T threads:
T student processes of one thread each; the CLI as a user runs it, start-up included); the stage times come from the time each log line arrived. Fashion-MNIST needs its dataset
(the benchmark skips a config whose data it cannot load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STAGES = [  # (name, first log line of the stage)
    ("normal teacher", re.compile(r"^\[normal")),
    ("nasty heads", re.compile(r"^\[nasty-head")),
    ("strength choice", re.compile(r"^\[tune\]")),
    ("probe", re.compile(r"^\[probe\] the thief|^\[probe\] mlp|^\[probe\] cnn|^\[probe\] [0-9]+ of")),
]


def timed(cmd: list[str], threads: int, log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Wall seconds of ``cmd`` and its stderr lines with the second each arrived."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
    rc = proc.wait()
    wall = time.perf_counter() - t0
    log.write_text("\n".join(f"{t:8.2f} {s}" for t, s in lines))
    if rc:
        sys.exit(f"{' '.join(cmd)} failed ({rc}); log: {log}")
    return wall, lines


def stages(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Seconds from each stage's first line to the next stage's first line (or the end)."""
    starts = []
    for name, pat in STAGES:
        t = next((t for t, s in lines if pat.search(s)), None)
        if t is not None:
            starts.append((t, name))
    starts.sort()
    out = {"start-up": starts[0][0] if starts else wall}
    for i, (t, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else wall
        out[name] = end - t
    return out


def latency(model, x: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one forward pass on ``x``."""
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def serving(normal_ckpt: Path, defended_ckpt: Path, threads: int, repeats: int) -> dict:
    """Latency of the served probabilities, defended vs normal: PyTorch and ONNX Runtime, batch 1 and 256."""
    from nasty.checkpoint import load_checkpoint
    from nasty.export import ServedModel, export_model

    torch.set_num_threads(threads)
    out: dict = {}
    served = {}
    for name, ck in (("normal", normal_ckpt), ("defended", defended_ckpt)):
        model, side = load_checkpoint(ck)
        served[name] = (ServedModel(model.eval(), side["normalization"]["mean"], side["normalization"]["std"]).eval(), side, model)
    c, h, w = served["normal"][1]["input_shape"]
    for batch in (1, 256):
        x = torch.rand(batch, c, h, w)
        # alternate normal/defended so that load on the machine affects both alike
        ms = {"normal": [], "defended": []}
        for _ in range(5):
            for name in ms:
                ms[name].append(latency(served[name][0], x, repeats))
        out[f"pytorch_batch{batch}"] = {k: statistics.median(v) for k, v in ms.items()}
    try:
        import onnxruntime as ort
    except ImportError:
        out["onnx"] = "onnxruntime not installed (pip install 'nasty[onnx]')"
        return out
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, (_, side, model) in served.items():
            path = Path(tmp) / f"{name}.onnx"
            export_model(model, side, path, "onnx")
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for batch in (1, 256):
            x = torch.rand(batch, c, h, w).numpy()
            ms = {"normal": [], "defended": []}
            for _ in range(5):
                for name, sess in sessions.items():
                    run = lambda a, s=sess: s.run(None, {s.get_inputs()[0].name: a})  # noqa: E731
                    ms[name].append(latency(run, x, repeats))
            out[f"onnx_batch{batch}"] = {k: statistics.median(v) for k, v in ms.items()}
    for k, v in out.items():
        if isinstance(v, dict):
            v["ratio"] = v["defended"] / v["normal"]
    return out


def inference_layout(repeats: int = 5) -> list[dict]:
    """``nasty.metrics.predict_logits`` (channels-last, batch 256 for convolutional models) against the plain
    loop it replaced (default layout, batch 1024): ms per image, one thread, alternated ABAB."""
    from nasty.metrics import predict_logits
    from nasty.models import create_model

    torch.set_num_threads(1)
    rows = []
    for spec, shape in (("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))):
        model = create_model(spec, 10, shape[0], shape[1:]).eval()
        x = torch.randn(2048, *shape)

        def old():
            with torch.no_grad():
                return torch.cat([model(x[i : i + 1024]) for i in range(0, len(x), 1024)])

        def new():
            return predict_logits(model, x)

        times = {"nchw_batch1024": [], "predict_logits": []}
        for _ in range(repeats):
            for name, f in (("nchw_batch1024", old), ("predict_logits", new)):
                t = time.perf_counter()
                f()
                times[name].append(1000 * (time.perf_counter() - t) / len(x))
        row = {"model": spec, "input": list(shape), **{k: statistics.median(v) for k, v in times.items()}}
        row["speedup"] = row["nchw_batch1024"] / row["predict_logits"]
        row["max_abs_logit_difference"] = float((old() - new()).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["configs/digits.toml"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--no-full", action="store_true", help="skip train-defended with the probe (the slowest run)")
    ap.add_argument("--repeats", type=int, default=30, help="timed forward passes per latency measurement")
    ap.add_argument("--out", type=Path, default=Path("bench-cost"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--inference-layout", action="store_true", help="only time predict_logits against the plain NCHW loop")
    args = ap.parse_args()
    if args.inference_layout:
        rows = inference_layout()
        if args.json:
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                             "rows": rows}, indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    nasty = [sys.executable, "-m", "nasty"]
    rows = []
    for config in args.configs:
        tag = Path(config).stem
        for threads in args.threads:
            row: dict = {"config": config, "threads": threads}
            d = args.out / f"{tag}-t{threads}"
            wall, _ = timed(nasty + ["train-teacher", "--config", config, "--out", str(d / "teacher"), "--force"], threads,
                            args.out / f"{tag}-t{threads}-teacher.log")
            row["train_teacher_s"] = wall
            wall, lines = timed(nasty + ["train-defended", "--config", config, "--out", str(d / "noprobe"), "--no-probe", "--force",
                                         "--jobs", str(threads)], threads, args.out / f"{tag}-t{threads}-noprobe.log")
            row["train_defended_no_probe_s"], row["no_probe_stages"] = wall, stages(lines, wall)
            if not args.no_full:
                wall, lines = timed(nasty + ["train-defended", "--config", config, "--out", str(d / "full"), "--force"] +
                                    (["--jobs", str(threads)]), threads, args.out / f"{tag}-t{threads}-full.log")
                row["train_defended_s"], row["stages"] = wall, stages(lines, wall)
                row["ratio_defended"] = row["train_defended_s"] / row["train_teacher_s"]
            row["ratio_no_probe"] = row["train_defended_no_probe_s"] / row["train_teacher_s"]
            row["serving"] = serving(d / "noprobe" / "normal", d / "noprobe" / "defended", threads, args.repeats)
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)
    meta = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or '?'}",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    print("\n| config | threads | train-teacher s | train-defended s (x) | --no-probe s (x) | serving PyTorch b1 / b256 | ONNX b1 / b256 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["serving"]
        full = f"{r['train_defended_s']:.0f} ({r['ratio_defended']:.1f}x)" if "train_defended_s" in r else "-"
        onnx = (f"{s['onnx_batch1']['ratio']:.2f}x / {s['onnx_batch256']['ratio']:.2f}x" if "onnx_batch1" in s else "-")
        print(f"| {r['config']} | {r['threads']} | {r['train_teacher_s']:.1f} | {full} | {r['train_defended_no_probe_s']:.0f} "
              f"({r['ratio_no_probe']:.1f}x) | {s['pytorch_batch1']['ratio']:.2f}x / {s['pytorch_batch256']['ratio']:.2f}x | {onnx} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
