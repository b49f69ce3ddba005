"""The federated training run: the invariants of reference/federation.md §7 that involve whole rounds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from defenda.compose import make_defense
from defenda.federation.aggregation import apply_step, weighted_sum
from defenda.federation.client import compute_update, gradient
from defenda.federation.run import client_batch, client_seed, replay_unit, run_federation
from defenda.federation.settings import FederationSettings
from defenda.harness.services import load_task
from defenda.plugins import get_plugins
from defenda.records import RoundSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    reg = get_plugins().registry
    task, data = load_task(reg, "digits", {"model": "mlp", "widths": [32]})
    return task, data


def _model(task, data):
    return lambda: task.build_model(data).double()


def _double(data):
    return dataclasses.replace(data, train=(data.train[0].double(), data.train[1]),
                               test=(data.test[0].double(), data.test[1]))


def _defense(name, **params):
    return make_defense(get_plugins().registry, name, params)


def test_one_client_one_step_fedavg_is_fedsgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    g = gradient(model, x, y)
    delta = compute_update(model, x, y, RoundSettings("delta", lr=0.05, local_epochs=1, local_batch_size=6))
    assert delta.local_steps == 1
    for d, gi in zip(delta.tensors, g):
        torch.testing.assert_close(d, -0.05 * gi, rtol=0, atol=1e-15)


def test_small_lr_limit_of_local_epochs():
    """Δ/η → −(steps)·(full-data mean gradient) as η → 0, with an error linear in η (ref §7.2)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    full = gradient(model, x, y)
    errs = []
    for lr in (1e-3, 5e-4):
        s = RoundSettings("delta", lr=lr, local_epochs=2, local_batch_size=4)
        d = compute_update(model, x, y, s)
        assert d.local_steps == 6
        errs.append(max(float((t / lr + 6 * g).abs().max()) for t, g in zip(d.tensors, full)))
    assert errs[1] < errs[0] * 0.6  # halving η roughly halves the error


def test_observed_updates_and_checkpoints_reproduce_the_server_step(digits):
    task, data = digits
    data = _double(data)
    fs = FederationSettings(clients=6, partition="dirichlet", alpha=0.5, clients_per_round=3, rounds=3,
                            local_batch_size=4, attack_rounds=(0, 1, 2), targets_per_round=1, lr=0.2, server_lr=0.5)
    res = run_federation(data, _model(task, data), _defense("none"), fs, seed=3, device=torch.device("cpu"))
    assert [o.round for o in res.observations] == [0, 1, 2]
    for obs, nxt in zip(res.observations, res.observations[1:]):
        assert len(obs.units) == 3 and sum(obs.weights) == pytest.approx(1.0)
        sizes = [res.client_sizes[k] for k in obs.sampled]
        assert obs.weights == pytest.approx([n / sum(sizes) for n in sizes])
        model = task.build_model(data).double()
        model.load_state_dict(obs.model_state)
        apply_step(model, weighted_sum([u.update for u in obs.units], obs.weights), client_lr=0.2, server_lr=0.5)
        for k, v in model.state_dict().items():
            assert torch.equal(v, nxt.model_state[k]), k  # bit for bit


def test_secure_aggregation_observes_only_the_weighted_sum(digits):
    task, data = digits
    data = _double(data)
    fs = FederationSettings(clients=5, clients_per_round=3, rounds=2, local_batch_size=2, attack_rounds=(1,))
    res = run_federation(data, _model(task, data), _defense("secure-aggregation"), fs, seed=0,
                         device=torch.device("cpu"))
    obs = res.observations[0]
    assert obs.hidden and len(obs.units) == 1 and obs.units[0].clients == obs.sampled
    x, y = obs.truth(obs.units[0])
    assert len(x) == 6 and obs.units[0].update.batch_size == 6
    model = task.build_model(data).double()
    model.load_state_dict(obs.model_state)
    model.train()
    honest = [compute_update(model, obs.clients[k].x, obs.clients[k].y, obs.clients[k].settings) for k in obs.sampled]
    expected = weighted_sum(honest, obs.weights)
    for a, b in zip(obs.units[0].update.tensors, expected.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    # a malicious server's replay on θ_r itself gives back what was observed (the run computed the
    # clients in one vectorised pass, the replay one by one: equal up to summation order)
    replayed = replay_unit(obs, obs.units[0], model, _defense("secure-aggregation"), fs)
    for a, b in zip(replayed.tensors, obs.units[0].update.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_replay_reproduces_a_noisy_client_update(digits):
    task, data = digits
    fs = FederationSettings(clients=4, clients_per_round=2, rounds=1, local_batch_size=3)
    defense = _defense("gaussian-noise", std=0.1)
    res = run_federation(data, lambda: task.build_model(data), defense, fs, seed=5, device=torch.device("cpu"))
    obs = res.observations[0]
    model = task.build_model(data)
    model.load_state_dict(obs.model_state)
    again = replay_unit(obs, obs.units[1], model, _defense("gaussian-noise", std=0.1), fs)
    for a, b in zip(again.tensors, obs.units[1].update.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same noise draw; float32 summation order aside


def test_one_client_round_zero_is_the_single_client_protocol(digits):
    """clients = 1 at round 0 attacks the update the old protocol attacked (same batch, same noise)."""
    task, data = digits
    fs = FederationSettings(clients=1, clients_per_round=1, rounds=1, local_batch_size=4)
    res = run_federation(data, lambda: task.build_model(data), _defense("gaussian-noise", std=0.01), fs, seed=2,
                         device=torch.device("cpu"))
    obs = res.observations[0]
    # the old trial: torch.manual_seed(seed); build; batch = randperm(n, gen(10_000 + seed))[:B]; noise from gen
    torch.manual_seed(2)
    model = task.build_model(data)
    gen = torch.Generator().manual_seed(10_000 + 2)
    idx = torch.randperm(len(data.train[0]), generator=gen)[:4]
    model.train()
    old = _defense("gaussian-noise", std=0.01).client_update(model, data.train[0][idx], data.train[1][idx],
                                                             RoundSettings(), gen)
    assert torch.equal(obs.clients[0].y, data.train[1][idx])
    for a, b in zip(obs.units[0].update.tensors, old.tensors):
        assert torch.equal(a, b)


def test_fedavg_client_trains_on_all_its_data(digits):
    task, data = digits
    fs = FederationSettings(clients=50, clients_per_round=2, rounds=1, update="delta", local_epochs=2,
                            local_batch_size=8)
    res = run_federation(data, lambda: task.build_model(data), _defense("none"), fs, seed=0,
                         device=torch.device("cpu"))
    obs = res.observations[0]
    k = obs.sampled[0]
    n = res.client_sizes[k]
    assert len(obs.clients[k].x) == n
    assert obs.units[0].update.local_steps == 2 * -(-n // 8)
    assert obs.units[0].update.local_epochs == 2 and obs.units[0].update.local_batch_size == 8


def test_client_batches_are_fixed_per_seed_and_defense_independent():
    fs = FederationSettings(clients=3, clients_per_round=3, rounds=2, local_batch_size=5)
    idx = torch.arange(40)
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(client_seed(0, 1, 2, 3))
        draws.append(client_batch(fs, 5, idx, gen, 1, 2, 0)[0])
    assert torch.equal(draws[0], draws[1]) and len(draws[0]) == 5


def test_accuracy_is_recorded_per_round_and_training_helps(digits):
    task, data = digits
    fs = FederationSettings(clients=10, clients_per_round=5, rounds=30, local_batch_size=16, lr=0.5, eval_every=10)
    res = run_federation(data, lambda: task.build_model(data), _defense("none"), fs, seed=0,
                         device=torch.device("cpu"))
    assert [r for r, _ in res.accuracy] == [9, 19, 29]
    assert res.test_acc > 0.5  # 30 rounds of 5 clients at b = 16 learn digits well above chance (0.1)


def test_poisson_sampling_can_skip_a_round(digits):
    task, data = digits
    fs = FederationSettings(clients=20, clients_per_round=1, sampling="poisson", rounds=30, local_batch_size=2,
                            eval_every=30)
    res = run_federation(data, lambda: task.build_model(data), _defense("none"), fs, seed=1,
                         device=torch.device("cpu"))
    assert res.skipped_rounds  # P(nobody) = 0.95^20 ≈ 0.36 per round


def test_batched_clients_equal_the_loop(digits, monkeypatch):
    """The vectorised FedSGD path gives the clients' gradients (and noise) of the one-by-one path."""
    import defenda.federation.run as run
    from defenda.federation.run import _transform_chain, client_updates

    monkeypatch.setattr(run, "BATCHED_MIN_CLIENTS", 2)
    calls = []
    real = run._batched
    monkeypatch.setattr(run, "_batched", lambda *a: calls.append(1) or real(*a))

    task, data = digits
    data = _double(data)
    fs = FederationSettings(clients=6, clients_per_round=4, rounds=1, local_batch_size=3)
    parts = [torch.arange(i, len(data.train[0]), 6) for i in range(6)]
    torch.manual_seed(0)
    model = task.build_model(data).double()
    # (not prune: a coordinate at its threshold may flip with the summation order)
    defense = _defense("gaussian-noise+laplace-noise", **{"gaussian-noise": {"std": 0.01}, "laplace-noise": {"scale": 0.01}})
    assert _transform_chain(defense) is not None
    batched, _ = client_updates(model, defense, data, parts, [0, 2, 3, 5], fs, 3, 0, 0, torch.device("cpu"), False)
    assert calls == [1]  # the vectorised path ran
    fs1 = dataclasses.replace(fs, clients_per_round=1)
    for j, k in enumerate([0, 2, 3, 5]):
        single, _ = client_updates(model, defense, data, parts, [k], fs1, 3, 0, 0, torch.device("cpu"), False)
        for a, b in zip(batched[j].tensors, single[0].tensors):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_dp_sgd_fedavg_draws_poisson_batches_and_accounts_them_exactly():
    """FedAvg under DP-SGD: Opacus' Poisson sampler on the client's data (empty batches included),
    and the ledger entry is Opacus' own (σ, q = 1/⌈n/b⌉, E·int(1/q))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(2, 5), torch.randint(0, 3, (2,))
    dp = _defense("dp-sgd", noise_multiplier=1.0)
    s = RoundSettings("delta", lr=0.1, local_epochs=10, local_batch_size=1, order_seed=3, client_samples=2)
    from defenda_defenses.dp_sgd import _poisson_batches

    batches, divisor = _poisson_batches(x, y, s)
    assert len(batches) == 20 and divisor == 1 and any(len(b[0]) == 0 for b in batches)
    a = dp.client_update(model, x, y, s, torch.Generator().manual_seed(0))
    b = dp.client_update(model, x, y, s, torch.Generator().manual_seed(0))
    assert a.local_steps == 20 and all(torch.isfinite(t).all() for t in a.tensors)
    assert all(torch.equal(t, u) for t, u in zip(a.tensors, b.tensors))
    assert dp.sample_ledger_entry(s, 2) == (1.0, 0.5, 20)
