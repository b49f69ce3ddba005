"""The federated client: the honest update a client shares (FedSGD gradient or FedAvg delta), and the server step."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from defenda.records import RoundSettings, SharedUpdate


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The clients' training loss: cross-entropy, mean over the batch."""
    return F.cross_entropy(logits, y)


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """FedSGD: the gradient of the mean loss on ``(x, y)``, one tensor per parameter."""
    params = [p for p in model.parameters()]
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def weight_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, local_steps: int, lr: float) -> list[torch.Tensor]:
    """FedAvg: ``θ_after − θ_before`` after ``local_steps`` full-batch SGD steps on a copy."""
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    for _ in range(local_steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(local(x), y).backward()
        opt.step()
    return [(a.detach() - b.detach()) for a, b in zip(local.parameters(), model.parameters())]


def compute_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   settings: RoundSettings | None = None) -> SharedUpdate:
    """The honest (undefended) update of ``model`` on the batch ``(x, y)`` under the round's ``settings``
    (default: a FedSGD gradient at lr 0.1)."""
    settings = settings or RoundSettings()
    names = [n for n, _ in model.named_parameters()]
    if settings.kind == "gradient":
        tensors = gradient(model, x, y)
        return SharedUpdate(tensors=tensors, names=names, kind="gradient", batch_size=len(x), lr=settings.lr)
    tensors = weight_delta(model, x, y, local_steps=settings.local_steps, lr=settings.lr)
    return SharedUpdate(tensors=tensors, names=names, kind="delta", batch_size=len(x),
                        local_steps=settings.local_steps, lr=settings.lr)


def apply_update(model: nn.Module, update: SharedUpdate, server_lr: float) -> None:
    """Server step: θ ← θ − lr·g for a gradient, θ ← θ + Δ for a delta (in place, no grad)."""
    with torch.no_grad():
        for p, t in zip(model.parameters(), update.tensors):
            if update.kind == "gradient":
                p.sub_(server_lr * t.to(p))
            else:
                p.add_(t.to(p))
