"""ReRo bounds (defenda.federation.bounds) against the closed forms, the Monte Carlo oracle and the
reference values of bounds.md (§1.2, §2.2, §3.2, §5.3); the test plan is bounds.md §7, items 1–6 and 9."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from defenda.federation import bounds as B

#: bounds.md §1.2: (σ, q, T, κ) → (ε,δ)-ReRo at δ = 1e-5, RDP-ReRo, PLD/f-DP
TABLE = [
    ((1.0, 0.01, 1000, 0.01), 0.0818, 0.0350, 0.0292),
    ((2.0, 0.1, 100, 0.1), 1.0, 0.2783, 0.2276),
    ((0.8, 0.05, 200, 0.1), 1.0, 0.7038, 0.4783),
    ((1.0, 0.001, 10000, 0.01), 0.0220, 0.0160, 0.0144),
]
#: the PLD is pessimistic: it may exceed the exact value by its discretisation (measured ≤ 5e-8 at 1e-3)
PLD_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------- 1. closed forms

@pytest.mark.parametrize(("sigma", "q", "steps", "kappa", "expected"), [
    (1.0, 1.0, 1, 0.1, 0.3891), (2.0, 1.0, 4, 0.01, 0.0924), (4.0, 1.0, 16, 0.1, 0.3891),
    (1.0, 0.1, 1, 0.1, 0.1289), (0.5, 0.3, 1, 0.01, 0.1186)])
def test_closed_forms_match_the_reference_values(sigma: float, q: float, steps: int, kappa: float,
                                                 expected: float) -> None:
    assert B.rero_closed_form(sigma, q, steps, kappa) == pytest.approx(expected, abs=5e-5)


def test_closed_forms_are_the_gaussian_formulas_to_machine_precision() -> None:
    for sigma, steps, kappa in [(0.7, 10, 0.05), (3.0, 250, 0.001), (1.3, 1, 0.3)]:
        expected = norm.cdf(norm.ppf(kappa) + math.sqrt(steps) / sigma)
        assert B.rero_closed_form(sigma, 1.0, steps, kappa) == pytest.approx(expected, abs=1e-12)
        assert B.rero_bound([(sigma, 1.0, steps)], kappa) == pytest.approx(expected, abs=1e-12)
    one_step = 0.8 * 0.02 + 0.2 * norm.cdf(norm.ppf(0.02) + 1 / 0.6)
    assert B.rero_closed_form(0.6, 0.2, 1, 0.02) == pytest.approx(one_step, abs=1e-12)
    assert B.rero_accounting([(0.6, 0.2, 1)], 0.02) == B.ReroBound(pytest.approx(one_step, abs=1e-12), "exact")
    with pytest.raises(ValueError, match="no closed form"):
        B.rero_closed_form(1.0, 0.5, 2, 0.1)


def test_heterogeneous_full_batch_ledgers_compose_as_one_gaussian() -> None:
    mu = math.sqrt(3 / 1.0**2 + 5 / 2.0**2)
    assert B.rero_bound([(1.0, 1.0, 3), (2.0, 1.0, 5)], 0.05) == pytest.approx(norm.cdf(norm.ppf(0.05) + mu), abs=1e-12)


@pytest.mark.parametrize(("sigma", "q", "steps", "kappa"), [
    (1.0, 1.0, 1, 0.1), (2.0, 1.0, 4, 0.01), (0.7, 1.0, 10, 0.05), (1.0, 0.1, 1, 0.1), (0.5, 0.3, 1, 0.01)])
def test_pld_is_an_upper_bound_within_its_discretisation_of_the_closed_form(sigma: float, q: float, steps: int,
                                                                            kappa: float) -> None:
    exact = B.rero_closed_form(sigma, q, steps, kappa)
    pld = B.pld_rero([(sigma, q, steps)], kappa)
    assert exact - 1e-12 <= pld <= exact + PLD_TOLERANCE


@pytest.mark.parametrize(("sigma", "q", "steps", "kappa"), [(1.0, 1.0, 1, 0.1), (2.0, 1.0, 4, 0.01),
                                                             (1.0, 0.1, 1, 0.1)])
def test_monte_carlo_interval_contains_the_closed_form(sigma: float, q: float, steps: int, kappa: float) -> None:
    exact = B.rero_closed_form(sigma, q, steps, kappa)
    point, upper = B.rero_monte_carlo([(sigma, q, steps)], kappa, n_p=200_000, n_q=200_000, beta=1e-3, seed=1)
    assert point == pytest.approx(exact, abs=0.004)
    assert exact <= upper <= exact + 0.02


# ----------------------------------------------------------------------------------- 2. orientation

def test_likelihood_ratio_is_with_target_over_without() -> None:
    rng = np.random.default_rng(0)
    sigma, q, n = 1.0, 0.5, 400_000
    without = rng.normal(0, sigma, size=(n, 1))
    with_target = without + (rng.random((n, 1)) < q)
    # E_P[dQ/dP] = 1 and E_Q[dP/dQ] = 1, while the swapped ratio has E_P[dP/dQ] > 1
    assert np.mean(np.exp(B.log_likelihood_ratio(without, sigma, q))) == pytest.approx(1, abs=0.01)
    assert np.mean(np.exp(-B.log_likelihood_ratio(with_target, sigma, q))) == pytest.approx(1, abs=0.01)
    assert np.mean(np.exp(-B.log_likelihood_ratio(without, sigma, q))) > 1.1
    assert B.log_likelihood_ratio(np.array([1.0]), 1.0, 1.0) == pytest.approx(0.5)
    assert B.log_likelihood_ratio(np.array([0.0]), 1.0, 1.0) == pytest.approx(-0.5)


def test_swapping_p_and_q_gives_a_different_wrong_number() -> None:
    history, kappa = [(1.0, 0.1, 1)], 0.1
    rng = np.random.default_rng(2)
    under_p = B._draw_llr(history, 200_000, rng, with_target=False)
    under_q = B._draw_llr(history, 200_000, rng, with_target=True)
    right, _ = B.mc_blow_up(under_p, under_q, kappa, 1e-3)
    swapped, _ = B.mc_blow_up(under_q, under_p, kappa, 1e-3)
    assert right == pytest.approx(B.rero_closed_form(1.0, 0.1, 1, kappa), abs=0.003)
    assert swapped < kappa - 0.005 < right


# ----------------------------------------------------------------------------- 3. limits, monotonicity

def test_limits() -> None:
    kappa = 0.05
    assert B.rero_accounting([], kappa) == B.ReroBound(kappa, "none")
    assert B.rero_accounting([(1.0, 0.0, 100), (1.0, 0.5, 0)], kappa) == B.ReroBound(kappa, "none")
    assert B.rero_accounting([(0.0, 0.1, 10)], kappa) == B.ReroBound(1.0, "no-noise")
    assert kappa <= B.rero_bound([(1e3, 0.5, 10)], kappa) <= kappa * 1.02
    limit = 1 - (1 - 0.1) ** 10 * (1 - kappa)
    assert B.sigma_zero_limit([(0.01, 0.1, 10)], kappa) == pytest.approx(limit, abs=1e-12)
    assert B.rero_accounting([(0.01, 0.1, 10)], kappa) == B.ReroBound(pytest.approx(limit, abs=1e-12), "limit")
    assert B.rero_bound([(0.01, 1.0, 10)], kappa) == 1.0
    # approaching σ → 0 from above: increasing towards the limit, never past it
    values = [B.rero_bound([(sigma, 0.1, 10)], kappa) for sigma in (2.0, 1.0, 0.5, 0.25)]
    assert values == sorted(values) and values[-1] <= limit + 1e-12 and limit - values[-1] < 0.05


def test_monotonicity_and_range() -> None:
    def bound(sigma: float = 1.0, q: float = 0.05, steps: int = 100, kappa: float = 0.01) -> float:
        value = B.rero_bound([(sigma, q, steps)], kappa)
        assert kappa <= value <= 1
        return value

    by_sigma = [bound(sigma=s) for s in (0.6, 0.8, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    by_q = [bound(q=q) for q in (0.01, 0.05, 0.2, 0.5)]
    assert all(a < b for a, b in zip(by_q, by_q[1:]))
    by_steps = [bound(steps=t) for t in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    by_kappa = [bound(kappa=k) for k in (0.001, 0.01, 0.1, 0.5)]
    assert all(a < b for a, b in zip(by_kappa, by_kappa[1:]))
    mixed = B.rero_accounting([(1.0, 1.0, 2), (1.0, 0.1, 10)], 0.01)  # the q = 1 part folded into one Gaussian
    assert mixed.method == "pld"
    assert max(bound(q=1.0, steps=2), bound(q=0.1, steps=10)) < mixed.value <= B.rero_from_rdp(
        [(1.0, 1.0, 2), (1.0, 0.1, 10)], 0.01)
    assert B.rero_accounting([(math.inf, 0.5, 10)], 0.01) == B.ReroBound(0.01, "none")


# ------------------------------------------------------------------------- 4–5. ordering, regression

@pytest.mark.parametrize(("row", "eps_delta", "rdp", "pld"), TABLE)
def test_reference_table_and_ordering(row: tuple[float, float, int, float], eps_delta: float, rdp: float,
                                      pld: float) -> None:
    from defenda.federation.accounting import ledger_epsilon

    sigma, q, steps, kappa = row
    ledger = [(sigma, q, steps)]
    got = B.rero_accounting(ledger, kappa)
    got_rdp = B.rero_from_rdp(ledger, kappa)
    got_eps = B.rero_from_epsilon(ledger_epsilon(ledger, 1e-5), 1e-5, kappa)
    assert got.method == "pld"
    assert got.value == pytest.approx(pld, abs=5e-4)
    assert got_rdp == pytest.approx(rdp, abs=5e-4)
    assert got_eps == pytest.approx(eps_delta, abs=5e-4)
    assert kappa <= got.value <= got_rdp <= got_eps


@pytest.mark.parametrize("ledger", [[(2.0, 0.1, 100)], [(1.0, 0.3, 3), (2.0, 1.0, 2), (0.8, 0.05, 4)]])
def test_monte_carlo_agrees_with_the_pld(ledger: list[B.Segment]) -> None:
    kappa = 0.1
    pld = B.rero_bound(ledger, kappa)
    point, upper = B.rero_monte_carlo(ledger, kappa, n_p=60_000, n_q=60_000, beta=1e-3, seed=3)
    assert B.rero_accounting(ledger, kappa).method == "pld"
    assert point == pytest.approx(pld, abs=0.01)
    assert upper >= pld - 1e-3


def test_opacus_rdp_epsilon_reference() -> None:
    from defenda.federation.accounting import ledger_epsilon

    assert ledger_epsilon([(1.0, 0.01, 1000)], 1e-5) == pytest.approx(2.1014, abs=1e-3)


def test_vectorised_delta_matches_dp_accounting() -> None:
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    ledger = [(1.0, 0.05, 20), (1.5, 0.2, 5)]
    grid = np.linspace(0, 4, 41)
    pld = B.composed_pld(ledger)
    ours = B.pld_delta(pld, grid)
    assert ours == pytest.approx(np.asarray(pld.get_delta_for_epsilon(grid)), abs=1e-12)
    accountant = PLDAccountant(value_discretization_interval=B.VALUE_DISCRETIZATION)
    for sigma, q, steps in ledger:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    assert [accountant.get_delta(e) for e in grid[::10]] == pytest.approx(list(ours[::10]), abs=1e-12)
    assert ours[0] > ours[-1] > 0


def test_merging_caching_and_grid() -> None:
    kappa = 0.02
    assert B.merged_segments([(1.0, 0.05, 50), (1.0, 0.05, 50), (1.0, 0.0, 9)]) == ((1.0, 0.05, 100),)
    (sigma, q, _), = B.merged_segments([(0.1 + 0.2, 1 / 3, 1)])
    assert sigma <= 0.1 + 0.2 and q >= 1 / 3  # conservative rounding
    split = B.rero_accounting([(1.0, 0.05, 50), (1.0, 0.05, 50)], kappa)
    assert split == B.rero_accounting([(1.0, 0.05, 100)], kappa)
    coarse = B.rero_bound([(1.0, 0.05, 100)], kappa, delta_grid=[0.0, 1.0, 2.0])
    assert coarse > split.value
    with pytest.raises(ValueError, match="ε grid"):
        B.rero_bound([(1.0, 0.05, 100)], kappa, delta_grid=[1.0, 0.5])
    for bad in ([(1.0, 1.5, 3)], [(1.0, 0.5, 2.5)], [(1.0, 0.5)]):
        with pytest.raises(ValueError):
            B.rero_bound(bad, kappa)
    with pytest.raises(ValueError, match="kappa"):
        B.rero_bound([(1.0, 0.5, 3)], 0.0)


# -------------------------------------------------------------------------------------------- 6. GDP

def test_gdp_identity_and_mu() -> None:
    from opacus.accountants.analysis.gdp import compute_mu_poisson

    for mu, kappa, expected in [(0.5, 0.1, 0.2172), (1.0, 0.01, 0.0924)]:
        tradeoff = norm.cdf(norm.ppf(1 - kappa) - mu)  # G_μ(κ)
        assert B._gaussian_rero(mu, kappa) == pytest.approx(1 - tradeoff, abs=1e-12)
        assert B._gaussian_rero(mu, kappa) == pytest.approx(expected, abs=5e-5)
    assert B.gdp_mu([(1.0, 0.01, 1000)]) == pytest.approx(
        compute_mu_poisson(steps=1000, noise_multiplier=1.0, sample_rate=0.01), rel=1e-12)
    two = math.hypot(B.gdp_mu([(1.0, 0.01, 1000)]), B.gdp_mu([(2.0, 0.1, 50)]))
    assert B.gdp_mu([(1.0, 0.01, 1000), (2.0, 0.1, 50)]) == pytest.approx(two, rel=1e-12)
    # the CLT estimate falls *below* the true bound here (bounds.md §3.3): an estimate, not a guarantee
    assert B.rero_gdp_estimate([(1.0, 0.01, 1000)], 0.01) == pytest.approx(0.0279, abs=5e-4)
    assert B.rero_gdp_estimate([(0.01, 0.5, 3)], 0.01) == 1.0


# --------------------------------------------------------------------------------- adversary mapping

def test_settings_map_to_segments_and_coverage() -> None:
    assert B.sample_level_segments([(1.0, 0.05, 10), (1.0, 0.05, 12)]) == [(1.0, 0.05, 10), (1.0, 0.05, 12)]
    assert B.client_level_segments(1.0, 0.05, 100) == [(1.0, 0.05, 100)]
    assert B.local_dp_segments(0.4, 0.1, 3) == [(pytest.approx(2.0), 1.0, 3)]
    central = B.bound_for("client", B.client_level_segments(1.0, 0.05, 100), 0.01, adversary="server")
    assert isinstance(central, B.NotCovered) and "server" in central.reason
    third = B.bound_for("client", B.client_level_segments(1.0, 0.05, 100), 0.01, adversary="third-party")
    assert third == B.rero_accounting([(1.0, 0.05, 100)], 0.01)
    local = B.bound_for("local", B.local_dp_segments(0.4, 0.1, 3), 0.01, adversary="server")
    assert isinstance(local, B.ReroBound) and local.method == "exact"
    assert local.value == pytest.approx(norm.cdf(norm.ppf(0.01) + math.sqrt(3) / 2.0), abs=1e-9)
    assert B.coverage("sample", "server") is None
    with pytest.raises(ValueError, match="adversary"):
        B.coverage("sample", "client")
    with pytest.raises(ValueError, match="client_rate"):
        B.client_level_segments(1.0, 0.0, 10)


# ------------------------------------------------------------------------------------------- 9. CIs

@pytest.mark.parametrize(("k", "exact", "wilson"), [
    (0, (0.0, 0.0362), (0.0, 0.0370)), (3, (0.0062, 0.0852), (0.0103, 0.0845)),
    (50, (0.3983, 0.6017), (0.4038, 0.5962)), (100, (0.9638, 1.0), (0.9630, 1.0))])
def test_proportion_intervals_reference_values(k: int, exact: tuple[float, float], wilson: tuple[float, float]) -> None:
    assert B.proportion_interval(k, 100, method="exact") == pytest.approx(exact, abs=1e-4)
    assert B.proportion_interval(k, 100) == pytest.approx(wilson, abs=1e-4)


def test_proportion_interval_edge_cases() -> None:
    assert B.proportion_interval(0, 0) == (0.0, 1.0)
    narrow, wide = B.proportion_interval(3, 100, level=0.9), B.proportion_interval(3, 100, level=0.99)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]
    with pytest.raises(ValueError, match="method"):
        B.proportion_interval(3, 100, method="wald")
    with pytest.raises(ValueError, match="0 ≤ k ≤ n"):
        B.proportion_interval(5, 3)
