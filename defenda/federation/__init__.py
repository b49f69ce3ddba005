"""The federation simulation: what clients compute and share, and the federation's recorded past.

* :mod:`defenda.federation.client` — one client's honest update (FedSGD / FedAvg) and the server step;
* :mod:`defenda.federation.history` — earlier rounds as the server observed them (GIML's gradient history);
* :mod:`defenda.federation.training` — federated training of the global model under a defense (utility).
"""

from __future__ import annotations

from defenda.federation.history import GradientHistory, ObservedRound

__all__ = ["GradientHistory", "ObservedRound"]
