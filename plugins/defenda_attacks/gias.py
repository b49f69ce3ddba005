"""GIAS (Jeon et al., NeurIPS 2021): gradient inversion in a generator's latent space, then its weights.

*Prior.* A DCGAN generator (:class:`~defenda_attacks._generators.DCGANGenerator`,
sized for the task's images) trained on the attacker's public split ``knowledge.public``
only (never on the clients' data). On small images (``prior = "auto"``: up to 16 px a
side, the 8×8 digits) by ordinary GAN training, with DiffAugment translation because
that split is small (~180 digits); on larger ones (the 32×32 RGB ``photos``) as the
decoder of a VAE (:func:`~defenda_attacks._generators.train_vae_prior`: random crops
and flips of the ~160 public crops, ~1.5 min on one CPU thread), because a GAN on
that few photographs does not converge in CPU minutes while the VAE decoder spans
held-out crops (a latent fit to test crops: ~24 dB). It is trained
once per (public split, generator settings) and cached as a state_dict in
``knowledge.cache_dir/generators/`` (loaded with ``weights_only=True``; without a
cache directory, in this process only). Training uses its own seeds (``prior_seed``),
leaves the global RNG untouched and runs on one thread, so the cached prior is the
same bits whichever worker trains it.

*Attack.* Images are ``x_k = ((G(z_k) + 1)/2 − μ)/σ`` (model space, always inside
the image box). The objective is the shared global-cosine gradient-matching loss
of :mod:`defenda.inversion` plus ``tv``·TV(x), as for ``geiping``:

1. latent search — Adam(``latent_lr``) on the latents ``z ~ N(0, I)`` (one per
   image) for ``latent_iterations`` steps, learning rate ×0.1 at 3/8, 5/8, 7/8;
   of ``restarts`` runs the one with the lowest matching loss is kept;
2. parameter search — one copy of the generator per image, all optimised jointly
   with Adam(``lr``) for ``iterations`` steps with the latents frozen (same
   schedule); ``iterations = 0`` gives the latent-only attack (GI-z).

Each stage returns its iterate with the lowest matching loss (not the last one):
Adam on generator weights makes the loss non-monotone at this scale, and keeping the
best iterate is the same "best by matching loss" rule the paper applies to restarts.
The model is used in eval mode with double backprop; the generator stays in eval
mode (BatchNorm on its running statistics, as in the paper's DCGAN).

Labels, batch size, FedAvg deltas and masked matching are handled exactly as in
``geiping`` (known labels when granted, else analytic recovery; the cosine on the
coordinates the defense declared kept, ``update.masks``, with ``masked = "auto"``).

The search machinery here (:func:`latent_search`, :func:`parameter_search`,
:class:`GenerativeInversion`) is shared with ``giml``, which differs only in
where the generator comes from (see :mod:`defenda_attacks.giml`). The
gradient-matching loss, TV, label recovery, the candidate update and the
learning-rate schedule are the shared ones of :mod:`defenda.inversion`, the
same code ``geiping`` uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from defenda import Attack, Knowledge, Reconstruction, Requirements, SharedUpdate, TaskData, param
from defenda.inversion import (
    gradient_matching_loss,
    infer_labels,
    multistep_schedule,
    on_device,
    predicted_update,
    total_variation,
    update_masks,
)
from defenda_attacks._generators import (
    PRIOR_THREADS,
    DCGANGenerator,
    build_generator,
    cache_key,
    cached_generator_state,
    load_generator_state,
    store_generator_state,
    to_model_space,
    train_gan_prior,
    train_vae_prior,
    training_lock,
)

#: objective of a candidate batch in model space: (x, create_graph) -> (total loss, matching loss)
Objective = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- the two searches


def latent_search(
    generator: nn.Module,
    render: Callable[[torch.Tensor], torch.Tensor],
    objective: Objective,
    z0: torch.Tensor,
    *,
    iterations: int,
    lr: float,
    latent_norm: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """GI-z: Adam on the latents ``z`` (one per image) with the generator frozen.

    Minimises ``objective(render(G(z))) + latent_norm·‖z‖₂`` (the L2 norm, not squared,
    over all latents, as in the GIML code); learning rate ×0.1 at 3/8, 5/8, 7/8.
    Returns the final latents and their gradient-matching loss (regularisers excluded).
    """
    for p in generator.parameters():
        p.requires_grad_(False)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = multistep_schedule(opt, iterations)
    best_z, best = z.detach().clone(), float("inf")
    for _ in range(iterations):
        loss, match = objective(render(generator(z)), True)
        value = float(match.detach())
        if value < best:
            best, best_z = value, z.detach().clone()
        if latent_norm > 0:
            loss = loss + latent_norm * z.norm()
        (grad,) = torch.autograd.grad(loss, z)
        z.grad = grad
        opt.step()
        sched.step()
    z = z.detach()
    with torch.enable_grad():
        _, match = objective(render(generator(z)), False)
    if float(match.detach()) < best:
        best, best_z = float(match.detach()), z
    return best_z, best


def stacked_parameters(generator: nn.Module, copies: int) -> dict[str, torch.Tensor]:
    """``copies`` independent copies of the generator's weights, stacked along a new first axis."""
    return {
        n: p.detach().unsqueeze(0).repeat(copies, *([1] * p.dim())).requires_grad_(True)
        for n, p in generator.named_parameters()
    }


def render_copies(generator: nn.Module, stacked: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """``G_k(z_k)`` for every image k: copy k of the stacked weights on latent k (one copy: shared by all)."""
    buffers = dict(generator.named_buffers())
    copies = next(iter(stacked.values())).shape[0]
    if copies == 1:
        return functional_call(generator, {**{n: p[0] for n, p in stacked.items()}, **buffers}, (z,))

    def one(params: dict[str, torch.Tensor], latent: torch.Tensor) -> torch.Tensor:
        return functional_call(generator, {**params, **buffers}, (latent.unsqueeze(0),)).squeeze(0)

    return vmap(one)(stacked, z)


def parameter_search(
    generator: nn.Module,
    render: Callable[[torch.Tensor], torch.Tensor],
    objective: Objective,
    z: torch.Tensor,
    *,
    iterations: int,
    lr: float,
    per_image: bool = True,
    keep_params: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, float]:
    """GIAS proper: with the latents frozen, optimise copies of the generator's weights.

    ``per_image``: one copy per image, optimised jointly (GIAS); otherwise one copy
    shared by all images (GIML's inner adaptation). Adam(``lr``), ×0.1 at 3/8, 5/8,
    7/8. The generator itself is not modified; BatchNorm keeps its running statistics.
    Returns the generated images ``(B, C, H, W)`` (generator range), the adapted
    stacked weights and the final gradient-matching loss.
    """
    stacked = stacked_parameters(generator, len(z) if per_image else 1)
    params = list(stacked.values())
    opt = torch.optim.Adam(params, lr=lr)
    sched = multistep_schedule(opt, iterations)
    best, best_images, best_params = float("inf"), None, None
    for _ in range(iterations):
        images = render_copies(generator, stacked, z)
        loss, match = objective(render(images), True)
        value = float(match.detach())
        if value < best:
            best, best_images = value, images.detach()
            best_params = {n: p.detach().clone() for n, p in stacked.items()} if keep_params else None
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        sched.step()
    with torch.no_grad():
        images = render_copies(generator, stacked, z)
    with torch.enable_grad():
        _, match = objective(render(images), False)
    if best_images is None or float(match.detach()) < best:
        best, best_images = float(match.detach()), images
        best_params = {n: p.detach().clone() for n, p in stacked.items()} if keep_params else None
    return best_images, best_params, best


# --------------------------------------------------------------------------- the attack


@dataclass(frozen=True)
class SearchParams:
    """Parameters of the latent search and the parameter search (shared by ``gias`` and ``giml``)."""

    latent_iterations: int = param(400, "Adam steps of the latent search (GI-z) per restart")
    latent_lr: float = param(0.1, "Adam step size on the latents (paper scripts: 0.03-0.1)")
    restarts: int = param(1, "latent-search restarts from fresh z ~ N(0, I); the lowest matching loss is kept")
    iterations: int = param(600, "Adam steps of the parameter search (0: latent search only, GI-z)")
    lr: float = param(1e-3, "Adam step size on the generator copies' weights (paper: 1e-3)")
    tv: float = param(1e-4, "weight of the anisotropic total-variation prior on the generated images")
    latent_norm: float = param(0.0, "weight of the latent penalty ‖z‖₂ in the latent search")
    cost: str = param("cosine", "gradient distance: global cosine (paper) or squared L2",
                      choices=("cosine", "l2"))
    masked: str = param("auto", "compare only the coordinates the defense kept (update.masks); "
                        "always: those, else the non-zero ones; never: all", choices=("auto", "always", "never"))
    local_lr: float | None = param(
        None, "client learning rate for FedAvg deltas (None: knowledge.lr, else 0.1)"
    )
    latent_dim: int = param(32, "generator latent size (DCGAN: 100 for 32x32; 32 suffices for 8x8 digits)")
    width: int = param(32, "generator width: channels of its last hidden layer (doubling per up-block)")


class GenerativeInversion(Attack):
    """Base of ``gias`` and ``giml``: latent search, then per-image parameter search, from a prior generator.

    Subclasses implement :meth:`prior` (the generator and a description of where it
    came from).
    """

    requires = Requirements(updates=frozenset({"gradient", "delta"}), knowledge=frozenset({"public_data"}),
                            task_kinds=frozenset({"image"}))
    #: what the prior was learned from, stored in every row's info (tells the threat models apart)
    prior_source: ClassVar[str] = ""
    Params: ClassVar[type] = SearchParams

    def check(self, model: nn.Module, data: TaskData, knowledge: Knowledge) -> str | None:
        shape = tuple(knowledge.input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            return f"the DCGAN generator needs square (C, S, S) images, the task has inputs of shape {shape}"
        return None

    def prior(self, model: nn.Module, knowledge: Knowledge) -> tuple[DCGANGenerator, dict[str, Any]]:
        """The prior generator (eval mode, on ``knowledge.device``) and info about it."""
        raise NotImplementedError

    def reconstruct(self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge) -> Reconstruction:
        reason = self.check(model, None, knowledge)  # type: ignore[arg-type]
        if reason:
            raise ValueError(reason)
        device = knowledge.device
        model = on_device(model, device)
        was_training = model.training
        model.eval()
        try:
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # the prior's training never shifts the trial's RNG
                generator, prior_info = self.prior(model, knowledge)
            prior_seconds = time.perf_counter() - t0
            recon = self.invert(update, model, knowledge, generator.to(device).eval())
            recon.info.update(prior_info, prior_seconds=prior_seconds, prior_source=self.prior_source)
            return recon
        finally:
            model.train(was_training)

    def invert(
        self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge, generator: DCGANGenerator
    ) -> Reconstruction:
        """GIAS with ``generator``: latent search (restarts, best by matching loss), then parameter search."""
        p = self.params
        device = knowledge.device
        dtype = next(model.parameters()).dtype
        observed = [t.detach().to(device=device, dtype=dtype) for t in update.tensors]
        batch_size, labels, known = infer_labels(update, model, knowledge)
        labels = labels.to(device)
        masks = update_masks(p.masked, update, observed)
        lr = p.local_lr or knowledge.lr or None
        mean, std = knowledge.mean.to(device), knowledge.std.to(device)

        def render(g: torch.Tensor) -> torch.Tensor:
            return to_model_space(g, mean, std)

        def objective(x: torch.Tensor, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
            pred = predicted_update(model, x, labels, update, lr=lr, create_graph=create_graph)
            match = gradient_matching_loss(pred, observed, masks=masks, cost=p.cost)
            loss = match + p.tv * total_variation(x) if p.tv > 0 else match
            return loss, match

        best_z: torch.Tensor | None = None
        latent_loss = float("inf")
        for _ in range(max(1, p.restarts)):
            z0 = torch.randn(batch_size, generator.latent_dim).to(device=device, dtype=dtype)  # CPU RNG: portable
            z, match = latent_search(generator, render, objective, z0, iterations=p.latent_iterations,
                                     lr=p.latent_lr, latent_norm=p.latent_norm)
            if best_z is None or match < latent_loss:
                best_z, latent_loss = z, match
        assert best_z is not None
        if p.iterations > 0:
            images, _, loss = parameter_search(generator, render, objective, best_z, iterations=p.iterations,
                                               lr=p.lr, per_image=True)
        else:
            with torch.no_grad():
                images = generator(best_z)
            loss = latent_loss
        info: dict[str, Any] = {
            "loss": loss,
            "latent_loss": latent_loss,
            "latent_iterations": p.latent_iterations,
            "iterations": p.iterations,
            "restarts": max(1, p.restarts),
            "batch_size": batch_size,
            "labels_known": known,
            "masked": masks is not None,
        }
        return Reconstruction(inputs=render(images).detach().cpu(), labels=labels.cpu(), info=info)


class GIAS(GenerativeInversion):
    """GIAS: latent search then per-image generator-weight search, with a GAN prior trained on public data.

    Paper: J. Jeon, J. Kim, K. Lee, S. Oh, J. Ok, "Gradient Inversion with Generative Image Prior",
    NeurIPS 2021. <https://arxiv.org/abs/2110.14962>

    Threat model: honest-but-curious server; FedSGD gradients and FedAvg deltas; requires
    ``public_data`` (the prior's training set), uses ``labels``, ``batch_size`` and ``lr``
    when granted; any differentiable model on square ``(C, S, S)`` image tasks.

    Arguments:
        latent_iterations (int, 400): Adam steps of the latent search (GI-z) per restart.
        latent_lr (float, 0.1): Adam step size on the latents.
        restarts (int, 1): latent-search restarts from fresh ``z ~ N(0, I)``; the lowest matching loss is kept.
        iterations (int, 600): Adam steps of the parameter search (0: latent search only, GI-z).
        lr (float, 1e-3): Adam step size on the generator copies' weights.
        tv (float, 1e-4): weight of the anisotropic total-variation prior on the generated images.
        latent_norm (float, 0.0): weight of the latent penalty ``‖z‖₂`` in the latent search.
        cost (str, "cosine"): gradient distance: global ``cosine`` or squared ``l2``.
        masked (str, "auto"): compare only the kept coordinates: ``auto`` (``update.masks``),
            ``always`` (those, else the non-zero ones) or ``never``.
        local_lr (float | None, None): the client's learning rate for FedAvg deltas
            (None: ``knowledge.lr``, else 0.1).
        latent_dim (int | None, None): generator latent size (None: 32 for the GAN prior, 64 for the VAE).
        width (int | None, None): generator width: channels of its last hidden layer, doubling per
            up-block (None: 32 for the GAN prior, 16 for the VAE).
        prior (str, "auto"): how the generator is trained on the public split: ``gan`` (GAN training),
            ``vae`` (the decoder of a VAE) or ``auto``: ``gan`` for images up to 16 px a side (the 8×8
            digits), ``vae`` above (the 32×32 photographs, where a GAN on ~100-160 crops does not
            converge in CPU minutes).
        prior_steps (int | None, None): training steps of the prior (None: 1500 GAN, 1000 VAE).
        prior_batch (int, 64): training batch size of the prior.
        prior_lr (float, 2e-3): Adam step size of the prior's training (both networks).
        prior_shift (int | None, None): augmentation in pixels: GAN, DiffAugment translation of real
            and fake images; VAE, random crops (reflect padding) plus horizontal flips (None: 1 GAN, 4 VAE).
        prior_beta (float, 1.0): VAE prior: weight of the KL term.
        prior_seed (int, 0): seed of the prior's training (fixed, so a study trains it once).

    Shapes:
        update: one tensor per ``model.named_parameters()`` entry.
        Reconstruction.inputs: ``(B̂, C, S, S)`` in model space, inside the image box.
        Reconstruction.labels: ``(B̂,)`` class indices.
        info: ``loss`` (matching loss of the returned images), ``latent_loss``, ``latent_iterations``,
        ``iterations``, ``restarts``, ``batch_size``, ``labels_known``, ``masked``, ``prior`` (cache key),
        ``prior_cached``, ``prior_seconds``, ``prior_source = "public_data"``.

    Example::

        [study]
        knowledge = ["public_data"]

        [[attacks]]
        name = "gias"
        iterations = [0, 600]   # GI-z, then GIAS proper
    """

    name = "gias"
    prior_source = "public_data"

    @dataclass(frozen=True)
    class Params(SearchParams):
        prior: str = param("auto", "how the generator is trained on the public split: a GAN (gan), the decoder "
                           "of a VAE (vae), or auto: gan for images up to 16 px a side (digits), vae above "
                           "(photographs, where a GAN on ~100-160 crops does not converge in CPU minutes)",
                           choices=("auto", "gan", "vae"))
        # None: per prior kind (resolved()); SearchParams' int fields stay ints for giml
        latent_dim: int | None = param(  # type: ignore[assignment]
            None, "generator latent size (None: 32 for the GAN prior, 64 for the VAE)")
        width: int | None = param(  # type: ignore[assignment]
            None, "generator width: channels of its last hidden layer, doubling per up-block "
            "(None: 32 for the GAN prior, 16 for the VAE)")
        prior_steps: int | None = param(None, "training steps of the prior on the public split "
                                        "(None: 1500 for the GAN, 1000 for the VAE)")
        prior_batch: int = param(64, "training batch size of the prior")
        prior_lr: float = param(2e-3, "Adam step size of the prior's training (both networks)")
        prior_shift: int | None = param(None, "augmentation: random translation in pixels (GAN: DiffAugment of "
                                        "real and fake; VAE: random crops, reflect padding, plus flips); "
                                        "None: 1 (gan), 4 (vae)")
        prior_beta: float = param(1.0, "VAE prior: weight of the KL term")
        prior_seed: int = param(0, "seed of the prior's training (fixed, so a study trains it once)")

        def prior_kind(self, image_shape: tuple[int, ...]) -> str:
            if self.prior != "auto":
                return self.prior
            return "gan" if max(image_shape[1:]) <= 16 else "vae"

        def resolved(self, kind: str) -> dict[str, int]:
            """latent_dim, width, steps and shift of the prior, the per-kind defaults filled in."""
            gan = kind == "gan"
            return {
                "latent_dim": self.latent_dim if self.latent_dim is not None else (32 if gan else 64),
                "width": self.width if self.width is not None else (32 if gan else 16),
                "steps": self.prior_steps if self.prior_steps is not None else (1500 if gan else 1000),
                "shift": self.prior_shift if self.prior_shift is not None else (1 if gan else 4),
            }

    def prior(self, model: nn.Module, knowledge: Knowledge) -> tuple[DCGANGenerator, dict[str, Any]]:
        if knowledge.public is None:
            raise ValueError("gias needs the attacker's public data sample (grant knowledge 'public_data')")
        p = self.params
        public_x = knowledge.public[0].detach().cpu().float()
        unit = (public_x * knowledge.std.cpu() + knowledge.mean.cpu()).clamp(0, 1)
        # everything the trained bits depend on (the data are hashed below): which worker trains it,
        # and when, must not matter (see "Same prior, same bits" in defenda_attacks._generators)
        kind = p.prior_kind(tuple(knowledge.input_shape))
        r = p.resolved(kind)
        settings: dict[str, Any] = {
            "latent_dim": r["latent_dim"], "width": r["width"], "steps": r["steps"], "batch": p.prior_batch,
            "lr": p.prior_lr, "shift": r["shift"], "seed": p.prior_seed, "version": 2,
            "threads": PRIOR_THREADS, "device": torch.device(knowledge.device).type,
        }
        if kind == "vae":
            settings.update(beta=p.prior_beta, version=1)
        key = cache_key(f"gias-{kind}", settings, unit)
        generator = build_generator(knowledge.input_shape, r["latent_dim"], r["width"])
        state = cached_generator_state(key, knowledge.cache_dir)
        cached = state is not None
        if state is None:
            with training_lock(knowledge.cache_dir, key):
                state = cached_generator_state(key, knowledge.cache_dir)  # another worker may have trained it
                cached = state is not None
                if state is None:
                    train = train_gan_prior if kind == "gan" else train_vae_prior
                    extra: dict[str, Any] = {} if kind == "gan" else {"beta": p.prior_beta}
                    trained = train(unit, latent_dim=r["latent_dim"], width=r["width"], steps=r["steps"],
                                    batch_size=p.prior_batch, lr=p.prior_lr, shift=r["shift"], seed=p.prior_seed,
                                    device=knowledge.device, **extra)
                    state = trained.state_dict()
                    store_generator_state(key, knowledge.cache_dir, state)
        load_generator_state(generator, state, key)
        return generator.eval(), {"prior": key, "prior_kind": kind, "prior_cached": cached,
                                  "prior_threads": PRIOR_THREADS}
