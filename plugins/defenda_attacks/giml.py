"""GIML (Jeon et al., NeurIPS 2021): meta-learn the generator from observed gradients only, then run GIAS with it.

Two clearly separated parts:

* the *world*, :class:`defenda.federation.GradientHistory` (core, knowledge flag
  ``gradient_history``): other clients of the federation train the global model; each
  round, ``round_images`` clients each share the gradient of one private image, and the
  server takes an SGD step with their mean. What it yields per round is what an
  honest-but-curious server sees: the global model and the clients' gradients.
* :func:`meta_train` — the *attacker*: GIML proper. From an untrained generator, for
  every observed round, a GIAS-style inner adaptation on a copy of the generator
  (latent search with the ‖z‖₂ penalty, then parameter search of one copy shared by the
  round's images) reconstructs the round's images from their gradients (labels by
  iDLG, i.e. also from the gradients); a Reptile meta-update (one Adam step on
  ``Σ‖θ' − θ‖²``) moves the generator toward the adapted copy. It sees gradients only.

*Prior.* Starting from an untrained DCGAN generator (PyTorch default init, seeded
with ``meta_seed``), GIML observes ``meta_rounds`` earlier FL rounds of the
federation (``knowledge.history``): in every round ``round_images`` other clients
share the gradient of one image each, and the global model drifts by the server's SGD
step. For each round the inner adaptation runs ``inner_latent_iterations`` of latent
search at ``inner_latent_lr`` with the penalty ``inner_latent_norm·‖z‖₂``, then
``inner_iterations`` of parameter search of one generator copy at ``inner_lr`` (labels
by iDLG), and the Reptile meta-update moves the generator toward the adapted copy
(``meta_optimizer``: SGD ``θ ← θ + meta_lr·(θ' − θ)``, or the paper's Adam on
``½Σ‖θ' − θ‖²``). The federation's initial global model is the victim's architecture
re-initialised with ``meta_seed`` (the server chose it). The meta-learned generator is
checkpointed every ``checkpoint_every`` rounds in ``knowledge.cache_dir/generators/``
(state_dicts, loaded with ``weights_only=True``) and reused by later trials; more rounds
resume from the latest checkpoint, and a resumed (or interrupted and re-run) meta-training
ends in the same bits as an uninterrupted one: seeds per round from ``meta_seed``, one
thread, and each checkpoint holds the global model after that round's server step.

*Attack.* GIAS with that generator (:mod:`defenda_attacks.gias`): latent search then
per-image parameter search, the same parameters and behaviour as ``gias``.
``meta_rounds = 0`` is GIAS with the untrained generator.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defenda import Knowledge, Requirements, SharedUpdate, param
from defenda.federation import GradientHistory, ObservedRound
from defenda.inversion import (
    gradient_matching_loss,
    predicted_update,
    recover_labels,
    total_variation,
)
from defenda_attacks._generators import (
    _MEMO,
    PRIOR_THREADS,
    CheckpointError,
    DCGANGenerator,
    build_generator,
    cache_key,
    cache_path,
    load_generator_state,
    load_state,
    prior_threads,
    save_state,
    to_model_space,
    training_lock,
)
from defenda_attacks.gias import GenerativeInversion, SearchParams, latent_search, parameter_search


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with freshly initialised weights (``reset_parameters`` of every module, seeded).

    The global model the observed federation started from: the server chose it, so the attacker knows it.
    """
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh.eval()


# --------------------------------------------------------------------------- meta-learning (gradients only)


@dataclass(frozen=True)
class MetaSettings:
    """Everything that determines a meta-learned generator (besides the rounds and the data)."""

    latent_dim: int
    width: int
    round_images: int
    inner_latent_iterations: int
    inner_latent_lr: float
    inner_iterations: int
    inner_lr: float
    inner_latent_norm: float
    inner_tv: float
    meta_lr: float
    seed: int
    meta_optimizer: str = "sgd"


def adapt_to_round(
    generator: DCGANGenerator, observed: ObservedRound, s: MetaSettings, mean: torch.Tensor, std: torch.Tensor,
    num_classes: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """GIML's inner adaptation on one round: latent search, then parameter search of one shared copy.

    Returns the adapted copy's weights θ' and its matching loss (mean over the round's gradients).
    """
    model = observed.model
    updates = [SharedUpdate(tensors=g, names=observed.names, kind="gradient", batch_size=1)
               for g in observed.gradients]
    labels = torch.cat([recover_labels(u, model, 1, num_classes) for u in updates]).to(mean.device)  # iDLG

    def render(g: torch.Tensor) -> torch.Tensor:
        return to_model_space(g, mean, std)

    def objective(x: torch.Tensor, create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        match = torch.stack([
            gradient_matching_loss(predicted_update(model, x[k : k + 1], labels[k : k + 1], u,
                                                    create_graph=create_graph), u.tensors)
            for k, u in enumerate(updates)
        ]).mean()
        return (match + s.inner_tv * total_variation(x) if s.inner_tv > 0 else match), match

    z0 = torch.randn(len(updates), s.latent_dim).to(mean.device)  # CPU RNG: the same latents on any device
    z, _ = latent_search(generator, render, objective, z0, iterations=s.inner_latent_iterations,
                         lr=s.inner_latent_lr, latent_norm=s.inner_latent_norm)
    _, adapted, loss = parameter_search(generator, render, objective, z, iterations=s.inner_iterations,
                                        lr=s.inner_lr, per_image=False, keep_params=True)
    assert adapted is not None
    return {n: p[0] for n, p in adapted.items()}, loss


def _checkpoints(cache_dir: str | None, key: str) -> dict[int, Path]:
    path = cache_path(cache_dir, key)
    if path is None or not path.parent.is_dir():
        return {}
    out = {}
    for f in path.parent.glob(f"{key}-round*.pt"):
        m = re.fullmatch(rf"{re.escape(key)}-round(\d+)\.pt", f.name)
        if m:
            out[int(m.group(1))] = f
    return out


def meta_train(
    model: nn.Module,
    history: GradientHistory,
    s: MetaSettings,
    *,
    rounds: int,
    image_shape: tuple[int, ...],
    mean: torch.Tensor,
    std: torch.Tensor,
    num_classes: int,
    cache_dir: str | None = None,
    checkpoint_every: int = 10,
    device: torch.device | str = "cpu",
) -> tuple[DCGANGenerator, dict[str, Any]]:
    """GIML: a generator meta-learned over ``rounds`` rounds of ``history`` (0: the untrained generator).

    The federation starts from ``model``'s architecture, re-initialised with ``s.seed``.

    Checkpoints (generator, meta-optimiser, the simulated global model; a state_dict each)
    go to ``cache_dir/generators/<key>-round<t>.pt`` every ``checkpoint_every`` rounds and
    at the end, where ``key`` hashes the settings, the architecture, the initial global model and
    the history but not ``rounds``: a later call with more rounds resumes from the latest checkpoint, a call
    with fewer or equal rounds loads its checkpoint. Without a cache directory, the
    checkpoints are kept in this process only. Runs on ``device``; checkpoints are CPU tensors.
    """
    device = torch.device(device)
    fl_model = reinitialised(model, s.seed)
    # The key names every input of the result, so a checkpoint is the same bits whoever wrote it:
    # the federation's initial weights themselves (a module that reset_parameters misses would keep
    # the victim's round-r weights; hashing them keeps such a prior from being shared across rounds),
    # the normalisation, the classes (iDLG), the device type and the thread count.
    arch = repr(model) + repr([tuple(p.shape) for p in model.parameters()])
    key = cache_key("giml", {**s.__dict__, "arch": arch, "image_shape": list(image_shape), "version": 3,
                             "history": history.fingerprint, "num_classes": num_classes,
                             "device": device.type, "threads": PRIOR_THREADS},
                    mean, std, *fl_model.state_dict().values())
    generator = _untrained(image_shape, s).to(device)
    fl_model = fl_model.to(device)
    mean, std = mean.to(device), std.to(device)
    if s.meta_optimizer == "adam":
        meta_opt: torch.optim.Optimizer = torch.optim.Adam(generator.parameters(), lr=s.meta_lr)
    else:  # classic Reptile: θ ← θ + ε(θ' − θ)
        meta_opt = torch.optim.SGD(generator.parameters(), lr=s.meta_lr)
    # parallel workers: one meta-trains, the others load its checkpoint
    with training_lock(cache_dir, key), prior_threads():
        info, losses = _meta_train_locked(generator, meta_opt, fl_model, history, s, key, rounds=rounds, mean=mean,
                                          std=std, num_classes=num_classes, cache_dir=cache_dir,
                                          checkpoint_every=checkpoint_every)
    info["prior_threads"] = PRIOR_THREADS
    if losses:
        info["giml_inner_loss_last"] = losses[-1]
    return generator.eval(), info


def _meta_train_locked(
    generator: DCGANGenerator, meta_opt: torch.optim.Optimizer, fl_model: nn.Module, history: GradientHistory,
    s: MetaSettings, key: str, *, rounds: int, mean: torch.Tensor, std: torch.Tensor, num_classes: int,
    cache_dir: str | None, checkpoint_every: int,
) -> tuple[dict[str, Any], list[float]]:
    """Resume from the latest checkpoint ≤ ``rounds`` and meta-train up to ``rounds`` (under the training lock)."""
    on_disk = _checkpoints(cache_dir, key)
    in_memory = {int(k.rsplit("round", 1)[1]): k for k in _MEMO if k.startswith(key + "-round")}
    available = sorted({t for t in [*on_disk, *in_memory] if t <= rounds})
    start = 0
    if available:
        start = available[-1]
        name = f"{key}-round{start}"
        state = _MEMO[name] if name in _MEMO else load_state(on_disk[start])
        _restore(state, generator, meta_opt, fl_model, on_disk.get(start, name))
    info: dict[str, Any] = {"prior": f"{key}-round{rounds}", "prior_cached": start == rounds, "giml_rounds": rounds,
                            "giml_resumed_from": start}
    losses = []
    due: int | None = None  # a round whose checkpoint waits for the server's step (see below)
    for observed in history.rounds(fl_model, rounds=rounds, clients=s.round_images, start=start):
        if due is not None:
            _checkpoint(cache_dir, f"{key}-round{due}", generator, meta_opt, fl_model, due)
        generator.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed * 1_000_003 + observed.round + 17)
            adapted, loss = adapt_to_round(generator, observed, s, mean, std, num_classes)
        losses.append(loss)
        meta_opt.zero_grad(set_to_none=True)
        for n, p in generator.named_parameters():  # Reptile: the gradient of ½Σ‖θ' − θ‖² is θ − θ'
            p.grad = p.detach() - adapted[n]
        meta_opt.step()
        t = observed.round
        # Round t's checkpoint is written once the history has applied round t's server step to
        # fl_model (it does so when the next round is drawn, or when it ends): a run resumed from it
        # then starts round t + 1 from the same global model as an uninterrupted one.
        due = t if t == rounds or (checkpoint_every > 0 and t % checkpoint_every == 0) else None
    if due is not None:
        _checkpoint(cache_dir, f"{key}-round{due}", generator, meta_opt, fl_model, due)
    return info, losses


def _untrained(image_shape: tuple[int, ...], s: MetaSettings) -> DCGANGenerator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        generator = build_generator(image_shape, s.latent_dim, s.width)
    return generator.eval()


def _checkpoint(cache_dir: str | None, name: str, generator: nn.Module, opt: torch.optim.Optimizer,
                fl_model: nn.Module, t: int) -> None:
    state = {"generator": generator.state_dict(), "meta_opt": opt.state_dict(), "fl_model": fl_model.state_dict(),
             "round": t}
    state = copy.deepcopy({k: (v if not isinstance(v, dict) else _detach(v)) for k, v in state.items()})
    _MEMO[name] = state  # type: ignore[assignment]
    path = cache_path(cache_dir, name)
    if path is not None:
        save_state(state, path)


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detach(v) for v in obj]
    return obj


def _restore(state: dict[str, Any], generator: nn.Module, opt: torch.optim.Optimizer, fl_model: nn.Module,
             where: Any) -> None:
    try:
        load_generator_state(generator, state["generator"], where)
        opt.load_state_dict(state["meta_opt"])
        fl_model.load_state_dict(state["fl_model"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"GIML checkpoint {where} is incomplete or does not fit: {exc}") from None


# --------------------------------------------------------------------------- the attack


class GIML(GenerativeInversion):
    """GIML: GIAS with a generator meta-learned from other clients' gradients only (no image prior).

    Paper: J. Jeon, J. Kim, K. Lee, S. Oh, J. Ok, "Gradient Inversion with Generative Image Prior",
    NeurIPS 2021, §4 (GIML). <https://arxiv.org/abs/2110.14962>

    Threat model: honest-but-curious server that recorded earlier rounds; FedSGD gradients and
    FedAvg deltas; requires ``gradient_history`` (other clients' gradients, never images; no
    ``public_data``), uses ``labels``, ``batch_size`` and ``lr`` when granted; any
    differentiable model on square ``(C, S, S)`` image tasks.

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
        latent_dim (int, 32): generator latent size.
        width (int, 32): generator width: channels of its last hidden layer (doubling per up-block).
        meta_rounds (int, 40): observed FL rounds GIML meta-learns from (0: untrained generator).
        round_images (int, 4): clients per observed round, each sharing the gradient of one image.
        inner_latent_iterations (int, 200): inner adaptation: latent-search steps per round.
        inner_latent_lr (float, 0.03): inner adaptation: Adam step size on the latents.
        inner_latent_norm (float, 1e-3): inner adaptation: weight of ``‖z‖₂``.
        inner_iterations (int, 100): inner adaptation: parameter-search steps on the shared copy per round.
        inner_lr (float, 1e-3): inner adaptation: Adam step size on the copy's weights.
        inner_tv (float, 1e-4): inner adaptation: TV weight.
        meta_lr (float, 0.5): Reptile meta step size (ε of ``θ ← θ + ε(θ' − θ)`` for sgd; Adam's for adam).
        meta_optimizer (str, "sgd"): Reptile meta step: ``adam`` on ``½Σ‖θ' − θ‖²`` (paper) or ``sgd``.
        checkpoint_every (int, 10): save a meta-training checkpoint every this many rounds.
        meta_seed (int, 0): seed of the untrained generator, the federation's initial model and the inner searches.

    Shapes:
        update: one tensor per ``model.named_parameters()`` entry.
        Reconstruction.inputs: ``(B̂, C, S, S)`` in model space, inside the image box.
        Reconstruction.labels: ``(B̂,)`` class indices.
        info: as ``gias`` (``loss``, ``latent_loss``, …, ``prior``, ``prior_cached``, ``prior_seconds``),
        plus ``giml_rounds``, ``giml_resumed_from``, ``giml_inner_loss_last`` (when meta-trained now) and
        ``prior_source = "gradients"`` (the prior never saw an image).

    Example::

        [study]
        knowledge = ["gradient_history"]

        [[attacks]]
        name = "giml"
        meta_rounds = [0, 40]   # untrained vs meta-learned generator
    """

    name = "giml"
    prior_source = "gradients"
    requires = Requirements(updates=frozenset({"gradient", "delta"}), knowledge=frozenset({"gradient_history"}),
                            task_kinds=frozenset({"image"}))

    @dataclass(frozen=True)
    class Params(SearchParams):
        meta_rounds: int = param(40, "observed FL rounds GIML meta-learns from (0: untrained generator)")
        round_images: int = param(4, "clients per observed round, each sharing the gradient of one image")
        inner_latent_iterations: int = param(200, "inner adaptation: latent-search steps per round")
        inner_latent_lr: float = param(0.03, "inner adaptation: Adam step size on the latents (paper: 0.03)")
        inner_latent_norm: float = param(1e-3, "inner adaptation: weight of ‖z‖₂ (paper: 1e-3)")
        inner_iterations: int = param(100, "inner adaptation: parameter-search steps on the shared copy per round")
        inner_lr: float = param(1e-3, "inner adaptation: Adam step size on the copy's weights (paper: 1e-3)")
        inner_tv: float = param(1e-4, "inner adaptation: TV weight (paper: 1e-4)")
        meta_lr: float = param(0.5, "Reptile meta step size: ε of θ ← θ + ε(θ' − θ) for sgd; Adam's step size for adam "
                                    "(paper: Adam, 1e-2)")
        meta_optimizer: str = param("sgd", "Reptile meta step: Adam on ½Σ‖θ' − θ‖² (paper) or SGD, θ ← θ + meta_lr·(θ' − θ)",
                                    choices=("adam", "sgd"))
        checkpoint_every: int = param(10, "save a meta-training checkpoint every this many rounds")
        meta_seed: int = param(0, "seed of the untrained generator, the federation's initial model and the inner searches")

    def prior(self, model: nn.Module, knowledge: Knowledge) -> tuple[DCGANGenerator, dict[str, Any]]:
        if knowledge.history is None:
            raise ValueError("giml learns its prior from earlier rounds' gradients "
                             "(grant knowledge 'gradient_history')")
        p = self.params
        s = MetaSettings(
            latent_dim=p.latent_dim, width=p.width, round_images=p.round_images,
            inner_latent_iterations=p.inner_latent_iterations, inner_latent_lr=p.inner_latent_lr,
            inner_iterations=p.inner_iterations, inner_lr=p.inner_lr, inner_latent_norm=p.inner_latent_norm,
            inner_tv=p.inner_tv, meta_lr=p.meta_lr, seed=p.meta_seed,
            meta_optimizer=p.meta_optimizer,
        )
        with torch.enable_grad():
            return meta_train(model, knowledge.history, s, rounds=p.meta_rounds, image_shape=tuple(knowledge.input_shape),
                              mean=knowledge.mean.cpu(), std=knowledge.std.cpu(), num_classes=knowledge.num_classes,
                              cache_dir=knowledge.cache_dir, checkpoint_every=p.checkpoint_every,
                              device=knowledge.device)
