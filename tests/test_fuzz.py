"""Fuzzed bad input: hypothesis sweeps CLI options and TOML configs that are wrong in one way each
(unknown keys, wrong types, out-of-range values, missing files, dataset/checkpoint mismatches). Every
case must give exit code 2, exactly one line on stderr and no traceback, *before* any training
starts: ``fit`` is replaced by a tripwire for the whole module.

The number of cases tried is printed at the end (``pytest -s``) and asserted to be large.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import nasty.runs
import nasty.train
from nasty.checkpoint import save_checkpoint
from nasty.cli import main
from nasty.config import SCHEMA, TRAIN_SCHEMA
from nasty.models import create_model

EXAMPLES = 80  # per test; a case takes a few milliseconds (no training, digits is in memory)
COUNTS: dict[str, int] = {}


class TrainingStarted(BaseException):
    """Raised by the tripwire ``fit``: a bad input reached training instead of failing early."""


def tripwire(members, *a, **kw):
    raise TrainingStarted(f"training started (desc={members[0].desc!r}): this bad input was not refused before training")


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits):
    """Tripwire on fit, a valid digits teacher checkpoint, and npz datasets that do not match it."""
    mp = pytest.MonkeyPatch()
    mp.setattr(nasty.train, "fit_group", tripwire)  # every training goes through the one loop
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    teacher = root / "teacher"
    save_checkpoint(teacher, create_model("mlp:hidden=8", 10, 1, (8, 8)), classes=digits.classes, input_shape=(1, 8, 8),
                    mean=digits.mean, std=digits.std, dataset="digits")
    rng = np.random.default_rng(0)
    npz = {}
    for name, shape, classes in (("three-classes", (40, 1, 8, 8), 3), ("rgb", (40, 3, 8, 8), 10), ("size16", (40, 1, 16, 16), 10)):
        y = np.arange(40) % classes
        f = root / f"{name}.npz"
        np.savez(f, x_train=rng.random(shape, dtype=np.float32), y_train=y, x_test=rng.random(shape, dtype=np.float32), y_test=y)
        npz[name] = f
    yield {"root": root, "teacher": teacher, "npz": npz, "n": [0]}
    mp.undo()


def check(env, kind: str, args: list, *needles: str) -> str:
    """Run the CLI in-process; assert exit 2, one line on stderr, nothing on stdout."""
    env["n"][0] += 1
    out_dir = env["root"] / f"out{env['n'][0]}"
    argv = [str(a) for a in args]
    if argv[0] in ("train-teacher", "train-defended", "attack", "convert") and "--out" not in argv:
        argv += ["--out", str(out_dir)]
    o, e = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = main(argv)
    except TrainingStarted as exc:
        config = Path(argv[argv.index("--config") + 1]).read_text() if "--config" in argv else ""
        raise AssertionError(f"{exc}: {argv} {config!r}") from None
    err = e.getvalue()
    lines = err.strip().splitlines()
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert o.getvalue() == "", (argv, o.getvalue())
    for n in needles:
        assert n in lines[0], (argv, n, lines[0])
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    return lines[0]


def starts_training(env, argv: list) -> bool:
    env["n"][0] += 1
    argv = [str(a) for a in argv] + ["--out", str(env["root"] / f"out{env['n'][0]}")]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as e:
            rc = main(argv)
    except TrainingStarted:
        return True
    raise AssertionError(f"{argv} did not reach training: exit {rc}, {e.getvalue()!r}")


COMMANDS = st.sampled_from(["train-teacher", "train-defended", "attack"])
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def base_args(command: str, env) -> list:
    """Valid options that would start a (tiny) training: each case then breaks one thing."""
    args = [command, "--dataset", "digits", "--epochs", "1", "--model", "mlp:hidden=4"]
    if command == "train-defended":
        args += ["--adversary", env["teacher"], "--no-probe"]
    if command == "attack":
        args += ["--teacher", env["teacher"], "--student", "mlp:hidden=4"]
    return args


@pytest.mark.parametrize("command", ["train-teacher", "train-defended", "attack"])
def test_bases_reach_training(env, command):
    """Control: the valid bases every case breaks do reach training (so each refusal below is caused
    by the one thing the case broke), through flags and through a config file."""
    assert starts_training(env, base_args(command, env))
    assert starts_training(env, [command, "--config", write_toml(env, base_tables(env))])


# ---- TOML


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(a) for a in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(a)}" for k, a in v.items()) + "}"
    raise TypeError(v)


def base_tables(env) -> dict:
    """A valid one-experiment config that would start a tiny training with any command."""
    t = str(env["teacher"])
    return {"data": {"dataset": "digits"}, "model": {"name": "mlp:hidden=4"}, "train": {"epochs": 1},
            "defense": {"adversary": [t]}, "attack": {"teacher": [t], "student": "mlp:hidden=4"}, "probe": {"enabled": False}}


def write_toml(env, tables: dict) -> Path:
    lines = []
    for sec, table in tables.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    env["n"][0] += 1
    f = env["root"] / f"cfg{env['n'][0]}.toml"
    f.write_text("\n".join(lines) + "\n")
    tomllib.loads(f.read_text())  # the generator writes valid TOML; the *content* is what is wrong
    return f


def write_key(env, sec: str, key: str, value) -> Path:
    """The base config with ``sec.key = value`` (``sec`` may be ``defense.train``/``probe.train``)."""
    tables = base_tables(env)
    parent, _, sub = sec.partition(".")
    table = tables.setdefault(parent, {})
    if sub:
        table = table.setdefault(sub, {})
    table[key] = value
    return write_toml(env, tables)


KEYS = [(sec, key, p.kind) for sec, keys in SCHEMA.items() for key, p in keys.items()]
KEYS += [(f"{sec}.train", key, p.kind) for sec in ("defense", "probe") for key, p in TRAIN_SCHEMA.items()]
ALPHABET = "abcdefghijklmnopqrstuvwxyz_"


@st.composite
def typo(draw, word: str, others) -> str:
    """A one-character edit of ``word`` that is not a valid name."""
    i = draw(st.integers(0, len(word) - 1))
    op = draw(st.sampled_from(["delete", "swap", "replace", "insert"]))
    c = draw(st.sampled_from(ALPHABET))
    new = {"delete": word[:i] + word[i + 1:], "swap": word[:i] + word[i + 1: i + 2] + word[i] + word[i + 2:],
           "replace": word[:i] + c + word[i + 1:], "insert": word[:i] + c + word[i:]}[op]
    assume(new and new not in others and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", new))
    return new


@given(command=COMMANDS, data=st.data())
@SETTINGS
def test_toml_unknown_key(env, command, data):
    sec, key, _ = data.draw(st.sampled_from(KEYS))
    known = TRAIN_SCHEMA if sec.endswith(".train") else SCHEMA[sec]
    bad = data.draw(typo(key, set(known)))
    f = write_key(env, sec, bad, 1)
    needles = ["unknown key"] + (["did you mean"] if len(key) >= 6 and bad[:2] == key[:2] else [])
    check(env, "toml-unknown-key", [command, "--config", f], *needles)


@given(command=COMMANDS, data=st.data())
@SETTINGS
def test_toml_unknown_section(env, command, data):
    sec = data.draw(st.sampled_from(sorted(SCHEMA)))
    bad = data.draw(typo(sec, set(SCHEMA)))
    f = write_toml(env, {**base_tables(env), bad: {"x": 1}})
    needles = ["unknown section"] + (["did you mean"] if len(sec) >= 5 and bad[:2] == sec[:2] else [])
    check(env, "toml-unknown-section", [command, "--config", f], *needles)


def wrong_type(tag: str):
    base = tag.rstrip("?")
    text = st.text(ALPHABET, min_size=1, max_size=8)
    table = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), min_size=1, max_size=2)
    return {
        "int": st.one_of(text, st.booleans(), st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v)),
                         st.lists(st.integers(), max_size=2), table),
        "float": st.one_of(text, st.booleans(), st.lists(st.floats(allow_nan=False), max_size=2), table),
        "str": st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False), table),
        "bool": st.one_of(st.integers(), text, st.floats(allow_nan=False), table),
        "list[int]": st.one_of(text, st.booleans(), st.lists(text, min_size=1, max_size=2), table),
        "list[float]": st.one_of(text, st.booleans(), st.lists(text, min_size=1, max_size=2), table),
        "list[str]": st.one_of(st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), min_size=1, max_size=2), table),
        "train": st.one_of(st.integers(), text, st.booleans()),
        "table": st.one_of(st.integers(), text, st.booleans(), st.lists(st.integers(), max_size=2)),
    }[base]


@given(command=COMMANDS, data=st.data())
@SETTINGS
def test_toml_wrong_type(env, command, data):
    sec, key, tag = data.draw(st.sampled_from(KEYS))
    value = data.draw(wrong_type(tag))
    check(env, "toml-wrong-type", [command, "--config", write_key(env, sec, key, value)], key)


def bad_number(low=None, high=None, low_open=True, high_open=True, integer=False):
    """Numbers outside [low, high] (open or closed ends), plus NaN and +-inf for floats."""
    parts = []
    if integer:
        if low is not None:
            parts.append(st.integers(max_value=low - 1 if not low_open else low, min_value=-(2**62)))
        if high is not None:
            parts.append(st.integers(min_value=high + 1 if not high_open else high, max_value=2**62))
        return st.one_of(parts)
    if low is not None:
        parts.append(st.floats(max_value=low, exclude_max=not low_open, allow_nan=False, allow_infinity=False, min_value=-1e300))
    if high is not None:
        parts.append(st.floats(min_value=high, exclude_min=not high_open, allow_nan=False, allow_infinity=False, max_value=1e300))
    parts.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return st.one_of(parts)


RANGES = {  # (section, key): strategy of values that must be refused
    ("train", "epochs"): bad_number(low=1, low_open=False, integer=True),
    ("train", "batch_size"): bad_number(low=1, low_open=False, integer=True),
    ("train", "lr"): bad_number(low=0),
    ("train", "momentum"): bad_number(low=0, high=1, low_open=False),
    ("train", "weight_decay"): bad_number(low=0, low_open=False).filter(lambda v: not v >= 0),
    ("train", "gamma"): bad_number(low=0),
    ("train", "seed"): bad_number(low=0, low_open=False, integer=True),
    ("train", "grad_clip"): bad_number(low=0),
    ("train", "label_smoothing"): bad_number(low=0, high=1, low_open=False),
    ("train", "milestones"): st.lists(st.integers(max_value=0, min_value=-100), min_size=1, max_size=3),
    ("defense.train", "lr"): bad_number(low=0),
    ("probe.train", "epochs"): bad_number(low=1, low_open=False, integer=True),
    ("data", "val_fraction"): bad_number(low=0, high=1),
    ("data", "split_seed"): bad_number(low=0, low_open=False, integer=True),
    ("data", "train_subset"): st.one_of(st.integers(max_value=0, min_value=-(2**62)), st.integers(min_value=10**6, max_value=2**62)),
    ("defense", "tau"): bad_number(low=0),
    ("defense", "omega"): bad_number(low=0, low_open=False).filter(lambda v: not v >= 0),
    ("defense", "omega_warmup"): bad_number(low=0, low_open=False, integer=True),
    ("defense", "kl_cap"): bad_number(low=0),
    ("attack", "temperature"): bad_number(low=0),
    ("attack", "alpha"): bad_number(low=0, high=1, low_open=False, high_open=False),
    ("attack", "queries"): bad_number(low=1, low_open=False, integer=True),
    ("probe", "temperature"): bad_number(low=0),
    ("probe", "alpha"): bad_number(low=0, high=1, low_open=False, high_open=False),
    ("probe", "train_subset"): st.integers(max_value=0, min_value=-(2**62)),
}
NAMES = {  # (section, key): valid names; anything else must be refused
    ("train", "optimizer"): ["sgd", "adam", "adamw"],
    ("train", "schedule"): ["constant", "cosine", "multistep", "onecycle"],
    ("train", "select"): ["best-val", "last"],
    ("probe.train", "optimizer"): ["sgd", "adam", "adamw"],
    ("data", "augment"): ["auto", "none", "crop", "crop-flip"],
    ("data", "dataset"): ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"],
    ("model", "name"): [],
    ("defense", "name"): [],
    ("defense", "adversary_model"): [],
    ("attack", "method"): [],
    ("attack", "student"): [],
    ("attack", "query"): ["logits", "probs", "label", "weights"],
}


@given(command=COMMANDS, data=st.data())
@SETTINGS
def test_toml_out_of_range(env, command, data):
    sec, key = data.draw(st.sampled_from(sorted(RANGES)))
    value = data.draw(RANGES[(sec, key)])
    check(env, "toml-out-of-range", [command, "--config", write_key(env, sec, key, value)], key)


@given(command=COMMANDS, data=st.data())
@SETTINGS
def test_toml_unknown_names(env, command, data):
    sec, key = data.draw(st.sampled_from(sorted(NAMES)))
    value = data.draw(st.text(ALPHABET + "-:=,0123456789", min_size=1, max_size=12))
    assume(value not in NAMES[(sec, key)] and not value.startswith(("npz:", "imagefolder:", "topk:")))
    assume(value.split(":")[0] not in ("mlp", "cnn", "kd", "scratch", "label-smoothing", "nasty")
           and value.split(":")[0] not in nasty.models.list_models())
    check(env, "toml-unknown-name", [command, "--config", write_key(env, sec, key, value)])


@given(command=COMMANDS, text=st.text(min_size=1, max_size=40))
@SETTINGS
def test_toml_syntax_errors(env, command, text):
    try:
        tomllib.loads(text)
        assume(False)  # valid TOML is another test's business
    except tomllib.TOMLDecodeError:
        pass
    env["n"][0] += 1
    f = env["root"] / f"bad{env['n'][0]}.toml"
    f.write_text(text)
    check(env, "toml-syntax", [command, "--config", f], "invalid TOML")


# ---- command-line options

import nasty.models  # noqa: E402

FLAG_CASES = {
    # flag: strategy of bad values (strings as typed on a command line)
    "--epochs": st.one_of(st.integers(max_value=0, min_value=-10**6).map(str), st.sampled_from(["x", "1.5", "", "1e3"])),
    "--batch-size": st.one_of(st.integers(max_value=0, min_value=-10**6).map(str), st.sampled_from(["ten", "2.0"])),
    "--lr": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr), st.sampled_from(["nan", "inf", "fast"])),
    "--seed": st.one_of(st.integers(max_value=-1, min_value=-10**20).map(str), st.integers(min_value=2**63, max_value=2**70).map(str)),
    "--train-subset": st.one_of(st.integers(max_value=0, min_value=-10**6).map(str), st.integers(min_value=10**6, max_value=10**9).map(str)),
    "--optimizer": st.text(ALPHABET, min_size=1, max_size=6).filter(lambda s: s not in ("sgd", "adam", "adamw")),
    "--schedule": st.text(ALPHABET, min_size=1, max_size=6),
    "--model": st.sampled_from(["cnn:width=-1", "cnn:width=0", "cnn:depth=3", "mlp:hidden=0", "mlp:hidden='x'", "resnet", "cnn:width",
                                "nope", "mlp:hidden=[0]", "cnn:width=nan", "cnn:width=1e9x"]),
    "--dataset": st.sampled_from(["digitz", "npz:/nonexistent.npz", "imagefolder:/nonexistent", "mnist-x", "", "npz:"]),
    "--config": st.sampled_from(["/nonexistent.toml", "/"]),
}
DEFENDED_CASES = {
    "--tau": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr), st.just("nan")),
    "--omega": st.one_of(st.floats(max_value=0, exclude_max=True, allow_nan=False, allow_infinity=False).map(repr), st.just("nan"), st.just("inf")),
    "--omega-warmup": st.integers(max_value=-1, min_value=-100).map(str),
    "--kl-cap": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr), st.just("nan")),
    "--defense-epochs": st.integers(max_value=0, min_value=-100).map(str),
    "--defense-lr": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr), st.just("inf")),
    "--probe-subset": st.integers(max_value=0, min_value=-100).map(str),
    "--adversary": st.sampled_from(["/nonexistent", "/nonexistent.pt", "/etc/passwd"]),
    "--init-from": st.sampled_from(["/nonexistent", "x.pth"]),
    "--defense": st.sampled_from(["nasti", "nope", ""]),
}
ATTACK_CASES = {
    "--temperature": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr), st.just("nan")),
    "--alpha": st.one_of(st.floats(min_value=1, exclude_min=True, allow_nan=False, allow_infinity=False).map(repr),
                         st.floats(max_value=0, exclude_max=True, allow_nan=False, allow_infinity=False).map(repr), st.just("nan")),
    "--query": st.sampled_from(["topk:0", "topk:x", "logits:3", "top", "", "probs:", "label:1"]),
    "--method": st.sampled_from(["kdd", "nope", ""]),
    "--param": st.sampled_from(["temperature", "nonexistent=1", "temperature=-1", "alpha=2", "=3"]),
    "--teacher": st.sampled_from(["/nonexistent", "/nonexistent.pth", "/tmp"]),
    "--student": st.sampled_from(["cnn:width=-1", "nope", "mlp:hidden=0"]),
}


@given(command=COMMANDS, data=st.data())
@SETTINGS
def test_bad_flags(env, command, data):
    cases = {**FLAG_CASES, **(DEFENDED_CASES if command == "train-defended" else ATTACK_CASES if command == "attack" else {})}
    flag = data.draw(st.sampled_from(sorted(cases)))
    value = data.draw(cases[flag])
    args = base_args(command, env)
    if flag in args:
        i = args.index(flag)
        args = args[:i] + args[i + 2:]
    check(env, "flag-bad-value", [*args, flag, value])


@given(command=st.sampled_from(["train-teacher", "train-defended", "attack", "eval", "convert"]), data=st.data())
@SETTINGS
def test_unknown_flags(env, command, data):
    flag = "--" + data.draw(st.text(ALPHABET.replace("_", "") + "-", min_size=2, max_size=12).filter(lambda s: s[0] != "-"))
    import nasty.cli

    known = {o for p in nasty.cli.cli.commands[command].params for o in getattr(p, "opts", [])}
    assume(flag not in known and not any(k.startswith(flag) for k in known))
    args = base_args(command, env) if command not in ("eval", "convert") else [command, env["teacher"]]
    check(env, "flag-unknown", [*args, flag, "1"], "No such option")


@given(data=st.data())
@SETTINGS
def test_dataset_checkpoint_mismatch(env, data):
    """A digits checkpoint (10 classes, 1x8x8) used with datasets of other classes, channels or size."""
    npz = data.draw(st.sampled_from(sorted(env["npz"])))
    dataset = f"npz:{env['npz'][npz]}"
    how = data.draw(st.sampled_from(["attack", "adversary", "init-from", "eval"]))
    t = env["teacher"]
    args = {
        "attack": ["attack", "--dataset", dataset, "--teacher", t, "--epochs", "1"],
        "adversary": ["train-defended", "--dataset", dataset, "--adversary", t, "--epochs", "1", "--no-probe"],
        "init-from": ["train-defended", "--dataset", dataset, "--adversary", t, "--init-from", t, "--lock", "two-net", "--epochs", "1", "--no-probe"],
        "eval": ["eval", t, "--dataset", dataset],
    }[how]
    line = check(env, "dataset-checkpoint-mismatch", args)
    assert re.search(r"classes|expects input|channels", line), line


def test_zz_number_of_cases(env):
    """Runs last: how many bad-input cases the tests above tried (all refused with exit 2, one line)."""
    total = sum(COUNTS.values())
    print(f"\nfuzz: {total} bad-input cases tried, all exit 2 with one line: {dict(sorted(COUNTS.items()))}")
    assert total >= 8 * EXAMPLES
