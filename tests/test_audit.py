"""`nasty audit` / `nasty report` end to end on digits: outputs, schema, resume, exit codes, skipped
and failed attacks, the fidelity rule, the reference teacher and the shared teacher cache."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nasty.attacks import ATTACKS, register_attack
from nasty.attacks.kd import KD
from nasty.audit.schema import validate

TINY = ["--students", "mlp", "--epochs", "2", "--batch-size", "128", "--bootstrap", "200"]


class KDTwin(KD):
    name = "test-kd-twin"
    summary = "KD again (test)"


class WhiteBox(KD):
    name = "test-whitebox"
    summary = "needs weights (test)"
    accepts = ("weights",)


class LabelFree(KD):
    name = "test-labelfree"
    summary = "teacher outputs only (test)"
    needs_labels = False
    uses_labels = False
    params = {"temperature": 4.0, "alpha": 1.0}


class Broken(KD):
    name = "test-broken"
    summary = "crashes (test)"

    def train(self, ctx):
        raise RuntimeError("boom")


@pytest.fixture(scope="module", autouse=True)
def registered_test_attacks():
    for cls in (KDTwin, WhiteBox, LabelFree, Broken):
        register_attack(cls)
    yield
    for cls in (KDTwin, WhiteBox, LabelFree, Broken):
        ATTACKS.pop(cls.name, None)


@pytest.fixture(scope="module")
def teacher(digits):
    """An MLP teacher, a few seconds of training (about 95% on digits)."""
    from nasty.models import create_model
    from nasty.train import TrainConfig, ce_objective, fit

    model = create_model("mlp:hidden=128", digits.num_classes, digits.in_channels, digits.image_size)
    fit(model, ce_objective(), digits, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0), log=None)
    return model.eval()


@pytest.fixture(scope="module")
def teacher_ckpt(teacher, digits, tmp_path_factory):
    from nasty.config import load_config
    from nasty.runs import save_model

    out = tmp_path_factory.mktemp("teacher")
    save_model(out, teacher, digits, load_config(None), {})
    return out


def _audit(out):
    return json.loads((out / "audit.json").read_text())


def test_audit_outputs_cache_and_resume(run_cli, teacher_ckpt, teacher, digits, tmp_path):
    out = tmp_path / "a"
    args = ["audit", teacher_ckpt, "--attacks", "kd,test-kd-twin", "--seeds", "2", "--out", out, *TINY]
    rc, stdout, err = run_cli(*args)
    assert rc == 0, err
    assert "of 10 classes transferable" in stdout
    a = validate(_audit(out))
    from nasty.metrics import served_quality

    q = a["targets"]["teacher"]["quality"]  # the teacher's served utility on the test split, in the terminal table too
    assert q == pytest.approx(served_quality(teacher, digits.x_test, digits.y_test), rel=1e-4)
    assert f"served top-5 {q['top5']:.2f}%, ECE {q['ece']:.2f}%, NLL {q['nll']:.3f}" in stdout
    assert a["status"] == "complete" and a["config"]["seeds"] == [0, 1] and a["schema_version"] == 3
    kd = a["targets"]["teacher"]["attacks"]["kd"]
    assert kd["rule"] == "gain" and kd["transferred_count"] == len(kd["transferred_classes"])
    # one family over the whole audit: 2 attacks x (10 classes + 1 pooled test) x 1 student
    assert kd["correction"] == "holm" and kd["family_size"] == 22 and "Holm-adjusted p < 0.025" in kd["threshold"]
    pl = kd["pooled"]
    assert pl["student"] == "mlp" and pl["ci_low"] <= pl["gain"] <= pl["ci_high"] and 0 <= pl["p"] <= pl["p_adjusted"] <= 1
    assert pl["transferred"] == (pl["p_adjusted"] < 0.025) and pl["detectable_gain"] > 0
    assert pl["resolution"] == 3.0 and pl["resolution_ok"] == (pl["detectable_gain"] <= 3.0)
    assert pl["gain"] == pytest.approx(kd["students"]["mlp"]["accuracy"] - max(  # float32 sums on either side: 1e-4 points
        a["baselines"][b]["mlp"]["accuracy"] for b in ("scratch", "label-smoothing")), abs=1e-4)
    sc = a["config"]["statistics"]
    assert sc["correction"] == "holm" and sc["intervals"] == "approximate" and sc["power"] == 0.8
    assert any("2 seeds: intervals and detectable gains are approximate" in n for n in a["notes"])
    rows = kd["students"]["mlp"]["classes"]
    assert len(rows) == 10 and all(r["gain_ci"][0] <= r["gain"] <= r["gain_ci"][1] for r in rows)
    assert all(0 <= r["p_value"] <= r["p_adjusted"] <= 1 for r in rows)
    assert all((r["detectable"] is None) == r["transferred"] for r in rows) and all(r["safe"] is None for r in rows)
    md = (out / "audit.md").read_text()
    assert "Holm correction" in md and "p (adjusted)" in md and "detectable at 80% power" in md and "approximate" in md
    assert all(r["baseline"] in ("scratch", "label-smoothing") for r in rows)
    assert 80 < kd["students"]["mlp"]["accuracy"] <= 100 and "teacher_agreement" in kd["students"]["mlp"]
    # baselines shared: 2 baselines + 2 attacks, x 2 seeds
    assert a["runtime"]["runs_trained"] == 8 and a["runtime"]["runs_reused"] == 0
    # the teacher ran once over the training images and once over the test split, for 4 attack runs
    n_train, n_test = len(digits.y_train), len(digits.y_test)
    assert a["runtime"]["teacher_samples_run"] == n_train + n_test and a["runtime"]["teacher_cache_hits"] == 3
    run = out / "runs" / "teacher" / "test-kd-twin" / "mlp" / "seed-1"
    res = json.loads((run / "result.json").read_text())
    assert res["resources"]["queries"] == n_train  # every attack still counts its queries
    pred = np.load(run / "test_pred.npy", allow_pickle=False)
    assert pred.shape == (n_test,) and res["accuracy"] == pytest.approx(100 * np.mean(pred == digits.y_test.numpy()))
    for f in ("audit.md", "audit.html"):
        assert (out / f).stat().st_size > 1000
    html = (out / "audit.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "http" not in html.split("<body>")[1]

    # resume: one run lost -> only that one is trained again, the decisions are unchanged
    (run / "result.json").unlink()
    rc, _, err = run_cli(*args)
    b = _audit(out)
    assert rc == 0 and b["runtime"]["runs_trained"] == 1 and b["runtime"]["runs_reused"] == 7
    for name, att in a["targets"]["teacher"]["attacks"].items():
        again = b["targets"]["teacher"]["attacks"][name]
        assert again["students"]["mlp"]["classes"] == att["students"]["mlp"]["classes"]  # same student, same numbers
    # statistics-only changes reuse every run
    rc, _, _ = run_cli(*args, "--margin", "1.5", "--correction", "bh", "--safe-below", "50", "--power", "0.9")
    c = _audit(out)
    assert rc == 0 and c["runtime"]["runs_trained"] == 0 and c["config"]["statistics"]["correction"] == "bh"
    rows = [r for r in c["targets"]["teacher"]["attacks"]["kd"]["students"]["mlp"]["classes"] if not r["transferred"]]
    assert all(r["safe"] == (r["detectable"] < 50) for r in rows) and "Benjamini-Hochberg" in (out / "audit.md").read_text()
    # a different training config is refused, one line, exit 2; --force starts afresh
    rc, _, err = run_cli(*[x if x != "2" else "3" for x in args[:-6]], *TINY[:2], "--epochs", "3", *TINY[4:])
    assert rc == 2 and "different configuration" in err and "train.epochs" in err and err.strip().count("\n") == 0
    rc, _, err = run_cli("audit", teacher_ckpt, "--attacks", "kd", "--seeds", "1", "--out", out, *TINY[:2], "--epochs", "3",
                         *TINY[4:], "--force")
    assert rc == 0 and _audit(out)["runtime"]["runs_trained"] == 3
    assert not (out / "runs" / "teacher" / "test-kd-twin").exists()


def test_exit_codes_and_report(run_cli, teacher_ckpt, tmp_path):
    out = tmp_path / "g"
    base = ["audit", teacher_ckpt, "--attacks", "kd", "--seeds", "1", "--out", out, *TINY]
    rc, stdout, _ = run_cli(*base, "--margin", "-100", "--fail-on", "0")  # every class clears a -100 point bar
    assert rc == 1 and "FAILED" in stdout
    a = _audit(out)
    assert a["gate"] == {"fail_on": 0, "failed": True, "failing_attacks": ["kd"]}
    assert a["targets"]["teacher"]["attacks"]["kd"]["transferred_count"] == 10
    rc, stdout, _ = run_cli(*base, "--margin", "-100", "--fail-on", "10", "--json")
    assert rc == 0 and json.loads(stdout)["targets"]["teacher"]["kd"]["transferred_count"] == 10

    md = (out / "audit.md").read_text()
    (out / "audit.md").unlink()
    (out / "audit.html").unlink()
    rc, stdout, err = run_cli("report", out / "audit.json")
    assert rc == 0 and (out / "audit.md").read_text() == md and (out / "audit.html").is_file()
    assert "10 of 10 classes transferable" in stdout
    assert "pooled: transfers" in md and "pooled: transfers" in stdout
    rc, _, err = run_cli("report", out / "audit.json", "--out", tmp_path / "r", "--format", "md")
    assert rc == 0 and (tmp_path / "r" / "audit.md").is_file() and not (tmp_path / "r" / "audit.html").exists()

    bad = _audit(out)
    bad["schema_version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc, _, err = run_cli("report", tmp_path / "bad.json")
    assert rc == 2 and "schema version 99" in err and err.strip().count("\n") == 0
    bad["schema_version"] = 1
    bad["targets"]["teacher"]["attacks"]["kd"]["transferred_count"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc, _, err = run_cli("report", tmp_path / "bad.json")
    assert rc == 2 and "transferred_count" in err
    bad["targets"]["teacher"]["attacks"]["kd"]["transferred_count"] = len(bad["targets"]["teacher"]["attacks"]["kd"]["transferred_classes"])
    for thief in ("x", {"images": "9", "labelled": 1, "pool": 9}, {"images": 9, "labelled": True, "pool": 9}, {"images": 9}):
        bad["dataset"]["thief"] = thief
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        rc, _, err = run_cli("report", tmp_path / "bad.json")
        assert rc == 2 and "dataset.thief" in err and err.strip().count("\n") == 0
    rc, _, err = run_cli("report", tmp_path / "missing.json")
    assert rc == 2 and "not found" in err
    # one seed: every interval is marked unreliable
    assert a["config"]["statistics"]["intervals"] == "unreliable" and "UNRELIABLE" in md
    assert all(r["interval"] == "unreliable" for r in a["targets"]["teacher"]["attacks"]["kd"]["students"]["mlp"]["classes"])
    # a schema-1 audit (bootstrap intervals, no p-values) still renders
    rc, stdout, err = run_cli("report", Path(__file__).parents[1] / "docs" / "audit-fashion-mnist" / "audit.json", "--out", tmp_path / "v1")
    assert rc == 0, err
    assert "schema-1 audit" in (tmp_path / "v1" / "audit.md").read_text() and "Bootstrap: 2000 replicates" in (tmp_path / "v1" / "audit.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "kdd"], "did you mean 'kd'"),
    (["--attacks", "scratch"], "no attack left"),
    (["--seeds", "0"], "--seeds"),
    (["--param", "kd.tempreature=2"], "did you mean 'temperature'"),
    (["--param", "kd.temperature=-1"], "temperature must be positive"),
    (["--param", "temperature=2"], "ATTACK.KEY=VALUE"),
    (["--query", "topk"], "positive K"),
    (["--students", "mlpp"], "unknown model"),
    (["--fidelity", "0"], "--fidelity"),
    (["--margin", "nan"], "--margin"),
    (["--margin", "100"], "--margin"),
    (["--margin", "-101"], "--margin"),
    (["--power", "1"], "--power"),
    (["--power", "nan"], "--power"),
    (["--safe-below", "0"], "--safe-below"),
    (["--safe-below", "inf"], "--safe-below"),
    (["--correction", "bonferroni"], "--correction"),
    (["--resolution", "0"], "--resolution"),
    (["--resolution", "101"], "--resolution"),
    (["--resolution", "nan"], "--resolution"),
])
def test_usage_errors_exit_2(run_cli, teacher_ckpt, tmp_path, extra, message):
    rc, _, err = run_cli("audit", teacher_ckpt, "--out", tmp_path / "u", *TINY, *extra)
    assert rc == 2 and message in err and err.strip().count("\n") == 0


def test_missing_teacher_exit_2(run_cli, tmp_path):
    rc, _, err = run_cli("audit", tmp_path / "nope", "--out", tmp_path / "u")
    assert rc == 2 and "not found" in err


def test_skipped_failed_and_fidelity_rule(run_cli, teacher_ckpt, tmp_path):
    out = tmp_path / "s"
    rc, stdout, err = run_cli("audit", teacher_ckpt, "--attacks", "kd,test-whitebox,test-labelfree,test-broken", "--seeds", "1",
                              "--out", out, *TINY)
    assert rc == 3 and "incomplete" in err and "test-broken" in err and err.strip().splitlines()[-1].startswith("error:")
    a = validate(_audit(out))  # the reports are written even so
    atk = a["targets"]["teacher"]["attacks"]
    assert a["status"] == "incomplete" and (out / "audit.html").is_file()
    assert atk["test-whitebox"]["status"] == "skipped" and "weights" in atk["test-whitebox"]["reason"]
    assert atk["test-broken"]["status"] == "failed" and "boom" in atk["test-broken"]["reason"]
    assert atk["kd"]["status"] == "ok" and atk["kd"]["rule"] == "gain"
    lf = atk["test-labelfree"]
    assert lf["status"] == "ok" and lf["rule"] == "fidelity" and "fidelity" in lf["threshold"]
    assert all(r["fidelity"] is not None for r in lf["students"]["mlp"]["classes"])
    res = json.loads((out / "runs/teacher/test-labelfree/mlp/seed-0/result.json").read_text())
    assert res["resources"]["labels"] is False
    # a definite gate failure outranks an incomplete audit
    rc, _, _ = run_cli("audit", teacher_ckpt, "--attacks", "kd,test-whitebox,test-labelfree,test-broken", "--seeds", "1",
                       "--out", out, *TINY, "--margin", "-100", "--fail-on", "0")
    assert rc == 1
    # white-box access: the attack runs
    rc, _, err = run_cli("audit", teacher_ckpt, "--attacks", "test-whitebox", "--seeds", "1", "--out", tmp_path / "w",
                         "--query", "weights", *TINY)
    assert rc == 0, err


def test_reference_shares_baselines(run_cli, teacher_ckpt, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(teacher_ckpt, ref)
    out = tmp_path / "r"
    rc, _, err = run_cli("audit", teacher_ckpt, "--reference", ref, "--attacks", "kd", "--seeds", "1", "--out", out, *TINY,
                         "--margin", "-100")
    assert rc == 0, err
    a = _audit(out)
    # 2 baselines + the teacher's KD run; the reference is the same checkpoint: its run is that one, not trained twice
    assert set(a["targets"]) == {"teacher", "reference"} and a["runtime"]["runs_trained"] == 3
    assert a["runtime"]["runs_reused"] == 1
    t, r = (a["targets"][g]["attacks"]["kd"]["students"]["mlp"] for g in ("teacher", "reference"))
    assert t["classes"] == r["classes"] and t["accuracy_per_seed"] == r["accuracy_per_seed"]
    eff = a["defense_effect"]["kd"]
    assert eff["protected_classes"] == [] and eff["still_transferred"] == list(range(10))
    assert "What the defense bought" in (out / "audit.md").read_text()


def test_shared_cache_gives_the_same_student(digits, teacher):
    """run_attack with the audit's shared cache trains exactly the student it trains without it."""
    from nasty.attacks import run_attack
    from nasty.frozen import TeacherOutputCache
    from nasty.train import TrainConfig, seed_everything

    cfg = TrainConfig(epochs=1, batch_size=128, seed=0)
    cache = TeacherOutputCache()
    accs = []
    for c in (None, cache, cache):
        seed_everything(0)
        _, res = run_attack("kd", data=digits, teachers=[teacher], student="mlp", train=cfg, log=lambda m: None,
                            teacher_cache=c)
        accs.append((res["accuracy"], res["teacher_agreement"], res["resources"]["queries"]))
    assert accs[0] == accs[1] == accs[2]
    assert cache.samples_run == len(digits.y_train) + len(digits.y_test) and cache.hits == 1


def test_surrogate_queries_for_label_free_attacks(run_cli, teacher_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.npz"
    np.savez(noise, x_train=rng.random((300, 8, 8), dtype=np.float32), y_train=rng.integers(0, 10, 300),
             x_test=rng.random((50, 8, 8), dtype=np.float32), y_test=rng.integers(0, 10, 50))
    out = tmp_path / "q"
    rc, _, err = run_cli("audit", teacher_ckpt, "--attacks", "kd,copycat", "--seeds", "1", "--surrogate", f"npz:{noise}",
                         "--queries", "100", "--out", out, *TINY)
    assert rc == 0, err
    cc = json.loads((out / "runs/teacher/copycat/mlp/seed-0/result.json").read_text())["resources"]
    kd = json.loads((out / "runs/teacher/kd/mlp/seed-0/result.json").read_text())["resources"]
    assert "surrogate" in cc["data"] and cc["labels"] is False and cc["train_images"] == 100  # the query budget
    assert cc["query_budget"] == 100 and kd["query_budget"] is None  # the budget binds label-free attacks only
    assert kd["labels"] is True and "surrogate" not in kd["data"]  # attacks with labels keep the teacher's data
    a = _audit(out)
    assert a["targets"]["teacher"]["attacks"]["copycat"]["rule"] == "fidelity"
    assert "another dataset" in a["targets"]["teacher"]["attacks"]["copycat"]["assumes"]


def test_shared_pass_gives_the_same_audit(run_cli, teacher_ckpt, tmp_path):
    """Fused (default) and --no-fuse audits train the same students: identical predictions, run by run."""
    outs = {}
    for mode in ("--fuse", "--no-fuse"):
        out = tmp_path / mode.strip("-")
        rc, _, err = run_cli("audit", teacher_ckpt, "--attacks", "kd,test-kd-twin,test-labelfree", "--seeds", "1", "--out", out,
                             *TINY, "--deterministic", mode)
        assert rc == 0, err
        outs[mode] = out
    runs = sorted(p.relative_to(outs["--fuse"]) for p in outs["--fuse"].glob("runs/**/test_pred.npy"))
    assert len(runs) == 5  # 2 baselines + 3 attacks
    for r in runs:
        a, b = (np.load(outs[m] / r, allow_pickle=False) for m in outs)
        assert np.array_equal(a, b), r
        fused = json.loads((outs["--fuse"] / r.parent / "result.json").read_text())
        alone = json.loads((outs["--no-fuse"] / r.parent / "result.json").read_text())
        assert fused["trained_with"] == 5 and "trained_with" not in alone
        assert fused["resources"]["queries"] == alone["resources"]["queries"]
    def numbers(obj):  # everything but the timings
        if isinstance(obj, dict):
            return {k: numbers(v) for k, v in obj.items() if k != "train_seconds"}
        return [numbers(v) for v in obj] if isinstance(obj, list) else obj

    assert numbers(_audit(outs["--fuse"])["targets"]) == numbers(_audit(outs["--no-fuse"])["targets"])


def test_output_defense_is_audited_and_named(run_cli, teacher_ckpt, tmp_path):
    out = tmp_path / "od"
    args = ["audit", teacher_ckpt, "--attacks", "kd", "--seeds", "1", "--query", "probs", "--out", out, *TINY]
    rc, _, err = run_cli(*args, "--output-defense", "label")
    assert rc == 0, err
    a = _audit(out)
    assert a["config"]["output_defense"] == "label" and a["targets"]["teacher"]["defense"] == {"training": None, "output": "label"}
    assert "Defense: output: label." in (out / "audit.md").read_text()
    # served utility as deployed (labels only): top-5 = top-1 + 4/9 of the misses, the misses cost -log(1e-12) nats each
    q = a["targets"]["teacher"]["quality"]
    assert q["top1"] == pytest.approx(a["targets"]["teacher"]["accuracy"])
    assert q["top5"] == pytest.approx(q["top1"] + (100 - q["top1"]) * 4 / 9)
    assert q["nll"] == pytest.approx((100 - q["top1"]) / 100 * 27.631021, rel=1e-6)
    assert q["ece"] == pytest.approx(100 - q["top1"])
    line = f"top-5 {q['top5']:.2f}% (ties broken at random), calibration error (ECE) {q['ece']:.2f}%, NLL {q['nll']:.3f} nats"
    assert line in (out / "audit.md").read_text() and line in (out / "audit.html").read_text()
    old = _audit(out)
    del old["targets"]["teacher"]["defense"]  # an audit.json written before targets recorded their defense
    del old["targets"]["teacher"]["quality"]  # ... or their served utility
    (tmp_path / "old.json").write_text(json.dumps(old))
    rc, stdout, err = run_cli("report", tmp_path / "old.json", "--out", tmp_path / "old")
    assert rc == 0 and "Defense:" not in (tmp_path / "old" / "audit.md").read_text()
    assert "Served outputs" not in (tmp_path / "old" / "audit.md").read_text() and "served top-5" not in stdout
    old["targets"]["teacher"]["quality"] = {**q, "ece": "<b>"}
    (tmp_path / "bad.json").write_text(json.dumps(old))
    rc, _, err = run_cli("report", tmp_path / "bad.json", "--out", tmp_path / "bad")
    assert rc == 2 and "targets.teacher.quality" in err and err.strip().count("\n") == 0
    res = json.loads((out / "runs/teacher/kd/mlp/seed-0/result.json").read_text())
    assert res["resources"]["output_defense"] == "label"
    # another output defense is another configuration; white-box access bypasses any output defense
    rc, _, err = run_cli(*args, "--output-defense", "topk:1")
    assert rc == 2 and "output_defense" in err
    rc, _, err = run_cli("audit", teacher_ckpt, "--query", "weights", "--output-defense", "label", "--out", tmp_path / "w", *TINY)
    assert rc == 2 and "white-box" in err and err.strip().count("\n") == 0
    rc, _, err = run_cli(*args, "--output-defense", "topkk:1", "--force")
    assert rc == 2 and "did you mean" in err


def test_defense_description_golden():
    from nasty.audit.analyse import defense_text, describe_defense

    side = {"defense": {"name": "class-selective", "tau": 4.0, "omega": 0.1, "kl_cap": None, "protect_classes": ["Coat", "Shirt"],
                        "protect_by": "label", "combine": "mean", "max_accuracy_drop": None, "adversary": ["a"]},
            "adversaries": ["a"], "defense_info": {}}
    d = describe_defense(side, None)
    assert d == {"training": {"name": "class-selective", "tau": 4.0, "omega": 0.1, "protect_classes": ["Coat", "Shirt"],
                              "protect_by": "label", "adversaries": 1}, "output": None}
    assert defense_text(d) == "training-time: class-selective (tau 4.0, omega 0.1, protect_classes Coat,Shirt, protect_by label, adversaries 1)"
    assert defense_text(describe_defense({}, None)).startswith("none")


def test_baselines_from_another_audit_and_first_seed(run_cli, teacher_ckpt, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    base = [teacher_ckpt, "--seeds", "1", *TINY]
    rc, _, err = run_cli("audit", *base, "--attacks", "kd", "--out", a)
    assert rc == 0, err
    rc, _, err = run_cli("audit", *base, "--attacks", "test-kd-twin", "--out", b, "--baselines-from", a)
    assert rc == 0, err
    rt = _audit(b)["runtime"]
    assert rt["runs_trained"] == 1 and rt["runs_reused"] == 2  # both baselines copied from a
    assert _audit(b)["baselines"] == _audit(a)["baselines"]
    rc, _, err = run_cli("audit", *base, "--attacks", "kd", "--out", c, "--baselines-from", a, "--first-seed", "1")
    assert rc == 0, err  # seed 1: nothing to reuse
    assert _audit(c)["runtime"]["runs_trained"] == 3 and _audit(c)["config"]["seeds"] == [1]
    assert (c / "runs" / "teacher" / "kd" / "mlp" / "seed-1" / "result.json").is_file()
    rc, _, err = run_cli("audit", *base, "--out", tmp_path / "d", "--baselines-from", tmp_path)
    assert rc == 2 and "no audit baselines" in err
    # baselines trained under another teacher's input normalisation do not apply
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_ckpt, other)
    side = json.loads((other / "model.json").read_text())
    side["normalization"]["mean"] = [m + 0.5 for m in side["normalization"]["mean"]]
    (other / "model.json").write_text(json.dumps(side))
    cfg = json.loads((a / "audit-config.json").read_text())
    cfg["teacher"] = str(other)
    (a / "audit-config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli("audit", *base, "--attacks", "kd", "--out", tmp_path / "e", "--baselines-from", a)
    assert rc == 2 and "normalised differently" in err and err.strip().count("\n") == 0


def test_resume_refuses_a_replaced_dataset(run_cli, teacher_ckpt, tmp_path):
    """The audit fingerprints the data's contents: an npz replaced at the same path is another configuration."""
    def write(seed):
        rng = np.random.default_rng(seed)
        np.savez(tmp_path / "d.npz", x_train=rng.random((200, 8, 8), dtype=np.float32), y_train=np.arange(200) % 10,
                 x_test=rng.random((100, 8, 8), dtype=np.float32), y_test=np.arange(100) % 10)

    write(0)
    args = ["audit", teacher_ckpt, "--dataset", f"npz:{tmp_path / 'd.npz'}", "--attacks", "kd", "--seeds", "1",
            "--out", tmp_path / "a", "--epochs", "1", *TINY[:2], *TINY[4:6]]
    rc, _, err = run_cli(*args)
    assert rc == 0, err
    assert len(_audit(tmp_path / "a")["config"]["data_sha256"]) == 64
    rc, _, err = run_cli(*args)
    assert rc == 0 and _audit(tmp_path / "a")["runtime"]["runs_trained"] == 0  # same file: resumed
    write(1)
    rc, _, err = run_cli(*args)
    assert rc == 2 and "contents changed" in err and "replaced" in err and err.strip().count("\n") == 0


def test_tllm_reuses_the_label_only_baseline(teacher_ckpt, tmp_path):
    """TLLM's preliminary label-only student is the audit's label-only baseline (same student, data, schedule and
    seed): it is not trained again, and TLLM's student is exactly the one it is when it trains that run itself."""
    from nasty.audit.run import AuditSettings, run_audit
    from nasty.config import load_config

    cfg = load_config(None, {"data": {"dataset": "digits"}, "train": {"epochs": 2, "batch_size": 128, "deterministic": True}})
    out = {}
    for reuse in (True, False):
        s = AuditSettings(teacher=str(teacher_ckpt), cfg=cfg, attacks=["tllm"], students=["mlp"], seeds=1,
                          reuse_label_only=reuse)
        out[reuse] = run_audit(s, tmp_path / str(reuse), log=lambda m: None)
    assert out[True]["runtime"]["label_only_runs_reused"] == 1 and out[False]["runtime"]["label_only_runs_reused"] == 0
    run = "runs/teacher/tllm/mlp/seed-0"
    a, b = (np.load(tmp_path / str(r) / run / "test_pred.npy", allow_pickle=False) for r in (True, False))
    assert np.array_equal(a, b)
    ra, rb = (json.loads((tmp_path / str(r) / run / "result.json").read_text()) for r in (True, False))
    assert ra["identification"]["ce_val_per_class"] == rb["identification"]["ce_val_per_class"]
    assert "label_only_run" in ra["identification"] and "label_only_run" not in rb["identification"]
    assert not (tmp_path / "True" / run / "prelim-ce").exists() and (tmp_path / "False" / run / "prelim-ce").is_dir()


def test_pooled_verdict_resolution_and_older_schemas(run_cli, teacher_ckpt, tmp_path):
    """An attack whose pooled test cannot find a leak of --resolution points says so in every report and in
    audit.json; an audit.json of schema 2 (no pooled test) still renders; a schema-3 one without it is refused."""
    out = tmp_path / "p"
    rc, stdout, err = run_cli("audit", teacher_ckpt, "--attacks", "kd", "--seeds", "2", "--out", out, *TINY,
                              "--margin", "50", "--resolution", "0.01")
    assert rc == 0, err
    a = _audit(out)
    pl = a["targets"]["teacher"]["attacks"]["kd"]["pooled"]
    assert not pl["transferred"] and pl["resolution_ok"] is False and pl["resolution"] == 0.01 and pl["detectable_gain"] > 0.01
    assert a["config"]["statistics"]["resolution"] == 0.01 and a["config"]["statistics"]["pooled_share"] == 0.5
    line = "this audit cannot show protection at this size: use more seeds or queries"
    md, html = (out / "audit.md").read_text(), (out / "audit.html").read_text()
    assert line in md and line in html and line in stdout and "pooled: not shown" in md
    # schema 2: no pooled test, the correction per attack; still rendered, without the pooled column
    old = json.loads(json.dumps(a))
    old["schema_version"] = 2
    for att in old["targets"]["teacher"]["attacks"].values():
        att.pop("pooled")
        for row in att["students"].values():
            row.pop("pooled")
    (tmp_path / "v2.json").write_text(json.dumps(old))
    rc, stdout, err = run_cli("report", tmp_path / "v2.json", "--out", tmp_path / "v2")
    assert rc == 0, err
    md2 = (tmp_path / "v2" / "audit.md").read_text()
    assert "pooled (all classes)" not in md2 and "pooled: " not in md2 and line not in md2
    assert "over the classes and students of each attack" in md2
    old["schema_version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(old))
    rc, _, err = run_cli("report", tmp_path / "v3.json", "--out", tmp_path / "v3")
    assert rc == 2 and "pooled" in err and err.strip().count("\n") == 0


def test_a_detectable_gain_above_100_points_prints_as_more_than_100():
    """A class with huge variance can need a 19,032-point gain to be seen: printed ">100" (no accuracy gains
    that much), in the per-class cell, the range and the pooled cell; fidelity ratios and sane gains unchanged."""
    from nasty.audit.render import _power_cell, pooled_cell

    classes = [{"detectable": 19032.4, "safe": None}, {"detectable": 12.34, "safe": None}]
    att = {"status": "ok", "rule": "gain", "students": {"s": {"classes": classes}}}
    assert _power_cell(att) == "12.3–>100 pts"
    att["rule"] = "fidelity"
    assert _power_cell(att) == "12.34–19032.40 (fidelity ratio)"
    pooled = {"transferred": False, "detectable_gain": 250.0, "gain": 1.0, "ci_low": -3.0, "ci_high": 5.0, "p_adjusted": 0.4}
    assert "detectable >100 pts" in pooled_cell({"pooled": pooled, "status": "ok", "rule": "gain"})
