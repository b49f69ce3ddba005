"""Label recovery: the fraction of matched samples whose reconstructed label is the true one."""

from __future__ import annotations

import torch


def label_accuracy(y_true: torch.Tensor, y_rec: torch.Tensor | None) -> float | None:
    """Fraction of samples whose reconstructed label equals the true one (None without labels).

    Rows are matched beforehand; an unmatched sample's label is
    :data:`~defenda.metrics.matching.UNMATCHED_LABEL`, never correct.
    """
    if y_rec is None:
        return None
    y_true = y_true.detach().reshape(-1).cpu()
    y_rec = y_rec.detach().reshape(-1).cpu()
    if y_true.shape != y_rec.shape:
        raise ValueError(f"label shapes differ: {tuple(y_true.shape)} vs {tuple(y_rec.shape)}")
    if y_true.numel() == 0:
        return None
    return float((y_true.to(torch.int64) == y_rec.to(torch.int64)).to(torch.float64).mean())
