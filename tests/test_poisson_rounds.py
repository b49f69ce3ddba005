"""FedSGD under DP-SGD: the client's batch is Poisson-sampled at the rate its ledger accounts (issue 14).

Opacus' accountants compose Poisson-subsampled Gaussians; a federation's ε is that of the
release only if each client's batch is drawn that way: every sample independently at rate
q = min(1, b/n_k), the clipped sum divided by the expected batch size b, an empty batch
releasing noise alone.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from defenda.compose import make_defense
from defenda.federation.client import gradient
from defenda.federation.run import (
    RunResult,
    _transform_chain,
    client_batch,
    client_seed,
    replay_unit,
    run_federation,
)
from defenda.federation.settings import FederationSettings
from defenda.harness.services import load_task
from defenda.interfaces import Defense
from defenda.plugins import get_plugins
from defenda.records import RoundSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[Any, Any]:
    task, data = load_task(get_plugins().registry, "digits", {"model": "mlp", "widths": [16]})
    return task, data


def _defense(name: str, **params: Any) -> Defense:
    return make_defense(get_plugins().registry, name, params)


def _run(digits: tuple[Any, Any], defense: Defense, fs: FederationSettings, seed: int = 0) -> RunResult:
    task, data = digits
    return run_federation(data, lambda: task.build_model(data), defense, fs, seed=seed, device=CPU)


def test_the_hook_is_declared_by_dp_sgd_and_forwarded_by_compositions() -> None:
    assert Defense.poisson_sampling is False
    assert _defense("dp-sgd").poisson_sampling is True
    assert _defense("none").poisson_sampling is False
    assert _defense("dp-sgd+gaussian-noise").poisson_sampling is True
    assert _defense("prune+gaussian-noise").poisson_sampling is False
    # DP-SGD computes its own update, so the vectorised transform-only path never serves it
    assert _transform_chain(_defense("dp-sgd")) is None and _transform_chain(_defense("dp-sgd+prune")) is None


def test_dp_sgd_batches_are_poisson_at_the_ledger_rate_and_observed_as_drawn(digits: tuple[Any, Any]) -> None:
    b, rounds = 8, 40
    fs = FederationSettings(clients=4, clients_per_round=4, rounds=rounds, local_batch_size=b,
                            attack_rounds=tuple(range(rounds)), eval_every=rounds)
    dp = _defense("dp-sgd", noise_multiplier=1.0)
    res = _run(digits, dp, fs)
    _, data = digits
    x_train = data.train[0]
    parts = [torch.as_tensor(p) for p in _parts(digits, fs)]
    sizes = []
    for obs in res.observations:
        for k, c in obs.clients.items():
            n = res.client_sizes[k]
            sizes.append(len(c.x))
            assert c.samples == n and c.settings.local_batch_size == b
            # the observation's truth is the very draw: the round's Poisson mask from the client's seed
            gen = torch.Generator().manual_seed(client_seed(0, obs.round, k, fs.clients))
            idx, _ = client_batch(fs, b, parts[k], gen, obs.round, k, 0, poisson=True)
            assert torch.equal(c.x, x_train[idx])
    # 160 Binomial(n_k, b/n_k) sizes: mean b, variance ≈ b; 5 standard errors of the mean
    mean = sum(sizes) / len(sizes)
    assert abs(mean - b) < 5 * math.sqrt(b / len(sizes)), mean
    assert len(set(sizes)) > 3 and any(s > b for s in sizes)
    # every ledger entry's q is the rate the batch was drawn at, whatever its realised size
    for k in range(fs.clients):
        entries = res.ledger.entries(k)
        assert len(entries) == rounds
        assert all(e[0] == 1.0 and e[1] == pytest.approx(b / res.client_sizes[k], abs=0, rel=1e-15) and e[2] == 1
                   for e in entries)


def _parts(digits: tuple[Any, Any], fs: FederationSettings) -> list[Any]:
    from defenda.federation.partition import partition

    _, data = digits
    return partition(data.train[1].numpy(), fs.clients, fs.partition, seed=0, alpha=fs.alpha,
                     shards_per_client=fs.shards_per_client)


def test_without_a_poisson_defense_batches_stay_fixed(digits: tuple[Any, Any]) -> None:
    b = 8
    fs = FederationSettings(clients=4, clients_per_round=4, rounds=5, local_batch_size=b,
                            attack_rounds=tuple(range(5)), eval_every=5)
    res = _run(digits, _defense("gaussian-noise", std=0.01), fs)
    assert {len(c.x) for obs in res.observations for c in obs.clients.values()} == {b}
    # a client smaller than b trains on all of its data, with or without Poisson sampling (q = 1)
    small = FederationSettings(clients=2, clients_per_round=2, rounds=1, local_batch_size=b)
    idx = torch.arange(5)
    for poisson in (False, True):
        drawn, settings = client_batch(small, b, idx, torch.Generator().manual_seed(3), 0, 0, 0, poisson=poisson)
        assert sorted(drawn.tolist()) == list(range(5)) and settings.local_batch_size == 5


def test_empty_batches_release_noise_only_and_replay_exactly(digits: tuple[Any, Any]) -> None:
    """At b = 1 a client of n_k ≈ 315 draws nobody with probability ≈ e⁻¹: its update is
    noise alone, finite, and the malicious-server replay reproduces it from the recorded state."""
    task, data = digits
    fs = FederationSettings(clients=4, clients_per_round=4, rounds=6, local_batch_size=1,
                            attack_rounds=tuple(range(6)), eval_every=6)
    dp = _defense("dp-sgd", noise_multiplier=1.0, max_grad_norm=0.5)
    res = _run(digits, dp, fs)
    empty = [(obs, u) for obs in res.observations for u in obs.units if len(obs.truth(u)[0]) == 0]
    assert empty, "no empty batch drawn; choose another seed"
    for obs, unit in empty[:3]:
        assert unit.update.batch_size == 0 and unit.update.meta["noise_std"] == pytest.approx(0.5)
        assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in unit.update.tensors)
        model = task.build_model(data)
        model.load_state_dict(obs.model_state)
        again = replay_unit(obs, unit, model, dp, fs)
        assert all(torch.equal(a, t) for a, t in zip(again.tensors, unit.update.tensors))


def test_an_empty_batch_is_opacus_zero_sum_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise only, N(0, (σ·C/b)²) per coordinate — exactly what DPOptimizer makes of a zero sum."""
    import defenda_defenses.dp_sgd as dp_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    sigma, clip, b = 1.5, 0.8, 4
    dp = _defense("dp-sgd", noise_multiplier=sigma, max_grad_norm=clip)
    settings = RoundSettings("gradient", lr=0.1, local_batch_size=b, client_samples=100)
    x, y = torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)
    update = dp.client_update(model, x, y, settings, torch.Generator().manual_seed(1))
    flat = torch.cat([t.flatten() for t in update.tensors])
    std = sigma * clip / b
    assert torch.isfinite(flat).all() and update.meta["noise_std"] == pytest.approx(std)
    # 4 810 coordinates: the sample std is within 5 % (≈ 5 standard errors) and the mean near 0
    assert abs(float(flat.std()) / std - 1) < 0.05 and abs(float(flat.mean())) < 5 * std / math.sqrt(len(flat))
    # the same generator through Opacus' own steps on the empty batch (an MLP takes zero rows)
    monkeypatch.setattr(dp_module, "_noise_only", lambda entry, opt, divisor: dp_module._dp_steps(
        entry, opt, [(x, y)], "gradient", list(model.parameters())))
    opacus = dp.client_update(model, x, y, settings, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, t) for a, t in zip(update.tensors, opacus.tensors))


def test_the_fedsgd_divisor_is_the_expected_batch_size() -> None:
    """3 samples drawn at expected size 5: the clipped sum is divided by 5 (Opacus'
    ``expected_batch_size``), not 3. No clipping (large C), negligible noise (σ·C = 1e-12)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 2, 1])
    dp = _defense("dp-sgd", noise_multiplier=1e-18, max_grad_norm=1e6)
    poisson = RoundSettings("gradient", lr=0.1, local_batch_size=5, client_samples=50)
    update = dp.client_update(model, x, y, poisson, torch.Generator().manual_seed(0))
    summed = [3 * g for g in gradient(model, x, y)]  # the gradient of the mean loss, times 3
    for t, s in zip(update.tensors, summed):
        torch.testing.assert_close(t, s / 5, rtol=1e-9, atol=1e-12)
    assert update.batch_size == 3 and update.meta["noise_std"] == pytest.approx(1e-12 / 5)
    entry = dp.sample_ledger_entry(poisson, 3)
    assert entry is not None and entry[1] == pytest.approx(0.1)  # the drawing rate 5/50, not 3/50
    # the single-client protocol (no expected size): a fixed batch, divided by its own size
    fixed = dp.client_update(model, x, y, RoundSettings("gradient", lr=0.1), torch.Generator().manual_seed(0))
    for t, s in zip(fixed.tensors, summed):
        torch.testing.assert_close(t, s / 3, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="empty batch"):
        dp.client_update(model, x[:0], y[:0], RoundSettings("gradient", lr=0.1))
