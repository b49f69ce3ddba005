"""SPEAR: exact batch recovery from the gradient of a Linear→ReLU layer.

Dimitrov, Baader, Müller, Vechev, "SPEAR: Exact Gradient Inversion of Batches
in Federated Learning", NeurIPS 2024.

The algebra lives in :mod:`defenda_attacks._spear_core` (plain tensor
functions, usable without the plugin system); this module finds the layer,
reads its gradients from the update, reshapes the result and, for CNNs,
inverts the recovered features back to images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from defenda import Attack, Knowledge, Reconstruction, Requirements, SharedUpdate, TaskData
from defenda_attacks._spear_core import SpearParams, SpearResult, spear_recover
from defenda_attacks._spear_dl import class_sign_patterns

if TYPE_CHECKING:
    from torch import nn


@dataclass
class _Layer:
    name: str
    module: Any  # nn.Linear
    is_first: bool  # its input is the flattened model input
    head: Any = None  # nn.Linear right after the ReLU when it is the model's last module (the logits)


def find_linear_relu(model: nn.Module, input_shape: tuple[int, ...], name: str = "") -> _Layer | None:
    """The first ``nn.Linear`` whose output feeds an ``nn.ReLU`` (or the one called ``name``).

    Leaf modules are scanned in registration order; a one-sample forward pass with
    hooks confirms that the ReLU consumes exactly the Linear's output and tells
    whether the Linear consumes the flattened model input.
    """
    from torch import nn

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    pairs = []
    heads: dict[str, Any] = {}
    for i, (n, m) in enumerate(leaves):
        if isinstance(m, nn.Linear) and (not name or n == name):
            nxt = leaves[i + 1][1] if i + 1 < len(leaves) else None
            pairs.append((n, m, nxt if isinstance(nxt, nn.ReLU) else None))
            if i + 2 == len(leaves) - 1 and isinstance(leaves[i + 2][1], nn.Linear):
                heads[n] = leaves[i + 2][1]
    if not pairs:
        return None
    try:
        p = next(model.parameters())
        dtype, device = p.dtype, p.device
    except StopIteration:
        dtype, device = torch.float32, torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape, generator=gen).to(dtype=dtype, device=device)
    seen: dict[str, Any] = {}
    handles = []
    for n, lin, relu in pairs:
        handles.append(lin.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out))))
        if relu is not None:
            handles.append(relu.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n + "#relu", inp[0])))
    try:
        with torch.no_grad():
            model(x)
        traced = True
    except Exception:  # noqa: BLE001 - an unusual forward: fall back to the module order alone
        traced = False
    finally:
        for h in handles:
            h.remove()
    for n, lin, relu in pairs:
        if relu is None:
            continue
        if not traced:
            return _Layer(n, lin, False)
        if n not in seen or (n + "#relu") not in seen or seen[n + "#relu"] is not seen[n][1]:
            continue
        lin_in = seen[n][0]
        first = lin_in.shape == x.flatten(1).shape and torch.equal(lin_in, x.flatten(1))
        return _Layer(n, lin, first, heads.get(n))
    return None


class Spear(Attack):
    """SPEAR: exact batch recovery from the gradient of a Linear→ReLU layer.

    Paper: Dimitar I. Dimitrov, Maximilian Baader, Mark Niklas Müller, Martin Vechev,
    "SPEAR: Exact Gradient Inversion of Batches in Federated Learning", NeurIPS 2024.
    https://arxiv.org/abs/2403.03945

    The dictionary-learning stage follows SPEAR++ (Bakarsky, Dimitrov, Baader, Vechev,
    arXiv 2510.24200), which recasts SPEAR's search as sparsely-used dictionary learning; ours is
    an own implementation (their code is not public): with it Gaussian-input batches of
    B = 128 at width 2000 are exact. A layer that does not feed the logits directly (deeper MLPs,
    CNN features) gets plain ℓ1 (no class-sign correction). Where it does, the softmax head also
    solves the found samples' inputs while up to K − 3 columns are still missing, or more when the
    missing samples form a cluster (our own addition, ``head_completion``): photo-crop batches of
    B = 32 and 64 become exact.

    Threat model: honest-but-curious server; FedSGD gradient (or a FedAvg delta of
    one local step); knowledge: none required (the batch size is the gradient's
    numerical rank when not granted; labels are recovered); model: an
    ``nn.Linear(n, m)`` with bias followed by ``nn.ReLU``, with width m and input
    size n both larger than the batch size.

    From the layer's gradients ``∂L/∂W = G Xᵀ`` (m×n, rank B) and ``∂L/∂b = G 1``,
    with ``G = ∂L/∂Z`` sparse because of the ReLU, the attack recovers the layer
    inputs ``X`` exactly (the stages are described in
    :mod:`defenda_attacks._spear_core`). Every recovered sample is checked
    exactly; ``info["n_exact_estimate"]`` counts those that pass. When the layer
    reads the flattened input (an MLP) the inputs are the images; when it reads
    conv features (a CNN) the features are exact and inverted to images by
    optimisation (feature matching with a total-variation prior,
    :mod:`defenda_attacks._feature_inversion`); a ConvNet at initialisation with GroupNorm
    and max-pooling leaves that inversion under-determined (on ``photos`` it is no better
    than the mean image: the features are exact, the images are not). A noisy update (DP, noise defenses) has no exact structure: the
    search's approximate batch then starts a least-squares fit of the whole update (the
    maximum-likelihood batch under Gaussian noise, ``refine_iterations`` Adam steps), returned with
    ``info["approximate"] = True``.

    Arguments:
        max_proposals (int, 500_000): most (B−1)-row submatrices the sampling stage tries: the search's
            budget, counted in work so that results do not depend on the machine or its load
            (5·10⁵ take about 3–5 s on one CPU core at B = 16–24).
        time_budget_s (float, 0.0): optional wall-clock safety cap in seconds (0 = none); when set,
            results depend on machine load.
        chunk_size (int, 4096): proposals solved together in one vectorised chunk.
        rank_tol (float, 0.0): relative singular-value cut for the batch size (0: 1e-10 float64, 1e-5 float32).
        zero_tol (float, 0.0): relative size below which an entry of G counts as zero (0: by precision).
        sparsity_threshold (float, 0.0): share of alive neurons a column of G must be zero on (0: calibrated).
        false_rejection (float, 1e-9): false-rejection rate that calibrates the sparsity threshold.
        min_sparsity (float, 0.05): weakest candidate kept in the pool, as a share of alive neurons.
        peel (bool, True): peel off samples from neurons that a single remaining sample activates.
        dictionary_learning (bool, True): search the columns of G as the sparsest directions of the
            gradient's column space before sampling — the sparsely-used dictionary-learning view of
            SPEAR++ (Bakarsky, Dimitrov, Baader, Vechev, arXiv 2510.24200): ℓ1 on the sphere with a
            class-sign correction where the layer feeds the logits, Riemannian subgradient steps,
            float64 null-space rounding, every column certified (:mod:`defenda_attacks._spear_dl`).
        dl_iterations (int, 150): subgradient steps per dictionary-learning round (work budget).
        dl_rounds (int, 3): dictionary-learning rounds with fresh starting directions while columns are missing.
        dl_starts (int, 0): starting directions per round (0: 2·B′ + 32).
        dl_rho (float, 10.0): penalty on entries of the wrong class sign (class-sign correction).
        dl_min_batch (int, 16): smallest residual batch B′ the dictionary-learning stage runs on (below it
            sampling is cheap).
        head_completion (bool, True): where the attacked layer feeds a softmax head directly, solve
            the inputs of the samples whose columns were found from the head's logit ratios while up
            to K−3 columns are still missing (7 for 10 classes; the bias gradient alone: 2), or, with
            more missing, from the rows on which all missing samples share their state (a cluster of
            similar inputs); subtract them, peel and search the rest again; every such input is
            verified exactly before it is used.
        sample_max_batch (int, 32): largest residual batch B′ the sampling stage is tried on (a proposal
            succeeds with probability about B′·2^−(B′−1), so beyond it sampling only burns its budget).
        approx_max_proposals (int, 20_000): proposal budget of the search when the update is noisy
            and the direction search below finds too few directions.
        approx_rho (float, 3.0): wrong-class-sign penalty of the noisy update's direction search
            (the B sharpest minima of the sign-corrected ℓ1 objective, no rounding: nothing is exact);
            softer than ``dl_rho`` because noise blurs the signs (8×8 digits, B = 8, noise std 10⁻³:
            34.7 dB at 3, 11.5 dB at 10, before the refinement).
        approx_bound (float, 10.0): without an input box (tabular), non-exact samples are clipped to
            ``|x| ≤ approx_bound`` in model space (standard deviations of a standardised feature).
        layer (str, ""): name of the Linear layer to attack (empty: the first Linear followed by ReLU).
        recover_labels (bool, True): recover labels from the per-sample gradients.
        feature_inversion_steps (int, 300): Adam steps inverting recovered CNN features to images (0: off).
        feature_inversion_lr (float, 0.05): Adam learning rate of the feature inversion.
        feature_inversion_tv (float, 0.1): total-variation weight of the feature inversion (image prior).
        features_in_info (bool, True): store recovered CNN features in ``info["features"]`` (lists of floats).
        refine_iterations (int, 400): on a noisy update (no exact structure), Adam steps moving the
            assembled batch to the least-squares fit of the whole update (the maximum-likelihood
            batch under Gaussian noise; ``spear-scale.md`` §4); 0: off. A clean update is left as
            the search found it (its exact samples are certified; a partial one reports which).
        refine_lr (float, 0.1): Adam learning rate of that refinement (model-space units).

    Shapes:
        update: one tensor per model parameter, the layer's ``weight`` ``(m, n)`` and ``bias`` ``(m,)``
        among them; returns ``inputs`` ``(B̂, *input_shape)``, ``labels`` ``(B̂,)``; ``info`` keys
        ``n_exact_estimate``, ``batch_size_estimate``, ``proposals_tried``, ``seconds``, ``rank``,
        ``n_peeled``, ``n_sampled``, ``n_dl_columns``, ``dl_iterations``, ``n_head``, ``exact_indices``, ``approximate``, ``layer``, ``timings``, ``non_finite``, and when
        they apply ``message``, ``labels_error``, ``refine_iterations``, ``refine_loss_start`` and ``refine_loss`` (the
        least-squares objective before and after the refinement) or ``refine`` (why it was skipped), ``features`` ``(B̂, n)``, ``feature_inversion_loss`` and ``feature_similarity`` (per sample,
        the cosine similarity between the features of the returned image and the recovered features:
        the fit of the inversion; the recovered features themselves are certified exact per sample,
        ``exact_indices``).

    Example::

        from defenda import reconstruct
        rec = reconstruct("spear", model, grads, batch_size=8, input_shape=(64,))
    """

    name = "spear"
    requires = Requirements(server="honest", updates=frozenset({"gradient", "delta"}))
    Params = SpearParams

    # ------------------------------------------------------------------------------------------
    def check(self, model: nn.Module, data: TaskData, knowledge: Knowledge) -> str | None:
        layer = find_linear_relu(model, tuple(knowledge.input_shape), self.params.layer)
        if layer is None:
            what = f"named '{self.params.layer}' " if self.params.layer else ""
            return f"spear needs a Linear layer {what}followed by ReLU; {type(model).__name__} has none"
        lin = layer.module
        if lin.bias is None:
            return f"spear needs a bias on layer '{layer.name}' (scales come from the bias gradient)"
        B = knowledge.batch_size
        if B is not None:
            if lin.out_features <= B:
                return f"spear needs layer width m > batch size: '{layer.name}' has m={lin.out_features}, B={B}"
            if lin.in_features <= B:
                return f"spear needs layer input size n > batch size: '{layer.name}' has n={lin.in_features}, B={B}"
        return None

    def reconstruct(self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge) -> Reconstruction:
        p = self.params
        shape = tuple(knowledge.input_shape)
        layer = find_linear_relu(model, shape, p.layer)
        if layer is None:
            raise ValueError("spear: the model has no Linear layer followed by ReLU (check() should have skipped it)")
        dW = _update_tensor(update, model, f"{layer.name}.weight")
        db = _update_tensor(update, model, f"{layer.name}.bias")
        lin = layer.module
        signs = _class_signs(model, layer, knowledge) if p.dictionary_learning else None
        # a FedAvg delta of several full-batch steps has rank B but no exactly sparse columns (each sums
        # the sample's gradients along the run); epochs of mini-batches keep the exact search, which is
        # exact for one epoch (each sample seen once) and measured better than this route for two
        inexact = update.kind == "delta" and update.local_epochs == 0 and update.local_steps > 1
        res = spear_recover(dW, db, lin.weight, lin.bias, batch_size=knowledge.batch_size, params=p,
                            seed=knowledge.seed, class_signs=signs, head=_softmax_head(layer), inexact=inexact)
        dtype = lin.weight.dtype
        device = lin.weight.device
        Bh = res.inputs.shape[0]
        info = _info(res, layer.name)
        feats = res.inputs.to(device=device, dtype=dtype)
        if layer.is_first:
            inputs = _bound_guesses(feats.reshape(Bh, *shape), res.exact, knowledge, p.approx_bound)
        else:
            if p.features_in_info:
                info["features"] = res.inputs.tolist()
            inputs = self._invert_features(model, layer.name, feats, knowledge, info)
        labels = None
        if p.recover_labels and res.grad_z is not None and Bh > 0:
            try:
                labels = _labels_from_grad_z(model, lin, feats, res.grad_z, knowledge, update.kind)
            except Exception as exc:  # noqa: BLE001 - labels are optional; say why they are missing
                info["labels_error"] = f"{type(exc).__name__}: {exc}"
        # A degenerate (e.g. heavily pruned) update can make Q singular: return the failure as a
        # blank (mean) guess, scored as such, rather than NaNs the harness must reject.
        info["non_finite"] = int((~torch.isfinite(inputs)).sum())
        inputs = torch.nan_to_num(inputs.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        if layer.is_first and res.noisy and Bh > 0 and p.refine_iterations > 0:
            inputs = self._refine(model, update, knowledge, inputs, res.exact, labels, info)
        return Reconstruction(inputs=inputs, labels=labels, info=info)

    # ------------------------------------------------------------------------------------------
    def _refine(self, model: nn.Module, update: SharedUpdate, knowledge: Knowledge, x0: torch.Tensor,
                exact: torch.Tensor, labels: torch.Tensor | None, info: dict[str, Any]) -> torch.Tensor:
        """The best approximate batch: the non-exact samples moved to minimise ‖g(X, y) − g̃‖² over
        every tensor of the update (:func:`~defenda.inversion.predicted_update`; masked where the
        defense declared kept coordinates), exact samples held fixed.

        Under Gaussian noise of one std on every coordinate this is the maximum-likelihood batch
        (``spear-scale.md`` §4, "best approximate batch"): SPEAR's assembly only starts it. The
        budget is ``refine_iterations`` Adam steps (work, not seconds); the returned batch is the
        one with the lowest objective met, so the refinement never makes the fit worse.
        """
        from defenda.inversion import clamp_box, matching_loss, multistep_schedule, predicted_update, update_masks

        p = self.params
        if labels is None and knowledge.labels is not None and len(knowledge.labels) == x0.shape[0]:
            labels = torch.as_tensor(knowledge.labels).long()
        if labels is None:
            info["refine"] = "skipped: no labels for the candidate batch"
            return x0
        was_training = model.training
        model.eval()
        observed = [t.detach().to(x0) for t in update.tensors]
        distance = matching_loss(observed, masks=update_masks("auto", update, observed), cost="l2")
        y = labels.to(x0.device)
        box = knowledge.box  # the image box, else (tabular) the same |x| <= approx_bound as the guesses
        if box is None and p.approx_bound > 0:
            box = (torch.tensor(-p.approx_bound), torch.tensor(p.approx_bound))
        box = None if box is None else (box[0].to(x0), box[1].to(x0))
        free = (~exact.to(x0.device)).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)

        def objective(x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
            return distance(predicted_update(model, x, y, update, lr=knowledge.lr, create_graph=create_graph))

        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.refine_lr)
        sched = multistep_schedule(opt, p.refine_iterations)
        start = best_loss = float(objective(x0, create_graph=False).detach())
        best = x0
        try:
            for _ in range(p.refine_iterations):
                loss = objective(x)
                (grad,) = torch.autograd.grad(loss, x)
                value = float(loss.detach())  # the loss of the iterate before this step
                if value < best_loss:
                    best_loss, best = value, x.detach().clone()
                x.grad = grad * free
                opt.step()
                sched.step()
                clamp_box(x, box)
            final = float(objective(x.detach(), create_graph=False).detach())
            if final < best_loss:
                best_loss, best = final, x.detach().clone()
        finally:
            model.train(was_training)
        info.update(refine_iterations=p.refine_iterations, refine_loss_start=start, refine_loss=best_loss)
        return best

    def _invert_features(self, model: nn.Module, layer_name: str, feats: torch.Tensor, knowledge: Knowledge,
                         info: dict[str, Any]) -> torch.Tensor:
        """Images whose features at the input of layer ``layer_name`` match ``feats``
        (:func:`defenda_attacks._feature_inversion.invert_features`)."""
        from defenda_attacks._feature_inversion import FeatureInversionConfig, invert_features

        shape = tuple(knowledge.input_shape)
        Bh = feats.shape[0]
        p = self.params
        if p.feature_inversion_steps <= 0 or Bh == 0:
            gen = torch.Generator().manual_seed(knowledge.seed)
            return (0.1 * torch.randn(Bh, *shape, generator=gen)).to(device=feats.device, dtype=feats.dtype)
        cfg = FeatureInversionConfig(steps=p.feature_inversion_steps, lr=p.feature_inversion_lr,
                                     tv=p.feature_inversion_tv)
        x, inv = invert_features(model, layer_name, feats, shape, knowledge.box, knowledge.seed, cfg)
        info["feature_inversion_loss"] = inv["feature_inversion_loss"]
        # what the attack can measure without the truth: how well the images' features match the
        # recovered ones (the recovered features themselves are certified: info["exact_indices"])
        info["feature_similarity"] = inv["feature_inversion_cosine"]
        return x


def _softmax_head(layer: _Layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W₂, b₂)`` of the logits layer right after the attacked ReLU (the cross-entropy head), or None."""
    h = layer.head
    if h is None or getattr(h, "bias", None) is None:
        return None
    return h.weight, h.bias


def _class_signs(model: nn.Module, layer: _Layer, knowledge: Knowledge) -> torch.Tensor | None:
    """Class sign patterns for the dictionary-learning search, only where the layer feeds the logits.

    The correction assumes ``∂L/∂z ∝ mask ⊙ W₂ᵀ(p − e_y)`` (cross-entropy right after the
    layer); deeper models get None (plain ℓ1). ``p̄`` is the mean softmax over the public data
    when granted, else over standard-normal inputs in model space (at initialisation the
    softmax barely depends on the input).
    """
    if layer.head is None or knowledge.num_classes < 2:
        return None
    p = next(model.parameters())
    if knowledge.public is not None:
        xs = knowledge.public[0][:256].to(device=p.device, dtype=p.dtype)
    else:
        gen = torch.Generator().manual_seed(knowledge.seed)
        xs = torch.randn(64, *knowledge.input_shape, generator=gen).to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            p_bar = torch.softmax(model(xs).double(), dim=1).mean(0)
    except Exception:  # noqa: BLE001 - no sign patterns: the search falls back to plain l1
        return None
    if p_bar.numel() != layer.head.weight.shape[0]:
        return None
    return class_sign_patterns(layer.head.weight, p_bar)


def _bound_guesses(inputs: torch.Tensor, exact: torch.Tensor, knowledge: Knowledge, bound: float) -> torch.Tensor:
    """Samples that are not exact are only guesses: clipped to the valid image box, or without one
    (tabular) to ``|x| ≤ bound`` in model space; NaNs become 0 (the blank guess). Exact samples stay."""
    if bool(exact.all()):
        return inputs
    device, dtype = inputs.device, inputs.dtype
    keep = exact.to(device).reshape(-1, *([1] * (inputs.ndim - 1)))
    guess = torch.nan_to_num(inputs, nan=0.0)
    box = knowledge.box
    if box is not None:
        lo, hi = (t.to(device=device, dtype=dtype) for t in box)
        guess = torch.maximum(torch.minimum(guess, hi), lo)
    elif bound > 0:
        guess = guess.clamp(-bound, bound)
    return torch.where(keep, inputs, guess)


def _info(res: SpearResult, layer: str) -> dict[str, Any]:
    """The JSON-friendly diagnostics of one recovery."""
    info: dict[str, Any] = {
        "n_exact_estimate": res.n_exact,
        "batch_size_estimate": res.batch_size,
        "proposals_tried": int(res.proposals),
        "seconds": round(res.seconds, 4),
        "rank": res.rank,
        "n_peeled": res.n_peeled,
        "n_sampled": res.n_sampled,
        "n_dl_columns": res.n_dl_columns,
        "dl_iterations": res.dl_iterations,
        "n_head": res.n_head,
        "exact_indices": [int(i) for i in torch.nonzero(res.exact).flatten().tolist()],
        "approximate": bool(res.approximate),
        "layer": layer,
        "timings": {k: round(v, 4) for k, v in res.timings.items()},
    }
    if res.message:
        info["message"] = res.message
    return info


def _update_tensor(update: SharedUpdate, model: nn.Module, name: str) -> torch.Tensor:
    """The update's tensor for parameter ``name``: by name, else by position in ``model.named_parameters()``."""
    named = update.named()
    if name in named:
        return named[name]
    suffix = [k for k in named if k.endswith("." + name)]  # wrapped models (e.g. '_module.' prefixes)
    if len(suffix) == 1:
        return named[suffix[0]]
    params = [n for n, _ in model.named_parameters()]
    if name in params and len(update.tensors) == len(params):
        return update.tensors[params.index(name)]
    raise ValueError(f"spear: the update has no tensor for parameter '{name}'")


def _labels_from_grad_z(model: nn.Module, lin: nn.Linear, feats: torch.Tensor, grad_z: torch.Tensor,
                        knowledge: Knowledge, kind: str) -> torch.Tensor:
    """Per sample, the class whose loss gradient at the layer output best matches the recovered column of G.

    The layer output is set to ``W x̂ + b`` by a forward hook, so the part of the model after
    the layer sees exactly the recovered sample; the part before it sees a dummy input.
    """
    from torch.nn import functional as F

    Bh = feats.shape[0]
    C = knowledge.num_classes
    z0 = (feats @ lin.weight.T + lin.bias).detach()
    target = grad_z.to(device=z0.device, dtype=z0.dtype).T  # B̂ × m
    if kind == "delta":
        target = -target
    target = target / target.norm(dim=1, keepdim=True).clamp_min(1e-300)
    dummy = torch.zeros(Bh, *knowledge.input_shape, device=z0.device, dtype=z0.dtype)
    scores = torch.empty(Bh, C, dtype=torch.float64)
    for c in range(C):
        z = z0.clone().requires_grad_(True)
        h = lin.register_forward_hook(lambda mod, inp, out: z)
        try:
            logits = model(dummy)
        finally:
            h.remove()
        y = torch.full((Bh,), c, dtype=torch.long, device=z0.device)
        (gz,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), z)
        gz = gz / gz.norm(dim=1, keepdim=True).clamp_min(1e-300)
        scores[:, c] = (gz * target).sum(dim=1).double().cpu()
    return scores.argmax(dim=1)
