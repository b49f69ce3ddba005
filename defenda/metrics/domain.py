"""The valid domain of a task's inputs, and clipping reconstructions into it before they are scored.

A score outside what the data allows is a bug, not a result: an MAE of 10³⁵ standard
deviations says the attack diverged, not how much it leaked, and one such trial
dominates every mean. So every reconstruction is scored inside the task's domain:

* images: ``[0, 1]`` in unit space (the box every image task declares);
* tabular data: each feature's range over the attacker's public split (what an attacker
  knows about plausible values), widened by half its width on each side because a small
  public split misses the tails (the truth can still lie outside, which only makes the
  attack look worse); discrete features snapped to the values they take there.

Non-finite values become the blank guess first (0 in model space: the data mean). The
fraction of values changed is recorded with the row (``clipped_fraction``), so a clipped
attack is visible as such.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from defenda.records import TaskData


#: tabular domain: the public split's range widened by this fraction of its width on each side
#: (57 public breast-cancer records miss 4% of the training values; widened by half, 0.17%)
TABULAR_MARGIN = 0.5
#: unit-space slack before a value counts as outside (float32 round trips land ~1e-9 outside [0, 1])
_SLACK = 1e-6


def domain_bounds(data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bound of valid inputs in unit space: ``[0, 1]`` for images; for tabular data each
    feature's public range widened by :data:`TABULAR_MARGIN` of its width on each side."""
    if data.kind == "image":
        return torch.zeros(()), torch.ones(())
    public = data.to_unit(data.public[0].to(torch.float64))
    lo, hi = public.min(dim=0).values, public.max(dim=0).values
    return lo - TABULAR_MARGIN * (hi - lo), hi + TABULAR_MARGIN * (hi - lo)


def _snapped(raw: torch.Tensor, data: TaskData) -> torch.Tensor:
    """Discrete tabular features snapped to the values they take in the public split."""
    public = data.to_unit(data.public[0].to(torch.float64))
    raw = raw.clone()
    for j in data.discrete_features:
        values = torch.unique(public[:, j])
        raw[:, j] = values[(raw[:, j, None] - values[None, :]).abs().argmin(dim=1)]
    return raw


def clip_to_domain(x: torch.Tensor, data: TaskData) -> tuple[torch.Tensor, float]:
    """``x`` (model space) inside the task's valid domain, and the fraction of values that were outside.

    Values inside the domain are returned bit for bit (no round trip through unit space).

    :returns: ``(clipped, fraction)``; ``clipped`` has ``x``'s dtype and device.
    """
    if x.numel() == 0:
        return x, 0.0
    orig = x.detach().to(torch.float64).cpu()
    finite = torch.nan_to_num(orig, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = domain_bounds(data)
    unit = data.to_unit(finite)
    slack = _SLACK * (hi - lo)
    moved = ~torch.isfinite(orig) | (unit < lo - slack) | (unit > hi + slack)
    raw = torch.minimum(torch.maximum(unit, lo.to(unit)), hi.to(unit))
    if data.kind == "tabular" and data.discrete_features:
        snapped = _snapped(raw, data)
        moved |= (snapped - raw).abs() > slack.expand_as(raw)
        raw = snapped
    out = torch.where(moved, data.to_model(raw), finite)
    return out.to(dtype=x.dtype, device=x.device), float(moved.to(torch.float64).mean())
