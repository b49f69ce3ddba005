"""Soteria as a defenda plugin: the contract, the algorithm against the reference code, and a tiny study."""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import defenda_soteria
from defenda import RoundSettings
from defenda.federation.client import compute_update
from defenda.models import MLP, ResNet18, SmallCNN
from defenda.testing import assert_installed, check_defense, make_tiny_case
from defenda_soteria.soteria import (
    Soteria,
    find_representation_layer,
    representation_and_sensitivity,
    soteria_mask,
)


@pytest.fixture
def cnn_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return SmallCNN(1, 8, 10, channels=4).train(), torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


def test_contract() -> None:
    check_defense(Soteria)
    check_defense(Soteria, {"fraction": 0.9})
    check_defense(Soteria, {"fraction": 0.5}, case=make_tiny_case(model="mlp"))


def test_version_matches_the_package_metadata() -> None:
    try:
        assert md.version("defenda-soteria") == defenda_soteria.__version__
    except md.PackageNotFoundError:
        pytest.skip("defenda-soteria is not installed (running from the source tree)")


def test_registered_through_the_hook(register_plugin) -> None:
    plugins = register_plugin(defenda_soteria, "soteria")
    entry = plugins.registry.get("defense", "soteria")
    assert entry.cls is Soteria and entry.origin.plugin == "soteria"
    assert plugins.status("soteria").provides == {"defenses": ["soteria"]}


def test_listed_with_its_strength(register_plugin, defenda_cli) -> None:
    register_plugin(defenda_soteria, "soteria")
    defenses = {d["name"]: d for d in defenda_cli("defenses", "--json").assert_success().json()}
    fraction = next(p for p in defenses["soteria"]["params"] if p["name"] == "fraction")
    assert fraction["strength"] == "up" and fraction["help"]
    assert defenses["soteria"]["default_sweep"] == [0.2, 0.4, 0.6, 0.8]


def test_installed_package_loads() -> None:
    try:
        md.distribution("defenda-soteria")
    except md.PackageNotFoundError:
        pytest.skip("defenda-soteria is not installed (running from the source tree)")
    assert_installed("defenda-soteria", {"defenses": ["soteria"]})


def reference_mask(model: SmallCNN, x: torch.Tensor, percent: float) -> np.ndarray:
    """The reference code's algorithm (jeremy313/Soteria), one backward pass per representation
    coordinate, with its 0/0 for inactive ReLU units replaced by 'no contribution'."""
    x = x.clone().requires_grad_(True)
    feature = model.features(x).flatten(1)
    ratio = torch.zeros_like(feature)
    for f in range(feature.shape[1]):
        target = torch.zeros_like(feature)
        target[:, f] = 1
        (dx,) = torch.autograd.grad(feature, x, grad_outputs=target, retain_graph=True)
        norm = torch.norm(dx.view(dx.size(0), -1), dim=1)
        r = feature.detach()[:, f]
        ratio[:, f] = torch.where(r != 0, norm / r.abs().clamp_min(1e-30), torch.zeros_like(r))
    score = ratio.sum(0).detach().numpy()
    active = np.flatnonzero((feature.detach() != 0).any(0).numpy())
    order = active[np.argsort(score[active], kind="stable")]
    mask = np.ones(feature.shape[1], dtype=np.float32)
    mask[order[: math.floor(percent * len(active))]] = 0
    return mask


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.8])
def test_mask_matches_the_reference_algorithm(cnn_batch, fraction: float) -> None:
    model, x, _ = cnn_batch
    r, sens = representation_and_sensitivity(model, x, "classifier.1")
    mask, pruned, active = soteria_mask(r, sens, fraction)
    expected = reference_mask(model, x, fraction)
    assert np.array_equal(mask.numpy(), expected)
    assert pruned == math.floor(fraction * active) and active == int((r != 0).any(0).sum())


def test_only_the_pruned_columns_of_the_representation_layer_change(cnn_batch) -> None:
    model, x, y = cnn_batch
    honest = compute_update(model, x, y)
    update = Soteria(fraction=0.5).client_update(model, x, y, RoundSettings())
    i = update.names.index("classifier.1.weight")
    for j, (a, b) in enumerate(zip(honest.tensors, update.tensors)):
        if j != i:
            assert torch.equal(a, b), update.names[j]
    zeroed = (update.tensors[i] == 0).all(0) & (honest.tensors[i] != 0).any(0)
    kept = ~(update.tensors[i] == 0).all(0)
    assert int(zeroed.sum()) == update.meta["soteria_zeroed"] > 0
    assert torch.equal(update.tensors[i][:, kept], honest.tensors[i][:, kept])
    assert update.meta["soteria_layer"] == "classifier.1"
    # the pruned columns are declared: masks hold the kept columns of that tensor only
    assert update.masks is not None and len(update.masks) == len(update.tensors)
    assert all(m is None for j, m in enumerate(update.masks) if j != i)
    assert update.masks[i].shape == update.tensors[i].shape
    columns = update.masks[i][0]
    assert torch.equal(update.masks[i], columns.expand_as(update.masks[i]))  # whole columns
    assert torch.equal(columns == 0, zeroed)


def test_nothing_pruned_declares_no_masks(cnn_batch) -> None:
    model, x, y = cnn_batch
    assert Soteria(fraction=0.0).client_update(model, x, y, RoundSettings()).masks is None


def test_zero_fraction_is_the_honest_update(cnn_batch) -> None:
    model, x, y = cnn_batch
    for kind in ("gradient", "delta"):
        settings = RoundSettings(kind=kind, local_steps=2)
        honest = compute_update(model, x, y, settings)
        update = Soteria(fraction=0.0).client_update(model, x, y, settings)
        assert all(torch.equal(a, b) for a, b in zip(honest.tensors, update.tensors))


def test_fedavg_delta_columns_are_pruned(cnn_batch) -> None:
    model, x, y = cnn_batch
    update = Soteria(fraction=0.6).client_update(model, x, y, RoundSettings(kind="delta", local_steps=3, lr=0.1))
    assert update.kind == "delta" and update.local_steps == 3
    i = update.names.index("classifier.1.weight")
    weight = update.tensors[i]
    assert int((weight == 0).all(0).sum()) >= update.meta["soteria_zeroed"] > 0
    assert update.masks is not None and int((update.masks[i] == 0).all(0).sum()) == update.meta["soteria_zeroed"]


def test_representation_layer_per_model_family() -> None:
    torch.manual_seed(0)
    assert find_representation_layer(SmallCNN(1, 8, 10), torch.rand(2, 1, 8, 8)) == "classifier.1"
    assert find_representation_layer(MLP(64, 10, (20, 20)), torch.rand(2, 1, 8, 8)) == "net.3"
    assert find_representation_layer(ResNet18(3, 10, width=8), torch.rand(2, 3, 8, 8)) == "fc"
    assert find_representation_layer(SmallCNN(1, 8, 10), torch.rand(2, 1, 8, 8), "classifier.3") == "classifier.3"
    with pytest.raises(ValueError, match=r"'features.0' is not an nn.Linear.*classifier.1"):
        find_representation_layer(SmallCNN(1, 8, 10), torch.rand(2, 1, 8, 8), "features.0")
    with pytest.raises(ValueError, match="no fully connected layer fed by a learned representation"):
        find_representation_layer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.rand(2, 1, 8, 8))


def test_batchnorm_model_uses_the_coupled_path_and_keeps_running_stats() -> None:
    """Train-mode BatchNorm couples the samples: the Jacobian is taken through the whole batch
    (as the reference code does), and the extra passes leave the running statistics alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 3)).train()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    twin = copy.deepcopy(model)
    Soteria(fraction=0.5).client_update(model, x, y, RoundSettings())
    compute_update(twin, x, y)  # what the honest client does to BatchNorm statistics
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), name
    r, sens = representation_and_sensitivity(model, x, "4")
    xr = x.clone().requires_grad_(True)
    feature = model[:4](xr)
    (dx,) = torch.autograd.grad(feature[:, 7].sum(), xr)
    assert torch.allclose(sens[:, 7], dx.flatten(1).norm(dim=1))


def test_lowers_geiping_psnr_in_a_tiny_study(register_plugin, defenda_cli, tmp_path: Path) -> None:
    """A study naming soteria runs through the CLI and reports it. Against the paper's (non-adaptive)
    attacker Soteria costs Geiping most of its PSNR; an attacker that ignores the zeroed coordinates
    gets much of it back (Balunović et al., ICLR 2022)."""
    register_plugin(defenda_soteria, "soteria")
    study = tmp_path / "study.toml"
    study.write_text(
        '[study]\nname = "soteria-tiny"\nseeds = [0]\nrounds = 2\nclient_batch_size = 8\n'
        '[task]\nname = "digits"\n'
        '[[attacks]]\nname = "geiping"\niterations = 100\nmasked = ["never", "always"]\n'
        '[[defenses]]\nname = "none"\n'
        '[[defenses]]\nname = "soteria"\nfraction = 0.5\n'
    )
    defenda_cli("run", str(study), "--out", str(tmp_path / "out"), "--no-progress").assert_success() \
        .assert_output_contains("4 ok", stream="err")
    db = sqlite3.connect(tmp_path / "out" / "results.sqlite")
    rows = db.execute("SELECT defense, strength, params, psnr, test_acc FROM trials").fetchall()
    psnr = {(d, json.loads(params)["attack"]["masked"] == "always"): p for d, _, params, p, _ in rows}
    assert psnr[("soteria", False)] < psnr[("none", False)] - 10
    assert psnr[("soteria", True)] > psnr[("soteria", False)] + 5
    assert all(acc is not None for *_, acc in rows)
    assert {s for d, s, *_ in rows if d == "soteria"} == {0.5}
