"""Merge bench_served.py results of the same normal teacher and seeds, taking the named targets from each, after
checking that every run both trained (floors, the normal teacher's KD) has the same accuracy to the last bit
(the students are deterministic: one thread, fixed seeds).

    python benchmarks/merge_served.py OUT.json RUN1.json=normal,decision RUN2.json=confidence:bins=1,confidence:bins=3
"""
import json, sys
out, *ins = sys.argv[1:]
docs = [json.load(open(f.split("=", 1)[0])) for f in ins]
take = [f.split("=", 1)[1].split(",") for f in ins]
m = {"meta": {"runs": [d["meta"] for d in docs], "merged": "runs of the same normal teacher, seeds and code; every run both "
      "trained (floors, the normal teacher's KD) gave the same accuracy to the last bit, checked when merging"},
     "quality": {}, "accuracy": {}, "leakage": {}, "floors": {}, "failed": []}
for i, d in enumerate(docs):
    keep = set(take[i])
    for k, v in d["accuracy"].items():
        t = k.split("/")[2]
        if k in m["accuracy"]:
            assert m["accuracy"][k] == v, (k, m["accuracy"][k], v)
        elif t in keep or t == "-" or t == "normal":
            m["accuracy"][k] = v
    for t in keep:
        m["leakage"][t] = d["leakage"][t]; m["floors"][t] = d["floors"][t]; m["quality"][t] = d["quality"][t]
    m["quality"]["labels-only"] = d["quality"]["labels-only"]
    m["failed"] += d["failed"]
    for k in ("labelled", "queries", "seeds"):
        assert m.setdefault(k, d[k]) == d[k]
json.dump(m, open(out, "w"), indent=1)
print({t: list(v) for t, v in m["leakage"].items()}, len(m["accuracy"]))
