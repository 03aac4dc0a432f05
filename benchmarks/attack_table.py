"""The attack-suite benchmark table (issue 3), read from an ``audit.json``.

The audit already runs every attack x student x seed against the defended teacher and, with
``--reference``, against the normal one, with shared label-only baselines; this script only
tabulates it: per attack and student, accuracy minus the label-only twin (mean ± sd over seeds),
TLLM's undistillable classes, the share of the normal teacher's KD gain an attack recovers against
the defended teacher, and the training time per run.

    nasty audit DEFENDED --reference NORMAL ... --out AUDIT
    python benchmarks/attack_table.py AUDIT/audit.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def ms(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.2f}" if values else "–"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def main(path: str) -> None:
    audit = json.loads(Path(path).read_text())
    base = audit["baselines"]
    targets = audit["targets"]
    students = audit["config"]["students"]
    print("| attack | student | vs label-only, normal teacher | vs label-only, defended teacher | "
          "share of normal KD gain recovered | transferred classes (normal → defended) | TLLM U (normal / defended) | s per run |")
    print("|---|---|---|---|---|---|---|---|")
    kd_gain = {}
    for st in students:
        ref = targets.get("reference", {}).get("attacks", {}).get("kd", {}).get("students", {}).get(st)
        if ref:
            kd_gain[st] = statistics.mean(ref["accuracy_per_seed"]) - statistics.mean(base["scratch"][st]["accuracy_per_seed"])
    for name, att in targets["teacher"]["attacks"].items():
        for st in students:
            row_d = att["students"].get(st)
            row_n = targets.get("reference", {}).get("attacks", {}).get(name, {}).get("students", {}).get(st)
            if row_d is None:
                reason = att.get("reason") or att.get("skipped_students", {}).get(st, "skipped")
                print(f"| {name} | {st} | skipped: {reason} | | | | | |")
                continue
            scratch = base["scratch"][st]["accuracy_per_seed"]
            gd = [a - b for a, b in zip(row_d["accuracy_per_seed"], scratch)]
            gn = [a - b for a, b in zip(row_n["accuracy_per_seed"], scratch)] if row_n else []
            rec = f"{100 * statistics.mean(gd) / kd_gain[st]:.0f}%" if kd_gain.get(st, 0) > 0 else "–"
            tn = row_n["transferred_count"] if row_n else "–"
            u = ""
            if name == "tllm":  # |U| per seed
                sizes = lambda row: [len(x) for x in (row or {}).get("extra", {}).get("undistillable_classes", [])]  # noqa: E731
                u = f"{sizes(row_n)} / {sizes(row_d)}"
            secs = row_d["train_seconds"] / len(row_d["accuracy_per_seed"])
            print(f"| {name} | {st} | {ms(gn) if gn else '–'} | {ms(gd)} | {rec} | {tn} → {row_d['transferred_count']} | {u} | "
                  f"{'' if secs is None else f'{secs:.0f}'} |")
    for st in students:
        for b in ("scratch", "label-smoothing"):
            v = base[b][st]["accuracy_per_seed"]
            print(f"\n{b} {st}: {statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f} (seeds {len(v)})", end="")
    print()


if __name__ == "__main__":
    main(sys.argv[1])
