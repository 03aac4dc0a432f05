"""Issue 22, class 5: every value is bounded before training starts. The test walks over every
declared parameter (defenses', the lock's, output defenses', attacks' -- declared or plain defaults --,
the audit's and the config schema) instead of the reported rows."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from nasty import config
from nasty.attacks import ATTACKS
from nasty.audit.plan import AUDIT_PARAMS
from nasty.defenses.base import DEFENSES
from nasty.defenses.lock import LOCK_PARAMS
from nasty.defenses.output import OUTPUT_DEFENSES
from nasty.errors import NastyError
from nasty.params import FLOAT_LIMIT, INT_LIMIT, Param, option_value
from nasty.registry import with_defaults


def declared() -> list[tuple[str, object]]:
    """(where, declaration) of every parameter: a :class:`Param` or an attack's plain default."""
    out: list[tuple[str, object]] = []
    for sec, keys in config.SCHEMA.items():
        out += [(f"[{sec}] {k}", p) for k, p in keys.items()]
    out += [(f"[train] {k}", p) for k, p in config.TRAIN_SCHEMA.items()]
    out += [(f"lock {k}", p) for k, p in LOCK_PARAMS.items()]
    out += [(f"audit {k}", p) for k, p in AUDIT_PARAMS.items()]
    for reg, what in ((DEFENSES, "defense"), (OUTPUT_DEFENSES, "output defense"), (ATTACKS, "attack")):
        for name, cls in reg.items():
            out += [(f"{what} {name} {k}", p) for k, p in cls.params.items()]
    return out


DECLARED = declared()
NUMERIC = [(w, p) for w, p in DECLARED if isinstance(p, Param) and p.kind.rstrip("?") in ("int", "float", "list[int]", "list[float]")]
PLAIN = [(w, p) for w, p in DECLARED if not isinstance(p, Param) and isinstance(p, (int, float)) and not isinstance(p, bool)]
LISTS = [(w, p) for w, p in DECLARED if isinstance(p, Param) and p.kind.rstrip("?").startswith("list[")]
HOSTILE = [1e308, -1e308, math.nan, math.inf, -math.inf, 10**30, -10**30]


def refused(fn) -> str:
    with pytest.raises(NastyError) as e:
        fn()
    msg = str(e.value)
    assert e.value.exit_code == 2 and msg and "\n" not in msg
    return msg


def test_the_walk_sees_every_kind_of_declaration():
    """A guard on the test itself: the declarations named in the issue are among those walked."""
    names = {w for w, _ in DECLARED}
    for must in ("defense nasty omega", "defense nasty tau", "defense nasty kl_cap", "lock omega_grid", "lock cmi",
                 "[train] lr", "[attack] temperature", "audit seeds", "attack kd temperature"):
        assert must in names, must
    assert len(NUMERIC) > 30 and PLAIN and LISTS


@pytest.mark.parametrize("where,param", NUMERIC, ids=[w for w, _ in NUMERIC])
def test_every_number_is_bounded(where, param):
    """Seen failing (1e308 accepted by ~40 declarations) with the default bound of params.check_bounds removed."""
    is_list = param.kind.rstrip("?").startswith("list[")
    for v in HOSTILE:
        value = [v] if is_list else v
        refused(lambda: param.validate(where, value))
    if param.default is not None:
        assert param.validate(where, param.default) == param.default  # the default itself passes its bounds


@pytest.mark.parametrize("where,default", PLAIN, ids=[w for w, _ in PLAIN])
def test_every_plain_attack_default_is_bounded(where, default):
    owner, key = where.rsplit(" ", 1)
    for v in HOSTILE:
        refused(lambda: with_defaults(owner, {key: default}, {key: v}))
    assert with_defaults(owner, {key: default}, {key: default}) == {key: default}


@pytest.mark.parametrize("where,param", LISTS, ids=[w for w, _ in LISTS])
def test_no_list_takes_an_empty_item(where, param):
    """``--omega-grid 0.1,,0.3`` silently dropped the empty item; seen failing with the check in _comma_list removed."""
    item = {"list[float]": "0.1", "list[int]": "1", "list[str]": "a"}[param.kind.rstrip("?")]
    for text in (f"{item},,{item}", f",{item}", f"{item},", f"{item}, ,{item}"):
        if param.repeat:
            continue
        refused(lambda: option_value(where.rsplit(" ", 1)[1], param, text))
    if param.kind.rstrip("?") == "list[str]":
        for value in ([""], [item, " "]):
            refused(lambda: param.validate(where, value))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NUMERIC), st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()))
def test_accepted_numbers_are_within_the_limits(decl, number):
    """Property: whatever a declaration accepts is finite and within the global limits."""
    where, param = decl
    value = [number] if param.kind.rstrip("?").startswith("list[") else number
    try:
        got = param.validate(where, value)
    except NastyError as e:
        assert e.exit_code == 2 and "\n" not in str(e)
        return
    for v in got if isinstance(got, list) else [got]:
        limit = max(FLOAT_LIMIT, INT_LIMIT, abs(param.hi or 0), abs(param.lo or 0))  # a declared bound (seeds: 2**32-1) is the limit
        assert math.isfinite(v) and abs(v) <= limit


FAST = ["--model", "mlp:hidden=4", "--epochs", "1", "--batch-size", "256"]


@pytest.mark.parametrize("args", [["--omega", "1e308"], ["--omega-grid", "1e308"], ["--omega-grid", "0.1,,0.3"],
                                  ["--tau", "1e308"], ["--lr", "1e308"], ["--cmi", "-1e308"]])
def test_the_reported_rows_are_refused_before_training(run_cli, tmp_path, args):
    """Were: training started and ended with exit 3 ("loss is -inf"), or the empty item was dropped."""
    rc, o, err = run_cli("train-defended", *args, "--out", tmp_path / "run", *FAST)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


# -- library model options: bounded, and checked for the dataset's real input shape

from nasty.config import check_model_spec, check_model_specs, defaults  # noqa: E402
from nasty.models.external import _check_options  # noqa: E402

PROBABILITIES = ["drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "drop_block_rate",
                 "dropout", "attention_dropout", "stochastic_depth_prob"]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(PROBABILITIES), st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=3)))
def test_probability_options_outside_0_1_are_refused(key, value):
    """``timm:...:drop_path_rate=5`` passed the build check and crashed in training; seen failing with the
    probability check of external._check_options removed."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if ok:
        _check_options("timm:x", {key: value}, set())
    else:
        refused(lambda: _check_options("timm:x", {key: value}, set()))


def test_other_options_are_left_to_the_library():
    _check_options("timm:x", {"depth": 12, "img_size": 8, "width_mult": 5.0}, set())


VIT_8 = "timm:vit_tiny_patch16_224:img_size=8,patch_size=2,depth=1"


def test_a_model_for_the_datas_own_shape_is_accepted():
    """Was refused: the check assumed 3x32x32 while digits are 1x8x8."""
    pytest.importorskip("timm")
    check_model_spec(VIT_8, "model.name", 10, 1, (8, 8))
    cfg = defaults()
    cfg["model"]["name"] = VIT_8
    config.validate(cfg)  # the config-time check (3x32x32 guess) defers the shape to the data
    check_model_specs(cfg, 10, 1, (8, 8))
    with pytest.raises(NastyError, match="cannot take 1x8x8 inputs"):
        check_model_spec("timm:vit_tiny_patch16_224:depth=1", "model.name", 10, 1, (8, 8))


def test_a_model_that_cannot_take_the_data_is_refused_before_training(run_cli, tmp_path):
    pytest.importorskip("timm")
    rc, o, err = run_cli("train-teacher", "--model", "timm:vit_tiny_patch16_224:depth=1", "--epochs", "1", "--out", tmp_path / "r")
    assert rc == 2 and "cannot take 1x8x8 inputs" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()
    rc, o, err = run_cli("train-teacher", "--model", "timm:resnet10t:drop_path_rate=5", "--epochs", "1", "--out", tmp_path / "r")
    assert rc == 2 and "drop_path_rate is a probability" in err and err.count("\n") == 1, err
