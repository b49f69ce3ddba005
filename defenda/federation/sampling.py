"""Which clients take part in a round: K of N uniformly without replacement, or Poisson at rate K/N.

Modes (reference ``federation.md`` §3):

* ``"uniform"`` — exactly K distinct clients, every K-subset equally likely (Flower's
  ``random.sample(all_nodes, sample_size)`` in ``strategy_utils.sample_nodes``, drawn here from a
  NumPy generator instead of Python's global :mod:`random`).
* ``"poisson"`` — every client joins independently with probability q = K/N, so the round size is
  Binomial(N, q) and may be 0. This is the sampling that client-level DP accounting analyses
  (:func:`defenda.federation.accounting.client_level_epsilon`); uniform sampling is the usual
  approximation of it.

``eligible`` (a boolean mask over the N clients) restricts sampling to the clients that may take
part — e.g. those with data, under the "keep and deactivate" policy of reference §2.5; the population
is then N_eff = number of eligible clients and the Poisson rate K/N_eff, the rate the accountant must use.

Determinism (reference §2.6): round r draws from its own generator,
``SeedSequence([seed, SAMPLING_KEY, r])`` — never the global RNG — so the selection depends on
(seed, round) only, not on how many rounds were sampled before or in what order.
"""

from __future__ import annotations

import numpy as np

MODES = ("uniform", "poisson")
#: SeedSequence key of the per-round sampling generators ("sampling" purpose of reference §2.6)
SAMPLING_KEY = 0x5A3D


def sample_clients(clients: int, per_round: int, round: int, *, seed: int, mode: str = "uniform",
                   eligible: np.ndarray | None = None) -> list[int]:
    """The sorted ids of the clients sampled in ``round`` (see the module docstring).

    :param clients: N ≥ 1, the population.
    :param per_round: K, 1 ≤ K ≤ N_eff; with ``mode="poisson"`` the expected round size.
    :param round: 0-based round number (≥ 0), part of the generator's key.
    :param seed: root seed (≥ 0).
    :param mode: ``"uniform"`` (exactly K, without replacement) or ``"poisson"`` (each with rate K/N_eff).
    :param eligible: optional boolean mask of length N; only its True clients can be sampled.
    :returns: sorted distinct client ids (a plain ``list[int]``); possibly empty under ``poisson``.
    """
    mask = _check(clients, per_round, round, seed, mode, eligible)
    ids = np.flatnonzero(mask)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SAMPLING_KEY, round]))
    if mode == "uniform":
        chosen = rng.choice(ids, size=per_round, replace=False)
    else:
        # one uniform per client of the population (eligible or not), so a client's coin does
        # not move when another client's eligibility changes; u < 1 always, so q = 1 takes everyone
        coins = rng.random(clients)
        chosen = ids[coins[ids] < per_round / len(ids)]
    return sorted(int(c) for c in chosen)


def _check(clients: int, per_round: int, round: int, seed: int, mode: str,
           eligible: np.ndarray | None) -> np.ndarray:
    """The eligibility mask, after one-line ValueErrors for arguments that cannot be sampled."""
    if mode not in MODES:
        raise ValueError(f"unknown client sampling mode {mode!r}; use one of {list(MODES)}")
    if int(clients) != clients or clients < 1:
        raise ValueError(f"clients must be an integer ≥ 1, got {clients!r}")
    if int(round) != round or round < 0:
        raise ValueError(f"round must be an integer ≥ 0 (0-based), got {round!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0 (a SeedSequence entropy), got {seed!r}")
    if eligible is None:
        mask = np.ones(clients, dtype=bool)
    else:
        mask = np.asarray(eligible)
        if mask.dtype != bool or mask.shape != (clients,):
            raise ValueError(f"eligible must be a boolean mask of length {clients}, got dtype {mask.dtype} and "
                             f"shape {mask.shape}")
    available = int(mask.sum())
    if int(per_round) != per_round or not 1 <= per_round <= available:
        raise ValueError(f"per_round must be an integer in [1, {available}] ({available} eligible clients), got "
                         f"{per_round!r}; lower per_round or make more clients eligible")
    return mask
