"""Noise added to the shared update (the "gradient noise" defense of DLG, Zhu et al. 2019, §5).

Unlike DP-SGD there is no per-sample clipping and no formal guarantee: i.i.d.
noise of an *absolute* scale is added to every coordinate of the update the
client shares (breaching's ``local_gradient`` convention: the noise is not
multiplied by the clipping bound). Optionally the whole update is first
clipped to an L2 norm.

* ``gaussian-noise`` — N(0, std²); the strength ``std`` is the standard deviation.
* ``laplace-noise`` — Laplace(0, b); the strength ``scale`` is the Laplace
  *scale* b (the parameter of ``torch.distributions.Laplace`` and of breaching),
  so the per-coordinate standard deviation is ``b·√2``. Both are recorded in the
  update's ``meta`` (``noise_scale``, ``noise_std``).

Noise is drawn on the CPU from the trial's ``generator`` (the global RNG when
None) and then moved to the update's device, so results do not depend on the
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from defenda import Defense, SharedUpdate, param


def clip_update(tensors: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale the whole update down to L2 norm ``max_norm`` (no-op when already smaller or max_norm is 0)."""
    if max_norm <= 0:
        return tensors
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))
    factor = min(1.0, max_norm / (float(norm) + 1e-12))
    return [t * factor for t in tensors]


def _check_scale(name: str, value: float, clip: float) -> None:
    if not (math.isfinite(value) and math.isfinite(clip) and value >= 0 and clip >= 0):
        raise ValueError(f"{name} and clip must be >= 0 (and finite; clip 0 = no clipping), "
                         f"got {name}={value}, clip={clip}")


@dataclass(frozen=True)
class NoiseParams:
    std: float = param(0.0, "standard deviation of the Gaussian noise added to every coordinate of the update",
                       strength="up")
    clip: float = param(0.0, "clip the whole update to this L2 norm before adding noise (0 = no clipping)")

    def __post_init__(self) -> None:
        _check_scale("std", self.std, self.clip)


@dataclass(frozen=True)
class LaplaceParams:
    scale: float = param(0.0, "Laplace scale b of the noise added to every coordinate (its std is b·√2)",
                         strength="up")
    clip: float = param(0.0, "clip the whole update to this L2 norm before adding noise (0 = no clipping)")

    def __post_init__(self) -> None:
        _check_scale("scale", self.scale, self.clip)


class _AdditiveNoise(Defense):
    """Shared code: optional clipping of the whole update, then i.i.d. noise on every coordinate."""

    #: name of the Params field holding the noise scale
    scale_field: ClassVar[str] = ""
    #: per-coordinate standard deviation of a unit-scale draw
    std_per_scale: ClassVar[float] = 1.0

    def sample(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        """Unit-scale noise of ``shape`` on the CPU."""
        raise NotImplementedError

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        clip = self.params.clip
        scale = float(getattr(self.params, self.scale_field))
        tensors = clip_update(update.tensors, clip)
        noisy = [t + scale * self.sample(t.shape, t.dtype, generator).to(t.device) for t in tensors]
        return update.replace(noisy, noise=self.name.removesuffix("-noise"), noise_scale=scale,
                              noise_std=scale * self.std_per_scale, clip=clip)

    def noise_position(self) -> str | None:
        """``"before"``: the noise is in the update the server observes (None at scale 0)."""
        return "before" if float(getattr(self.params, self.scale_field)) > 0 else None


class GaussianNoise(_AdditiveNoise):
    """Gaussian noise N(0, std²) added to every coordinate of the shared update.

    Paper: L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019, §5.
    <https://arxiv.org/abs/1906.08935>

    Acts on: the update after the client computed it: the whole update is clipped to L2 norm
    ``clip`` (when > 0), then i.i.d. noise of absolute scale ``std`` is added to every
    coordinate (no per-sample clipping, no formal guarantee). The server is told ``noise``,
    ``noise_scale``, ``noise_std`` and ``clip`` in ``meta``.

    Arguments:
        std (float, 0.0): standard deviation of the noise on every coordinate; the strength, larger is stronger.
        clip (float, 0.0): clip the whole update to this L2 norm before adding noise (0 = no clipping).

    Example::

        [[defenses]]
        name = "gaussian-noise"
        std = [1e-3, 1e-2, 1e-1]
    """

    name = "gaussian-noise"
    Params = NoiseParams
    default_sweep = (1e-3, 1e-2, 3e-2, 1e-1)
    scale_field = "std"
    std_per_scale = 1.0

    def sample(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)


class LaplaceNoise(_AdditiveNoise):
    """Laplace noise of scale b (std b·√2) added to every coordinate of the shared update.

    Paper: L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019, §5.
    <https://arxiv.org/abs/1906.08935>

    Acts on: the update after the client computed it: the whole update is clipped to L2 norm
    ``clip`` (when > 0), then i.i.d. Laplace(0, ``scale``) noise is added to every coordinate
    (``scale`` is the Laplace scale b, as in breaching's Laplacian ``gradient_noise``; compare
    it with ``gaussian-noise`` through the recorded ``noise_std``). The server is told
    ``noise``, ``noise_scale``, ``noise_std`` and ``clip`` in ``meta``.

    Arguments:
        scale (float, 0.0): Laplace scale b of the noise on every coordinate; the strength, larger is stronger.
        clip (float, 0.0): clip the whole update to this L2 norm before adding noise (0 = no clipping).

    Example::

        [[defenses]]
        name = "laplace-noise"
        scale = [1e-3, 1e-2, 1e-1]
    """

    name = "laplace-noise"
    Params = LaplaceParams
    default_sweep = (1e-3, 1e-2, 3e-2, 1e-1)
    scale_field = "scale"
    std_per_scale = math.sqrt(2.0)

    def sample(self, shape: torch.Size, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        # Laplace(0, 1) = E1 − E2 with E1, E2 i.i.d. Exp(1): exact, and draws from ``generator``
        # (torch.distributions.Laplace cannot take one).
        e = torch.empty((2, *shape), dtype=dtype).exponential_(generator=generator)
        return e[0] - e[1]
