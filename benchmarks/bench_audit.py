"""Audit benchmark (issue 4): how long does `nasty audit` of k attacks take, compared with running one
attack the ordinary way (`nasty attack`, one process per student and seed) on the same students and data?

Target: audit(k attacks) <= 0.6 * k * T_attack, where T_attack is the summed wall time of the
`nasty attack --method kd` runs over the same students x seeds grid. The audit trains k + 2 students
per (student, seed) -- the two label-only baselines are shared by all attacks -- and runs the teacher
once per audit (shared output cache); the script also reports the cost of doing the same work by hand,
(k + 2) * T_attack, and the teacher forward passes each audit made.

Every step is a real CLI call (printed with its command), so each number can be reproduced.

Tiny check on digits (about a minute on 2 cores; trains its own small teacher):

    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py --dataset digits --students mlp --seeds 1 \\
        --epochs 2 --ks 1,2 --out bench_runs/audit-digits

Fashion-MNIST (as in docs/results.md; about 40 minutes on one core):

    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py --teacher bench_runs/fm/seed0/normal --config configs/fashion-mnist.toml \\
        --train-subset 3000 --epochs 40 --batch-size 64 --extra '--lr 0.05 --schedule cosine' --students mlp:hidden=128,cnn:width=0.25 --seeds 3 --ks 1,3,6 \\
        --unfused --out bench_runs/audit-fm

Writes OUT/bench_audit.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ATTACKS = "kd,averager,tllm,skeptical,copycat,knockoff"


def timed(cmd: list[str], log: Path, ok=(0, 1)) -> float:
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if rc not in ok:
        sys.exit(f"command failed ({rc}); see {log}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", help="Teacher checkpoint (default: train a small one with --teacher-epochs).")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--config", help="TOML config passed to every command ([data], [train]).")
    ap.add_argument("--train-subset", type=int, help="The thief's labelled images.")
    ap.add_argument("--students", default="mlp")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, help="Student epochs (default: the config's).")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--extra", default="", help="More flags for every attack and audit, e.g. '--lr 0.05 --schedule cosine'.")
    ap.add_argument("--attacks", default=DEFAULT_ATTACKS, help="Pool of attacks; the first k are audited.")
    ap.add_argument("--ks", default="1,2", help="Comma-separated numbers of attacks to audit.")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--out", default="bench_runs/audit")
    ap.add_argument("--unfused", action="store_true", help="Also time the largest audit with --no-fuse (one run at a time).")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nasty = [sys.executable, "-m", "nasty"]
    common: list[str] = []
    if args.config:
        common += ["--config", args.config]
    else:
        common += ["--dataset", args.dataset]
    for flag, v in (("--train-subset", args.train_subset), ("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if v is not None:
            common += [flag, str(v)]
    common += shlex.split(args.extra)
    teacher = args.teacher
    if not teacher:
        teacher = str(out / "teacher")
        if not (Path(teacher) / "model.json").is_file():
            timed(nasty + ["train-teacher", "--dataset", args.dataset, *(["--config", args.config] if args.config else []),
                           "--epochs", str(args.teacher_epochs), "--out", teacher, "--force"], out / "teacher.log")
    students = [s for s in args.students.split(",") if s]
    pool = [a for a in args.attacks.split(",") if a]
    ks = [int(k) for k in args.ks.split(",")]
    if max(ks) > len(pool):
        sys.exit(f"--ks asks for {max(ks)} attacks but the pool has {len(pool)}")

    # one attack, the ordinary way: one `nasty attack` process per student and seed
    t_attack = 0.0
    for st in students:
        for seed in range(args.seeds):
            run = out / "attack" / f"{st.replace(':', '-').replace('=', '')}-seed{seed}"
            t_attack += timed(nasty + ["attack", "--method", "kd", "--teacher", teacher, "--student", st, "--seed", str(seed),
                                       *common, "--out", run, "--force"], out / f"attack-{run.name}.log")
    rows = []
    for k in ks:
        aud = out / f"audit-k{k}"
        dt = timed(nasty + ["audit", teacher, "--attacks", ",".join(pool[:k]), "--students", args.students, "--seeds",
                            str(args.seeds), *common, "--out", aud, "--force"],
                   out / f"audit-k{k}.log", ok=(0, 1))
        audit = json.loads((aud / "audit.json").read_text())
        rows.append({"k": k, "attacks": pool[:k], "audit_seconds": dt, "ratio": dt / t_attack, "target_ratio": 0.6 * k,
                     "meets_target": dt / t_attack <= 0.6 * k, "by_hand_seconds": (k + 2) * t_attack,
                     "runs_trained": audit["runtime"]["runs_trained"], "teacher_samples_run": audit["runtime"]["teacher_samples_run"],
                     "skipped": [a for a, v in audit["targets"]["teacher"]["attacks"].items() if v["status"] != "ok"]})
    unfused = None
    if args.unfused:
        k = max(ks)
        aud = out / f"audit-k{k}-nofuse"
        dt = timed(nasty + ["audit", teacher, "--attacks", ",".join(pool[:k]), "--students", args.students, "--seeds",
                            str(args.seeds), *common, "--out", aud, "--force", "--no-fuse"], out / f"audit-k{k}-nofuse.log", ok=(0, 1))
        fused = next(r for r in rows if r["k"] == k)
        unfused = {"k": k, "audit_seconds": dt, "ratio": dt / t_attack, "fused_speedup": dt / fused["audit_seconds"]}
    result = {"teacher": teacher, "students": students, "seeds": args.seeds, "common_args": common,
              "attack_seconds": t_attack, "rows": rows, "unfused": unfused,
              "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}
    (out / "bench_audit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\none attack (`nasty attack --method kd`, {len(students)} student(s) x {args.seeds} seed(s)): {t_attack:.1f} s\n")
    print("| k attacks | audit s | ratio audit / one attack | target (0.6 k) | met | by hand, (k+2) x one attack, s | runs trained | teacher samples run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} ({', '.join(r['attacks'])}) | {r['audit_seconds']:.1f} | {r['ratio']:.2f} | {r['target_ratio']:.1f} | "
              f"{'yes' if r['meets_target'] else 'no'} | {r['by_hand_seconds']:.1f} | {r['runs_trained']} | {r['teacher_samples_run']} |")
    if unfused:
        print(f"\n--no-fuse, k = {unfused['k']}: {unfused['audit_seconds']:.1f} s (ratio {unfused['ratio']:.2f}); "
              f"the shared passes save {100 * (1 - 1 / unfused['fused_speedup']):.0f}% ({unfused['fused_speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
