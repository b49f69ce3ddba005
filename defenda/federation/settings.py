"""The federation's settings: the ``[federation]`` table of a study (every key sweepable).

One :class:`FederationSettings` describes the protocol of one training run:
N clients holding a partition of the task's train split, K sampled per round,
R rounds of FedSGD (one mini-batch gradient per client) or FedAvg (E local
epochs in mini-batches of b), aggregation weighted by client data size, and
the rounds at which the attacked clients' updates are recorded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PARTITIONS = ("iid", "dirichlet", "shards")
SAMPLINGS = ("uniform", "poisson")


@dataclass(frozen=True)
class FederationSettings:
    """One federation (see the module docstring).

    :ivar clients: N, the clients holding the train split.
    :ivar partition: ``iid``, ``dirichlet`` (label skew with concentration ``alpha``) or
        ``shards`` (label-sorted shards, ``shards_per_client`` each).
    :ivar clients_per_round: K; with ``sampling = "poisson"`` the expected number (rate K/N).
    :ivar sampling: ``uniform`` (K of N without replacement) or ``poisson``.
    :ivar rounds: R.
    :ivar update: ``gradient`` (FedSGD) or ``delta`` (FedAvg).
    :ivar local_epochs: E, FedAvg's epochs over the client's data.
    :ivar local_batch_size: b, the client's mini-batch (FedSGD: the one batch of the round,
        min(b, n_k) samples; under a defense whose accounting assumes Poisson sampling —
        DP-SGD — each sample is drawn at rate min(1, b/n_k) instead, so b is the batch's
        expected size and the realised one varies, possibly 0).
    :ivar lr: η_l, the client's learning rate.
    :ivar server_lr: η_s, the server's step on the aggregate.
    :ivar attack_rounds: 0-based rounds whose updates are recorded for attacks (empty: first and last).
    :ivar targets_per_round: how many of a round's sampled clients are attacked.
    :ivar delta: δ of every DP guarantee in the run.
    :ivar eval_every: test accuracy of the global model every this many rounds (and after the last).
    """

    clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    clients_per_round: int = 5
    sampling: str = "uniform"
    rounds: int = 20
    update: str = "gradient"
    local_epochs: int = 1
    local_batch_size: int = 8
    lr: float = 0.1
    server_lr: float = 1.0
    attack_rounds: tuple[int, ...] = ()
    targets_per_round: int = 1
    delta: float = 1e-5
    eval_every: int = 1

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError(problems[0])
        object.__setattr__(self, "attack_rounds", tuple(sorted(set(self.attack_rounds))))

    def problems(self) -> list[str]:
        """Why these settings are invalid (one line each, saying what to do)."""
        out = []
        ints = {"clients": 1, "clients_per_round": 1, "rounds": 1, "local_epochs": 1, "local_batch_size": 1,
                "targets_per_round": 1, "shards_per_client": 1, "eval_every": 1}
        for key, low in ints.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                out.append(f"{key} must be an integer >= {low}, got {v!r}")
        if self.partition not in PARTITIONS:
            out.append(f"partition must be one of {list(PARTITIONS)}, got {self.partition!r}")
        if self.sampling not in SAMPLINGS:
            out.append(f"sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        if self.update not in ("gradient", "delta"):
            out.append(f"update must be 'gradient' (FedSGD) or 'delta' (FedAvg), got {self.update!r}")
        for key in ("alpha", "lr", "server_lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                out.append(f"{key} must be a number > 0, got {v!r}")
        if not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            out.append(f"delta must be in (0, 1), e.g. 1e-5, got {self.delta!r}")
        if isinstance(self.clients_per_round, int) and isinstance(self.clients, int) \
                and self.clients_per_round > self.clients:
            out.append(f"clients_per_round ({self.clients_per_round}) cannot exceed clients ({self.clients})")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in self.attack_rounds):
            out.append(f"attack_rounds must be a list of round numbers, got {list(self.attack_rounds)!r}")
        elif isinstance(self.rounds, int) and any(not 0 <= r < self.rounds for r in self.attack_rounds):
            out.append(f"attack_rounds must lie in 0..{self.rounds - 1} (rounds = {self.rounds}), "
                       f"got {list(self.attack_rounds)}")
        return out

    @property
    def observed_rounds(self) -> tuple[int, ...]:
        """The attack rounds (default: the first and the last)."""
        return self.attack_rounds or tuple(sorted({0, self.rounds - 1}))

    def with_batch_size(self, b: int) -> FederationSettings:
        """The same federation with the clients' mini-batch ``b``."""
        return dataclasses.replace(self, local_batch_size=b)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attack_rounds"] = list(self.observed_rounds)
        return d


#: [federation] keys a study file may give (each also accepts a list: a sweep)
FEDERATION_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FederationSettings))
