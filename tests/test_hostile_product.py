"""Issue 11, classes 8c and 9: what the product says matches what it does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def test_kd_with_label_access_is_what_its_note_says():
    from nasty.attacks import check_requirements
    from nasty.attacks.augment import Mixed
    from nasty.attacks.base import Oracle
    from nasty.attacks.kd import KD, distill_loss
    from nasty.data import Batch
    from nasty.models import create_model

    torch.manual_seed(0)
    teacher = create_model("mlp:hidden=8", 10, 1, (8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    z_t = Oracle(teacher, "label")(x)
    z_s = torch.randn(16, 10)
    T, a = 4.0, 0.9
    loss, _ = distill_loss(z_s, z_t, Mixed(Batch(x, y, torch.arange(16), False), y, 1.0), T, a, True)
    expected = a * T**2 * F.cross_entropy(z_s / T, z_t.argmax(1)) + (1 - a) * F.cross_entropy(z_s, y)
    assert torch.allclose(loss, expected, atol=1e-5)
    note = " ".join(check_requirements(KD, query="label"))
    assert "T^2" in note and "temperature" in note and "reduces to cross-entropy" not in note


def test_training_state_passed_as_checkpoint_says_what_it_is(run_cli, tmp_path):
    from nasty.checkpoint import save_state_file

    run = tmp_path / "run"
    save_state_file(run / "train_state-teacher.safetensors", {"w": torch.zeros(2)}, {"epoch": 1})
    for arg in (run / "train_state-teacher.safetensors", run):
        rc, out, err = run_cli("eval", arg)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "training state" in err and "--resume" in err
    renamed = tmp_path / "progress.safetensors"
    (run / "train_state-teacher.safetensors").rename(renamed)
    rc, out, err = run_cli("eval", renamed)
    assert rc == 2 and "is a training state" in err and "model.safetensors" in err


def test_data_augment_is_a_flag_of_the_training_commands(run_cli, tmp_path):
    rc, out, err = run_cli("train-teacher", "--data-augment", "crop", "--model", "mlp:hidden=4", "--epochs", "1",
                           "--out", tmp_path / "r")
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["augment"] == "crop"
    rc, out, err = run_cli("train-teacher", "--data-augment", "rotate", "--out", tmp_path / "r2")
    assert rc == 2 and "augment" in err
    for cmd in ("train-defended", "attack"):
        rc, out, err = run_cli(cmd, "--help")
        assert "--data-augment" in out


@pytest.mark.parametrize("needle", ["../shared", "this workplace"])
def test_product_text_speaks_of_the_product(needle):
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "nasty").rglob("*.py") if needle in p.read_text()]
    assert not hits, hits
    table = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("|") and needle in ln]
    assert not table, table
