"""Shared fixtures: small real data (digits, bundled with scikit-learn) and tiny trained models."""

from __future__ import annotations


import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is faster and keeps parallel runs fair


def save_trained_teacher(digits, folder, spec: str, epochs: int):
    """Train ``spec`` on digits (batch 64, lr 0.05, seed 0) and save it as a checkpoint in ``folder``;
    the test modules that attack a teacher on disk each pick the size and epochs their assertions need."""
    from nasty.config import load_config
    from nasty.models import create_model
    from nasty.runs import save_model
    from nasty.train import TrainConfig, ce_objective, fit

    model = create_model(spec, digits.num_classes, digits.in_channels, digits.image_size)
    fit(model, ce_objective(), digits, TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=0), log=None)
    save_model(folder, model.eval(), digits, load_config(None), {})
    return folder


@pytest.fixture(scope="session")
def digits():
    from nasty.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_teacher(digits):
    """A small CNN trained for a few epochs on digits (about 95% test accuracy), frozen."""
    from nasty.models import create_model
    from nasty.train import TrainConfig, ce_objective, fit

    model = create_model("cnn:width=0.5", digits.num_classes, digits.in_channels, digits.image_size)
    fit(model, ce_objective(), digits, TrainConfig(epochs=8, batch_size=64, lr=0.05, seed=0), log=None)
    model.eval()
    return model


@pytest.fixture(scope="session")
def small_teacher(digits):
    """A smaller CNN (width 0.25) trained for 6 epochs on digits, frozen."""
    from nasty.models import create_model
    from nasty.train import TrainConfig, ce_objective, fit

    model = create_model("cnn:width=0.25", digits.num_classes, digits.in_channels, digits.image_size)
    fit(model, ce_objective(), digits, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0), log=None)
    return model.eval()


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from nasty.cli import main

    def run(*args: str):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture(scope="session")
def rsig_reference():
    """Reverse sigmoid (Lee et al. 2018) as in ART, one scalar at a time with the math module: ``p`` clipped
    to [1e-9, 1 - 1e-9] inside the logit only; the golden reference of the output-defense tests."""
    import math

    def ref(row, beta, gamma):
        pert = []
        for p in row:
            pc = min(max(p, 1e-9), 1 - 1e-9)
            r = beta * (1 / (1 + math.exp(-gamma * math.log(pc / (1 - pc)))) - 0.5)
            pert.append(min(max(p - r, 0.0), 1.0))
        s = sum(pert)
        return [v / s for v in pert]

    return ref
