"""Federated training of the global model under a defense: what a defense costs in utility.

Federated training is simulated as ``rounds`` rounds in which one client draws
a batch of ``batch_size`` from the train split, computes its update through the
defense (exactly the update an attacker would see) and the server applies it:
θ ← θ − lr·g (FedSGD) or θ ← θ + Δ (FedAvg).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from defenda.federation.client import apply_update
from defenda.records import RoundSettings, TaskData

if TYPE_CHECKING:
    from defenda.interfaces import Defense


def train(model: nn.Module, defense: Defense, data: TaskData, *, rounds: int, batch_size: int,
          settings: RoundSettings, seed: int, device: torch.device) -> nn.Module:
    """Train ``model`` in place for ``rounds`` rounds of one defended client; returns it."""
    x_train, y_train = data.train
    # Two generators: the defense's randomness must not change which batches are drawn,
    # or every noisy defense would also train on a different batch order than `none`.
    batches = torch.Generator().manual_seed(20_000 + seed)
    noise = torch.Generator().manual_seed(30_000 + seed)
    for _ in range(rounds):
        idx = torch.randperm(len(x_train), generator=batches)[:batch_size]
        model.train()
        update = defense.client_update(model, x_train[idx].to(device), y_train[idx].to(device), settings, noise)
        apply_update(model, update, settings.lr)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: TaskData, device: torch.device, chunk: int = 1024) -> float:
    """Top-1 accuracy on the test split."""
    model.eval()
    x, y = data.test
    correct = 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + chunk]).sum())
    return correct / max(1, len(x))
