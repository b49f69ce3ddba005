"""``dp-fedavg``: client-level differential privacy of the federation (DP-FedAvg).

McMahan, Ramage, Talwar & Zhang 2018 ("Learning Differentially Private
Recurrent Language Models", ICLR; arXiv 1710.06963): every sampled client's
whole update is flat-clipped to L2 norm S, the server averages the clipped
updates with equal weights over a fixed denominator K (the configured clients
per round, not the realised count) and Gaussian noise of std z·S/K is added
to the mean — N(0, (zS)²) on the sum. One "record" is one client; ε follows
from z, the client sampling rate q_c = K/N and the rounds R (the federation
computes it from :meth:`DPFedAvg.client_noise_multiplier` with Opacus).

Where the noise enters (``mode``):

* ``central`` — Flower's ``DifferentialPrivacyClientSideFixedClipping``: the
  clients clip (``fixedclipping_mod``), the server adds N(0, (z·S/K)²) to the
  aggregate (``std = noise_multiplier·clipping_norm/num_sampled_clients``).
  The curious server sees every clipped update *before* the noise, so central
  DP gives **no** protection of a client's data against the server; it protects
  against third parties that see the released global models.
* ``distributed`` — each client adds N(0, (zS)²/K) to its clipped update, so the
  sum over K clients carries N(0, (zS)²); the server adds nothing. The server
  sees noisy updates, but each carries only 1/√K of the noise: it is meant to be
  combined with secure aggregation (``dp-fedavg+secure-aggregation``), when the
  server sees only the noisy sum. The guarantee holds while the K clients are
  honest and survive (with K_h of them the noise std is zS·√(K_h/K)).

Threat coverage (reference §5.2): central DP-FedAvg — the curious server sees
Δ_k before noise, protects against the server: no; against third parties seeing
θ_r: yes (client-level, q_c, T). Distributed DP with SecAgg — the server sees the
noisy sum; protects while enough clients are honest/survive; yes against third
parties.

The weights are equal (1/K): Flower enforces equal weights under DP, since z·S/K
is the sensitivity of an *unweighted* mean only — a weighted mean moves by up to
max_k p_k·S ≥ S/K. With FedSGD the gradient is the update and is clipped the same
way (S in gradient units; the server then steps by the learning rate).

Outside a federation (no :meth:`DPFedAvg.join_federation`) K = 1: the one client
is the whole round.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from defenda import Defense, SharedUpdate, param
from defenda_defenses.noise import clip_update

if TYPE_CHECKING:
    from defenda import FederationPlan

MODES = ("central", "distributed")


def _gaussian_like(tensors: list[torch.Tensor], std: float, generator: torch.Generator | None) -> list[torch.Tensor]:
    """``tensors`` plus i.i.d. N(0, std²) drawn on the CPU from ``generator`` (device-independent)."""
    if std == 0:
        return [t.clone() for t in tensors]
    return [t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]


def update_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of the whole update (all tensors flattened into one vector), in float64."""
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


class DPFedAvg(Defense):
    """DP-FedAvg: client-level DP — each client's update is clipped, the round's mean is noised.

    Paper: H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018. <https://arxiv.org/abs/1710.06963>

    Acts on: the client's update and the round's aggregate: each client flat-clips its whole
    update (FedSGD gradient or FedAvg delta) to L2 norm ``clip_norm`` S; the server weighs the
    clients equally (1/K, K the configured clients per round); ``central`` adds N(0, (z·S/K)²)
    to the aggregate after the server observed the clipped updates (no protection against
    the curious server: it sees Δ_k before noise; client-level DP against third parties),
    ``distributed`` lets every client add N(0, (zS)²/K) before sending (the server sees noisy
    updates; meant with ``secure-aggregation``). ε is client-level, from z with q = K/N over
    the rounds. The server is told ``clip_norm``, ``noise_multiplier``, ``dp_level``
    (``"client"``), ``mode`` and ``clients_per_round`` in ``meta``.

    Arguments:
        noise_multiplier (float, 1.0): z, the noise std on the sum of clipped updates in units of
            ``clip_norm``; the strength, larger is stronger.
        clip_norm (float, 1.0): S, the L2 bound of each client's whole update (flat clipping).
        mode (str, "central"): ``central`` (server adds the noise) or ``distributed`` (each client adds its share).

    Example::

        [federation]
        clients = 100
        clients_per_round = 10

        [[defenses]]
        name = "dp-fedavg+secure-aggregation"
        dp-fedavg = { noise_multiplier = [0.5, 1.0], clip_norm = 1.0, mode = "distributed" }
    """

    name = "dp-fedavg"
    default_sweep = (0.1, 0.3, 1.0, 3.0)

    @dataclass(frozen=True)
    class Params:
        noise_multiplier: float = param(1.0, "z: std of the Gaussian noise on the sum of the round's clipped "
                                             "updates, in units of clip_norm", strength="up")
        clip_norm: float = param(1.0, "S: L2 bound of each client's whole update (flat clipping)")
        mode: str = param("central", "'central' (the server adds N(0, (zS/K)²) to the mean after observing) or "
                                     "'distributed' (each client adds N(0, (zS)²/K) before sending)", choices=MODES)

        def __post_init__(self) -> None:
            if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
            if not math.isfinite(self.clip_norm) or self.clip_norm <= 0:
                raise ValueError(f"clip_norm must be a finite number > 0, got {self.clip_norm}")
            if self.mode not in MODES:
                raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.plan: FederationPlan | None = None

    @property
    def clients_per_round(self) -> int:
        """K, the fixed denominator: the federation's configured clients per round (1 outside a federation)."""
        return self.plan.clients_per_round if self.plan is not None else 1

    def join_federation(self, plan: FederationPlan) -> None:
        self.plan = plan

    def _meta(self) -> dict[str, object]:
        p = self.params
        return {"clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier, "dp_level": "client",
                "mode": p.mode, "clients_per_round": self.clients_per_round}

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        p = self.params
        clipped = clip_update(update.tensors, p.clip_norm)
        if p.mode == "distributed":
            std = p.noise_multiplier * p.clip_norm / math.sqrt(self.clients_per_round)
            return update.replace(_gaussian_like(clipped, std, generator), **self._meta(), client_noise_std=std)
        return update.replace(clipped, **self._meta())

    def aggregation_weights(self, sizes: list[int]) -> list[float]:
        """Equal weights over the fixed denominator: 1/K each (K configured; the realised count outside
        a federation). Under Poisson sampling they sum to (clients in the round)/K, as in McMahan et al."""
        k = self.clients_per_round if self.plan is not None else len(sizes)
        return [1.0 / k for _ in sizes]

    def server_update(self, aggregate: SharedUpdate, clients: int,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        p = self.params
        k = self.clients_per_round if self.plan is not None else max(1, clients)
        if self.plan is not None and self.plan.sampling == "uniform" and clients != k:
            warnings.warn(f"dp-fedavg: {clients} clients in the round, but the noise is calibrated for the "
                          f"configured {k} (the fixed denominator)", RuntimeWarning, stacklevel=2)
        if p.mode != "central":
            return aggregate
        std = p.noise_multiplier * p.clip_norm / k
        return aggregate.replace(_gaussian_like(aggregate.tensors, std, generator), server_noise_std=std,
                                 noise_denominator=k)

    def client_noise_multiplier(self) -> float:
        return self.params.noise_multiplier

    def noise_position(self) -> str | None:
        if self.params.noise_multiplier == 0:
            return None
        return "after" if self.params.mode == "central" else "before"
