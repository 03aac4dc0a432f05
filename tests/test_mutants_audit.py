"""Tests that kill mutants of the audit's defense-effect report (issue 15): the classes a defense
*protects* (transferred from the undefended reference, not from the audited teacher) and the classes
*newly transferred* (from the teacher, not from the reference) must not be swapped, neither in
``audit.json`` nor in the rendered reports."""

from __future__ import annotations

import json
import re

import pytest

TINY = ["--students", "mlp", "--epochs", "2", "--batch-size", "128", "--bootstrap", "200", "--seeds", "1"]


@pytest.fixture(scope="module")
def good_and_garbage(digits, tmp_path_factory):
    """A trained MLP (about 95% on digits) and an untrained one (chance), both saved as checkpoints."""
    import torch

    from nasty.config import load_config
    from nasty.models import create_model
    from nasty.runs import save_model
    from nasty.train import TrainConfig, ce_objective, fit

    root = tmp_path_factory.mktemp("targets")
    good = create_model("mlp:hidden=128", digits.num_classes, digits.in_channels, digits.image_size)
    fit(good, ce_objective(), digits, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0), log=None)
    torch.manual_seed(1)
    garbage = create_model("mlp:hidden=128", digits.num_classes, digits.in_channels, digits.image_size)
    for name, model in (("good", good), ("garbage", garbage)):
        save_model(root / name, model.eval(), digits, load_config(None), {})
    return root / "good", root / "garbage"


def _row(md: str, attack: str) -> list[str]:
    section = md.split("## What the defense bought", 1)[1]
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {attack} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_protected_and_newly_transferred_are_not_swapped(run_cli, good_and_garbage, tmp_path):
    good, garbage = good_and_garbage
    out = tmp_path / "a"
    # audited teacher: chance-level (little transfers); reference: a good teacher (KD about as good as labels)
    rc, _, err = run_cli("audit", garbage, "--reference", good, "--attacks", "kd", "--out", out, *TINY, "--margin", "-40")
    assert rc == 0, err
    a = json.loads((out / "audit.json").read_text())
    ref = set(a["targets"]["reference"]["attacks"]["kd"]["transferred_classes"])
    tea = set(a["targets"]["teacher"]["attacks"]["kd"]["transferred_classes"])
    assert len(ref - tea) >= 5, (ref, tea)  # the defense (a useless teacher) "protects" most classes: a swap shows
    eff = a["defense_effect"]["kd"]
    assert eff["protected_classes"] == sorted(ref - tea)
    assert eff["newly_transferred"] == sorted(tea - ref) and eff["still_transferred"] == sorted(ref & tea)
    # the rendered table puts each set in its own column
    md = (out / "audit.md").read_text()
    cell = lambda cs: ", ".join(map(str, sorted(cs))) or "none"  # noqa: E731
    assert _row(md, "kd") == ["kd", cell(ref - tea), cell(ref & tea), cell(tea - ref)]


def test_report_renders_each_set_in_its_column(run_cli, good_and_garbage, tmp_path):
    """Re-rendering an audit.json whose three sets are distinct: each lands under its own heading (md and html)."""
    good, garbage = good_and_garbage
    out = tmp_path / "a"
    rc, _, err = run_cli("audit", garbage, "--reference", good, "--attacks", "kd", "--out", out, *TINY, "--margin", "-100")
    assert rc == 0, err
    a = json.loads((out / "audit.json").read_text())
    a["defense_effect"]["kd"] = {"protected_classes": [1, 2], "still_transferred": [4], "newly_transferred": [7, 8, 9]}
    (out / "audit.json").write_text(json.dumps(a))
    rc, _, err = run_cli("report", out / "audit.json")
    assert rc == 0, err
    md = (out / "audit.md").read_text()
    header = next(ln for ln in md.split("## What the defense bought", 1)[1].splitlines() if ln.startswith("| attack |"))
    assert [c.strip() for c in header.strip().strip("|").split("|")] == ["attack", "protected", "still transferred",
                                                                            "newly transferred"]
    assert _row(md, "kd") == ["kd", "1, 2", "4", "7, 8, 9"]
    html = (out / "audit.html").read_text()
    table = html.split("What the defense bought", 1)[1].split("</table>", 1)[0]
    cells = lambda tag: [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", table)]  # noqa: E731
    assert cells("th") == ["attack", "protected", "still transferred", "newly transferred"]
    assert cells("td") == ["kd", "1, 2", "4", "7, 8, 9"]
