"""Compare numbers of two bitcheck folders: result.json / audit.json (minus timings, paths, dates)."""
import json, sys, pathlib
A, B = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
SKIP = {"seconds", "train_seconds", "created", "out_dir", "versions", "runtime", "trained_with"}  # times and dates
PATHS = {"checkpoint", "defended_checkpoint", "normal_checkpoint", "teacher", "reference", "adversaries", "data_root"}  # where a run lives
def strip(o, path=""):
    if isinstance(o, dict):
        return {k: strip(v, path + "." + k) for k, v in o.items()
                if k not in SKIP and not k.endswith("_seconds") and not (k in PATHS and not isinstance(v, dict))}
    if isinstance(o, list):
        return [strip(v, path) for v in o]
    if isinstance(o, str) and ("/tmp/" in o):
        return "<path>"
    return o
def diff(a, b, path=""):
    if type(a) != type(b):
        return [f"{path}: {a!r} vs {b!r}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'A' if k in a else 'B'}")
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: len {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]
files = sorted(p.relative_to(A) for p in A.rglob("*.json") if p.name in ("result.json", "audit.json", "metrics.json"))
bad = 0; n = 0
for rel in files:
    if not (B / rel).exists():
        print("missing in B:", rel); bad += 1; continue
    n += 1
    d = diff(strip(json.loads((A / rel).read_text())), strip(json.loads((B / rel).read_text())))
    if d:
        bad += 1
        print(rel, len(d), "differences, e.g.", d[:3])
# also metrics.jsonl val accuracy/loss per epoch and test predictions
import numpy as np
for p in sorted(A.rglob("metrics.jsonl")):
    rel = p.relative_to(A); q = B / rel
    if not q.exists():
        print("missing in B:", rel); bad += 1; continue
    ra = [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in p.read_text().splitlines()]
    rb = [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in q.read_text().splitlines()]
    n += 1
    if ra != rb:
        bad += 1; print(rel, "metrics.jsonl differ")
for p in sorted(A.rglob("test_pred.npy")):
    rel = p.relative_to(A); n += 1
    if not np.array_equal(np.load(p), np.load(B / rel)):
        bad += 1; print(rel, "test_pred differ")
print(f"compared {n} files, {bad} differ")
