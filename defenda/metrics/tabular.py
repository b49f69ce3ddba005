"""Tabular scores: MAE on continuous features (model space), exact-recovery accuracy on discrete ones (raw values)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from defenda.metrics.spaces import _check_pair, blank_non_finite


def _continuous(num_features: int, discrete: Sequence[int]) -> list[int]:
    skip = {int(i) % num_features for i in discrete} if num_features else set()
    return [j for j in range(num_features) if j not in skip]


def mae(a: torch.Tensor, b: torch.Tensor, discrete: Sequence[int] = ()) -> float | None:
    """Mean absolute error over the continuous features of tabular samples.

    :param a, b: ``(B, F)`` in *model space* (standardised features: each feature
        weighs the same, and an error of 1 is one standard deviation of that feature).
        Non-finite reconstructed values count as the blank guess 0 (the feature's mean).
    :param discrete: feature indices to leave out (scored by :func:`feature_accuracy`).
    :returns: the mean of ``|a − b|`` over samples and continuous features, or None
        when every feature is discrete.
    """
    _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"expected tabular samples (B, F), got shape {tuple(a.shape)}")
    cols = _continuous(a.shape[1], discrete)
    if not cols or a.shape[0] == 0:
        return None
    d = (a.detach().to(torch.float64) - blank_non_finite(b.detach().to(torch.float64)))[:, cols].abs()
    return float(d.mean())


def _snap(x: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    if support is None or support.numel() == 0:
        return torch.round(x)
    support = support.to(x).reshape(-1)
    idx = (x[:, None] - support[None, :]).abs().argmin(dim=1)
    return support[idx]


def feature_accuracy(
    a: torch.Tensor,
    b: torch.Tensor,
    discrete: Sequence[int],
    supports: Sequence[torch.Tensor | None] | None = None,
) -> float | None:
    """Fraction of (sample, discrete feature) entries recovered exactly.

    :param a, b: ``(B, F)`` true and reconstructed samples in *unit space* (raw values).
    :param discrete: indices of the discrete features.
    :param supports: for each entry of ``discrete``, the values that feature takes
        (e.g. the unique values in the training data); both the truth and the
        reconstruction are snapped to the nearest of them before comparison. Without
        supports, values are rounded to the nearest integer.
    :returns: the accuracy, or None when there is no discrete feature.
    """
    _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"expected tabular samples (B, F), got shape {tuple(a.shape)}")
    if not len(discrete) or a.shape[0] == 0:
        return None
    if supports is not None and len(supports) != len(discrete):
        raise ValueError("supports must give one tensor (or None) per discrete feature")
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    hits = []
    for k, j in enumerate(discrete):
        sup = supports[k] if supports is not None else None
        finite = torch.isfinite(b[:, j])  # a non-finite value is a miss
        hits.append((_snap(a[:, j], sup) == _snap(torch.where(finite, b[:, j], 0.0), sup)) & finite)
    return float(torch.stack(hits).to(torch.float64).mean())
