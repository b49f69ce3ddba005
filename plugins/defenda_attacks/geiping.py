"""Inverting Gradients (Geiping et al., NeurIPS 2020): cosine gradient matching in pixel space.

Minimises ``1 − cos(∇θ L(x̂, ŷ), g) + tv·TV(x̂)`` over ``x̂`` of shape
``(B̂, *input_shape)`` in model space, the cosine taken over all parameter
tensors concatenated. ``x̂`` starts from ``randn``; Adam(``lr``) is fed the
*sign* of the gradient (``signed``), the learning rate drops ×0.1 at 3/8, 5/8
and 7/8 of ``iterations``, and after every step ``x̂`` is clamped to the
image box (``boxed``; images only, no box for tabular data, where TV is also
skipped). The model is used in eval mode with double backprop. Of
``restarts`` runs, the one with the lowest final objective is returned; with
more than one, the restarts run as one stacked optimisation (``torch.func``:
``vmap`` over the per-restart objective's gradient), so one forward and double
backward per iteration serve all of them.

* Update: ``kind == "gradient"`` (FedSGD) or ``"delta"`` (FedAvg; the client's
  ``local_steps`` SGD steps are unrolled with its learning rate: ``local_lr``,
  else ``knowledge.lr`` when granted, else 0.1; never the update's own ``lr``).
* Labels ``ŷ`` (``(B̂,)``): ``knowledge.labels`` when granted, else recovered
  analytically (iDLG for B̂ = 1, bias-corrected counting for B̂ > 1).
* Batch size B̂: ``knowledge.batch_size`` (or the number of known labels) when
  granted, else the number of negative entries of the last-layer bias
  gradient, at least 1 — i.e. the number of distinct labels, a lower bound.
* Masked matching: with ``masked = "auto"`` the cosine is taken on the
  coordinates the defense declared kept (``update.masks``: pruning, Soteria)
  only; ``"always"`` also masks an undeclared update to its non-zero
  coordinates; ``"never"`` compares every coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defenda import Attack, Knowledge, Reconstruction, Requirements, SharedUpdate, param
from defenda.inversion import (
    clamp_box,
    functional_update,
    infer_labels,
    matching_loss,
    multistep_schedule,
    on_device,
    predicted_update,
    total_variation,
    update_masks,
)

#: Geiping's step count for ``iterations = 0``: (most values per sample, steps), first match wins.
#: Measured on fresh victims at batch 1 (README): 400 steps reach 70 dB on 8×8 digits (small CNN);
#: on 32×32 RGB crops (small CNN) 400 / 1,200 / 2,000 steps give 25.4 / 31.9 / 34.3 dB median.
AUTO_ITERATIONS: tuple[tuple[float, int], ...] = ((1024, 400), (math.inf, 2000))


def auto_iterations(iterations: int, input_shape: tuple[int, ...]) -> int:
    """``iterations`` if positive, else the :data:`AUTO_ITERATIONS` count for inputs of ``input_shape``."""
    if iterations > 0:
        return iterations
    values = math.prod(input_shape)
    return next(steps for most, steps in AUTO_ITERATIONS if values <= most)


class Geiping(Attack):
    """Inverting Gradients: optimise inputs so that their update has the observed direction.

    Paper: J. Geiping, H. Bauermeister, H. Dröge, M. Moeller, "Inverting Gradients — How easy is it
    to break privacy in federated learning?", NeurIPS 2020. <https://arxiv.org/abs/2003.14053>

    Threat model: honest-but-curious server; FedSGD gradients and FedAvg deltas; needs no
    knowledge, uses ``labels``, ``batch_size`` and ``lr`` when granted; any differentiable
    model (image and tabular tasks; the TV prior and the box apply to images only).

    Arguments:
        iterations (int, 0): optimisation steps per restart; 0 picks them from the input's size
            (:data:`AUTO_ITERATIONS`: 400 up to 1,024 values per sample, e.g. 8×8 digits or 25×25
            faces; 2,000 above, e.g. 32×32 RGB crops).
        lr (float, 0.1): Adam step size on the inputs (model space).
        tv (float, 1e-4): weight of the anisotropic total-variation prior (images only).
        restarts (int, 1): independent random initialisations; the lowest final objective wins.
        signed (bool, True): feed Adam the sign of the gradient.
        boxed (bool, True): clamp the inputs to the valid image box after every step.
        init (str, "randn"): initialisation of the inputs: ``randn``, ``rand`` or ``zeros``.
        cost (str, "cosine"): gradient distance: global ``cosine`` or squared ``l2`` (DLG).
        masked (str, "auto"): compare only the kept coordinates: ``auto`` (``update.masks``),
            ``always`` (those, else the non-zero ones) or ``never``.
        local_lr (float | None, None): the client's learning rate for FedAvg deltas
            (None: ``knowledge.lr`` when granted, else 0.1).

    Shapes:
        update: one tensor per ``model.named_parameters()`` entry.
        Reconstruction.inputs: ``(B̂, *input_shape)`` in model space.
        Reconstruction.labels: ``(B̂,)`` class indices.
        info: ``loss``, ``iterations`` (the steps run), ``restarts``, ``batch_size``, ``labels_known``,
        ``masked``.

    Example::

        [[attacks]]
        name = "geiping"
        iterations = 400
        masked = ["never", "always"]
    """

    name = "geiping"
    requires = Requirements(updates=frozenset({"gradient", "delta"}))

    @dataclass(frozen=True)
    class Params:
        iterations: int = param(
            0, "optimisation steps per restart (0: by input size, 400 up to 1,024 values per sample, "
               "2,000 above; paper: 4,800-24,000 on CIFAR)"
        )
        lr: float = param(0.1, "Adam step size on the inputs (model space)")
        tv: float = param(1e-4, "weight of the anisotropic total-variation prior (images only)")
        restarts: int = param(1, "independent random initialisations; the lowest final objective wins")
        signed: bool = param(True, "feed Adam the sign of the gradient (the paper's default)")
        boxed: bool = param(True, "clamp inputs to the valid image box after every step (images only)")
        init: str = param("randn", "initialisation of the inputs", choices=("randn", "rand", "zeros"))
        cost: str = param("cosine", "gradient distance: global cosine (paper) or squared L2 (DLG)",
                          choices=("cosine", "l2"))
        masked: str = param("auto", "compare only the coordinates the defense kept (update.masks); "
                            "always: those, else the non-zero ones; never: all", choices=("auto", "always", "never"))
        local_lr: float | None = param(
            None, "client learning rate for FedAvg deltas (None: knowledge.lr when granted, else 0.1)"
        )

        def __post_init__(self) -> None:
            if self.iterations < 0:
                raise ValueError(f"iterations must be >= 0 (0 picks them from the input size), got {self.iterations}")

    def reconstruct(self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge) -> Reconstruction:
        device = knowledge.device
        model = on_device(model, device)
        was_training = model.training
        model.eval()
        try:
            return self._reconstruct(update, model, knowledge, device)
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ steps

    def _reconstruct(
        self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge, device: torch.device
    ) -> Reconstruction:
        p = self.params
        dtype = next(model.parameters()).dtype
        observed = [t.detach().to(device=device, dtype=dtype) for t in update.tensors]
        batch_size, labels, known = infer_labels(update, model, knowledge)
        labels = labels.to(device)
        masks = update_masks(p.masked, update, observed)
        image = knowledge.task_kind == "image" and len(knowledge.input_shape) == 3
        box = knowledge.box if (p.boxed and image) else None
        lr = p.local_lr or knowledge.lr or None

        distance = matching_loss(observed, masks=masks, cost=p.cost)

        def objective(x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
            loss = distance(predicted_update(model, x, labels, update, lr=lr, create_graph=create_graph))
            if image and p.tv > 0:
                loss = loss + p.tv * total_variation(x)
            return loss

        shape = (batch_size, *knowledge.input_shape)
        restarts = max(1, p.restarts)
        steps = auto_iterations(p.iterations, knowledge.input_shape)
        # the restarts' starts, drawn one after the other from the global RNG (as sequential runs would)
        starts = [self._init(shape, box).to(device=device, dtype=dtype) for _ in range(restarts)]
        if restarts == 1:
            best_x = self._optimise(objective, starts[0], box, steps)
            best_loss = float(objective(best_x, create_graph=False).detach())
        else:
            per_restart = self._stacked_objective(model, labels, update, distance, lr, image)
            xs = self._optimise_stacked(per_restart, torch.stack(starts), box, steps)
            finals = torch.stack([objective(x, create_graph=False).detach() for x in xs])
            k = int(torch.argmin(finals))  # first of the lowest, as the sequential loop chose
            best_x, best_loss = xs[k], float(finals[k])
        info: dict[str, Any] = {
            "loss": best_loss,
            "iterations": steps,
            "restarts": restarts,
            "batch_size": batch_size,
            "labels_known": known,
            "masked": masks is not None,
        }
        return Reconstruction(inputs=best_x.cpu(), labels=labels.cpu(), info=info)

    def _optimise(self, objective: Any, x0: torch.Tensor, box: Any, steps: int) -> torch.Tensor:
        p = self.params
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.lr)
        sched = multistep_schedule(opt, steps)
        for _ in range(steps):
            (grad,) = torch.autograd.grad(objective(x), x)
            x.grad = grad.sign() if p.signed else grad
            opt.step()
            sched.step()
            clamp_box(x, box)
        return x.detach()

    def _stacked_objective(self, model: nn.Module, labels: torch.Tensor, update: SharedUpdate, distance: Any,
                           lr: float | None, image: bool) -> Any:
        """The objective of one restart as a pure function of its inputs (``torch.func``), to vmap."""
        tv = self.params.tv
        predict = functional_update(model, labels, update, lr=lr)

        def objective(x: torch.Tensor) -> torch.Tensor:
            loss = distance(predict(x))
            if image and tv > 0:
                loss = loss + tv * total_variation(x)
            return loss

        return objective

    def _optimise_stacked(self, objective: Any, x0: torch.Tensor, box: Any, steps: int) -> torch.Tensor:
        """All restarts ``(R, B̂, ...)`` as one optimisation: one vmapped forward/double backward per
        iteration, the restarts' gradients computed independently (``vmap(grad(objective))``). Adam,
        the sign, the schedule and the box act element-wise, so each restart follows its own run."""
        from torch.func import grad, vmap

        p = self.params
        step = vmap(grad(objective))
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.lr)
        sched = multistep_schedule(opt, steps)
        for _ in range(steps):
            grad_x = step(x.detach())
            x.grad = grad_x.sign() if p.signed else grad_x
            opt.step()
            sched.step()
            clamp_box(x, box)
        return x.detach()

    def _init(self, shape: tuple[int, ...], box: Any) -> torch.Tensor:
        """Initial inputs from the global RNG (on CPU, so seeds give the same start on any device)."""
        if self.params.init == "zeros":
            return torch.zeros(shape)
        if self.params.init == "rand" and box is not None:
            lo, hi = (b.cpu() for b in box)
            return lo + torch.rand(shape) * (hi - lo)
        if self.params.init == "rand":
            return torch.rand(shape) * 2 - 1
        return torch.randn(shape)
