"""`nasty report` reads an audit.json that may be damaged or hostile: any malformed field is bad input
(one line, exit 2), never an internal error, and nothing is written."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "audit-fashion-mnist" / "audit.json"


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and obj:
        yield from _leaves(obj[0], (*path, 0))
    else:
        yield path


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="the committed example audit is missing")
def test_malformed_fields_are_bad_input_not_internal_errors(tmp_path, run_cli):
    audit = json.loads(EXAMPLE.read_text())
    leaves = list(_leaves(audit))
    rng = random.Random(0)
    picked = rng.sample(leaves, min(15, len(leaves)))
    picked.append(("targets", "teacher", "accuracy"))  # read by every renderer (was an exit-3 format error)
    codes = {}
    for i, path in enumerate(picked):
        for j, value in enumerate(("high", None, [1, 2], {"a": 1})):
            bad = copy.deepcopy(audit)
            _set(bad, path, value)
            f = tmp_path / f"a{i}-{j}.json"
            f.write_text(json.dumps(bad))
            out = tmp_path / f"out{i}-{j}"
            rc, stdout, err = run_cli("report", f, "--out", out)
            assert rc in (0, 2), (path, value, err)
            if rc == 2:
                assert err.startswith("error: ") and err.strip().count("\n") == 0 and "internal error" not in err, err
                assert not out.exists() or not any(out.iterdir()), (path, value)  # nothing written
            codes[rc] = codes.get(rc, 0) + 1
    assert codes.get(2, 0) >= 1  # the accuracy-as-text case at least is refused
