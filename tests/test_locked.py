"""Decision-locked defended teachers: the lock, the artifact, training, strength selection, the
adaptive attacks built against them, and the bad input around them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from nasty.config import load_config
from nasty.pipelines.defended import train_defended
from nasty.models import create_model
from nasty.models.served import lock_rule, serve, served_gap


def test_lock_rules_put_the_decision_on_top_and_keep_the_rest():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 10, generator=g)
    z[:50, 3] = z[:50, 7] = 9.0  # exact ties with the top
    d = torch.randint(0, 10, (500,), generator=g)
    normal = torch.nn.functional.one_hot(d, 10).float()  # normal logits deciding d
    for rule, margin in (("swap", 0.0), ("margin", 0.5)):
        served = serve(z, normal, rule, margin)
        assert torch.equal(served.argmax(1), d)
        zl = lock_rule(z, d[:, None], rule, margin)
        lead = served_gap(zl.softmax(1), d) >= 1.1e-3
        assert lead.sum() > 300  # rows already leading by the gap are served as the locked logits' softmax, untouched
        assert torch.allclose(served[lead], zl.log_softmax(1)[lead], atol=1e-6)
    swap = lock_rule(z, d[:, None], "swap", 0.0)
    assert torch.equal(swap.sort(1).values, z.sort(1).values)  # swap: a permutation of each row
    margin = lock_rule(z, d[:, None], "margin", 0.5)
    others = margin.scatter(1, d[:, None], float("-inf")).amax(1)
    assert (margin.gather(1, d[:, None]).squeeze(1) >= others + 0.5 - 1e-6).all()
    untouched = torch.ones_like(z, dtype=torch.bool).scatter(1, d[:, None], False)
    assert torch.equal(margin[untouched], z[untouched])  # margin changes the decided logit only
    # golden: swap exchanges the decided logit with the top one
    assert lock_rule(torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[2]]), "swap", 0.0).tolist() == [[1.0, 2.0, 5.0]]


@pytest.mark.parametrize("form,nasty", [("two-head", "linear"), ("two-head", "mlp:hidden=8"), ("two-net", "mlp:hidden=8")])
def test_locked_model_serves_the_decision_models_class_and_round_trips(tmp_path, digits, form, nasty):
    from nasty.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = create_model("locked", 10, 1, (8, 8), decision="cnn:width=0.25", nasty=nasty, form=form).eval()
    x = digits.x_test[:200]
    with torch.no_grad():
        assert torch.equal(m(x).argmax(1), m.decision(x).argmax(1))
        assert not torch.equal(m(x), m.decision(x))  # the soft outputs are the nasty part's
    save_checkpoint(tmp_path / "c", m, classes=digits.classes, input_shape=(1, 8, 8), mean=digits.mean, std=digits.std, dataset="digits")
    back, side = load_checkpoint(tmp_path / "c")
    assert side["model"]["name"] == "locked" and side["model"]["kwargs"]["form"] == form
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def _cfg(**defense):
    return load_config(None, {"model": {"name": "cnn:width=0.25"}, "train": {"epochs": 3, "batch_size": 64, "seed": 0},
                              "defense": {"head_epochs": 20, **defense},
                              "probe": {"students": ["mlp:hidden=16"], "train_subset": 300, "train": {"epochs": 4}}})


def test_two_head_default_keeps_accuracy_exactly_and_picks_omega_on_validation(tmp_path, digits, monkeypatch):
    import nasty.pipelines.defended as lock

    seen = []
    real = lock.tuning_data

    def spy(data, n, split_seed):
        t = real(data, n, split_seed)
        seen.append(t)
        return t

    monkeypatch.setattr(lock, "tuning_data", spy)
    r = train_defended(_cfg(omega_grid=[0.03, 0.3]), tmp_path / "d", log=lambda m: None)
    assert r["lock"] == "two-head" and r["accuracy_drop"] == 0.0
    assert r["defended_per_class_accuracy"] == r["normal_per_class_accuracy"]
    table = r["defense_info"]["tuning"]
    assert [row["omega"] for row in table] == [0.03, 0.3]
    best = min(table, key=lambda row: (row["worst_gain"], row["omega"]))
    assert r["omega"] == best["omega"]
    assert set(table[0]["val_gain"]) == {"kd", "rehead"}  # the adaptive attack is part of the choice
    # the strength is chosen on the validation split: the tuning students are scored on it, never on test
    (t,) = seen
    assert torch.equal(t.x_test, digits.x_val) and torch.equal(t.y_test, digits.y_val)
    assert not any(torch.equal(t.x_test, digits.x_test) for _ in [0])
    side = json.loads((tmp_path / "d" / "defended" / "model.json").read_text())
    assert side["model"]["name"] == "locked" and side["defense"]["omega"] == r["omega"]
    assert "normal model" in side["defense_info"]["lock"]["white_box"]
    rows = ("labels_only", "template", "normal", "defended")
    assert all(set(r[f"{k}_quality"]) == {"top1", "top5", "ece", "nll"} for k in rows)
    # every row serves the normal model's decision: one top-1; labels only gets 4/9 of the misses in its top-5
    assert len({round(r[f"{k}_quality"]["top1"], 9) for k in rows}) == 1
    lab = r["labels_only_quality"]
    assert lab["top5"] == pytest.approx(lab["top1"] + (100 - lab["top1"]) * 4 / 9)
    assert r["template_quality"]["top5"] < r["normal_quality"]["top5"]
    assert set(r["validation_cmi"]) == {"normal", "defended"} and all(v >= 0 for v in r["validation_cmi"].values())
    saved = json.loads((tmp_path / "d" / "result.json").read_text())
    assert saved["labels_only_quality"] == lab and saved["validation_cmi"] == r["validation_cmi"]
    (line,) = [x for x in r["verdict"].splitlines() if x.startswith("served utility")]
    assert f"labels only {lab['ece']:.2f}%" in line and f"defended {r['defended_quality']['top5']:.2f}%" in line


def test_two_head_harms_plain_kd_far_more_than_the_single_network(tmp_path):
    """At one fixed strength on real data (digits, seed 0) KD from the locked teacher falls under labels alone
    when the head shapes the whole served distribution (keep decision; a kept confidence near 1 serves almost
    labels, which plain KD learns from as from hard labels)."""
    cfg = load_config(None, {"model": {"name": "cnn:width=0.5"}, "train": {"epochs": 10, "batch_size": 64, "seed": 0},
                             "defense": {"omega": 0.1, "keep": "decision"},  # the default, said where the test depends on it
                             "probe": {"students": ["mlp:hidden=32"], "train_subset": 400, "train": {"epochs": 30}}})
    r = train_defended(cfg, tmp_path / "d", log=lambda m: None)
    s = r["probe"]["students"][0]
    assert r["accuracy_drop"] == 0.0
    assert s["kd_gain_normal"] > 0 > s["kd_gain_defended"] + 2, s  # KD from normal helps, from the lock it hurts (> 2 points)


def test_two_net_lock_and_the_lock_command(tmp_path, run_cli):
    cfg = _cfg(lock="two-net", omega=0.1, init_from="adversary")
    cfg["probe"]["enabled"] = False
    r = train_defended(cfg, tmp_path / "d", log=lambda m: None)
    assert r["lock"] == "two-net" and r["accuracy_drop"] == 0.0
    cfg = _cfg(lock="none", omega=0.3, adversary=[str(tmp_path / "d" / "normal")])
    cfg["probe"]["enabled"] = False
    single = train_defended(cfg, tmp_path / "single", log=lambda m: None)
    rc, out, err = run_cli("lock", "--decision", tmp_path / "d" / "normal", "--nasty", tmp_path / "single" / "defended",
                           "--out", tmp_path / "L", "--json")
    assert rc == 0, err
    rc, out, err = run_cli("eval", tmp_path / "L", "--json")
    assert rc == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(r["normal_accuracy"])
    assert single["accuracy_drop"] != 0.0
    # --keep on the lock command: the served top probability is the decision model's, or its validation-calibrated bin
    from nasty.checkpoint import load_checkpoint
    from nasty.data import load_dataset
    from nasty.metrics import predict_logits
    from nasty.models.served import fit_bins

    normal, side = load_checkpoint(tmp_path / "d" / "normal")
    data = load_dataset("digits", normalization=(side["normalization"]["mean"], side["normalization"]["std"]))
    p_normal = predict_logits(normal, data.x_test).softmax(1)
    for keep in ("confidence", "confidence:bins=4", "decision:top=5"):
        out_dir = tmp_path / keep.replace(":", "-")
        rc, out, err = run_cli("lock", "--decision", tmp_path / "d" / "normal", "--nasty", tmp_path / "single" / "defended",
                               "--keep", keep, "--out", out_dir, "--json")
        assert rc == 0, err
        locked, _ = load_checkpoint(out_dir)
        served = predict_logits(locked, data.x_test).softmax(1)
        assert torch.equal(served.argmax(1), p_normal.argmax(1))
        if keep == "confidence":
            assert torch.allclose(served.amax(1), p_normal.amax(1).clamp(max=1 - 1e-6), atol=1e-5)
        elif keep == "decision:top=5":  # the served top-5 set is the decision model's on (nearly) every image
            same = (served.topk(5, 1).indices.sort(1).values == p_normal.topk(5, 1).indices.sort(1).values).all(1)
            assert same.float().mean() > 0.99, same.float().mean()
        else:
            edges, values = fit_bins(predict_logits(normal, data.x_val), data.y_val, 4)
            assert torch.equal(locked.served.bin_edges, edges) and torch.equal(locked.served.bin_values, values)
    _one_line(*run_cli("lock", "--decision", tmp_path / "d" / "normal", "--nasty", tmp_path / "single" / "defended",
                       "--keep", "confidence:bins=0", "--out", tmp_path / "bad"), "keep")
    _one_line(*run_cli("lock", "--decision", tmp_path / "d" / "normal", "--nasty", tmp_path / "single" / "defended",
                       "--keep", "decision:top=11", "--out", tmp_path / "bad"), "top=11 is more than the 10 classes")
    assert not (tmp_path / "bad").exists()


def _one_line(rc, out, err, needle):
    assert rc == 2, (rc, err)
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert needle in err, err


def test_bad_input_around_locks(tmp_path, run_cli):
    from nasty.checkpoint import save_checkpoint

    locked = create_model("locked", 10, 1, (8, 8), decision="cnn:width=0.25")
    save_checkpoint(tmp_path / "L", locked, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8), mean=[0.3], std=[0.3], dataset="digits")
    plain = create_model("cnn:width=0.25", 10, 1, (8, 8))
    save_checkpoint(tmp_path / "P", plain, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8), mean=[0.3], std=[0.3], dataset="digits")
    save_checkpoint(tmp_path / "Q", plain, classes=[str(9 - i) for i in range(10)], input_shape=(1, 8, 8), mean=[0.3], std=[0.3], dataset="digits")
    save_checkpoint(tmp_path / "N", plain, classes=[str(i) for i in range(10)], input_shape=(1, 8, 8), mean=[0.5], std=[0.3], dataset="digits")
    tiny = ["--dataset", "digits", "--epochs", "1", "--no-probe"]
    _one_line(*run_cli("train-defended", *tiny, "--adversary", tmp_path / "L", "--out", tmp_path / "o1"), "decision-locked")
    _one_line(*run_cli("train-defended", *tiny, "--adversary", tmp_path / "P", "--lock", "two-net", "--init-from", tmp_path / "L",
                       "--out", tmp_path / "o2"), "decision-locked")
    _one_line(*run_cli("train-defended", *tiny, "--defense", "budget", "--max-accuracy-drop", "1", "--out", tmp_path / "o3"), "--lock none")
    _one_line(*run_cli("train-defended", *tiny, "--init-from", tmp_path / "P", "--out", tmp_path / "o4"), "two-head")
    _one_line(*run_cli("train-defended", *tiny, "--omega-grid", "0.1,nan", "--out", tmp_path / "o5"), "finite")
    _one_line(*run_cli("train-defended", *tiny, "--nasty-head", "transformer", "--out", tmp_path / "o6"), "nasty_head")
    _one_line(*run_cli("train-defended", *tiny, "--lock-margin", "-1", "--out", tmp_path / "o7"), "--lock-margin")
    _one_line(*run_cli("lock", "--decision", tmp_path / "P", "--nasty", tmp_path / "Q", "--out", tmp_path / "o8"), "classes")
    _one_line(*run_cli("lock", "--decision", tmp_path / "P", "--nasty", tmp_path / "N", "--out", tmp_path / "o9"), "normalisation")
    _one_line(*run_cli("lock", "--decision", tmp_path / "L", "--nasty", tmp_path / "P", "--out", tmp_path / "o10"), "decision-locked")
    for o in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
        assert not (tmp_path / o / "normal").exists()  # refused before anything trained


def test_rehead_corrector_undoes_an_invertible_scramble():
    from nasty.attacks.rehead import fit_corrector

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (600,), generator=g)
    normal = 4.0 * nn.functional.one_hot(y, 10).float() + torch.randn(600, 10, generator=g)
    perm = torch.randperm(10, generator=g)
    served = normal[:, perm] * 0.5 - 3.0  # a permuted, rescaled, shifted copy: invertible
    net, facts = fit_corrector(served[:500], y[:500], served[500:], y[500:], "affine", 64, 300, 0)
    assert facts["corrector_val_accuracy"] > 90
    # the served scores alone mislead: their argmax is the scrambled class
    assert (served[500:].argmax(1) == y[500:]).float().mean() < 0.5


def test_top1_confidence_target_golden():
    from nasty.attacks.top1conf import top1_confidence_target

    z = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert torch.allclose(top1_confidence_target(z).exp(), torch.tensor([[0.7, 0.15, 0.15]]))


def test_template_says_nothing_beyond_the_decision():
    from nasty.defenses.output import parse_output_defense

    t = parse_output_defense("template")
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(300, 10, generator=g), 1)
    q = t(p)
    assert torch.equal(q.argmax(1), p.argmax(1))
    assert torch.allclose(q.sum(1), torch.ones(300))
    for c in range(10):  # one fixed vector per decided class
        rows = q[p.argmax(1) == c]
        assert len(rows) and torch.equal(rows, rows[:1].expand_as(rows))
    assert q[0, (p[0].argmax() + 1) % 10] == pytest.approx(0.45)
