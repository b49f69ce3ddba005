"""Success rates of a matched reconstruction: exact recovery, recognisable, identified among n candidates.

Means hide failures: one exactly recovered sample lifts a batch's mean PSNR above a
failed batch's. These scores count samples instead; each is the fraction of the
batch's samples that succeed (an unmatched sample always fails), so rates pool over
trials and seeds as k successes out of n samples.

Exact recovery
    Per-sample MSE ≤ :data:`EXACT_MSE` (1e-10): PSNR ≥ 100 dB for unit-space images;
    for tabular data the same bound on standardised features. Float64 attacks that
    solve for the inputs (SPEAR, Stein) land far below it; optimisation attacks never
    reach it.
Recognisable
    Per-image PSNR ≥ :data:`RECOGNISED_PSNR_DB` (20 dB) for images, per-sample MAE ≤
    :data:`RECOGNISED_MAE` (0.25 standard deviations) for tabular data. **A convention,
    not a sourced threshold**: the literature has no agreed cut-off; Sun et al.
    ("Privacy Assessment on Reconstructed Images: Are Existing Evaluation Metrics
    Faithful to Human Perception?", NeurIPS 2023) found that PSNR, SSIM and LPIPS
    agree only weakly with whether people recognise a reconstruction. Read it as a
    descriptive quantile of the PSNR distribution; identification is the calibrated score.
Identification (Balle, Cherubin & Hayes, IEEE S&P 2022, arXiv 2201.04845; the protocol of
reference ``bounds.md`` §5.1)
    For each sample, a pool of :data:`IDENTIFICATION_CANDIDATES` = n candidates: the true
    sample and n − 1 distractors drawn from the attacker's public split (the prior; disjoint
    from every client's data). Success when the reconstruction is *strictly* nearer to the
    truth than to every distractor (ties fail). Chance level κ = 1/n — an attacker without
    the update succeeds with probability κ — which is the κ of the reconstruction-robustness
    bound drawn beside it (:mod:`defenda.federation.bounds`). Distances: MSE of clamped
    unit-space images, or of standardised tabular features. Distractors are a deterministic
    function of the truth batch (:func:`distractors`), so every attack and the prior-only
    baselines of one batch face the same pools. Breaching's "Image Identifiability Precision"
    is the same test with the whole same-label dataset as the pool.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from defenda.metrics.images import mse_per_image, psnr_per_image
from defenda.metrics.spaces import blank_non_finite, unit_images

if TYPE_CHECKING:
    from defenda.records import TaskData

#: per-sample MSE at or below which a sample counts as exactly recovered (PSNR ≥ 100 dB for images)
EXACT_MSE = 1e-10
#: per-image PSNR (dB) at or above which an image counts as recognisable (a convention, see above)
RECOGNISED_PSNR_DB = 20.0
#: per-sample MAE (standard deviations) at or below which a tabular sample counts as recognisable
RECOGNISED_MAE = 0.25
#: candidates per identification pool: the truth and n − 1 public distractors (κ = 1/n)
IDENTIFICATION_CANDIDATES = 10


def _scored(x: torch.Tensor, data: TaskData) -> torch.Tensor:
    """The space success is measured in: clamped unit-space images, or finite standardised features."""
    if data.kind == "image":
        return unit_images(x, data)
    return blank_non_finite(x.detach().to(torch.float64).cpu())


def _matched(info: dict[str, Any], n: int) -> torch.Tensor:
    mask = info.get("matched_mask")
    return torch.ones(n, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)


def exact_per_sample(x: torch.Tensor, x_rec: torch.Tensor, data: TaskData) -> torch.Tensor:
    """``(B,)`` bool: sample recovered exactly (per-sample MSE ≤ :data:`EXACT_MSE` in the scored space)."""
    return mse_per_image(_scored(x, data), _scored(x_rec, data)) <= EXACT_MSE


def recognised_per_sample(x: torch.Tensor, x_rec: torch.Tensor, data: TaskData) -> torch.Tensor:
    """``(B,)`` bool: PSNR ≥ :data:`RECOGNISED_PSNR_DB` (images) or MAE ≤ :data:`RECOGNISED_MAE` (tabular)."""
    if data.kind == "image":
        return psnr_per_image(_scored(x, data), _scored(x_rec, data)) >= RECOGNISED_PSNR_DB
    err = (_scored(x, data) - _scored(x_rec, data)).abs().reshape(len(x), -1).mean(dim=1)
    return err <= RECOGNISED_MAE


def _seed_of(x: torch.Tensor) -> int:
    """A seed that is a function of the truth batch only (never of process state)."""
    digest = hashlib.sha256(x.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def distractors(x: torch.Tensor, num_public: int, n: int = IDENTIFICATION_CANDIDATES) -> torch.Tensor:
    """``(B, n − 1)`` indices into the public split: each sample's distractors (distinct within a pool).

    :raises ValueError: when the public split has fewer than n − 1 samples.
    """
    if n < 2:
        raise ValueError(f"an identification pool needs at least 2 candidates, got {n}")
    if num_public < n - 1:
        raise ValueError(f"identification among {n} candidates needs ≥ {n - 1} public samples, "
                         f"the task's public split has {num_public}")
    gen = torch.Generator().manual_seed(_seed_of(x))
    return torch.stack([torch.randperm(num_public, generator=gen)[: n - 1] for _ in range(len(x))])


def identified_per_sample(x: torch.Tensor, x_rec: torch.Tensor, data: TaskData,
                          n: int = IDENTIFICATION_CANDIDATES) -> torch.Tensor:
    """``(B,)`` bool: the reconstruction is strictly nearer to its truth than to each of its n − 1 distractors."""
    public = _scored(data.public[0], data).reshape(len(data.public[0]), -1)
    idx = distractors(x, len(public), n)
    truth = _scored(x, data).reshape(len(x), -1)
    rec = _scored(x_rec, data).reshape(len(x), -1)
    d_true = ((rec - truth) ** 2).mean(dim=1)
    d_pool = ((rec[:, None, :] - public[idx]) ** 2).mean(dim=2)
    return d_true < d_pool.min(dim=1).values


def success_rates(x: torch.Tensor, x_rec: torch.Tensor, data: TaskData, info: dict[str, Any] | None = None,
                  n: int = IDENTIFICATION_CANDIDATES) -> dict[str, float | None]:
    """``exact_rate``, ``recognised_rate``, ``ident_acc``: fractions of the batch's samples.

    :param x, x_rec: ``(B, *shape)`` truth and matched reconstruction, model space.
    :param info: the matched reconstruction's info; its ``matched_mask`` marks samples that got
        a reconstruction (the others always fail, whatever the blank guess scores).
    """
    if len(x) == 0:
        return {"exact_rate": None, "recognised_rate": None, "ident_acc": None}
    ok = _matched(info or {}, len(x))
    rates: dict[str, torch.Tensor | None] = {"exact_rate": exact_per_sample(x, x_rec, data),
                                             "recognised_rate": recognised_per_sample(x, x_rec, data)}
    rates["ident_acc"] = identified_per_sample(x, x_rec, data, n) if len(data.public[0]) >= n - 1 else None
    return {k: None if v is None else float((v & ok).to(torch.float64).mean()) for k, v in rates.items()}
