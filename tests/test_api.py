"""The Python API: one attack on a researcher's own model and gradients; a study as a DataFrame."""

from __future__ import annotations

import pytest
import torch

import defenda
from defenda.errors import DefendaError
from defenda.federation.client import gradient
from defenda.models import SmallCNN


def _digit() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[7] / 16.0, dtype=torch.float32).view(1, 1, 8, 8)


def test_reconstruct_own_model_and_gradients() -> None:
    torch.manual_seed(0)
    model = SmallCNN(1, 8, 10)
    x01 = _digit()
    x = (x01 - 0.5) / 0.5  # the researcher's own normalisation
    grads = gradient(model, x, torch.tensor([7]))
    rec = defenda.reconstruct("geiping", model, grads, batch_size=1, input_shape=(1, 8, 8), mean=0.5, std=0.5,
                              iterations=200)
    assert rec.inputs.shape == (1, 1, 8, 8)
    assert rec.labels.tolist() == [7]  # recovered from the last layer's gradient
    mse = float(((rec.inputs * 0.5 + 0.5).clamp(0, 1) - x01).pow(2).mean())
    assert 10 * torch.log10(torch.tensor(1 / mse)) > 30  # dB


def test_reconstruct_accepts_named_gradients_and_checks_them() -> None:
    model = SmallCNN(1, 8, 10)
    grads = dict(zip([n for n, _ in model.named_parameters()], gradient(model, _digit(), torch.tensor([1]))))
    rec = defenda.reconstruct("geiping", model, grads, input_shape=(1, 8, 8), iterations=5)
    assert rec.inputs.shape[1:] == (1, 8, 8)
    with pytest.raises(DefendaError, match="match model.parameters"):
        defenda.reconstruct("geiping", model, list(grads.values())[:-1], input_shape=(1, 8, 8))
    with pytest.raises(DefendaError, match="input_shape"):
        defenda.reconstruct("geiping", model, grads)
    with pytest.raises(Exception, match="unknown parameter 'iters'"):
        defenda.reconstruct("geiping", model, grads, input_shape=(1, 8, 8), iters=5)


def test_reconstruct_reads_the_input_shape_off_a_first_linear_layer() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    x = torch.randn(1, 30)
    rec = defenda.reconstruct("spear", model, gradient(model, x, torch.tensor([1])), batch_size=1, image=False)
    assert rec.inputs.shape == (1, 30)  # no input_shape given: the first nn.Linear states (30,)
    assert torch.allclose(rec.inputs, x, atol=1e-4)


def test_run_study_returns_a_dataframe(tmp_path) -> None:
    study = {"study": {"seeds": [0], "rounds": 1}, "task": {"name": "digits"},
             "attacks": [{"name": "geiping", "iterations": 3}]}
    df = defenda.run_study(study, out=tmp_path)
    assert list(df["status"]) == ["ok"] and "psnr" in df.columns
