def test_models_lists(run_cli):
    rc, out, err = run_cli("models")
    assert rc == 0 and "resnet20" in out


def test_unknown_dataset_one_line_exit_2(run_cli, tmp_path):
    rc, out, err = run_cli("train-teacher", "--dataset", "digitz", "--out", str(tmp_path / "r"))
    assert rc == 2
    assert err.strip().count("\n") == 0 and "did you mean 'digits'" in err
