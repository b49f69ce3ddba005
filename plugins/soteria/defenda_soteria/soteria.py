"""``soteria``: prune the gradient of the representation layer (Sun et al., CVPR 2021).

J. Sun, A. Li, B. Wang, H. Yang, H. Li, Y. Chen, "Soteria: Provable Defense
against Privacy Leakage in Federated Learning from Representation Perspective",
CVPR 2021, pp. 9311-9319. Reference code: https://github.com/jeremy313/Soteria.

The representation ``r = f(X)`` is the input of a fully connected layer
``z = W r + b``; the gradient the client shares for that layer is
``∂L/∂W = (∂L/∂z) rᵀ``, so the attacker sees ``r`` almost directly. Soteria
perturbs ``r`` into ``r'`` so that the input reconstructed from ``r'`` is as far
as possible from ``X`` while ``r'`` stays close to ``r``. Zeroing coordinate
``i`` moves the reconstruction by about ``|r_i| / ‖∂r_i/∂X‖``, so the paper
(and its code) prunes the coordinates with the *smallest*
``‖∂r_i/∂X‖ / |r_i|`` — the largest reconstruction change per unit of
representation change — and shares ``(∂L/∂z) r'ᵀ``: the columns of ``∂L/∂W``
for the pruned coordinates are zero. Nothing else in the update changes. The
update declares the kept columns in ``update.masks`` (the server sees the zeros
anyway), so masked matching (``geiping``'s ``masked = "auto"``) leaves them out.

Per batch, as in the reference code: ``s_i = Σ_b ‖∂r_{b,i}/∂X_b‖ / |r_{b,i}|``
and the fraction ``p`` (the strength) of coordinates with the lowest ``s_i``
is pruned. Two adaptations, both documented in the plugin's README:

* ReLU representations (defenda's models) have coordinates with ``r_{b,i} = 0``;
  the reference code (sigmoid LeNet) would divide 0 by 0. Such a sample
  contributes nothing to column ``i`` of ``∂L/∂W`` (it is ``δ_b · 0``) and is left
  out of ``s_i``; a coordinate that is zero for the whole batch carries no
  gradient at all and is not counted among the coordinates ``p`` applies to.
* FedAvg (``kind = "delta"``): the mask is computed on the shared model before
  the local steps and applied to the columns of the layer's weight delta.

The representation layer is the first ``nn.Linear`` whose input is not the
model's own (flattened) input — for defenda's ``SmallCNN`` the first classifier
layer, fed by the conv features; for an ``MLP`` the second layer; for
``ResNet18`` the final ``fc`` — or the module named by ``layer``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defenda import Defense, RoundSettings, SharedUpdate, param
from defenda.federation.client import compute_update


def find_representation_layer(model: nn.Module, x: torch.Tensor, layer: str = "") -> str:
    """The name of the ``nn.Linear`` module whose input is the defended representation.

    :param layer: a module name (``dict(model.named_modules())`` key); empty: the first
        ``nn.Linear`` whose input is not the model's flattened input.
    :raises ValueError: when ``layer`` is not a linear module of ``model``, or none qualifies.
    """
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    if layer:
        if not isinstance(modules.get(layer), nn.Linear):
            raise ValueError(f"soteria: layer {layer!r} is not an nn.Linear of the model; "
                             f"linear layers: {linears or '(none)'}")
        return layer
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            seen.setdefault(name, inputs[0].detach())  # a forward hook must return None
        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in linears]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    flat = x.detach().reshape(len(x), -1)
    for name in linears:
        inp = seen.get(name)
        if inp is None:
            continue
        inp = inp.reshape(len(x), -1)
        if not (inp.shape == flat.shape and torch.equal(inp, flat)):
            return name
    raise ValueError("soteria: the model has no fully connected layer fed by a learned representation; "
                     f"name one with layer = '…' (linear layers: {linears or '(none)'})")


def representation_and_sensitivity(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``r`` ``(B, D)`` at the input of ``layer`` and ``‖∂r_{b,i}/∂X_b‖`` ``(B, D)``.

    Samples are independent in most models (no BatchNorm in training mode), so the
    per-sample Jacobian ``∂r_b/∂X_b`` is computed with ``torch.func`` (forward mode
    when the input is smaller than the representation, reverse mode otherwise),
    vectorised over the batch. Otherwise (BatchNorm statistics couple the samples,
    or an op has no batching rule) it falls back to the reference code's loop: one
    backward pass of ``Σ_b r_{b,i}`` per coordinate ``i``. Neither touches the
    parameters' ``.grad``, buffers or hooks of ``model``.
    """
    module = dict(model.named_modules())[layer]
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        captured.append(inputs[0])

    handle = module.register_forward_hook(hook)
    try:
        coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        if not coupled:
            try:
                return _per_sample(model, x, captured)
            except RuntimeError:  # e.g. dropout, or an op without a batching rule under vmap
                captured.clear()
        return _coupled(model, x, captured)
    finally:
        handle.remove()


def _per_sample(model: nn.Module, x: torch.Tensor, captured: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.func import jacfwd, jacrev, vmap

    def rep(xb: torch.Tensor) -> torch.Tensor:
        captured.clear()
        model(xb.unsqueeze(0))
        return captured[-1].reshape(-1)

    with torch.no_grad():
        captured.clear()
        model(x)
        r = captured[-1].reshape(len(x), -1).detach()
    jac_fn = jacfwd(rep) if x[0].numel() <= r.shape[1] else jacrev(rep)
    with torch.no_grad(), warnings.catch_warnings():  # torch.func still differentiates; no graph to the weights
        # torch's forward-mode rules call torch.jit.script internally, which warns about its own deprecation
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        jac = vmap(jac_fn)(x.detach())  # (B, D, *sample_shape)
    return r, jac.reshape(len(x), r.shape[1], -1).norm(dim=2).detach()


def _coupled(model: nn.Module, x: torch.Tensor, captured: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x_ = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        model(x_)
    r = captured[-1].reshape(len(x), -1)
    norms = torch.empty_like(r, requires_grad=False)
    for i in range(r.shape[1]):
        (g,) = torch.autograd.grad(r[:, i].sum(), x_, retain_graph=True)
        norms[:, i] = g.reshape(len(x), -1).norm(dim=1)
    return r.detach(), norms.detach()


def soteria_mask(r: torch.Tensor, sensitivity: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int, int]:
    """The keep-mask ``(D,)`` over representation coordinates, the number pruned and the number active.

    ``s_i = Σ_b ‖∂r_{b,i}/∂X_b‖ / |r_{b,i}|`` over the samples with ``r_{b,i} ≠ 0``;
    of the active coordinates (non-zero for some sample), the ``⌊p·n⌋`` with the
    lowest ``s_i`` are pruned (ties: lower index first).
    """
    active_b = r != 0
    ratio = torch.where(active_b, sensitivity / r.abs().clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(r))
    score = ratio.sum(0)
    active = active_b.any(0)
    n_active = int(active.sum())
    n_pruned = min(n_active, math.floor(round(fraction * n_active, 6)))
    mask = torch.ones(r.shape[1], dtype=r.dtype, device=r.device)
    if n_pruned:
        ranked = torch.where(active, score, torch.full_like(score, math.inf))
        order = torch.sort(ranked, stable=True).indices
        mask[order[:n_pruned]] = 0.0
    return mask, n_pruned, n_active


class Soteria(Defense):
    """Soteria: prune the representation layer's gradient where the reconstruction moves most.

    Paper: J. Sun, A. Li, B. Wang, H. Yang, H. Li, Y. Chen, "Soteria: Provable Defense against Privacy
    Leakage in Federated Learning from Representation Perspective", CVPR 2021.
    <https://doi.org/10.1109/CVPR46437.2021.00919>

    Acts on: how the client computes its update (client-side): of the representation layer's
    weight gradient (or FedAvg delta), the columns of the ``fraction`` of representation
    coordinates with the smallest ``‖∂r_i/∂X‖ / |r_i|`` are zeroed; every other tensor is the
    honest one. The server is told the kept coordinates of that tensor (``update.masks``; None
    for the others) and ``soteria_fraction``, ``soteria_layer``, ``soteria_zeroed``,
    ``soteria_active`` in ``meta``.

    Arguments:
        fraction (float, 0.4): fraction p of the representation's active coordinates pruned; the strength,
            larger is stronger.
        layer (str, ""): the ``nn.Linear`` whose input is the representation (empty: the first one not fed
            by the raw input).

    Example::

        [[defenses]]
        name = "soteria"
        fraction = [0.2, 0.4, 0.6, 0.8]
    """

    name = "soteria"
    default_sweep = (0.2, 0.4, 0.6, 0.8)

    @dataclass(frozen=True)
    class Params:
        fraction: float = param(0.4, "fraction p of the representation's (active) coordinates whose "
                                "weight-gradient columns are zeroed, those with the smallest "
                                "‖∂r_i/∂X‖/|r_i| (the paper's pruning rate)", strength="up")
        layer: str = param("", "the nn.Linear whose input is the representation "
                           "(empty: the first one not fed by the raw input)")

        def __post_init__(self) -> None:
            if not (0.0 <= self.fraction <= 1.0):
                raise ValueError(f"fraction (the pruning rate p) must be in [0, 1], got {self.fraction}")

    def client_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RoundSettings,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        # The analysis passes must not count as client training: BatchNorm running
        # statistics are restored, so only the honest update below touches them.
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            layer = find_representation_layer(model, x, self.params.layer)
            r, sens = representation_and_sensitivity(model, x, layer)
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        mask, pruned, active = soteria_mask(r, sens, self.params.fraction)
        update = compute_update(model, x, y, settings)
        weight = f"{layer}.weight" if layer else "weight"
        tensors = list(update.tensors)
        i = update.names.index(weight)
        tensors[i] = tensors[i] * mask.to(tensors[i])
        masks: list[torch.Tensor | None] | None = None  # declared only when a column was dropped
        if pruned:
            masks = [None] * len(tensors)
            masks[i] = mask.to(tensors[i]).expand_as(tensors[i]).clone()  # kept columns of ∂L/∂W
        meta: dict[str, Any] = {"soteria_fraction": self.params.fraction, "soteria_layer": layer,
                                "soteria_zeroed": pruned, "soteria_active": active}
        return update.replace(tensors, masks=masks, **meta)
