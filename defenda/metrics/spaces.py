"""The space a score is computed in: unit-space images, the blank guess, and the pair check every score runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from defenda.records import TaskData


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError("expected a batch (first dimension = samples)")


def blank_non_finite(x: torch.Tensor) -> torch.Tensor:
    """Model-space values with NaN/±inf replaced by 0, the blank guess (the data mean)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def unit_images(x: torch.Tensor, data: TaskData | None = None) -> torch.Tensor:
    """Images in float64, in unit space, clamped to [0, 1] (NaN → 0, +inf → 1, −inf → 0).

    :param x: a batch; in model space when ``data`` is given, else already in unit space.
    :param data: the task whose ``to_unit`` de-normalises ``x``.
    """
    x = x.detach().to(torch.float64)
    if data is not None:
        x = data.to_unit(x)
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
