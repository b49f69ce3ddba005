"""Privacy accounting across federated rounds with Opacus' accountants: per-client ledgers and DP-FedAvg.

Sample-level DP (DP-SGD inside each client, reference ``federation.md`` §5.1): a record of client
k's data is affected only by the rounds k took part in, so each client keeps its own ledger — one
``(noise_multiplier, sample_rate, steps)`` entry per participation — and ε composes the ledger's
Poisson-subsampled Gaussian steps. :class:`PrivacyLedger` holds the ledgers; :func:`ledger_epsilon`
composes one.

Client-level DP (DP-FedAvg, McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018, arXiv 1710.06963; reference §3, §5.2): the same computation
with one entry (z, q_c = K/N, R rounds) — see :func:`client_level_epsilon`.

Composition is Opacus' (``opacus.accountants``, read at 1.6.0): ``RDPAccountant`` sums the RDP of
every history entry over its default orders and converts with Balle et al. 2020, Thm. 21;
``PRVAccountant`` composes the entries numerically (Gopi et al. 2021) and reports the *upper*
estimate. Both take the ledger as ``accountant.history``, after entries with the same (σ, q) are
merged by summing their steps — composition is commutative, and Opacus' own ``step`` merges repeated
steps the same way; for RDP the result is identical, for PRV it is the same composition discretised
on a grid sized for the merged ledger — so long ledgers stay cheap.

PRV fallback: for small σ, Opacus' PRV discretisation grid explodes (about 6·10⁹ points at σ = 0.01,
q = 0.025, 150 steps: tens of GiB). The grid size is computed first, as ``PRVAccountant._get_domain``
does; beyond :data:`PRV_MAX_GRID` points, or if PRV still runs out of memory or overflows, ε comes
from RDP instead (also a valid upper bound, only looser) with a ``RuntimeWarning``.
:func:`ledger_accounting` returns an :class:`Epsilon` that names the accountant actually used;
:func:`ledger_epsilon` returns the bare number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

ACCOUNTANTS = ("rdp", "prv")
#: largest PRV grid (points) computed before falling back to RDP (about 2 s at this size)
PRV_MAX_GRID = 2_000_000
#: Opacus' note that the best RDP order sits at the edge of its grid: not actionable here (ε is
#: then astronomically large or tiny anyway)
_EDGE_WARNING = "Optimal order is the (smallest|largest) alpha"

Entry = tuple[float, float, int]


@dataclass(frozen=True)
class Epsilon:
    """ε of a ledger and the accountant that produced it.

    :ivar value: ε at the requested δ (0 for an empty ledger, ``math.inf`` without noise).
    :ivar accountant: ``"rdp"`` or ``"prv"``; ``"rdp"`` when PRV was asked for but fell back.
    """

    value: float
    accountant: str


def ledger_accounting(entries: Iterable[Entry], delta: float, accountant: str = "rdp") -> Epsilon:
    """ε of a ledger of ``(noise_multiplier, sample_rate, steps)`` segments, and the accountant used.

    Segments with no steps or sampling rate 0 spend nothing and are skipped; after that, any noise
    multiplier ≤ 0 gives ε = ∞ (an unnoised release). See the module docstring for the PRV fallback.
    """
    _check_delta(delta, accountant)
    history = _merged([validated_entry(e) for e in entries])
    if not history:
        return Epsilon(0.0, accountant)
    if any(sigma <= 0 for sigma, _, _ in history):
        return Epsilon(math.inf, accountant)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EDGE_WARNING)
        if accountant == "prv":
            value = _prv_epsilon(history, delta)
            if value is not None:
                return Epsilon(value, "prv")
        return Epsilon(_opacus_epsilon(history, delta, "rdp"), "rdp")


def ledger_epsilon(entries: Iterable[Entry], delta: float, accountant: str = "rdp") -> float:
    """ε of a per-client ledger composed with Opacus' ``accountant`` (``"rdp"`` or ``"prv"``); see
    :func:`ledger_accounting`, which also says whether PRV fell back to RDP."""
    return ledger_accounting(entries, delta, accountant).value


def client_level_epsilon(noise_multiplier: float, client_rate: float, rounds: int, delta: float,
                         accountant: str = "rdp") -> float:
    """Client-level ε of DP-FedAvg (McMahan et al. 2018): ``rounds`` rounds at client sampling rate q_c.

    One "record" is one client's whole data; each round the server adds N(0, (zS)²) to the sum of
    updates clipped to S, and a client takes part with probability ``client_rate`` = K/N (K/N_eff
    when clients are deactivated, reference §2.5). ε is Opacus' accounting of the single ledger entry
    (z, q_c, R) — the same computation as DP-SGD's (google-research/federated#20).

    This is the Poisson-sampling analysis under add/remove-one-client neighbouring. For fixed-size
    uniform sampling (K of N without replacement) it is the standard approximation, not a proof: the
    TF Privacy helper used to reproduce McMahan et al. says it "actually assumes Poisson subsampling,
    which may not be *quite* right" (tensorflow/privacy#174); the rigorous replace-one analysis
    (Wang, Balle & Kasiviswanathan 2019) gives a much larger ε (reference §3: 34.3 against 4.038 at
    N = 1000, K = 50, z = 1, 100 rounds, δ = 1e-5).

    Who is the adversary matters (reference §3): amplification by client sampling hides *whether* a
    client took part, but the server chooses the clients and sees who replied — this ε gives **no**
    protection against the server itself, only against parties that see the released global models.
    """
    if not 0 < client_rate <= 1:
        raise ValueError(f"client_rate must be in (0, 1] (K/N), got {client_rate!r}")
    return ledger_epsilon([(noise_multiplier, client_rate, rounds)], delta, accountant)


class PrivacyLedger:
    """Per-client sample-level privacy ledgers: one ``(σ, q_k, steps)`` entry per participation.

    Call :meth:`add` once for each round a client takes part in, with the noise multiplier, the
    client's Poisson rate q_k = 1/⌈n_k/b⌉ and the DP-SGD steps it ran that round. Entries are never
    merged here (unlike Opacus' ``step``), so a ledger's length is the client's participations. A
    never-sampled client has an empty ledger and ε = 0.
    """

    def __init__(self) -> None:
        self._entries: dict[int, list[Entry]] = {}

    def add(self, client: int, entry: Entry) -> None:
        """Record one participation of ``client``."""
        if int(client) != client or client < 0:
            raise ValueError(f"client must be an integer id ≥ 0, got {client!r}")
        self._entries.setdefault(int(client), []).append(validated_entry(entry))

    def entries(self, client: int) -> list[Entry]:
        """``client``'s ledger, oldest first (a copy; empty if it never took part)."""
        return list(self._entries.get(int(client), []))

    def participations(self, client: int) -> int:
        """How many rounds ``client`` took part in."""
        return len(self._entries.get(int(client), []))

    def clients(self) -> list[int]:
        """The clients with at least one entry, sorted."""
        return sorted(c for c, e in self._entries.items() if e)

    def epsilon(self, client: int, delta: float, accountant: str = "rdp") -> float:
        """ε of the records of ``client`` at ``delta`` (0 for a client that never took part)."""
        return ledger_epsilon(self.entries(client), delta, accountant)

    def max_epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """The largest ε over the clients (0 when nobody took part): the federation's sample-level ε."""
        _check_delta(delta, accountant)
        return max((self.epsilon(c, delta, accountant) for c in self.clients()), default=0.0)

    def snapshot(self) -> dict[int, list[list[float | int]]]:
        """The ledgers as plain lists, JSON-friendly (``json.dumps`` turns the client keys into strings)."""
        return {c: [[sigma, q, steps] for sigma, q, steps in self._entries[c]] for c in self.clients()}

    @classmethod
    def from_snapshot(cls, snapshot: Mapping[int | str, Iterable[Iterable[float | int]]]) -> PrivacyLedger:
        """The ledger a :meth:`snapshot` (or its JSON round trip, with string keys) describes."""
        ledger = cls()
        for client, entries in snapshot.items():
            for entry in entries:
                ledger.add(int(client), validated_entry(entry))
        return ledger


def validated_entry(entry: Iterable[float | int]) -> Entry:
    """One validated ``(noise_multiplier, sample_rate, steps)`` segment as plain Python numbers (ledger entries
    here, bound segments in :mod:`defenda.federation.bounds`)."""
    values = tuple(entry)
    if len(values) != 3:
        raise ValueError(f"a ledger entry is (noise_multiplier, sample_rate, steps), got {values!r}")
    sigma, q, steps = float(values[0]), float(values[1]), values[2]
    if math.isnan(sigma):
        raise ValueError(f"noise_multiplier must be a number (≤ 0 means no noise), got {values[0]!r}")
    if not 0 <= q <= 1:
        raise ValueError(f"sample_rate must be in [0, 1], got {values[1]!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer ≥ 0, got {values[2]!r}")
    return sigma, q, int(steps)


def _merged(entries: list[Entry]) -> list[Entry]:
    """The segments that spend privacy, with equal (σ, q) combined by summing steps (first-seen order)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in entries:
        if n > 0 and q > 0:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _check_delta(delta: float, accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; use one of {list(ACCOUNTANTS)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1) (choose δ ≪ 1/n_k), got {delta!r}")


def _opacus_epsilon(history: list[Entry], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _prv_epsilon(history: list[Entry], delta: float) -> float | None:
    """PRV's ε, or None (after a warning) when its grid is too large or it runs out of memory."""
    try:
        size = prv_grid_size(history, delta)
        if size <= PRV_MAX_GRID:
            return _opacus_epsilon(history, delta, "prv")
        reason = f"would need a grid of {size:.3g} points"
    except (MemoryError, OverflowError) as error:
        reason = f"failed ({type(error).__name__})"
    warnings.warn(f"Opacus' PRV accountant {reason} for the ledger {history}; reporting the RDP accountant's ε "
                  "instead (also an upper bound, looser)", RuntimeWarning, stacklevel=3)
    return None


def prv_grid_size(history: list[Entry], delta: float) -> float:
    """Points of the grid Opacus' ``PRVAccountant`` would discretise ``history`` on, computed as its
    ``_get_domain`` does with the default ``eps_error=0.01``, ``delta_error=δ/1000``."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    eps_error, delta_error = 0.01, delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    steps = [n for _, _, n in history]
    half_width = compute_safe_domain_size(prvs, steps, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / np.sqrt(sum(steps) * np.log(12 / delta_error) / 2)
    return float(2 * half_width / mesh)
