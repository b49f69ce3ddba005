"""``prune``: per-layer top-k magnitude sparsification of the shared update.

The gradient-pruning defense of DLG (Zhu et al. 2019, §5: "gradient
compression and sparsification", after Lin et al. 2018, Deep Gradient
Compression), in the form used by the GIAS scripts (Jeon et al. 2021): in every
tensor of the update only the ``k = ⌊(1 − r)·numel⌋`` entries of largest
magnitude are kept, the others are set to zero. The pruned fraction ``r`` is
the strength. Small tensors can lose every entry (e.g. a 10-entry bias at
r = 0.95 keeps ⌊0.5⌋ = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from defenda import Defense, SharedUpdate, param


def kept_count(numel: int, fraction: float) -> int:
    """``k = ⌊(1 − r)·numel⌋``, the product rounded to 6 decimals first so that floating-point error
    does not drop an entry (``(1 − 0.8)·10`` is 1.9999999999999996 in floats; it counts as 2)."""
    return min(numel, max(0, math.floor(round((1.0 - fraction) * numel, 6))))


def top_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` with all but its ``k`` largest-magnitude entries set to zero (ties broken by torch.topk)."""
    if k >= t.numel():
        return t.clone()
    flat = t.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(k, sorted=False).indices
        out[idx] = flat[idx]
    return out.reshape(t.shape)


class Prune(Defense):
    """Per-layer top-k magnitude pruning: only the largest entries of every tensor are shared.

    Paper: L. Zhu, Z. Liu, S. Han, "Deep Leakage from Gradients", NeurIPS 2019, §5 (gradient
    pruning; in the form of the GIAS scripts, Jeon et al. 2021). <https://arxiv.org/abs/1906.08935>

    Acts on: the update after the client computed it: in every tensor all but the
    ``⌊(1 − fraction)·numel⌋`` largest-magnitude entries are set to zero. The server is told
    the kept coordinates (``update.masks``, when ``fraction > 0``) and ``prune_fraction``,
    ``kept_fraction`` in ``meta``.

    Arguments:
        fraction (float, 0.0): fraction r of each tensor's entries set to zero; the strength, larger is stronger.

    Example::

        [[defenses]]
        name = "prune"
        fraction = [0.5, 0.9, 0.99]
    """

    name = "prune"
    default_sweep = (0.5, 0.8, 0.9, 0.95, 0.99)

    @dataclass(frozen=True)
    class Params:
        fraction: float = param(0.0, "fraction r of each tensor's entries set to zero (the smallest |entries|); "
                                 "keeps ⌊(1 − r)·numel⌋ per tensor", strength="up")

        def __post_init__(self) -> None:
            if not (0.0 <= self.fraction < 1.0):
                raise ValueError(f"fraction (the pruned fraction r) must be in [0, 1), got {self.fraction}")

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        r = self.params.fraction
        pruned = [top_k(t, kept_count(t.numel(), r)) for t in update.tensors]
        kept = sum(kept_count(t.numel(), r) for t in update.tensors)
        total = sum(t.numel() for t in update.tensors)
        # the kept coordinates, declared for masked matching; fraction 0 drops nothing
        masks = [(t != 0).to(t.dtype) for t in pruned] if r > 0 else None
        return update.replace(pruned, masks=masks, prune_fraction=r, kept_fraction=kept / max(1, total))
