"""Inverting recovered features to images: SPEAR's CNN route, second half.

SPEAR recovers the input ``f`` of a CNN's first Linear → ReLU layer exactly (the flattened
conv features); the images are then found by optimisation, as in Geiping et al.'s Inverting
Gradients but on a feature-matching objective, which decouples the batch into B independent
problems (every sample has its own target):

    min_x  Σ_i ‖φ(x_i) − f_i‖² / ‖f_i‖²  +  λ_TV · TV(x_i)        subject to  x_i ∈ box,

with ``φ`` the model up to the layer (a forward pre-hook stops the forward pass there), Adam
with a cosine-decayed learning rate, a start at the data mean (zero in model space), projection onto the box after every step and the best iterate
(lowest feature loss) kept per sample. The features of a 32×32 ConvNet after two 3×3
max-pools have fewer entries than the image (576 vs 3072 at width 16), so the problem is
under-determined and the total-variation prior picks the smooth solution.

The optimisation runs in float32 on a copy of the model when the model is float64 (the
features are matched to ~1e-6 either way; float32 is about twice as fast on a CPU).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class FeatureInversionConfig:
    """Settings of :func:`invert_features` (the attack's ``feature_inversion_*`` parameters)."""

    steps: int = 600
    lr: float = 0.05
    tv: float = 1e-3
    restarts: int = 1


class _Stop(Exception):
    """Raised by the pre-hook: the rest of the forward pass is not needed."""


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Per-sample anisotropic total variation (mean absolute difference of neighbours)."""
    if x.ndim < 4:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dh + dw


def invert_features(model: nn.Module, layer_name: str, target: torch.Tensor, input_shape: tuple[int, ...],
                    box: tuple[torch.Tensor, torch.Tensor] | None, seed: int,
                    cfg: FeatureInversionConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Images (B, *input_shape) whose input to ``model.<layer_name>`` matches ``target`` (B, n).

    Returns the images in the model's dtype and device, and diagnostics: the final mean relative
    feature error ``feature_inversion_loss`` and per sample ``feature_inversion_cosine`` (cosine
    similarity between the features of the returned images and ``target``).
    """
    p0 = next(model.parameters())
    device, out_dtype = p0.device, p0.dtype
    work = model
    if out_dtype == torch.float64:
        work = copy.deepcopy(model).float()
    work.eval()
    dtype = next(work.parameters()).dtype
    lin = work.get_submodule(layer_name)
    B = target.shape[0]
    tgt = target.detach().to(device=device, dtype=dtype).reshape(B, -1)
    norm = tgt.pow(2).sum(dim=1).clamp_min(1e-12)
    lo = hi = None
    centre = torch.zeros(B, *input_shape, device=device, dtype=dtype)  # model space: the data mean
    if box is not None:
        lo, hi = (t.to(device=device, dtype=dtype) for t in box)
        centre = torch.maximum(torch.minimum(centre, hi), lo)
    captured: dict[str, torch.Tensor] = {}

    def hook(mod: Any, inp: Any) -> None:
        captured["f"] = inp[0]
        raise _Stop

    def feats(x: torch.Tensor) -> torch.Tensor:
        try:
            work(x)
        except _Stop:
            pass
        return captured["f"].reshape(x.shape[0], -1)

    h = lin.register_forward_pre_hook(hook)
    best_x = centre.clone()
    best_loss = torch.full((B,), math.inf, device=device, dtype=dtype)
    try:
        for r in range(max(1, cfg.restarts)):
            gen = torch.Generator().manual_seed(seed * 1000 + r)
            noise = torch.randn(B, *input_shape, generator=gen).to(device=device, dtype=dtype)
            scale = (hi - lo) if lo is not None and hi is not None else torch.ones((), device=device, dtype=dtype)
            x = centre + 0.05 * scale * noise
            if lo is not None and hi is not None:
                x = torch.maximum(torch.minimum(x, hi), lo)
            x.requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
            for _ in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                fl = (feats(x) - tgt).pow(2).sum(dim=1) / norm
                loss = (fl + cfg.tv * _tv(x)).sum()
                (x.grad,) = torch.autograd.grad(loss, [x])  # leaves the model's .grad untouched
                with torch.no_grad():
                    better = fl.detach() < best_loss
                    if bool(better.any()):
                        best_loss = torch.where(better, fl.detach(), best_loss)
                        best_x[better] = x.detach()[better]
                opt.step()
                sched.step()
                if lo is not None and hi is not None:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            with torch.no_grad():  # the last iterate (after the final step)
                fl = (feats(x) - tgt).pow(2).sum(dim=1) / norm
                better = fl < best_loss
                best_loss = torch.where(better, fl, best_loss)
                best_x[better] = x.detach()[better]
        with torch.no_grad():
            f = feats(best_x)
            cos = torch.nn.functional.cosine_similarity(f.double(), tgt.double(), dim=1)
    finally:
        h.remove()
    info = {"feature_inversion_loss": float(best_loss.double().mean()),
            "feature_inversion_cosine": [float(c) for c in cos]}
    return best_x.detach().to(dtype=out_dtype), info
