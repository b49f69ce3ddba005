"""The federation's data and bookkeeping: partitions, client sampling and privacy accounting.

Covers ``federation.md`` §7 items 7 (accounting regressions), 8 (participation bookkeeping),
10 (partition statistics) and the partition/sampling part of 9 (determinism).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits

from defenda.federation.accounting import (
    PrivacyLedger,
    client_level_epsilon,
    ledger_accounting,
    ledger_epsilon,
)
from defenda.federation.partition import SCHEMES, partition, partition_hash
from defenda.federation.sampling import sample_clients

DELTA = 1e-5


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().target  # 1797 labels, 10 classes of 174–183


def _histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    classes = np.unique(labels)
    return np.array([[np.sum(labels[p] == c) for c in classes] for p in parts], dtype=float)


# --- partitions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("clients", [7, 10])
def test_iid_sizes_differ_by_at_most_one(digits: np.ndarray, clients: int) -> None:
    sizes = [len(p) for p in partition(digits, clients, "iid", seed=0)]
    assert len(sizes) == clients and max(sizes) - min(sizes) <= 1 and sum(sizes) == len(digits)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("clients", [3, 10, 50])
def test_every_index_exactly_once(digits: np.ndarray, scheme: str, clients: int) -> None:
    parts = partition(digits, clients, scheme, seed=3)
    assert len(parts) == clients
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(digits)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_deterministic_per_seed(digits: np.ndarray, scheme: str) -> None:
    first = partition_hash(partition(digits, 10, scheme, seed=11))
    assert partition_hash(partition(digits, 10, scheme, seed=11)) == first
    assert partition_hash(partition(digits, 10, scheme, seed=12)) != first


def test_partition_hash_pins_indices_and_boundaries() -> None:
    # independent of NumPy's generators: a fixed partition has a fixed hash on every platform
    assert partition_hash([np.array([0, 2]), np.array([1])]) == partition_hash([[0, 2], [1]])
    assert partition_hash([np.array([0, 1]), np.array([2])]) != partition_hash([np.array([0]), np.array([1, 2])])
    assert partition_hash([np.array([0, 2]), np.array([1])]) != partition_hash([np.array([1]), np.array([0, 2])])
    # per client: length then indices, little-endian int64 — 2 | 0 2 | 1 | 1
    assert partition_hash([np.array([0, 2]), np.array([1])]) == (
        "5898622a490e730015de81a97a9333637dfed42dc2332fae0d064b5e2fb43943")


@pytest.mark.parametrize(("clients", "alpha"), [(10, 0.1), (50, 0.5)])
def test_dirichlet_leaves_no_client_empty(digits: np.ndarray, clients: int, alpha: float) -> None:
    sizes = [len(p) for p in partition(digits, clients, "dirichlet", seed=0, alpha=alpha)]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) > 1  # label skew also skews sizes: not an IID split in disguise


def test_dirichlet_large_alpha_approaches_the_global_histogram(digits: np.ndarray) -> None:
    parts = partition(digits, 10, "dirichlet", seed=0, alpha=1e4)
    hist = _histograms(digits, parts)
    share = hist / hist.sum(axis=1, keepdims=True)
    overall = np.bincount(digits) / len(digits)
    tv = 0.5 * np.abs(share - overall).sum(axis=1)
    assert np.all(tv < 0.15), tv


def test_dirichlet_small_alpha_gives_one_dominant_class(digits: np.ndarray) -> None:
    parts = partition(digits, 10, "dirichlet", seed=0, alpha=1e-3)
    hist = _histograms(digits, parts)
    dominant = hist.max(axis=1) / hist.sum(axis=1)
    assert np.mean(dominant >= 0.9) >= 0.8, dominant
    # and far from IID: the moderate-α split has no client this concentrated
    moderate = _histograms(digits, partition(digits, 10, "dirichlet", seed=0, alpha=1e4))
    assert np.all(moderate.max(axis=1) / moderate.sum(axis=1) < 0.2)


def test_dirichlet_that_cannot_fill_every_client_says_what_to_do(digits: np.ndarray) -> None:
    with pytest.raises(ValueError, match="raise alpha or lower clients"):
        partition(digits, 40, "dirichlet", seed=0, alpha=1e-3)
    with pytest.raises(ValueError, match="lower clients or min_size"):
        partition(digits, 10, "dirichlet", seed=0, min_size=200)


def test_dirichlet_accepts_arbitrary_sorted_labels() -> None:
    labels = np.array(["cat", "dog", "eel"] * 40)
    parts = partition(labels, 4, "dirichlet", seed=0, alpha=1.0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(120))


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_give_about_shards_per_client_classes(digits: np.ndarray, shards_per_client: int) -> None:
    parts = partition(digits, 50 // shards_per_client, "shards", seed=0, shards_per_client=shards_per_client)
    classes = np.array([len(np.unique(digits[p])) for p in parts])
    # a shard (~18 samples) is smaller than a class (~180): it holds one class or straddles two
    assert np.all(classes <= 2 * shards_per_client)
    assert abs(classes.mean() - shards_per_client) <= 0.5, classes
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= shards_per_client  # shards differ by at most one sample


def test_shards_are_label_sorted_runs(digits: np.ndarray) -> None:
    parts = partition(digits, 10, "shards", seed=0, shards_per_client=1)
    order = np.argsort(digits, kind="stable")
    runs = np.array_split(order, 10)
    assert sorted(partition_hash([p]) for p in parts) == sorted(partition_hash([np.sort(r)]) for r in runs)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_client_holds_the_whole_split_in_order(digits: np.ndarray, scheme: str) -> None:
    (only,) = partition(digits, 1, scheme, seed=5, alpha=1e-3)
    np.testing.assert_array_equal(only, np.arange(len(digits)))
    assert only.dtype == np.int64


def test_invalid_partitions_say_what_to_do(digits: np.ndarray) -> None:
    with pytest.raises(ValueError, match="lower clients to at most 1797"):
        partition(digits, 1798, "iid", seed=0)
    with pytest.raises(ValueError, match="lower clients or shards_per_client"):
        partition(digits, 1000, "shards", seed=0, shards_per_client=2)
    with pytest.raises(ValueError, match="clients must be an integer ≥ 1"):
        partition(digits, 0, "iid", seed=0)
    with pytest.raises(ValueError, match="unknown partition scheme 'pathological'; use one of"):
        partition(digits, 2, "pathological", seed=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        partition(digits, 2, "dirichlet", seed=0, alpha=0.0)
    with pytest.raises(ValueError, match="seed must be an integer ≥ 0"):
        partition(digits, 2, "iid", seed=-1)


# --- client sampling --------------------------------------------------------------------------------


def test_uniform_sampling_is_k_distinct_sorted_and_deterministic() -> None:
    rounds = [sample_clients(100, 10, r, seed=7) for r in range(20)]
    for chosen in rounds:
        assert len(chosen) == 10 and chosen == sorted(set(chosen)) and 0 <= chosen[0] and chosen[-1] < 100
        assert all(type(c) is int for c in chosen)
    assert rounds == [sample_clients(100, 10, r, seed=7) for r in range(20)]
    assert len({tuple(c) for c in rounds}) == 20  # each round draws afresh
    assert sample_clients(100, 10, 0, seed=8) != rounds[0]
    # the round's draw depends on (seed, round) only, not on earlier calls
    assert sample_clients(100, 10, 13, seed=7) == rounds[13]


def test_uniform_sampling_is_uniform_over_clients() -> None:
    counts = np.bincount(np.concatenate([sample_clients(20, 5, r, seed=0) for r in range(2000)]), minlength=20)
    # each client is expected 500 times (std ≈ 19)
    assert np.all(np.abs(counts - 500) < 100), counts


def test_poisson_sampling_has_mean_size_k_and_may_be_empty() -> None:
    sizes = np.array([len(sample_clients(100, 10, r, seed=1, mode="poisson")) for r in range(2000)])
    assert abs(sizes.mean() - 10) < 0.3  # std of the mean ≈ 0.067
    assert sizes.std() > 1  # not a fixed size (Binomial(100, 0.1): std 3)
    small = [sample_clients(20, 1, r, seed=1, mode="poisson") for r in range(200)]
    assert any(len(s) == 0 for s in small) and any(len(s) > 1 for s in small)  # P(empty) = 0.95^20 ≈ 0.36
    assert small == [sample_clients(20, 1, r, seed=1, mode="poisson") for r in range(200)]


@pytest.mark.parametrize("mode", ["uniform", "poisson"])
def test_one_client_per_round_of_one(mode: str) -> None:
    assert all(sample_clients(1, 1, r, seed=0, mode=mode) == [0] for r in range(10))


@pytest.mark.parametrize("mode", ["uniform", "poisson"])
def test_sampling_only_picks_eligible_clients(mode: str) -> None:
    eligible = np.zeros(30, dtype=bool)
    eligible[::3] = True  # 10 eligible clients
    chosen = np.concatenate([sample_clients(30, 4, r, seed=2, mode=mode, eligible=eligible) for r in range(300)])
    assert set(chosen.tolist()) == set(np.flatnonzero(eligible).tolist())
    if mode == "poisson":  # the rate is K/N_eff = 0.4, not K/N
        assert abs(len(chosen) / 300 - 4) < 0.4


def test_invalid_sampling_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="lower per_round or make more clients eligible"):
        sample_clients(10, 11, 0, seed=0)
    with pytest.raises(ValueError, match=r"per_round must be an integer in \[1, 2\]"):
        sample_clients(10, 3, 0, seed=0, eligible=np.arange(10) < 2)
    with pytest.raises(ValueError, match="unknown client sampling mode"):
        sample_clients(10, 2, 0, seed=0, mode="cyclic")
    with pytest.raises(ValueError, match="boolean mask of length 10"):
        sample_clients(10, 2, 0, seed=0, eligible=np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="round must be an integer ≥ 0"):
        sample_clients(10, 2, -1, seed=0)


# --- privacy accounting -----------------------------------------------------------------------------


@pytest.mark.parametrize(("entries", "expected", "tol"), [
    ([(1.0, 0.01, 1000)], 2.1014, 1e-3),
    ([(1.0, 256 / 60000, 14040)], 3.0761, 1e-3),
    ([(1.0, 0.02, 50), (1.0, 0.05, 30), (1.5, 0.02, 50)], 2.889, 2e-3),
])
def test_opacus_rdp_regressions(entries: list[tuple[float, float, int]], expected: float, tol: float) -> None:
    assert ledger_epsilon(entries, DELTA) == pytest.approx(expected, abs=tol)


def test_dp_fedavg_client_level_regression() -> None:
    # N = 1000, K = 50, z = 1.0, 100 rounds, δ = 1e-5: Poisson q_c = 0.05, add/remove one client
    assert client_level_epsilon(1.0, 50 / 1000, 100, DELTA) == pytest.approx(4.038, abs=5e-3)
    assert client_level_epsilon(1.0, 50 / 1000, 0, DELTA) == 0.0


def test_per_participation_entries_compose_across_rounds() -> None:
    # reference §5.1: n_k = 500, b = 25 (q = 1/20), E = 2 → 40 steps per round, σ = 1.0
    for rounds, expected in [(5, 5.37), (20, 10.61), (100, 27.27)]:
        assert ledger_epsilon([(1.0, 1 / 20, 40)] * rounds, DELTA) == pytest.approx(expected, abs=5e-3)


def test_ledger_composition_ignores_order() -> None:
    entries = [(1.0, 0.02, 50), (1.0, 0.05, 30), (1.5, 0.02, 50)]
    assert ledger_epsilon(entries[::-1], DELTA) == pytest.approx(ledger_epsilon(entries, DELTA), rel=1e-12)


def test_degenerate_ledgers() -> None:
    assert ledger_epsilon([], DELTA) == 0.0
    assert ledger_epsilon([(1.0, 0.1, 0), (0.0, 0.0, 5)], DELTA) == 0.0  # nothing was spent
    assert ledger_epsilon([(1.0, 0.1, 10), (0.0, 0.1, 1)], DELTA) == math.inf
    with pytest.raises(ValueError, match="sample_rate must be in"):
        ledger_epsilon([(1.0, 1.5, 10)], DELTA)
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        ledger_epsilon([(1.0, 0.1, 10)], DELTA, "gdp")
    with pytest.raises(ValueError, match="delta must be in"):
        ledger_epsilon([(1.0, 0.1, 10)], 0.0)


def test_prv_is_tighter_and_falls_back_to_rdp_for_small_sigma() -> None:
    entries = [(1.0, 0.02, 50), (1.0, 0.05, 30), (1.5, 0.02, 50)]
    prv = ledger_accounting(entries, DELTA, "prv")
    assert prv.accountant == "prv" and 1.0 < prv.value < ledger_epsilon(entries, DELTA)
    with pytest.warns(RuntimeWarning, match="reporting the RDP accountant's ε instead"):
        small = ledger_accounting([(0.01, 0.025, 150)], DELTA, "prv")  # a grid of ~6e9 points
    assert small.accountant == "rdp" and small.value == ledger_epsilon([(0.01, 0.025, 150)], DELTA)


def test_rdp_edge_order_warnings_are_silenced() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ledger_epsilon([(0.01, 0.025, 150)], DELTA) > 1e3  # optimum at the smallest order


def test_ledger_bookkeeping() -> None:
    ledger = PrivacyLedger()
    sampled = {r: sample_clients(10, 3, r, seed=4) for r in range(30)}
    for r, chosen in sampled.items():
        for client in chosen:
            ledger.add(client, (1.0, 0.05, 10))
    counts = {c: sum(c in chosen for chosen in sampled.values()) for c in range(10)}
    for client in range(10):
        assert len(ledger.entries(client)) == ledger.participations(client) == counts[client]
        assert ledger.epsilon(client, DELTA) == pytest.approx(ledger_epsilon([(1.0, 0.05, 10 * counts[client])],
                                                                             DELTA), rel=1e-9)
    assert ledger.max_epsilon(DELTA) == max(ledger.epsilon(c, DELTA) for c in range(10))
    assert ledger.participations(99) == 0 and ledger.entries(99) == [] and ledger.epsilon(99, DELTA) == 0.0
    assert PrivacyLedger().max_epsilon(DELTA) == 0.0


def test_ledger_snapshot_round_trips_through_json() -> None:
    ledger = PrivacyLedger()
    ledger.add(3, (1.0, 0.02, 50))
    ledger.add(3, (1.5, 0.02, 50))
    ledger.add(0, (1.0, 0.05, 30))
    snap = ledger.snapshot()
    assert snap == {0: [[1.0, 0.05, 30]], 3: [[1.0, 0.02, 50], [1.5, 0.02, 50]]}
    restored = PrivacyLedger.from_snapshot(json.loads(json.dumps(snap)))
    assert restored.snapshot() == snap
    assert restored.epsilon(3, DELTA) == ledger.epsilon(3, DELTA)
    with pytest.raises(ValueError, match="client must be an integer id"):
        ledger.add(-1, (1.0, 0.1, 1))
