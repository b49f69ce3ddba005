"""``large-batch``: hide each sample in a larger client batch.

Averaging over more samples is the simplest mitigation of gradient inversion:
reconstruction quality degrades with batch size for optimisation attacks
(DLG, Zhu et al. 2019; Geiping et al. 2020, §6; Yin et al. 2021) and exact
attacks' cost grows with it (SPEAR, Dimitrov et al. 2024). The client's batch
size is the strength: the client computes its honest update (FedSGD gradient
or FedAvg delta) on ``batch_size`` samples, the attacker sees the mean update of
the whole batch and is scored on all of it, and utility is measured by
training with that batch size.

The parameter *replaces* the batch size the study asks for (its
``batch_sizes`` for attack trials and ``client_batch_size`` for utility), so
that the sweep is the defense's own axis; a value above the task's train
split is a ``skipped`` attack trial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenda import Defense, SharedUpdate, param


class LargeBatch(Defense):
    """Large batch: the client trains on a larger batch, so the update averages all of it.

    Paper: L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019.
    <https://arxiv.org/abs/1906.08935>

    Acts on: the client's batch size (client-side): the honest update (FedSGD gradient or
    FedAvg delta) is computed on ``batch_size`` samples instead of the study's batch size,
    for the attacked update and for utility training; the attacker is scored on the whole
    batch. The server is told ``meta["client_batch_size"]`` (and ``update.batch_size``).

    Arguments:
        batch_size (int, 64): the client's batch size (replaces the study's batch size); the strength, larger is stronger.

    Example::

        [[defenses]]
        name = "large-batch"
        batch_size = [4, 16, 64]
    """

    name = "large-batch"
    default_sweep = (4, 16, 64, 256)

    @dataclass(frozen=True)
    class Params:
        batch_size: int = param(64, "the client's batch size (replaces the study's batch size)", strength="up")

        def __post_init__(self) -> None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def client_batch_size(self, requested: int) -> int:
        return self.params.batch_size

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        return update.replace(update.tensors, client_batch_size=update.batch_size)
