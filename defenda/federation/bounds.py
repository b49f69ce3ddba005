"""Reconstruction robustness (ReRo): upper bounds on the success of *any* reconstruction attack under DP.

What: for an informed adversary who knows every training record but one target z, drawn from a prior
with baseline success κ (the best guess without seeing the model, e.g. 1/n for identifying z among n
candidates), a mechanism is (η, γ)-ReRo if no attack reconstructs z with probability above γ
(Balle, Cherubin & Hayes, "Reconstructing Training Data with Informed Adversaries", IEEE S&P 2022,
arXiv 2201.04845). Reference: ``bounds.md`` §1–§3 (formulas, reference values and test plan).

Why: ε alone says little about reconstruction — equal ε can give very different γ. Hayes, Mahloujifar &
Balle ("Bounding data reconstruction attacks with the hypothesis testing interpretation of differential
privacy", NeurIPS 2023, arXiv 2302.07225) show that DP-SGD with noise multiplier σ, Poisson rate q and
T steps is ReRo with γ = B_κ(P, Q) = sup{Q(E) : P(E) ≤ κ}, where P = N(0, σ²)^⊗T (without the target)
and Q = ((1−q)N(0, σ²) + qN(1, σ²))^⊗T (with it). Kaissis, Hayes, Ziller & Rueckert (arXiv 2307.03928)
read the same object as γ = 1 − f(κ) for the trade-off function f (hypothesis-testing DP).

How (:func:`rero_accounting`; ``method`` in the returned :class:`ReroBound`):

* ``"exact"`` — closed forms (:func:`rero_closed_form`): every segment has q = 1 (a Gaussian trade-off,
  μ² = Σ T/σ²), or the ledger is one step.
* ``"pld"`` — the production path (§2.4): the privacy-loss distribution of the composed
  Poisson-subsampled Gaussian from Google's ``dp_accounting`` (pessimistic discretisation, so δ(ε) is an
  upper bound), then γ = inf_ε min{1, e^ε κ + δ(ε), 1 − e^{−ε}(1 − κ − δ(ε))} on an ε grid.
* ``"rdp"`` / ``"limit"`` — for very small σ the PLD grid explodes (millions of points); the bound is then
  the smaller of the RDP-ReRo bound (§1.2, Opacus' RDP) and the σ → 0 value 1 − (1−q)^T (1−κ), which
  bounds every σ because γ does not increase with σ (more noise is post-processing). ``"limit"`` is also
  reported whenever that value undercuts the PLD.
* ``"no-noise"`` — a segment with σ ≤ 0 spends privacy without noise: γ = 1, no guarantee claimed (as
  ε = ∞ in :mod:`defenda.federation.accounting`; only if the Poisson sampling stays secret would
  :func:`sigma_zero_limit` still hold).
* ``"none"`` — nothing spent (empty ledger, q = 0 or 0 steps, or κ = 1): γ = κ.

Also here: the Monte Carlo estimator with a rigorous Clopper–Pearson upper bound (§2.3, the independent
test oracle), the CLT/GDP *estimate* (§3.3, not a guarantee), the (ε, δ) and RDP conversions (§1.2),
the mapping from defenda's DP settings to segments and the adversaries each covers (§2.5), and
confidence intervals for empirical success rates (§5.3). ``dp_accounting``, SciPy's stats and Opacus
are imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from defenda.federation.accounting import validated_entry

Segment = tuple[float, float, int]

METHODS = ("exact", "pld", "rdp", "limit", "no-noise", "none")
#: privacy-loss discretisation of the PLD (bounds.md §2.4); pessimistic, so coarser is looser, never wrong
VALUE_DISCRETIZATION = 1e-3
#: spacing of the default ε grid on [0, ln(1/κ)] (beyond ln(1/κ), e^ε κ > 1 and the grid adds nothing)
EPSILON_STEP = 1e-3
#: estimated PLD points beyond which the PLD is skipped for the RDP / σ → 0 route (about 1 s at this size)
PLD_MAX_POINTS = 2_000_000
#: relative rounding of σ (down) and q (up) in the cache key: conservative, so the bound stays an upper bound
_ROUND_DIGITS = 9
DP_KINDS = ("sample", "client", "local")
ADVERSARIES = ("server", "third-party")


@dataclass(frozen=True)
class ReroBound:
    """A ReRo bound γ and how it was computed.

    :ivar value: γ, with κ ≤ γ ≤ 1.
    :ivar method: one of :data:`METHODS` (see the module docstring for when each applies).
    """

    value: float
    method: str


@dataclass(frozen=True)
class NotCovered:
    """The answer of :func:`bound_for` when no ReRo bound holds against the named adversary.

    :ivar reason: one line saying why (e.g. the server sees the update before the noise).
    """

    reason: str


# --------------------------------------------------------------------------------------------- inputs


def _segments(segments: Iterable[Iterable[float | int]]) -> list[Segment]:
    """Validated ``(σ, q, T)`` segments as plain numbers (accounting's ledger-entry rules)."""
    return [validated_entry(entry) for entry in segments]


def _check_kappa(kappa: float) -> float:
    kappa = float(kappa)
    if not 0 < kappa <= 1:
        raise ValueError(f"kappa (baseline success) must be in (0, 1], got {kappa!r}")
    return kappa


def _round(value: float, up: bool) -> float:
    """``value`` rounded to :data:`_ROUND_DIGITS` significant digits, up or down."""
    if value <= 0 or math.isinf(value):
        return value
    scale = 10.0 ** (_ROUND_DIGITS - 1 - math.floor(math.log10(value)))
    rounded = (math.ceil if up else math.floor)(value * scale) / scale
    return min(rounded, 1.0) if up else rounded


def merged_segments(segments: Iterable[Iterable[float | int]]) -> tuple[Segment, ...]:
    """The segments that spend privacy (q > 0, T > 0, σ < ∞), canonical: σ rounded down and q up (so any bound of the result
    bounds the input), equal (σ, q) merged by summing steps, sorted — the cache key of :func:`rero_accounting`.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in _segments(segments):
        if n > 0 and q > 0 and sigma != math.inf:
            key = (_round(sigma, up=False), _round(q, up=True))
            steps[key] = steps.get(key, 0) + n
    return tuple(sorted((sigma, q, n) for (sigma, q), n in steps.items()))


# ------------------------------------------------------------------------------------- closed forms


def _gaussian_rero(mu: float, kappa: float) -> float:
    """1 − G_μ(κ) = Φ(Φ⁻¹(κ) + μ): the ReRo bound of μ-GDP (Kaissis et al. 2023; bounds.md §3.2)."""
    from scipy.special import ndtr, ndtri

    if kappa >= 1 or math.isinf(mu):
        return 1.0
    return float(ndtr(ndtri(kappa) + mu))


def rero_closed_form(sigma: float, q: float, steps: int, kappa: float) -> float:
    """The exact Hayes et al. bound where it has a closed form (bounds.md §2.2).

    * q = 1: the likelihood ratio is monotone in Σx_t, so γ = Φ(Φ⁻¹(κ) + √T/σ);
    * T = 1: the optimal set is {x ≥ σΦ⁻¹(1−κ)}, so γ = (1−q)κ + qΦ(Φ⁻¹(κ) + 1/σ);
    * q = 0 or T = 0: γ = κ. σ ≤ 0 is the noiseless limit (σ → 0 of the same formulas).

    Raises ValueError for 0 < q < 1 with T > 1 (use :func:`rero_bound`).
    """
    (sigma, q, steps), = _segments([(sigma, q, steps)])
    kappa = _check_kappa(kappa)
    if q == 0 or steps == 0:
        return kappa
    mu = math.inf if sigma <= 0 else 1 / sigma
    if q == 1:
        return _gaussian_rero(math.sqrt(steps) * mu, kappa)
    if steps == 1:
        return (1 - q) * kappa + q * _gaussian_rero(mu, kappa)
    raise ValueError(f"no closed form for 0 < q < 1 with T > 1 (q={q!r}, T={steps!r}); use rero_bound")


def rero_from_epsilon(epsilon: float, delta: float, kappa: float) -> float:
    """γ = min(1, e^ε κ + δ) for an (ε, δ)-DP mechanism (Balle et al. 2022; bounds.md §1.2) — the loosest route."""
    kappa = _check_kappa(kappa)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε ≥ 0 and δ in [0, 1], got ε={epsilon!r}, δ={delta!r}")
    if math.isinf(epsilon):
        return 1.0
    return min(1.0, math.exp(min(epsilon, 800.0)) * kappa + delta)


def sigma_zero_limit(segments: Iterable[Iterable[float | int]], kappa: float) -> float:
    """1 − Π(1−q)^T · (1−κ): the σ → 0 value of the Hayes et al. bound (the adversary learns exactly
    whether the target was ever sampled). γ does not increase with σ, so this bounds every σ > 0."""
    kappa = _check_kappa(kappa)
    log_absent = sum(n * math.log1p(-q) if q < 1 else -math.inf for _, q, n in merged_segments(segments))
    return 1 - math.exp(log_absent) * (1 - kappa)


def rero_from_rdp(segments: Iterable[Iterable[float | int]], kappa: float) -> float:
    """γ = min_α min(1, (e^{ε_α} κ)^{(α−1)/α}) from the ledger's RDP curve (bounds.md §1.2).

    Rényi probability preservation, Q(E) ≤ (e^{D_α(Q‖P)} P(E))^{(α−1)/α} (Mironov 2017), with Opacus'
    subsampled-Gaussian RDP (which is D_α(with target ‖ without)) summed over the segments on Opacus'
    default orders, in log space. σ ≤ 0 gives 1.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    kappa = _check_kappa(kappa)
    history = merged_segments(segments)
    if not history:
        return kappa
    if any(sigma <= 0 for sigma, _, _ in history):
        return 1.0
    orders = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        rdp = sum(np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(orders)), dtype=float)
                  for s, q, n in history)
        exponents = (orders - 1) / orders * (rdp + math.log(kappa))
    exponents = np.where(np.isnan(exponents), np.inf, exponents)
    return float(max(kappa, math.exp(min(0.0, float(np.min(exponents))))))


def gdp_mu(segments: Iterable[Iterable[float | int]]) -> float:
    """The CLT μ of a ledger, μ² = Σ q²T(e^{1/σ²} − 1): Opacus' ``compute_mu_poisson`` per segment
    (bounds.md §3.3), composed in quadrature. ∞ without noise or when e^{1/σ²} overflows."""
    total = 0.0
    for sigma, q, n in merged_segments(segments):
        if sigma <= 0 or 1 / sigma**2 > 700:
            return math.inf
        total += q * q * n * math.expm1(1 / sigma**2)
    return math.sqrt(total)


def rero_gdp_estimate(segments: Iterable[Iterable[float | int]], kappa: float) -> float:
    """Φ(Φ⁻¹(κ) + μ) with the CLT μ of :func:`gdp_mu` — an **estimate, not a guarantee**.

    The CLT is asymptotic (T → ∞ with q√T fixed); it can fall *below* the true bound (0.0279 against
    0.0292 at σ = 1, q = 0.01, T = 1000, κ = 0.01; bounds.md §3.3) and above it elsewhere. Use it for
    quick plots only; report :func:`rero_bound`.
    """
    return _gaussian_rero(gdp_mu(segments), _check_kappa(kappa))


# ---------------------------------------------------------------------------------------------- PLD


def _pld_points(history: Sequence[Segment], vdi: float) -> float:
    """A rough (over-)estimate of the size of the composed PLD's grid: the spread of the number k of
    steps that include the target (each adds ≈ 1/(2σ²) of privacy loss) plus the Gaussian spread
    ≈ 16√T/σ, and each single step's own range ≈ (1 + 20σ)/(2σ²), all over ``vdi``."""
    from scipy.stats import binom

    points = 0.0
    for sigma, q, n in history:
        k_spread = 0.0 if q >= 1 else float(binom.isf(1e-15, n, q) - binom.ppf(1e-15, n, q))
        composed = k_spread / (2 * sigma**2) + 16 * math.sqrt(n) / sigma
        points += max(composed, (1 + 20 * sigma) / (2 * sigma**2)) / vdi
    return points


def _gaussian_steps(history: Sequence[Segment]) -> list[Segment]:
    """The q = 1 segments folded into one step of the equivalent Gaussian (σ_eff = (Σ T/σ²)^{−1/2}), exact."""
    precision = sum(n / sigma**2 for sigma, q, n in history if q >= 1)
    rest = [seg for seg in history if seg[1] < 1]
    return rest + ([(1 / math.sqrt(precision), 1.0, 1)] if precision > 0 else [])


def composed_pld(history: Sequence[Segment], vdi: float = VALUE_DISCRETIZATION) -> Any:
    """The pessimistic privacy-loss distribution of the ledger (add/remove neighbours), exactly as
    ``dp_accounting``'s ``PLDAccountant(value_discretization_interval=vdi)`` builds it for
    ``compose(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), T)`` per segment — built directly so that
    its PMFs can be read. All σ must be > 0."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    total = pld_lib.identity(value_discretization_interval=vdi)
    for sigma, q, n in _gaussian_steps(history):
        step = pld_lib.from_gaussian_mechanism(sigma, value_discretization_interval=vdi, sampling_prob=q)
        total = total.compose(step.self_compose(n))
    return total


def _pmf_delta(pmf: Any, epsilons: np.ndarray) -> np.ndarray:
    """Hockey-stick δ(ε) = m_∞ + Σ_{ℓ > ε} p_ℓ (1 − e^{ε−ℓ}) of one dense PLD PMF, for ε ≥ 0, in NumPy."""
    dense = pmf.to_dense_pmf()
    probs = np.asarray(dense._probs, dtype=float)
    losses = (np.arange(probs.size) + dense._lower_loss) * dense._discretization
    keep = losses >= 0
    probs, losses = probs[keep], losses[keep]
    tail_p = np.concatenate([np.cumsum(probs[::-1])[::-1], [0.0]])
    tail_w = np.concatenate([np.cumsum((probs * np.exp(-losses))[::-1])[::-1], [0.0]])
    index = np.searchsorted(losses, epsilons, side="right")
    delta = dense._infinity_mass + tail_p[index] - np.exp(epsilons) * tail_w[index]
    return np.clip(delta, 0.0, 1.0)


def pld_delta(pld: Any, epsilons: np.ndarray) -> np.ndarray:
    """δ(ε) of a ``PrivacyLossDistribution``: the larger of its remove and add directions, as
    ``get_delta_for_epsilon`` returns, vectorised in NumPy (the library loops in Python over the PMF).
    Falls back to the library's own method if its PMF internals are not there."""
    try:
        return np.maximum(_pmf_delta(pld._pmf_remove, epsilons), _pmf_delta(pld._pmf_add, epsilons))
    except AttributeError:
        return np.asarray(pld.get_delta_for_epsilon(epsilons), dtype=float)


def rero_from_delta_curve(epsilons: np.ndarray, deltas: np.ndarray, kappa: float) -> float:
    """γ = inf_ε min{1, e^ε κ + δ(ε), 1 − e^{−ε}(1 − κ − δ(ε))} over the given (ε, δ(ε)) pairs (bounds.md
    §2.4): each ε gives a valid bound, the second term being the other direction (ε < 0 of the first)."""
    eps = np.asarray(epsilons, dtype=float)
    with np.errstate(over="ignore"):
        first = np.exp(eps) * kappa + deltas
    second = 1 - np.exp(-eps) * (1 - kappa - deltas)
    return float(min(1.0, max(kappa, float(np.min(np.minimum(first, second))))))


def default_epsilon_grid(kappa: float) -> np.ndarray:
    """ε from 0 to ln(1/κ) (at least 0.01) in steps of :data:`EPSILON_STEP`."""
    top = max(math.log(1 / kappa), 0.01)
    return np.linspace(0.0, top, int(math.ceil(top / EPSILON_STEP)) + 1)


def pld_rero(history: Sequence[Segment], kappa: float, epsilons: np.ndarray | None = None,
             vdi: float = VALUE_DISCRETIZATION) -> float:
    """The PLD route alone (no closed forms, no size check): exposed for tests and comparisons."""
    grid = default_epsilon_grid(kappa) if epsilons is None else np.asarray(epsilons, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or np.any(grid < 0) or np.any(np.diff(grid) < 0):
        raise ValueError("the ε grid must be a non-empty, sorted 1-D sequence of values ≥ 0")
    return rero_from_delta_curve(grid, pld_delta(composed_pld(history, vdi), grid), kappa)


# ------------------------------------------------------------------------------------ the public bound


def rero_accounting(segments: Iterable[Iterable[float | int]], kappa: float, *,
                    delta_grid: Sequence[float] | None = None) -> ReroBound:
    """The Hayes et al. ReRo bound γ of a ledger of ``(σ, q, T)`` segments, and the method used.

    ``delta_grid``: the ε values at which the PLD route evaluates δ(ε) (sorted, ≥ 0; default
    :func:`default_epsilon_grid`; any grid gives a valid bound, a finer one a tighter one). Always κ ≤ γ ≤ 1 and γ is an upper bound (see the module docstring
    for the methods). Results are cached on :func:`merged_segments` of the ledger.
    """
    history = merged_segments(segments)
    grid = None if delta_grid is None else tuple(float(e) for e in delta_grid)
    return _cached_bound(history, _check_kappa(kappa), grid)


def rero_bound(segments: Iterable[Iterable[float | int]], kappa: float, *,
               delta_grid: Sequence[float] | None = None) -> float:
    """γ of a ledger (see :func:`rero_accounting`, which also names the method)."""
    return rero_accounting(segments, kappa, delta_grid=delta_grid).value


@functools.lru_cache(maxsize=4096)
def _cached_bound(history: tuple[Segment, ...], kappa: float, grid: tuple[float, ...] | None) -> ReroBound:
    if not history or kappa >= 1:
        return ReroBound(kappa, "none")
    if any(sigma <= 0 for sigma, _, _ in history):
        return ReroBound(1.0, "no-noise")
    limit = sigma_zero_limit(history, kappa)
    if all(q >= 1 for _, q, _ in history):
        mu = math.sqrt(sum(n / sigma**2 for sigma, _, n in history))
        return ReroBound(_gaussian_rero(mu, kappa), "exact")
    if len(history) == 1 and history[0][2] == 1:
        return ReroBound(rero_closed_form(*history[0], kappa), "exact")
    if _pld_points(history, VALUE_DISCRETIZATION) > PLD_MAX_POINTS:
        rdp = rero_from_rdp(history, kappa)
        return ReroBound(rdp, "rdp") if rdp < limit else ReroBound(limit, "limit")
    value = pld_rero(history, kappa, None if grid is None else np.asarray(grid))
    return ReroBound(value, "pld") if value <= limit else ReroBound(limit, "limit")


# ------------------------------------------------------------------------------------- Monte Carlo


def log_likelihood_ratio(x: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """log dQ/dP summed over the last axis, with P = N(0, σ²) per step (without the target) and
    Q = (1−q)N(0, σ²) + qN(1, σ²) (with it): Σ_t log(1 − q + q·exp((2x_t − 1)/(2σ²))), stably."""
    z = (2 * np.asarray(x, dtype=float) - 1) / (2 * sigma**2)
    if q >= 1:
        return np.sum(z, axis=-1)
    return np.sum(np.logaddexp(math.log1p(-q), math.log(q) + z), axis=-1)


def _draw_llr(history: Sequence[Segment], n: int, rng: np.random.Generator, with_target: bool,
              chunk_values: int = 2_000_000) -> np.ndarray:
    """L(x) for ``n`` draws from Q (``with_target``) or P, chunked to about ``chunk_values`` normals."""
    out = np.zeros(n)
    for sigma, q, steps in history:
        rows = max(1, chunk_values // steps)
        for start in range(0, n, rows):
            size = (min(rows, n - start), steps)
            x = rng.normal(0.0, sigma, size=size)
            if with_target:
                x += rng.random(size) < q
            out[start:start + size[0]] += log_likelihood_ratio(x, sigma, q)
    return out


def mc_blow_up(reference: np.ndarray, alternative: np.ndarray, kappa: float, beta: float) -> tuple[float, float]:
    """The §2.3 estimate of sup{Q(E) : P(E) ≤ κ} from L values drawn under P (``reference``) and Q
    (``alternative``): (point, Clopper–Pearson upper bound holding with probability ≥ 1 − β)."""
    from scipy.stats import beta as beta_dist
    from scipy.stats import binom

    ordered = np.sort(reference)[::-1]
    n_p, n_q = ordered.size, alternative.size
    point = float(np.mean(alternative >= ordered[max(math.ceil(kappa * n_p), 1) - 1]))
    j = int(binom.ppf(1 - beta / 2, n_p, kappa)) + 1
    hits = n_q if j > n_p else int(np.sum(alternative >= ordered[j - 1]))
    upper = 1.0 if hits >= n_q else float(beta_dist.ppf(1 - beta / 2, hits + 1, n_q - hits))
    return point, upper


def rero_monte_carlo(segments: Iterable[Iterable[float | int]], kappa: float, *, n_p: int = 100_000,
                     n_q: int = 100_000, beta: float = 1e-3, seed: int = 0) -> tuple[float, float]:
    """Monte Carlo estimate of the Hayes et al. bound and its rigorous upper bound (bounds.md §2.3).

    Draws ``n_p`` likelihood ratios under P for the threshold (a conservative order statistic whose
    failure probability is ≤ β/2) and ``n_q`` under Q; the Clopper–Pearson bound fails with
    probability ≤ β/2, so the true γ is ≤ ``upper`` with probability ≥ 1 − β. Take n_p ≳ 100/κ. The
    cost is (n_p + n_q)·ΣT Gaussian draws; it is the independent oracle of the tests, not the
    production path. Returns ``(point, upper)``.
    """
    kappa = _check_kappa(kappa)
    if n_p < 1 or n_q < 1 or not 0 < beta < 1:
        raise ValueError(f"need n_p, n_q ≥ 1 and β in (0, 1), got {n_p!r}, {n_q!r}, {beta!r}")
    history = merged_segments(segments)
    if not history or kappa >= 1:
        return kappa, kappa
    if any(sigma <= 0 for sigma, _, _ in history):
        raise ValueError("Monte Carlo needs σ > 0 in every segment (σ ≤ 0 gives γ = 1 anyway)")
    rng = np.random.default_rng(seed)
    reference = _draw_llr(history, n_p, rng, with_target=False)
    return mc_blow_up(reference, _draw_llr(history, n_q, rng, with_target=True), kappa, beta)


# ------------------------------------------------------------------------ defenda settings → segments


def sample_level_segments(ledger_entries: Iterable[Iterable[float | int]]) -> list[Segment]:
    """DP-SGD inside a client, target = one record: the client's privacy ledger itself (one
    ``(noise_multiplier, sample_rate, steps)`` entry per participation; bounds.md §2.5). Covers the
    curious server too: the local Poisson sampling is hidden from it."""
    return _segments(ledger_entries)


def client_level_segments(z: float, client_rate: float, rounds: int) -> list[Segment]:
    """Central DP-FedAvg (the server adds N(0, (zS)²) to the sum of updates clipped to S; a client
    takes part with probability ``client_rate`` = K/N): ``[(z, client_rate, rounds)]`` (bounds.md §2.5).

    Removing the client removes every one of its records, so this bounds the reconstruction of any of
    its records — but only by parties that see the released global models, **not** the server, which
    sees each Δ_k before the noise.
    """
    if not 0 < client_rate <= 1:
        raise ValueError(f"client_rate must be in (0, 1] (K/N), got {client_rate!r}")
    return _segments([(z, client_rate, rounds)])


def local_dp_segments(noise_std: float, clip_norm: float, participations: int) -> list[Segment]:
    """Local DP: each client adds N(0, s²) to its update clipped to S before sending it:
    ``[(s/(2S), 1.0, participations)]`` (bounds.md §2.5). q = 1 because the server knows who took
    part; the sensitivity is 2S because changing one record can move the clipped update anywhere in
    the ball of radius S. Covers the server and everyone after it."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    return _segments([(noise_std / (2 * clip_norm), 1.0, participations)])


#: (kind, adversary) pairs no ReRo bound covers, with the reason
_NOT_COVERED = {
    ("client", "server"): "under central DP the server sees each client's update before it adds the noise",
}


def coverage(kind: str, adversary: str) -> str | None:
    """``None`` if the DP setting ``kind`` (:data:`DP_KINDS`) bounds reconstruction by ``adversary``
    (:data:`ADVERSARIES`: the curious server, or a third party seeing the global models), else the reason."""
    if kind not in DP_KINDS:
        raise ValueError(f"unknown DP kind {kind!r}; use one of {list(DP_KINDS)}")
    if adversary not in ADVERSARIES:
        raise ValueError(f"unknown adversary {adversary!r}; use one of {list(ADVERSARIES)}")
    return _NOT_COVERED.get((kind, adversary))


def bound_for(kind: str, segments: Iterable[Iterable[float | int]], kappa: float, *,
              adversary: str) -> ReroBound | NotCovered:
    """The ReRo bound of ``segments`` (from :func:`sample_level_segments`, :func:`client_level_segments`
    or :func:`local_dp_segments`, per ``kind``) against ``adversary``, or :class:`NotCovered` with the
    one-line reason when that adversary is outside the guarantee (see :func:`coverage`)."""
    reason = coverage(kind, adversary)
    if reason is not None:
        return NotCovered(reason)
    return rero_accounting(segments, kappa)


# ---------------------------------------------------------------------------- success-rate intervals


def proportion_interval(k: int, n: int, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Two-sided interval for a success probability from k successes in n trials (bounds.md §5.3):
    ``method`` ``"wilson"`` or ``"exact"`` (Clopper–Pearson, conservative), via SciPy's
    ``binomtest(k, n).proportion_ci``. With n = 0 nothing is known: (0, 1). For a one-sided test of
    "success ≤ γ", use the lower end of a two-sided interval at level 1 − 2α."""
    from scipy.stats import binomtest

    methods: dict[str, str] = {"wilson": "wilson", "exact": "exact", "clopper-pearson": "exact"}
    if method not in methods:
        raise ValueError(f"unknown interval method {method!r}; use one of {list(methods)}")
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"need integers 0 ≤ k ≤ n, got k={k!r}, n={n!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method=methods[method])
    return float(ci.low), float(ci.high)


__all__: list[str] = ["ADVERSARIES", "DP_KINDS", "METHODS", "NotCovered", "ReroBound", "Segment", "bound_for",
                      "client_level_segments", "coverage", "gdp_mu", "local_dp_segments", "merged_segments",
                      "proportion_interval", "rero_accounting", "rero_bound", "rero_closed_form",
                      "rero_from_epsilon", "rero_from_rdp", "rero_gdp_estimate", "rero_monte_carlo",
                      "sample_level_segments", "sigma_zero_limit"]
