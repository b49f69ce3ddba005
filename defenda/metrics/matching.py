"""Pairing reconstructions one-to-one with the truth (Hungarian assignment on per-sample MSE)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from defenda.metrics.spaces import unit_images

if TYPE_CHECKING:
    from defenda.records import Reconstruction, TaskData

#: Label given to the blank guess that stands in for an unmatched truth sample.
UNMATCHED_LABEL = -1


def pairwise_mse(x_true: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """``(B, B̂)`` float64 matrix of per-sample MSEs between truth rows and reconstruction rows.

    Non-finite entries (a diverged reconstruction) become a very large finite cost.
    """
    if x_true.shape[1:] != x_rec.shape[1:]:
        raise ValueError(f"sample shapes differ: {tuple(x_true.shape[1:])} vs {tuple(x_rec.shape[1:])}")
    a = x_true.detach().to(torch.float64).reshape(x_true.shape[0], -1).cpu()
    b = x_rec.detach().to(torch.float64).reshape(x_rec.shape[0], -1).cpu()
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).mean(dim=-1)
    return torch.nan_to_num(cost, nan=1e300, posinf=1e300, neginf=1e300)


def match(x_true: torch.Tensor, x_rec: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairing of reconstructions with truth samples minimising the total MSE.

    :param x_true: ``(B, *shape)`` ground truth.
    :param x_rec: ``(B̂, *shape)`` reconstructions; B̂ may differ from B.
    :returns: ``(row_idx, col_idx)`` from ``scipy.optimize.linear_sum_assignment``:
        truth sample ``row_idx[k]`` is paired with reconstruction ``col_idx[k]``;
        ``min(B, B̂)`` pairs, ``row_idx`` sorted ascending.
    """
    from scipy.optimize import linear_sum_assignment

    cost = pairwise_mse(x_true, x_rec).numpy()
    if cost.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def apply_matching(
    x: torch.Tensor,
    y: torch.Tensor,
    recon: Reconstruction,
    *,
    data: TaskData | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Reconstruction]:
    """Reorder a reconstruction so that its row ``i`` is the guess for truth sample ``i``.

    :param x: ``(B, *shape)`` true inputs (model space).
    :param y: ``(B,)`` true labels.
    :param recon: the attack's answer, ``B̂`` rows in any order.
    :param data: when given and the task is an image task, the matching cost is the MSE of
        the clamped unit-space images (the space PSNR is computed in); otherwise model space.
    :returns: ``(x, y, matched)``: the truth unchanged (all B rows, original order) and a
        copy of ``recon`` with exactly B rows. Truth samples left without a partner
        (B̂ < B) get the blank guess (zeros in model space, label :data:`UNMATCHED_LABEL`);
        extra reconstructions (B̂ > B) are dropped. ``matched.info`` gains
        ``matched_fraction``, ``num_reconstructed`` and ``matched_mask`` (per truth row: got a partner).
    """
    rec = recon.inputs.detach()
    if rec.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"reconstruction samples have shape {tuple(rec.shape[1:])}, expected {tuple(x.shape[1:])}"
        )
    if data is not None and data.kind == "image":
        rows, cols = match(unit_images(x, data), unit_images(rec, data))
    else:
        rows, cols = match(x, rec)
    n = x.shape[0]
    inputs = torch.zeros_like(x, dtype=rec.dtype, device=rec.device)
    rows_t = torch.as_tensor(rows, device=rec.device)
    cols_t = torch.as_tensor(cols, device=rec.device)
    if len(rows):
        inputs[rows_t] = rec[cols_t]
    labels = None
    if recon.labels is not None:
        rec_labels = recon.labels.detach().to(device=y.device).reshape(-1)
        labels = torch.full((n,), UNMATCHED_LABEL, dtype=rec_labels.dtype, device=y.device)
        if len(rows):
            labels[torch.as_tensor(rows, device=y.device)] = rec_labels[torch.as_tensor(cols, device=y.device)]
    matched_mask = [False] * n
    for r in rows:
        matched_mask[int(r)] = True
    info = {**recon.info, "matched_fraction": (len(rows) / n) if n else 0.0, "num_reconstructed": int(rec.shape[0]),
            "matched_mask": matched_mask}
    return x, y, dataclasses.replace(recon, inputs=inputs, labels=labels, info=info)
