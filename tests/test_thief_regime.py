"""The thief's regime (--labelled N of --queries M), its floors, self-tuning thieves and failed students."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasty.attacks.run import thief_view
from nasty.errors import NastyError, TrainingDiverged
from nasty.losses import kd_loss, labelled_ce
from nasty.train import TrainConfig


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


@pytest.mark.parametrize("n, m", [(20, 100), (37, 300), (100, 101), (300, 1000)])
def test_thief_view_splits_its_images_into_labelled_queries_and_a_labelled_validation_split(digits, n, m):
    mixed, sel = thief_view(digits, n, m, "mixed")
    labels, _ = thief_view(digits, n, m, "labels")
    free, _ = thief_view(digits, n, m, "queries")
    n_val = len(mixed.y_val)
    assert n_val == max(digits.num_classes, round(0.2 * n)) and f"{n_val} labelled validation images" in sel
    assert int((mixed.y_train >= 0).sum()) == n - n_val and int((mixed.y_train < 0).sum()) == m - n
    assert len(mixed.y_train) + n_val == m  # every image the thief holds is used exactly once
    assert (labels.y_train >= 0).all() and len(labels.y_train) == n - n_val  # the label-only floor: the labelled images alone
    assert (free.y_train == -1).all() and free.x_train is mixed.x_train  # label-free attacks share the images (one pass)
    assert not _rows(mixed.x_val) & _rows(mixed.x_train)  # validation images are never trained on
    assert _rows(labels.x_train) <= _rows(mixed.x_train)
    # the validation split is carved from the labelled images only, with their true labels, every class present
    assert set(mixed.y_val.tolist()) == set(range(digits.num_classes))
    truth = {r.numpy().tobytes(): int(y) for r, y in zip(digits.x_train, digits.y_train)}
    assert all(truth[r.numpy().tobytes()] == int(y) for r, y in zip(mixed.x_val, mixed.y_val))
    known = mixed.y_train >= 0
    assert all(truth[r.numpy().tobytes()] == int(y) for r, y in zip(mixed.x_train[known], mixed.y_train[known]))
    assert thief_view(digits, n, m, "mixed")[0] is mixed  # deterministic, and the same tensors for every method and seed


@pytest.mark.parametrize("n, m, msg", [(0, 100, "positive integer"), (-3, 100, "positive integer"), (100, 100, "smaller than"),
                                       (150, 100, "smaller than"), (19, 100, "too few"), (20, 10**6, "exceeds"),
                                       (True, 100, "positive integer"), (20.5, 100, "positive integer"), (20, 0, "positive integer")])
def test_thief_view_refuses_impossible_regimes(digits, n, m, msg):
    with pytest.raises(NastyError, match=msg):
        thief_view(digits, n, m, "mixed")


def test_labelled_ce_counts_only_labelled_samples():
    z = torch.randn(6, 4)
    y = torch.tensor([0, -1, 2, -1, 3, 1])
    k = y >= 0
    assert labelled_ce(z, y).item() == pytest.approx(F.cross_entropy(z[k], y[k]).item())
    assert labelled_ce(z, y.clamp_min(0)).item() == F.cross_entropy(z, y.clamp_min(0)).item()  # fully labelled: plain CE
    none = labelled_ce(z.requires_grad_(), torch.full((6,), -1))
    assert none.item() == 0.0 and none.requires_grad


def test_kd_on_a_mixed_batch_distils_every_sample_and_takes_ce_on_the_labelled_ones():
    zs, zt = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([2, -1, -1, 0, -1])
    T, a = 4.0, 0.6
    loss, terms = kd_loss(zs, zt, y, T, a)
    pt = F.softmax(zt / T, 1)
    kl = (pt * (F.log_softmax(zt / T, 1) - F.log_softmax(zs / T, 1))).sum(1).mean()
    ce = F.cross_entropy(zs[y >= 0], y[y >= 0])
    assert loss.item() == pytest.approx((a * T**2 * kl + (1 - a) * ce).item(), rel=1e-5)


def test_hard_label_floor_trains_on_labels_and_on_the_teachers_decision_for_queries(digits, small_teacher):
    from nasty.attacks import get_attack
    from nasty.attacks.base import AttackContext, Oracle
    from nasty.data import Batch

    view, _ = thief_view(digits, 40, 200, "mixed")
    ctx = AttackContext(data=view, teachers=[Oracle(small_teacher)], student="mlp:hidden=8", train=TrainConfig(epochs=1), params={})
    student = nn.Linear(64, 10)
    obj = get_attack("hard-label")().objective(ctx, nn.Sequential(nn.Flatten(), student))
    model = nn.Sequential(nn.Flatten(), student)
    idx = torch.arange(len(view.y_train))
    loss, _ = obj(model, Batch(view.x_train, view.y_train, idx, False), 0)
    decided = small_teacher(view.x_train).argmax(1)
    target = torch.where(view.y_train >= 0, view.y_train, decided)
    assert loss.item() == pytest.approx(F.cross_entropy(model(view.x_train), target).item(), rel=1e-6)
    shifted = torch.where(view.y_train >= 0, (view.y_train + 1) % 10, view.y_train)  # labels the teacher disagrees with
    loss2, _ = obj(model, Batch(view.x_train, shifted, idx, False), 0)
    target2 = torch.where(shifted >= 0, shifted, decided)
    assert loss2.item() == pytest.approx(F.cross_entropy(model(view.x_train), target2).item(), rel=1e-6)  # its own labels stay its labels


def test_a_loss_that_explodes_without_turning_nan_is_a_diverged_run(digits):
    from nasty.train import Objective, fit

    def loss(model, batch, epoch):  # finite, but 1000x larger from the second epoch on
        z = model(batch.x)
        return F.cross_entropy(z, batch.y) * (1.0 if epoch == 0 else 1000.0), {}

    with pytest.raises(TrainingDiverged, match="exploded at epoch 2"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), Objective(loss), digits, TrainConfig(epochs=3, batch_size=256), log=None,
            explode=10.0)
    fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), Objective(loss), digits, TrainConfig(epochs=3, batch_size=256), log=None)


@pytest.mark.parametrize("labels", [True, False])
def test_a_tuned_thief_trains_its_whole_grid_and_keeps_the_candidate_best_on_its_validation_split(digits, small_teacher, labels):
    from nasty.attacks import run_attack

    _, r = run_attack("kd", data=digits, teachers=[small_teacher], student="mlp:hidden=8", log=lambda m: None,
                      train=TrainConfig(epochs=2, batch_size=128, seed=0), params={"tune": True},
                      **({"labelled": 40, "query_budget": 300} if labels else {"labels": False, "query_budget": 300}))
    rows = r["tuning"]
    assert len(rows) == (10 if labels else 3)
    if labels:
        assert {(x["alpha"], x["temperature"]) for x in rows} == {(0.0, 1.0)} | {(a, t) for a in (0.3, 0.6, 0.9) for t in (1.0, 4.0, 10.0)}
    best = max(rows, key=lambda x: (x["val_accuracy"], -x["val_nll"]))
    own = next(x for x in rows if (x["alpha"], x["temperature"]) == (0.9, 4.0))
    n_val = 10 if labels else len(digits.y_val)
    p = min(max(best["val_accuracy"] / 100, 1 / n_val), 1 - 1 / n_val)
    if best["val_accuracy"] - own["val_accuracy"] <= 100 * (p * (1 - p) / n_val) ** 0.5:  # within noise: the published settings stay
        best = own
        assert "kept_within_noise" in own
    assert r["tuned"] == {"alpha": best["alpha"], "temperature": best["temperature"]}
    assert r["val_accuracy"] == best["val_accuracy"]
    assert r["resources"]["queries"] == (300 - 10 if labels else 300 + len(digits.y_val))  # each image answered once


def test_when_every_tuning_candidate_diverges_the_attack_failed(digits, small_teacher, monkeypatch):
    import nasty.attacks.kd as kd_mod
    from nasty.attacks import run_attack

    monkeypatch.setattr(kd_mod, "distill_loss", lambda *a, **k: (torch.tensor(math.nan, requires_grad=True), {}))
    with pytest.raises(TrainingDiverged, match="every tuning candidate diverged"):
        run_attack("kd", data=digits, teachers=[small_teacher], student="mlp:hidden=8", log=lambda m: None,
                   train=TrainConfig(epochs=1, batch_size=256), params={"tune": True}, labelled=40, query_budget=200)


def test_skeptical_picks_its_epoch_after_the_warm_up(digits, small_teacher):
    from nasty.attacks import run_attack

    _, r = run_attack("skeptical", data=digits, teachers=[small_teacher], student="mlp:hidden=16", log=lambda m: None,
                      train=TrainConfig(epochs=6, batch_size=128, seed=0), params={"kd_delay": 2})
    labels_win = any("labels win" in n for n in r["notes"])
    assert r["best_epoch"] > 3 or labels_win  # warm-up = kd_delay + 1 = 3 epochs of labels only


def test_skeptical_says_so_when_its_validation_prefers_the_label_only_warm_up(digits, small_teacher, monkeypatch):
    import nasty.attacks.skeptical as sk
    import nasty.train as train_mod
    from nasty.attacks import run_attack

    loop = iter([50.0, 90.0, 60.0, 70.0, 72.0, 71.0])  # the loop's validation accuracy per epoch (scripted)
    warm = iter([50.0, 90.0, 60.0])  # the same epochs as the warm-up hook measures them
    monkeypatch.setattr(train_mod, "_val_accuracy", lambda *a: next(loop))
    monkeypatch.setattr(sk, "accuracy", lambda *a: next(warm))
    _, r = run_attack("skeptical", data=digits, teachers=[small_teacher], student="mlp:hidden=16", log=lambda m: None,
                      train=TrainConfig(epochs=6, batch_size=128, seed=0), params={"kd_delay": 2})
    assert r["best_epoch"] == 2 and r["val_accuracy"] == 90.0 and any("labels win" in n for n in r["notes"])
    loop, warm = iter([50.0, 90.0, 60.0, 70.0, 95.0, 71.0]), iter([50.0, 90.0, 60.0])
    _, r = run_attack("skeptical", data=digits, teachers=[small_teacher], student="mlp:hidden=16", log=lambda m: None,
                      train=TrainConfig(epochs=6, batch_size=128, seed=0), params={"kd_delay": 2})
    assert r["best_epoch"] == 5 and not any("labels win" in n for n in r["notes"])


def test_cli_refuses_bad_regimes_before_training(run_cli, tmp_path):
    from tests.conftest import save_trained_teacher
    from nasty.data import load_dataset

    teacher = tmp_path / "t"
    save_trained_teacher(load_dataset("digits"), teacher, "mlp:hidden=8", 1)
    base = ["attack", "--method", "kd", "--teacher", str(teacher), "--out", str(tmp_path / "a")]
    for extra, msg in [(["--labelled", "0"], "--labelled must be >= 1"), (["--labelled", "50", "--queries", "50"], "smaller than"),
                       (["--labelled", "50", "--queries", "99999"], "exceeds"), (["--labelled", "5", "--queries", "100"], "too few"),
                       (["--labelled", "50", "--no-labels"], "--no-labels"), (["--labelled", "nan"], "labelled")]:
        code, out, err = run_cli(*base, *extra)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (extra, err)
        assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("own_val, expect_own", [(85.0, True), (60.0, False)])
def test_tuning_keeps_the_published_settings_unless_validation_clearly_prefers_another(digits, small_teacher, monkeypatch, own_val,
                                                                                      expect_own):
    """40 labelled images -> 10 validation images: a 90% vs 85% difference is noise (one standard error is ~9.5
    points), 90% vs 60% is not."""
    import nasty.attacks.base as base
    from nasty.attacks import run_attack
    from nasty.train import FitResult

    def scripted(members, *a, **k):
        vals = [90.0 if "alpha=0.3,T=10" in m.desc else own_val if "alpha=0.9,T=4" in m.desc else 50.0 for m in members]
        return [FitResult(3, v, [], 0.0) for v in vals]

    monkeypatch.setattr(base, "fit_group", scripted)
    _, r = run_attack("kd", data=digits, teachers=[small_teacher], student="mlp:hidden=8", log=lambda m: None,
                      train=TrainConfig(epochs=1, batch_size=128), params={"tune": True}, labelled=40, query_budget=200)
    assert r["tuned"] == ({"alpha": 0.9, "temperature": 4.0} if expect_own else {"alpha": 0.3, "temperature": 10.0})


def test_a_warm_up_that_adds_loss_terms_is_a_new_phase_not_an_explosion(digits):
    """The skeptical student's loss jumps when distillation starts after its labels-only warm-up: other terms,
    the same run. The guard compares an epoch with the first epoch of the same terms."""
    from nasty.train import Objective, fit

    def loss(model, batch, epoch):
        ce = F.cross_entropy(model(batch.x), batch.y)
        if epoch == 0:
            return ce, {"ce": ce.item()}
        return ce * 50.0, {"ce": ce.item(), "kd_kl": 1.0}  # 50x larger from epoch 2 on, with a new term

    fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), Objective(loss), digits, TrainConfig(epochs=3, batch_size=256), log=None,
        explode=10.0)
