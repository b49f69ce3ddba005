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


def batched_gradients(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
    """FedSGD for K clients at once: ``xs`` is ``(K, b, ...)``, ``ys`` ``(K, b)``; returns per parameter
    a ``(K, ...)`` tensor whose k-th slice is :func:`gradient` of client k's batch.

    One vectorised computation (``torch.func.vmap`` over the clients) instead of K backward
    passes; equal to the loop up to floating-point summation order. Models with buffers
    (BatchNorm statistics) are not functional in training mode: use the loop for them.
    """
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    return [grads[n] for n in params]


def weight_delta(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, local_steps: int, lr: float) -> list[torch.Tensor]:
    """FedAvg: ``θ_after − θ_before`` after ``local_steps`` full-batch SGD steps on a copy."""
    return local_training(model, [(x, y)] * local_steps, lr)


def minibatches(n: int, settings: RoundSettings) -> list[torch.Tensor]:
    """Index batches of FedAvg's local epochs: each epoch a fresh permutation (from
    ``settings.order_seed``) cut into ⌈n/b⌉ batches of ``local_batch_size`` (the last may be smaller)."""
    gen = torch.Generator().manual_seed(settings.order_seed)
    out = []
    for _ in range(settings.local_epochs):
        out.extend(torch.randperm(n, generator=gen).split(settings.local_batch_size))
    return out


def local_training(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                   lr: float) -> list[torch.Tensor]:
    """Plain SGD (no momentum, a fresh optimizer each round) over ``batches`` on a copy of ``model``;
    returns ``θ_after − θ_before``."""
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    for bx, by in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(local(bx), by).backward()
        opt.step()
    return [(a.detach() - b.detach()) for a, b in zip(local.parameters(), model.parameters())]


def compute_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   settings: RoundSettings | None = None) -> SharedUpdate:
    """The honest (undefended) update of ``model`` on ``(x, y)`` under the round's ``settings``
    (default: a FedSGD gradient at lr 0.1).

    FedSGD: the gradient on the batch ``(x, y)``. FedAvg: ``local_steps`` full-batch steps on it,
    or, with ``settings.local_epochs``, E epochs of mini-batches over ``(x, y)`` (the client's data).
    """
    settings = settings or RoundSettings()
    names = [n for n, _ in model.named_parameters()]
    if settings.kind == "gradient":
        tensors = gradient(model, x, y)
        return SharedUpdate(tensors=tensors, names=names, kind="gradient", batch_size=len(x), lr=settings.lr)
    if settings.local_epochs > 0:
        batches = [(x[i], y[i]) for i in minibatches(len(x), settings)]
        return SharedUpdate(tensors=local_training(model, batches, settings.lr), names=names, kind="delta",
                            batch_size=len(x), local_steps=len(batches), lr=settings.lr,
                            local_epochs=settings.local_epochs, local_batch_size=settings.local_batch_size)
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
