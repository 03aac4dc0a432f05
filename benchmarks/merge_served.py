"""Merge bench_served.py results of the same normal teacher and seeds, taking the named targets from each, after
checking that every run both trained (floors, the normal teacher's KD) has the same accuracy to the last bit
(the students are deterministic: one thread, fixed seeds).

    python benchmarks/merge_served.py OUT.json RUN1.json=normal,decision RUN2.json=confidence:bins=1,confidence:bins=3
"""

from __future__ import annotations

import json
import sys


def merge(runs: list[tuple[dict, list[str]]]) -> dict:
    """One result from ``(result, targets to take from it)`` pairs; an AssertionError if shared runs differ."""
    m = {"meta": {"runs": [d["meta"] for d, _ in runs], "merged": "runs of the same normal teacher, seeds and code; every run "
                  "both trained (floors, the normal teacher's KD) gave the same accuracy to the last bit, checked when merging"},
         "quality": {}, "accuracy": {}, "leakage": {}, "floors": {}, "failed": []}
    for d, take in runs:
        for k, v in d["accuracy"].items():  # keys: student/seed/target/method; target "-" for the label-only floors
            target = k.split("/")[2]
            if k in m["accuracy"]:
                assert m["accuracy"][k] == v, (k, m["accuracy"][k], v)
            elif target in take or target in ("-", "normal"):
                m["accuracy"][k] = v
        for t in take:
            m["leakage"][t], m["floors"][t], m["quality"][t] = d["leakage"][t], d["floors"][t], d["quality"][t]
        m["quality"]["labels-only"] = d["quality"]["labels-only"]
        m["failed"] += d["failed"]
        for k in ("labelled", "queries", "seeds"):
            assert m.setdefault(k, d[k]) == d[k], k
    return m


def main() -> None:
    out, *specs = sys.argv[1:]
    runs = [(json.loads(open(path).read()), targets.split(",")) for path, targets in (s.split("=", 1) for s in specs)]
    m = merge(runs)
    open(out, "w").write(json.dumps(m, indent=1))
    print({t: list(v) for t, v in m["leakage"].items()}, len(m["accuracy"]), "runs")


if __name__ == "__main__":
    main()
