"""Utility: what a defense costs. Train the task's model under the defense, measure test accuracy.

Federated training is simulated as ``rounds`` rounds in which one client
draws a batch of ``client_batch_size`` from the train split, computes its
update through the defense (exactly the update an attacker would see) and
the server applies it: θ ← θ − lr·g (FedSGD) or θ ← θ + Δ (FedAvg).
"""

from __future__ import annotations

from typing import Any

import torch

from defenda.client import apply_update
from defenda.compose import make_defense
from defenda.interfaces import TaskData
from defenda.plugins import Plugins


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TaskData, device: torch.device, chunk: int = 1024) -> float:
    """Top-1 accuracy on the test split."""
    model.eval()
    x, y = data.test
    correct = 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + chunk]).sum())
    return correct / max(1, len(x))


def measure_utility(plugins: Plugins, job: dict[str, Any], device: torch.device) -> tuple[float, float | None]:
    """Test accuracy after training under the job's defense, and the defense's ε (None if not DP)."""
    from defenda.trial import load_task

    task, data = load_task(plugins, job["task"], job["task_params"])
    defense = make_defense(plugins.registry, job["defense"], job["defense_params"])
    torch.manual_seed(job["seed"])
    model = task.build_model(data).to(device)
    x_train, y_train = data.train
    size = min(defense.client_batch_size(job["client_batch_size"]), len(x_train))
    gen = torch.Generator().manual_seed(20_000 + job["seed"])
    for _ in range(job["rounds"]):
        idx = torch.randperm(len(x_train), generator=gen)[:size]
        model.train()
        update = defense.client_update(model, x_train[idx].to(device), y_train[idx].to(device), kind=job["update"],
                                       local_steps=job["local_steps"], lr=job["lr"], generator=gen)
        apply_update(model, update, job["lr"])
    acc = accuracy(model, data, device)
    delta = job["delta"] or 1.0 / len(x_train)
    eps = defense.epsilon(steps=job["rounds"], sample_rate=size / len(x_train), delta=delta)
    return acc, eps
