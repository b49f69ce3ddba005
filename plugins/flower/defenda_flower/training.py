"""The local training the example ClientApp runs and the Flower defenses reproduce: plain SGD on a copy.

One function for both, so that a defense applied in a defenda study and the same Flower
mod in the example app see the very same trained weights (the arrays-equality tests rely
on it). It is defenda's own FedAvg client (:func:`defenda.federation.client.local_training`:
cross-entropy, SGD without momentum, a fresh optimizer each round, mini-batches from
:func:`defenda.federation.client.minibatches`), but it returns the trained model, whose
weights are what a Flower client sends, instead of their difference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from defenda import RoundSettings
from defenda.federation.client import loss_fn, minibatches


def batches_for(x: torch.Tensor, y: torch.Tensor, settings: RoundSettings,
                max_steps: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The mini-batches of one round: FedSGD one step on the whole batch; FedAvg ``local_epochs``
    epochs of shuffled batches (or ``local_steps`` full-batch steps); at most ``max_steps`` (0: all)."""
    if settings.kind == "gradient":
        out = [(x, y)]
    elif settings.local_epochs > 0:
        out = [(x[i], y[i]) for i in minibatches(len(x), settings)]
    else:
        out = [(x, y)] * settings.local_steps
    return out[:max_steps] if max_steps > 0 else out


def train_copy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> nn.Module:
    """SGD over ``batches`` on a deep copy of ``model`` (left unchanged); returns the trained copy."""
    local = copy.deepcopy(model)
    local.train()
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    for bx, by in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(local(bx), by).backward()
        opt.step()
    return local
