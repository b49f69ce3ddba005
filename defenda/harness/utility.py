"""The utility job: what a defense costs. One training run per (task, defense, strength, seed).

Trains the task's model under the defense (:func:`defenda.federation.training.train`),
measures test accuracy and the defense's ε for that run's accounting. Runs in a
worker process and returns a plain row for the single writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from defenda.compose import make_defense
from defenda.federation.training import accuracy, train
from defenda.harness.jobs import Federation, UtilityJob
from defenda.harness.services import load_task, resolve_device
from defenda.plugins import Plugins, get_plugins

if TYPE_CHECKING:
    from defenda.interfaces import Defense


@dataclass(frozen=True)
class Accounting:
    """The federation's privacy accounting: one subsampled mechanism per round of utility training."""

    steps: int
    sample_rate: float
    delta: float
    local_steps: int
    #: the client's batch size in each round (the defense may enlarge it; at most the train split)
    batch_size: int

    def calibrate_args(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`defenda.Defense.calibrate`."""
        return {"steps": self.steps, "sample_rate": self.sample_rate, "delta": self.delta,
                "local_steps": self.local_steps}


def accounting_for(fed: Federation, defense: Defense, n_train: int) -> Accounting:
    """The accounting of a training run under ``defense`` on a train split of ``n_train`` samples."""
    size = min(defense.client_batch_size(fed.client_batch_size), n_train)
    return Accounting(steps=fed.rounds, sample_rate=size / n_train, delta=fed.delta or 1.0 / n_train,
                      local_steps=fed.local_steps if fed.update == "delta" else 1, batch_size=size)


def now() -> str:
    """The UTC time stamp written into rows."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def measure_utility(plugins: Plugins, job: UtilityJob, device: torch.device) -> tuple[float, float | None]:
    """Test accuracy after training under the job's defense, and the defense's ε (None if not DP)."""
    task, data = load_task(plugins.registry, job.task, job.task_params)
    defense = make_defense(plugins.registry, job.defense, job.defense_params)
    fed = job.federation
    assert isinstance(fed, Federation)
    torch.manual_seed(job.seed)
    model = task.build_model(data).to(device)
    accounting = accounting_for(fed, defense, len(data.train[0]))
    defense.calibrate(**accounting.calibrate_args())
    train(model, defense, data, rounds=fed.rounds, batch_size=accounting.batch_size, settings=fed.round_settings,
          seed=job.seed, device=device)
    eps = defense.epsilon(steps=accounting.steps, sample_rate=accounting.sample_rate, delta=accounting.delta)
    return accuracy(model, data, device), eps


def _row(job: UtilityJob) -> dict[str, Any]:
    return {"key": job.key, "task": job.task, "defense": job.defense, "strength": job.strength,
            "params": job.defense_params, "seed": job.seed}


def run_utility(job: UtilityJob, device: str = "cpu", out_dir: str | None = None) -> dict[str, Any]:
    """Run one training run; never raises: a failure becomes an ``error`` row.

    In a federation the run also writes its observations under ``out_dir`` (see
    :mod:`defenda.harness.federated`) and its row carries the run's record in ``extra``.
    """
    t0 = time.perf_counter()
    row = _row(job)
    try:
        if job.federated:
            from defenda.harness.federated import measure_federation

            if out_dir is None:
                raise ValueError("a federated training run needs the output directory for its observations")
            acc, eps, extra = measure_federation(get_plugins(), job, resolve_device(device), out_dir)
            row.update(status="ok", reason="", test_acc=acc, epsilon=eps, extra=extra)
        else:
            acc, eps = measure_utility(get_plugins(), job, resolve_device(device))
            row.update(status="ok", reason="", test_acc=acc, epsilon=eps)
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    row["seconds"] = time.perf_counter() - t0
    row["finished_at"] = now()
    return row


def failed_utility(job: UtilityJob, reason: str, plugin: str) -> dict[str, Any]:
    """The utility row of a job whose worker was stopped or died."""
    return {**_row(job), "status": "error", "reason": f"{plugin}: {reason}", "finished_at": now()}
