"""Issue 11, class 4 and 5: NaN/inf and wrongly typed numbers are refused up front, by one rule
(every float option of every command; every method parameter against its default's kind)."""

from __future__ import annotations

import click
import pytest


def _float_options():
    from nasty.cli import cli

    out = []
    for name, cmd in sorted(cli.commands.items()):
        for p in cmd.params:
            if isinstance(p, click.Option) and isinstance(p.type, click.types.FloatParamType) or \
                    type(p.type).__name__ == "_Finite":
                out.append((name, p.opts[0]))
    return out


FLOAT_OPTIONS = _float_options()


def test_there_are_float_options():
    names = {o for _, o in FLOAT_OPTIONS}
    assert {"--margin", "--lr", "--temperature", "--delta", "--tau"} <= names


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("command,option", FLOAT_OPTIONS)
def test_every_float_option_refuses_non_finite(run_cli, tmp_path, command, option, value):
    args = [command, f"{option}={value}"]
    if command in ("audit", "eval"):
        args.append(str(tmp_path / "no-such-checkpoint"))
    if command == "convert":
        args += [str(tmp_path / "x.pt"), "--model", "mlp", "--out", str(tmp_path / "o")]
    rc, out, err = run_cli(*args)
    assert rc == 2, err
    assert "finite" in err and option in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--param", "temperature=hot"], "temperature must be a number"),
    (["--param", "temperature=1e999"], "temperature must be finite"),
    (["--param", "alpha=nan"], "alpha must be a number"),
    (["--param", "alpha=True"], "alpha must be a number"),
    (["--method", "tllm", "--param", "delta=nan"], "delta must be a number"),
    (["--method", "tllm", "--param", "mode=3"], "mode must be a string"),
    (["--output-defense", "noise:scale=nan"], "scale must be a finite number"),
    (["--output-defense", "noise:scale=inf"], "scale must be a finite number"),
])
def test_method_parameters_checked_before_anything_runs(run_cli, tmp_path, args, needle):
    rc, out, err = run_cli("attack", "--out", tmp_path / "o", *args)
    assert rc == 2, err
    assert needle in err
    assert not (tmp_path / "o").exists()


def test_registry_rule_is_shared():
    from nasty.errors import NastyError
    from nasty.registry import with_defaults

    assert with_defaults("x", {"a": 1.0, "b": "s", "c": None}, {"a": 2, "c": [1.0]}) == {"a": 2, "b": "s", "c": [1.0]}
    for bad in ({"a": float("nan")}, {"a": "2"}, {"b": 1}, {"c": [float("inf")]}):
        with pytest.raises(NastyError):
            with_defaults("x", {"a": 1.0, "b": "s", "c": None}, bad)


@pytest.mark.parametrize("args,needle", [(["--bootstrap", "5"], "--bootstrap"), (["--seeds", "0"], "--seeds"),
                                         (["--param", "kd.temperature=1e999"], "finite")])
def test_audit_settings_refused_up_front(run_cli, tmp_path, args, needle):
    rc, out, err = run_cli("audit", tmp_path / "missing", *args)
    assert rc == 2 and needle in err
