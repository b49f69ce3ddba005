"""Geiping on ``photos`` (32×32 RGB crops): batch 1, labels recovered, the attack's defaults.

With its defaults (``iterations = 0``: 2,000 steps for inputs of more than 1,024 values) Geiping
reaches ≥ 30 dB median over 5 seeds on the small CNN victim (``cnn``) at initialisation, about
15 s per trial on 2 cores. On the Inverting Gradients ConvNet with GroupNorm (one or two channels
per group at width 16) it does not (about 5–10 dB, README): at batch 1 that normalisation makes
the victim's gradient chaotic in the input — the second test measures it, three orders of
magnitude apart between the two victims — so the cosine objective has no usable basin.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from torch.nn import functional as F

import defenda
from defenda.data import load_photos_task
from defenda.errors import ParamError
from defenda.models import build_model
from defenda_attacks.geiping import Geiping, auto_iterations


@pytest.fixture(scope="module")
def photos():
    return load_photos_task()


def _psnr(data, rec: torch.Tensor, truth: torch.Tensor) -> float:
    mse = ((data.to_unit(rec).clamp(0, 1) - data.to_unit(truth).clamp(0, 1)) ** 2).mean().clamp_min(1e-10)
    return float(10 * torch.log10(1 / mse))


def _victim(arch: str, data, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(arch, (3, 32, 32), 10).eval()
    i = int(torch.randint(len(data.train[1]), ()))
    return model, data.train[0][i:i + 1], data.train[1][i:i + 1]


def test_default_iterations_follow_the_input_size() -> None:
    assert auto_iterations(0, (1, 8, 8)) == 400 and auto_iterations(0, (1, 25, 25)) == 400
    assert auto_iterations(0, (3, 32, 32)) == 2000 and auto_iterations(0, (30,)) == 400
    assert auto_iterations(123, (3, 32, 32)) == 123
    with pytest.raises(ParamError, match="iterations must be >= 0"):
        Geiping(iterations=-5)


@pytest.mark.slow
def test_geiping_photos_batch1_defaults_30db(photos) -> None:
    psnrs = []
    for seed in range(5):
        model, x, y = _victim("cnn", photos, seed)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        rec = defenda.reconstruct("geiping", model, [g.detach() for g in grads], mean=photos.mean,
                                  std=photos.std, num_classes=10, input_shape=(3, 32, 32), seed=seed)
        assert rec.labels.tolist() == y.tolist() and rec.info["iterations"] == 2000
        psnrs.append(_psnr(photos, rec.inputs, x))
    assert statistics.median(psnrs) >= 30.0, psnrs


def _gradient_instability(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − cos between the parameter gradients at ``x`` and at ``x`` plus a 1% perturbation."""
    def grad_at(inputs: torch.Tensor) -> torch.Tensor:
        gs = torch.autograd.grad(F.cross_entropy(model(inputs), y), list(model.parameters()))
        return torch.cat([g.flatten() for g in gs])

    noise = 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return float(1 - F.cosine_similarity(grad_at(x), grad_at(x + noise), dim=0))


def test_groupnorm_convnet_gradient_is_chaotic_at_batch_1(photos) -> None:
    convnet = [_gradient_instability(*_victim("convnet", photos, s)) for s in range(3)]
    cnn = [_gradient_instability(*_victim("cnn", photos, s)) for s in range(3)]
    assert min(convnet) > 0.05 and max(cnn) < 5e-3, (convnet, cnn)
