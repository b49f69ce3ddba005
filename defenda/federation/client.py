"""Federated client simulation: the honest update a client shares (FedSGD or FedAvg)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from defenda.interfaces import SharedUpdate, UpdateKind


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


def compute_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kind: UpdateKind = "gradient",
    local_steps: int = 1,
    lr: float = 0.1,
) -> SharedUpdate:
    """The honest (undefended) update of ``model`` on the batch ``(x, y)``."""
    names = [n for n, _ in model.named_parameters()]
    if kind == "gradient":
        tensors = gradient(model, x, y)
        return SharedUpdate(tensors=tensors, names=names, kind=kind, batch_size=len(x), lr=lr)
    if kind == "delta":
        tensors = weight_delta(model, x, y, local_steps=local_steps, lr=lr)
        return SharedUpdate(
            tensors=tensors, names=names, kind=kind, batch_size=len(x), local_steps=local_steps, lr=lr
        )
    raise ValueError(f"unknown update kind {kind!r}; use 'gradient' or 'delta'")


def apply_update(model: nn.Module, update: SharedUpdate, server_lr: float) -> None:
    """Server step: θ ← θ − lr·g for a gradient, θ ← θ + Δ for a delta (in place, no grad)."""
    with torch.no_grad():
        for p, t in zip(model.parameters(), update.tensors):
            if update.kind == "gradient":
                p.sub_(server_lr * t.to(p))
            else:
                p.add_(t.to(p))
