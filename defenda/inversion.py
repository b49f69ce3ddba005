"""Shared tools for optimisation-based gradient inversion (Geiping, GIAS, GIML).

One implementation of each piece, so that attacks differ only in what they
optimise (pixels, latents, generator weights):

* :func:`gradient_matching_loss` — 1 − global cosine over all parameter tensors
  (Geiping et al. 2020, §3 of the attack notes), optionally on the kept
  coordinates of a pruned update only (GIAS ``sim_cmpr``), or squared L2 (DLG).
* :func:`total_variation` — anisotropic TV, means of absolute differences.
* :func:`parameter_gradients` / :func:`simulate_delta` / :func:`predicted_update`
  — the update a candidate batch would produce, differentiable in the inputs
  (FedSGD gradient, or FedAvg delta by unrolling the client's SGD steps).
* :func:`functional_update` — the same as a pure ``torch.func`` function of the inputs,
  to ``vmap`` over independent candidates (restarts run as one stacked optimisation).
* :func:`recover_labels` / :func:`estimate_batch_size` — analytic label and
  batch-size inference from the last linear layer (iDLG; Wainakh et al.'s
  bias-corrected count for batches).
* :func:`infer_labels` — the batch size and labels an attack works with: granted
  knowledge first, the analytic recovery above otherwise.
* :func:`update_masks` — the kept coordinates of a pruned update, to compare only those.
* :func:`on_device` — the victim model on the attack's device (a copy only when needed).
* :func:`multistep_schedule` — MultiStepLR at 3/8, 5/8, 7/8 of the run, γ = 0.1.

Tensors are in model space; shared updates follow :class:`defenda.records.SharedUpdate`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from torch.func import functional_call

from defenda.federation.client import loss_fn

if TYPE_CHECKING:
    from defenda.records import Knowledge, SharedUpdate

Cost = Literal["cosine", "l2"]

# --------------------------------------------------------------------------- objectives


def matching_loss(
    observed: Sequence[torch.Tensor],
    *,
    masks: Sequence[torch.Tensor | None] | None = None,
    cost: Cost = "cosine",
) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """The distance to ``observed`` as a function of a candidate's tensors (see
    :func:`gradient_matching_loss`), with the observed side flattened once.

    Attacks call the returned function every iteration; precomputing the observed
    vector and its norm keeps the per-iteration cost close to a bare PyTorch loop.
    """
    if cost not in ("cosine", "l2"):
        raise ValueError(f"unknown cost {cost!r}; use 'cosine' or 'l2'")
    mask_flat = None
    if masks is not None:
        mask_flat = torch.cat([(torch.ones_like(g) if m is None else m).flatten() for g, m in zip(observed, masks)])
    g_flat = torch.cat([g.flatten() for g in observed])
    if mask_flat is not None:
        g_flat = g_flat * mask_flat
    g_norm = g_flat.norm()
    n = len(observed)

    def loss(pred_grads: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(pred_grads) != n:
            raise ValueError(f"{len(pred_grads)} predicted tensors but {n} observed")
        p_flat = torch.cat([p.flatten() for p in pred_grads])
        if mask_flat is not None:
            p_flat = p_flat * mask_flat
        if cost == "l2":
            return (p_flat - g_flat).pow(2).sum()
        return 1 - (p_flat @ g_flat) / (p_flat.norm() * g_norm).clamp_min(1e-12)

    return loss


def gradient_matching_loss(
    pred_grads: Sequence[torch.Tensor],
    observed: Sequence[torch.Tensor],
    *,
    masks: Sequence[torch.Tensor | None] | None = None,
    cost: Cost = "cosine",
) -> torch.Tensor:
    """Distance between a candidate's update and the observed one.

    ``"cosine"``: ``1 − ⟨p, g⟩ / (‖p‖·‖g‖)`` with ``p`` and ``g`` all tensors
    concatenated (one global cosine, not a per-layer mean); ``"l2"``:
    ``Σ_l ‖p_l − g_l‖²`` (DLG).

    :param pred_grads: the candidate's tensors (differentiable), one per parameter.
    :param observed: the shared tensors, same shapes.
    :param masks: optional per-tensor 0/1 masks (or None entries) multiplying both
        sides, so only kept coordinates are compared (pruned updates).
    :returns: a scalar tensor (0 for identical directions under ``"cosine"``).
    """
    if len(pred_grads) != len(observed):
        raise ValueError(f"{len(pred_grads)} predicted tensors but {len(observed)} observed")
    return matching_loss(observed, masks=masks, cost=cost)(pred_grads)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of images ``(..., H, W)``: ``mean|Δ_W x| + mean|Δ_H x|``."""
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dw + dh


def pruning_masks(observed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The kept coordinates of a pruned update: 1 where the shared value is non-zero."""
    return [(g != 0).to(g.dtype) for g in observed]


# --------------------------------------------------------------------------- candidate updates


def _params(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Parameter names and detached, grad-requiring copies (so model.grad is never touched)."""
    named = list(model.named_parameters())
    return [n for n, _ in named], [p.detach().requires_grad_(True) for _, p in named]


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def parameter_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True
) -> list[torch.Tensor]:
    """Gradient of the clients' mean cross-entropy on ``(x, y)``, one tensor per parameter.

    Differentiable with respect to ``x`` when ``create_graph`` (double backprop).
    ``y`` is ``(B,)`` class indices or ``(B, K)`` soft targets.
    """
    # autograd.grad never accumulates into .grad, so the model's own parameters can be used
    # directly (no functional_call per iteration: it costs more than the small models' math).
    params = list(model.parameters())
    return _grads(loss_fn(model(x), y), params, create_graph)


def simulate_delta(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, local_steps: int, lr: float, create_graph: bool = True,
    local_epochs: int = 0, local_batch_size: int = 0,
) -> list[torch.Tensor]:
    """FedAvg client, unrolled: ``θ_after − θ_before`` after the client's local SGD steps.

    ``local_steps`` full-batch steps, or with ``local_epochs`` E epochs over ``x`` in
    mini-batches of ``local_batch_size`` taken in the candidate's own order. The client's
    real order is unknown to the attacker, but the candidate batch is unordered: for one
    epoch assigning its first b rows to the first step loses nothing (the optimisation
    places each sample); later epochs reshuffle, which this approximation ignores.
    Mirrors :func:`defenda.federation.client.compute_update`, but differentiable in ``x``.
    """
    names, params = _params(model)
    current = list(params)
    if local_epochs > 0 and local_batch_size > 0:
        chunks = [(x[i:i + local_batch_size], y[i:i + local_batch_size]) for i in range(0, len(x), local_batch_size)]
        batches = chunks * local_epochs
    else:
        batches = [(x, y)] * max(1, local_steps)
    for bx, by in batches:
        logits = functional_call(model, dict(zip(names, current)), (bx,))
        grads = _grads(loss_fn(logits, by), current, create_graph)
        current = [p - lr * g for p, g in zip(current, grads)]
    return [c - p for c, p in zip(current, params)]


def predicted_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    update: SharedUpdate,
    *,
    lr: float | None = None,
    create_graph: bool = True,
) -> list[torch.Tensor]:
    """What the client would share for the candidate ``(x, y)``, in the form of ``update``.

    A gradient for ``kind == "gradient"``; for ``"delta"``, the unrolled FedAvg delta
    with the update's local steps (or epochs of mini-batches) at ``lr`` (default 0.1; attacks pass
    the granted ``knowledge.lr``, never ``update.lr``, which :func:`defenda.grants.visible_update`
    withholds without the ``lr`` grant). One local step is matched as a negated gradient (same cosine, cheaper).
    """
    if update.kind == "gradient":
        return parameter_gradients(model, x, y, create_graph)
    if update.kind != "delta":
        raise ValueError(f"unknown update kind {update.kind!r}")
    step = lr if lr is not None else 0.1
    if update.local_steps <= 1:
        return [-step * g for g in parameter_gradients(model, x, y, create_graph)]
    return simulate_delta(model, x, y, local_steps=update.local_steps, lr=step, create_graph=create_graph,
                          local_epochs=update.local_epochs, local_batch_size=update.local_batch_size)


def functional_update(
    model: nn.Module,
    y: torch.Tensor,
    update: SharedUpdate,
    *,
    lr: float | None = None,
) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """:func:`predicted_update` as a pure function of the candidate inputs, built on
    ``torch.func`` (``grad`` + ``functional_call``), so that it can be ``vmap``-ed over
    independent candidates (Geiping's restarts as one stacked optimisation).

    The model's parameters and buffers are captured once (detached); the returned function
    maps ``x`` ``(B, ...)`` to one tensor per parameter, differentiable in ``x``. Same
    maths as :func:`predicted_update` (gradient; FedAvg delta unrolled, or one local step
    as the negated gradient), up to floating-point summation order.
    """
    from torch.func import grad

    if update.kind not in ("gradient", "delta"):
        raise ValueError(f"unknown update kind {update.kind!r}")
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for _, p in model.named_parameters())
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    step = lr if lr is not None else 0.1

    def batch_loss(ps: tuple[torch.Tensor, ...], bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, {**dict(zip(names, ps)), **buffers}, (bx,)), by)

    grad_fn = grad(batch_loss)

    def fn(x: torch.Tensor) -> list[torch.Tensor]:
        if update.kind == "gradient":
            return list(grad_fn(params, x, y))
        if update.local_steps <= 1:
            return [-step * g for g in grad_fn(params, x, y)]
        if update.local_epochs > 0 and update.local_batch_size > 0:
            b = update.local_batch_size
            batches = [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)] * update.local_epochs
        else:
            batches = [(x, y)] * update.local_steps
        current = params
        for bx, by in batches:
            current = tuple(c - step * g for c, g in zip(current, grad_fn(current, bx, by)))
        return [c - p for c, p in zip(current, params)]

    return fn


# --------------------------------------------------------------------------- labels and batch size


def last_linear(update: SharedUpdate, model: nn.Module | None = None, num_classes: int | None = None) -> tuple[
    torch.Tensor, torch.Tensor | None
]:
    """The last ``nn.Linear``'s (weight, bias) entries of ``update``, as *gradient-like* tensors.

    Found by name from ``model``'s modules when given; otherwise the last 2-D
    ``*.weight`` tensor with ``num_classes`` rows. A FedAvg delta is negated
    (``Δ ≈ −lr·Σ∇``) so that signs read as for a gradient.
    """
    named = update.named()
    weight_name = None
    if model is not None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            prefix = linears[-1] + "." if linears[-1] else ""
            weight_name = prefix + "weight"
    if weight_name is None or weight_name not in named:
        cands = [n for n in update.names if n.endswith("weight") and named[n].dim() == 2]
        if num_classes is not None:
            cands = [n for n in cands if named[n].shape[0] == num_classes] or cands
        if not cands:
            raise ValueError("the update has no 2-D weight tensor; cannot locate the last linear layer")
        weight_name = cands[-1]
    bias_name = weight_name[: -len("weight")] + "bias"
    sign = -1.0 if update.kind == "delta" else 1.0
    weight = sign * named[weight_name].detach()
    bias = sign * named[bias_name].detach() if bias_name in named else None
    return weight, bias


def estimate_batch_size(update: SharedUpdate, model: nn.Module | None = None, num_classes: int | None = None) -> int:
    """An estimate B̂ ≥ 1 of the batch size from the last-layer bias gradient.

    For the mean cross-entropy the bias gradient of class c is ``p̄_c − n_c/B``
    (``p̄_c`` the batch-mean softmax output): negative, in practice, exactly for
    the classes present. The count of negative entries (the number of distinct
    labels, a lower bound on B) is refined when the entries are consistent with
    a near-uniform ``p̄`` (a fresh model): with ``p̄`` estimated by the mean of the
    non-negative entries, ``q_c = p̄ − g_c ∝ n_c``, and ``B̂ = round(Σq / min q)``
    (exact when some label occurs once) is accepted only if every ``q_c·B̂/Σq`` is
    within 0.25 of an integer. Scale-free, so it also reads FedAvg deltas. Without
    a bias, only the count of negative weight-gradient row sums is used.
    """
    weight, bias = last_linear(update, model, num_classes)
    signal = (bias if bias is not None else weight.sum(dim=1)).double()
    neg = signal < 0
    count = max(1, int(neg.sum()))
    if bias is None or not neg.any() or neg.all():
        return count
    q = signal[~neg].mean() - signal[neg]
    if float(q.min()) <= 0:
        return count
    est = round(float(q.sum() / q.min()))
    counts = q * est / q.sum()
    if est >= count and float((counts - counts.round()).abs().max()) <= 0.25:
        return est
    return count


def recover_labels(
    update: SharedUpdate, model: nn.Module | None, batch_size: int, num_classes: int | None = None
) -> torch.Tensor:
    """Labels of the batch, inferred from the last linear layer's gradient (sorted, ``(B,)`` long).

    * ``B = 1``: iDLG (Zhao et al. 2020): ``argmin_c Σ_k ∂L/∂W[c, k]``; exact for
      non-negative (post-ReLU) features.
    * ``B > 1``: bias-corrected counting (Wainakh et al. 2022, breaching's
      ``bias-corrected``): every class with a negative bias gradient first, then the
      remaining slots by repeated argmin after adding back the estimated per-sample
      impact ``m = Σ_{negative} ∂L/∂b / B`` to the chosen class. Without a bias, the
      weight row sums play the bias' role (breaching's ``wainakh-simple``).
    """
    weight, bias = last_linear(update, model, num_classes)
    rows = weight.sum(dim=1)
    if batch_size <= 1:
        return rows.argmin().reshape(1).cpu()
    signal = (bias if bias is not None else rows).clone().double()
    present = [c for c in signal.argsort().tolist() if signal[c] < 0][:batch_size]
    impact = signal[present].sum() / batch_size if present else torch.zeros((), dtype=signal.dtype)
    if impact >= 0:  # no class looks present (heavy noise): spread the slots over the lowest classes
        impact = -signal.abs().max().clamp_min(1e-12)
    labels = list(present)
    signal[present] -= impact
    while len(labels) < batch_size:
        c = int(signal.argmin())
        labels.append(c)
        signal[c] -= impact
    return torch.tensor(sorted(labels), dtype=torch.long)


def infer_labels(update: SharedUpdate, model: nn.Module, knowledge: Knowledge) -> tuple[int, torch.Tensor, bool]:
    """``(B̂, labels, known)``: granted labels first, then the granted batch size or its
    estimate with analytic label recovery (:func:`recover_labels`)."""
    if knowledge.labels is not None:
        labels = torch.as_tensor(knowledge.labels).long().flatten()
        return len(labels), labels, True
    if knowledge.batch_size is not None:
        batch_size = int(knowledge.batch_size)
    else:
        batch_size = estimate_batch_size(update, model, knowledge.num_classes)
    return batch_size, recover_labels(update, model, batch_size, knowledge.num_classes), False


def update_masks(mode: str, update: SharedUpdate,
                 observed: Sequence[torch.Tensor]) -> list[torch.Tensor | None] | None:
    """The masks for masked matching, on the device and dtype of ``observed`` (the tensors the
    attack matches), or None to compare every coordinate.

    ``"auto"``: the coordinates the defense declared kept (:attr:`SharedUpdate.masks`,
    set by pruning and Soteria); ``"always"``: those, else the observed non-zero
    coordinates; ``"never"``: None.
    """
    if mode == "never":
        return None
    if mode == "always" and update.masks is None:
        return list(pruning_masks(observed))
    if update.masks is None:
        return None
    return [None if m is None else m.to(g) for m, g in zip(update.masks, observed)]


def on_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a copy moved there."""
    first = next(model.parameters(), None)
    device = torch.device(device)
    if first is None or (first.device.type == device.type and device.index in (None, first.device.index)):
        return model
    return copy.deepcopy(model).to(device)


# --------------------------------------------------------------------------- optimisation


def multistep_schedule(
    optimizer: torch.optim.Optimizer, iterations: int, gamma: float = 0.1
) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR with milestones ⌊3N/8⌋, ⌊5N/8⌋, ⌊7N/8⌋ (Geiping et al.); step it once per iteration."""
    milestones = sorted({max(1, (k * iterations) // 8) for k in (3, 5, 7)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def clamp_box(x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Project ``x`` (in place, no grad) into the model-space box ``(lo, hi)``; no-op for None."""
    if box is None:
        return
    lo, hi = box
    with torch.no_grad():
        x.copy_(torch.maximum(torch.minimum(x, hi.to(x)), lo.to(x)))
