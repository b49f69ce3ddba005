"""The server side of a round: weighted aggregation of the clients' updates, and secure aggregation.

* :func:`weighted_sum` — Σ p_k Δ_k, what a server that decodes only the aggregate obtains
  (masks of pruned coordinates are kept where every client dropped the coordinate);
* :func:`apply_step` — the server's step θ ← θ − η_s·η_l·g (FedSGD) or θ ← θ + η_s·Δ (FedAvg).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from defenda.records import SharedUpdate


def weighted_sum(updates: list[SharedUpdate], weights: list[float]) -> SharedUpdate:
    """Σ_k p_k·Δ_k as one update over the union of the clients' samples.

    ``batch_size`` is the total number of samples behind the aggregate; the meta of the
    first update is kept (the defense is the same for every client).
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    tensors: list[torch.Tensor] = []
    for i in range(len(updates[0].tensors)):
        total = weights[0] * updates[0].tensors[i]
        for u, w in zip(updates[1:], weights[1:]):
            total = total + w * u.tensors[i]
        tensors.append(total)
    masks = None
    if all(u.masks is not None for u in updates):
        masks = []
        for i in range(len(tensors)):
            parts = [u.masks[i] for u in updates]  # type: ignore[index]
            masks.append(None if any(m is None for m in parts) else
                         torch.stack([m for m in parts if m is not None]).amax(0))
    first = updates[0]
    return dataclasses.replace(first, tensors=tensors,
                               batch_size=sum(u.batch_size for u in updates), masks=masks,
                               meta={**first.meta, "aggregated_clients": len(updates)})


def apply_step(model: nn.Module, aggregate: SharedUpdate, *, client_lr: float, server_lr: float = 1.0) -> None:
    """The server's step, in place: θ ← θ − η_s·η_l·g for a gradient, θ ← θ + η_s·Δ for a delta."""
    with torch.no_grad():
        for p, t in zip(model.parameters(), aggregate.tensors):
            if aggregate.kind == "gradient":
                p.sub_(server_lr * client_lr * t.to(p))
            else:
                p.add_(server_lr * t.to(p))
