"""One attack trial as the harness runs it, outside a study: for attack benchmarks and quality tests.

:func:`harness_trial` follows :mod:`defenda.trial`'s seeding — ``torch.manual_seed(seed)``
before the fresh victim, the batch drawn from the train split with
``Generator(10_000 + seed)``, its FedSGD update (:func:`~defenda.federation.client.compute_update`),
an optional defense-like ``transform`` of the update with that same generator, then
``torch.manual_seed(seed + 1)`` before the attack — and scores the answer after the
harness's one-to-one matching, in unit space. Labels and batch size are known to the
attacker unless ``knowledge`` overrides them.

Example::

    from defenda.data import load_photos_task
    from defenda.models import build_model
    from defenda.testing.trials import harness_trial
    from defenda_attacks.geiping import Geiping

    data = load_photos_task()
    out = harness_trial(data, lambda: build_model("cnn", (3, 32, 32), 10), Geiping(), seed=0, batch=4)
    print(out.psnr, out.ssim, out.seconds)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from defenda.federation.client import compute_update
from defenda.metrics import apply_matching, psnr, ssim
from defenda.records import Knowledge, Reconstruction, SharedUpdate

__all__ = ["TrialOutcome", "harness_trial"]


@dataclass(frozen=True)
class TrialOutcome:
    """What one :func:`harness_trial` gave: matched truth and guess (unit space), the raw answer, seconds."""

    truth: torch.Tensor
    guess: torch.Tensor
    reconstruction: Reconstruction
    seconds: float

    @cached_property
    def psnr(self) -> float:
        """Mean per-sample PSNR (MAX = 1) of the matched guess."""
        return psnr(self.truth, self.guess)

    @cached_property
    def ssim(self) -> float:
        """Mean SSIM of the matched guess (images only)."""
        return ssim(self.truth, self.guess)

    @property
    def info(self) -> dict[str, Any]:
        return self.reconstruction.info


def harness_trial(
    data: Any,
    make_model: Callable[[], nn.Module],
    attack: Any,
    *,
    seed: int,
    batch: int,
    knowledge: Mapping[str, Any] | None = None,
    transform: Callable[[SharedUpdate, torch.Generator], SharedUpdate] | None = None,
) -> TrialOutcome:
    """Attack the FedSGD update of one seeded batch of ``data.train`` on a fresh ``make_model()``.

    ``knowledge`` adds to (or overrides) the attacker's :class:`~defenda.interfaces.Knowledge`
    of ``space``, ``batch_size``, ``labels`` and ``seed``; ``transform(update, generator)``
    stands for a defense (applied with the batch's generator, after the draw).
    """
    torch.manual_seed(seed)
    model = make_model()
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(data.train[0]), generator=gen)[:batch]
    x, y = data.train[0][idx], data.train[1][idx]
    update = compute_update(model, x, y)
    if transform is not None:
        update = transform(update, gen)
    model.eval()
    know = Knowledge(**{"space": data.space, "batch_size": batch, "labels": y, "seed": seed, **(knowledge or {})})
    torch.manual_seed(seed + 1)
    t0 = time.perf_counter()
    rec = attack.reconstruct(update, model, know)
    seconds = time.perf_counter() - t0
    xm, _, matched = apply_matching(x, y, rec, data=data)
    return TrialOutcome(data.to_unit(xm), data.to_unit(matched.inputs), rec, seconds)
