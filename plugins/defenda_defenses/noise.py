"""Noise added to the shared update (the "gradient noise" defense of DLG, Zhu et al. 2019, §5).

Unlike DP-SGD there is no per-sample clipping and no formal guarantee: i.i.d.
noise of an *absolute* scale is added to every coordinate of the update the
client shares (breaching's ``local_gradient`` convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defenda import param
from defenda.interfaces import Defense, SharedUpdate


@dataclass(frozen=True)
class NoiseParams:
    std: float = param(0.0, "standard deviation of the noise added to every coordinate of the update",
                       strength="up")
    clip: float = param(0.0, "clip the whole update to this L2 norm before adding noise (0 = no clipping)")

    def __post_init__(self) -> None:
        if self.std < 0 or self.clip < 0:
            raise ValueError("std and clip must be >= 0")


def clip_update(tensors: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale the whole update down to L2 norm ``max_norm`` (no-op when already smaller or max_norm is 0)."""
    if max_norm <= 0:
        return tensors
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))
    factor = min(1.0, max_norm / (float(norm) + 1e-12))
    return [t * factor for t in tensors]


class GaussianNoise(Defense):
    """Gaussian noise N(0, std²) added to every coordinate of the shared update."""

    name = "gaussian-noise"
    Params = NoiseParams
    default_sweep = (1e-3, 1e-2, 3e-2, 1e-1)

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        tensors = clip_update(update.tensors, self.params.clip)
        std = self.params.std
        noisy = [t + std * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]
        return update.replace(noisy, noise_std=std, clip=self.params.clip)
