"""What an attacker achieves with no update at all: the prior-only guesses every leakage value is compared with.

Without seeing an update, an attacker who knows the data distribution (the public
split) can still guess. Two such guesses are scored against every trial's true batch,
matched and scored exactly like the attack's reconstruction:

``mean``
    every sample guessed as the public split's mean (label: the public split's most
    common class). On 8×8 digits this already scores about 8.5 dB PSNR.
``sample``
    each sample guessed as a random public sample with its label, never one of that
    sample's identification distractors (:func:`defenda.metrics.success.distractors`),
    so the guess cannot be penalised for coinciding with one.

An attack's value that does not beat both is leakage an attacker gets for free.
Both guesses are deterministic functions of the truth batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from defenda.metrics.success import IDENTIFICATION_CANDIDATES, _seed_of, distractors
from defenda.records import Reconstruction

if TYPE_CHECKING:
    from defenda.records import TaskData

BASELINES = ("mean", "sample")


def _mean_guess(x: torch.Tensor, data: TaskData) -> Reconstruction:
    px, py = data.public
    mean = px.to(torch.float64).mean(dim=0, keepdim=True).to(x.dtype)
    label = torch.bincount(py.to(torch.int64).reshape(-1)).argmax() if len(py) else torch.tensor(0)
    return Reconstruction(mean.expand(len(x), *mean.shape[1:]).clone(), label.repeat(len(x)), {})


def _sample_guess(x: torch.Tensor, data: TaskData) -> Reconstruction:
    px, py = data.public
    n = IDENTIFICATION_CANDIDATES
    # a pool of n − 1 leaves at least one other public sample to pick only when the split has ≥ n
    pools = distractors(x, len(px), n) if len(px) >= n else torch.zeros(len(x), 0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(_seed_of(x) ^ 0x5EED)
    picks = []
    for pool in pools:
        allowed = torch.ones(len(px), dtype=torch.bool)
        allowed[pool] = False
        choices = torch.nonzero(allowed).reshape(-1)
        picks.append(int(choices[torch.randint(len(choices), (1,), generator=gen)]))
    idx = torch.tensor(picks, dtype=torch.int64)
    return Reconstruction(px[idx].to(x.dtype).clone(), py[idx].clone(), {})


def prior_guesses(x: torch.Tensor, data: TaskData) -> dict[str, Reconstruction]:
    """The prior-only guesses for the true batch ``x`` (model space), keyed by :data:`BASELINES`.

    Empty when the task has no public split to guess from.
    """
    if len(data.public[0]) == 0 or len(x) == 0:
        return {}
    x = x.detach().cpu()
    return {"mean": _mean_guess(x, data), "sample": _sample_guess(x, data)}
