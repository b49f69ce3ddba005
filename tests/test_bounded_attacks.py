"""Stein and SPEAR bound their own internals: breast-cancer under the defenses that blew them up.

Before the bounds, the committed default report held breast-cancer reconstructions of 10¹²–10³⁵
(Stein: the norm fit over log ρ ran to ρ → ∞ under 1-bit quantisation and noise) and 10²–10¹⁵
(SPEAR: its noisy fallback inverted a near-singular Q). The documented bounds, in model space
(standardised features, so units are feature SDs):

* Stein: every reconstructed sample has norm ≤ ``norm_bound · ρ̄`` (default 5 × the public
  split's median norm ρ̄ ≈ 4.5, so ≈ 22; the longest breast-cancer training sample is 4.3 ρ̄);
* SPEAR: non-exact samples have ``|x̂| ≤ approx_bound`` (default 10); exact ones are the data.

SPEAR's search budget is counted in proposals, so two calls give identical bits.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from defenda.compose import make_defense
from defenda.federation.client import compute_update
from defenda.grants import grant_knowledge, visible_update
from defenda.harness.services import load_task
from defenda.models import MLP
from defenda.plugins import get_plugins
from defenda.records import Knowledge, Reconstruction, RoundSettings, TaskData
from defenda_attacks._spear_core import DEFAULT_MAX_PROPOSALS, SpearParams, spear_recover
from defenda_attacks.spear import Spear
from defenda_attacks.stein import Stein

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = range(4)
#: the defenses of the worst cases (quantize 1–2 bits, Gaussian noise 0.1, prune 0.99)
WORST: list[tuple[str, dict[str, float]]] = [("quantize", {"bits": 1}), ("quantize", {"bits": 2}), ("gaussian-noise", {"std": 0.1}),
         ("prune", {"fraction": 0.99})]


@pytest.fixture(scope="module")
def cancer() -> tuple[Any, TaskData]:
    return load_task(get_plugins().registry, "breast-cancer", {"model": "mlp"})


def _attack(cancer: tuple[Any, TaskData], attack: Stein | Spear, defense: str, params: dict[str, float], B: int,
            seed: int) -> tuple[Reconstruction, Knowledge]:
    """One trial as the harness runs it (seeded batch, defended update, filtered knowledge)."""
    task, data = cancer
    torch.manual_seed(seed)
    model = task.build_model(data)
    if attack.requires.server == "malicious":
        model = attack.prepare_model(model, data)
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(data.train[0]), generator=gen)[:B]
    x, y = data.train[0][idx], data.train[1][idx]
    model.train()
    update = make_defense(get_plugins().registry, defense, params).client_update(model, x, y, RoundSettings(), gen)
    knowledge = grant_knowledge(("batch_size", "public_data"), data, model, y, lr=0.1, device=torch.device("cpu"),
                                seed=seed)
    model.eval()
    torch.manual_seed(seed + 1)
    return attack.reconstruct(visible_update(update, knowledge), model, knowledge), knowledge


@pytest.mark.parametrize("defense, params", WORST, ids=[f"{d}-{next(iter(p.values()))}" for d, p in WORST])
def test_stein_breast_cancer_is_bounded(cancer: tuple[Any, TaskData], defense: str, params: dict[str, float]) -> None:
    data = cancer[1]
    rho_bar = float(data.public[0].flatten(1).double().norm(dim=1).median())
    cap = 5.0 * rho_bar
    for seed in SEEDS:
        rec, _ = _attack(cancer, Stein(width=50_000), defense, params, 2, seed)
        assert torch.isfinite(rec.inputs).all()
        norms = rec.inputs.flatten(1).double().norm(dim=1)
        # the attack reads ρ̄ back from its own W (‖W‖_F² ≈ m d / ρ̄²): equal to ~1e-3, not bitwise
        assert float(norms.max()) <= cap * 1.01, (seed, norms)


@pytest.mark.parametrize("defense, params", WORST, ids=[f"{d}-{next(iter(p.values()))}" for d, p in WORST])
def test_spear_breast_cancer_is_bounded(cancer: tuple[Any, TaskData], defense: str, params: dict[str, float]) -> None:
    data = cancer[1]
    data_max = float(data.train[0].abs().max())
    for seed in SEEDS:
        rec, _ = _attack(cancer, Spear(approx_max_proposals=2000), defense, params, 4, seed)
        assert torch.isfinite(rec.inputs).all()
        # approximate samples within approx_bound; exact ones are real samples
        assert float(rec.inputs.abs().max()) <= max(10.0, data_max) + 1e-6, (seed, rec.info)


def test_stein_undefended_breast_cancer_unchanged_by_the_bound(cancer: tuple[Any, TaskData]) -> None:
    """The bound is loose: an exact update still gives the batch (relative error < 5%)."""
    task, data = cancer
    for seed in (0, 1):
        rec, _ = _attack(cancer, Stein(width=50_000), "none", {}, 2, seed)
        gen = torch.Generator().manual_seed(10_000 + seed)
        x = data.train[0][torch.randperm(len(data.train[0]), generator=gen)[:2]]
        d = torch.cdist(x.double(), rec.inputs.double())
        err = min(float(d[0, 0] + d[1, 1]), float(d[0, 1] + d[1, 0])) / float(x.double().norm(dim=1).sum())
        assert err < 0.05, (seed, err)


def test_stein_is_bitwise_deterministic(cancer: tuple[Any, TaskData]) -> None:
    a, _ = _attack(cancer, Stein(width=20_000), "gaussian-noise", {"std": 0.1}, 2, 3)
    b, _ = _attack(cancer, Stein(width=20_000), "gaussian-noise", {"std": 0.1}, 2, 3)
    assert torch.equal(a.inputs, b.inputs)


def _random_batch_24() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uncorrelated inputs at B = 24: peeling finds little; the sampler alone runs out of its budget."""
    torch.manual_seed(0)
    model = MLP(64, 10, (1000,)).double()
    xb = torch.randn(24, 64, dtype=torch.float64)
    yb = torch.randint(0, 10, (24,))
    g = compute_update(model, xb, yb).named()
    params = dict(model.named_parameters())
    return g["net.1.weight"], g["net.1.bias"], params["net.1.weight"], params["net.1.bias"]


def test_spear_budget_is_counted_in_work_and_deterministic() -> None:
    dW, db, W, b = _random_batch_24()
    # Without the dictionary-learning stage the sampler faces B' = 24 and its budget binds.
    params = SpearParams(max_proposals=30_000, chunk_size=1024, dictionary_learning=False)
    runs = [spear_recover(dW, db, W, b, batch_size=24, params=params, seed=1) for _ in range(2)]
    assert runs[0].proposals == runs[1].proposals == 30_000
    assert "proposal budget" in runs[0].message
    assert torch.equal(runs[0].inputs, runs[1].inputs) and torch.equal(runs[0].exact, runs[1].exact)
    assert SpearParams().time_budget_s == 0 and SpearParams().max_proposals == DEFAULT_MAX_PROPOSALS


def test_spear_dictionary_learning_recovers_the_batch_the_sampler_cannot() -> None:
    """ℓ1 certifies 20–22 of the 24 columns (which, depends on the CPU's rounding); the softmax head
    solves those samples and the rest follow: exact, without the sampler's budget."""
    dW, db, W, b = _random_batch_24()
    torch.manual_seed(0)  # the same victim as _random_batch_24's: its logits layer
    head = MLP(64, 10, (1000,)).double().net[3]
    res = spear_recover(dW, db, W, b, batch_size=24, params=SpearParams(max_proposals=30_000), seed=1,
                        head=(head.weight, head.bias))
    assert bool(res.exact.all()) and res.n_dl_columns >= 16 and res.proposals < 30_000
    assert res.n_head >= 16


def test_spear_noisy_fallback_is_deterministic(cancer: tuple[Any, TaskData]) -> None:
    a, _ = _attack(cancer, Spear(approx_max_proposals=2000), "gaussian-noise", {"std": 0.1}, 4, 1)
    b, _ = _attack(cancer, Spear(approx_max_proposals=2000), "gaussian-noise", {"std": 0.1}, 4, 1)
    assert torch.equal(a.inputs, b.inputs) and a.info["approximate"]
    assert a.info["proposals_tried"] == b.info["proposals_tried"]
    assert math.isfinite(float(a.inputs.abs().max()))
