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


def accounting_for(job: dict[str, Any], size: int, n_train: int) -> dict[str, Any]:
    """The federation's privacy accounting: one subsampled mechanism per round of utility training."""
    return {"steps": job["rounds"], "sample_rate": size / n_train, "delta": job["delta"] or 1.0 / n_train,
            "local_steps": job["local_steps"] if job["update"] == "delta" else 1}


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

    task, data = load_task(plugins.registry, job["task"], job["task_params"])
    defense = make_defense(plugins.registry, job["defense"], job["defense_params"])
    torch.manual_seed(job["seed"])
    model = task.build_model(data).to(device)
    x_train, y_train = data.train
    size = min(defense.client_batch_size(job["client_batch_size"]), len(x_train))
    accounting = accounting_for(job, size, len(x_train))
    defense.calibrate(**accounting)
    # Two generators: the defense's randomness must not change which batches are drawn,
    # or every noisy defense would also train on a different batch order than `none`.
    batches = torch.Generator().manual_seed(20_000 + job["seed"])
    noise = torch.Generator().manual_seed(30_000 + job["seed"])
    for _ in range(job["rounds"]):
        idx = torch.randperm(len(x_train), generator=batches)[:size]
        model.train()
        update = defense.client_update(model, x_train[idx].to(device), y_train[idx].to(device), kind=job["update"],
                                       local_steps=job["local_steps"], lr=job["lr"], generator=noise)
        apply_update(model, update, job["lr"])
    acc = accuracy(model, data, device)
    eps = defense.epsilon(steps=accounting["steps"], sample_rate=accounting["sample_rate"],
                          delta=accounting["delta"])
    return acc, eps
