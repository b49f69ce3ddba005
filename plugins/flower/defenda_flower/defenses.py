"""Flower's privacy mechanisms as defenda defenses, applied by calling Flower's own code.

Each defense trains the client like a Flower client (:mod:`defenda_flower.training`),
builds the Flower messages a ClientApp would see — the train message carrying θ_r (and
the config Flower's server wrapper would add) and the reply carrying the trained
weights — and passes them through Flower's mod (``flwr.clientapp.mod.LocalDpMod``,
``fixedclipping_mod``). The update defenda attacks is then ``reply − θ_r`` of the arrays
the mod returns: byte for byte what the Flower client sends, minus the global model.
Server-side noise is drawn with Flower's ``add_gaussian_noise_inplace`` at Flower's
``compute_stdv``.

Flower draws its noise from NumPy's global RNG; these defenses seed it from the trial's
generator for the duration of the call (then restore it), so studies stay reproducible.
FedSGD studies (``kind = "gradient"``): the client's reply is one SGD step, θ_r − η·g;
the defended gradient is (θ_r − reply)/η.

What the curious server observes, per defense:

============================  ========================================  ==============================
defense                       the server receives                       noise relative to observation
============================  ========================================  ==============================
``flower-local-dp``           θ_r + clip(Δ, C) + N(0, s²) per entry     before (in every reply)
``flower-fixed-clipping``     θ_r + clip(Δ, C)                          none
``flower-central-dp`` client  θ_r + clip(Δ, C)                          after (on the aggregate only)
``flower-central-dp`` server  θ_r + Δ (raw; the server clips later)     after (on the aggregate only)
============================  ========================================  ==============================

Papers: Flower — D. J. Beutel et al., "Flower: A Friendly Federated Learning Research
Framework", arXiv 2007.14390. Flat clipping and central Gaussian noise (DP-FedAvg) —
H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018, arXiv 1710.06963 (and R. C. Geyer, T. Klein, M. Nabi,
"Differentially Private Federated Learning: A Client Level Perspective", arXiv 1712.07557).
The local Gaussian mechanism's calibration s = Δ₂·√(2 ln(1.25/δ))/ε — C. Dwork, A. Roth,
"The Algorithmic Foundations of Differential Privacy", 2014, Thm. A.1 (proven for ε < 1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from defenda import Defense, RoundSettings, SharedUpdate, param
from defenda_flower.training import batches_for, train_copy

if TYPE_CHECKING:
    from defenda import FederationPlan

#: the config key of Flower's clipping norm (``flwr.supercore.differential_privacy.KEY_CLIPPING_NORM``)
KEY_CLIPPING_NORM = "clipping_norm"


def noise_seed(generator: torch.Generator | None) -> int | None:
    """The NumPy seed a defense gives Flower's noise for one call (drawn from ``generator``)."""
    if generator is None:
        return None
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))


@contextlib.contextmanager
def numpy_seeded(seed: int | None) -> Iterator[None]:
    """NumPy's global RNG seeded with ``seed`` inside the block, restored after (None: left as it is)."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def flower_messages(model: nn.Module, trained: nn.Module, config: dict[str, Any], num_examples: int) -> tuple[Any, Any]:
    """The train message a ClientApp receives (θ_r of ``model`` and ``config``) and its reply (``trained``'s weights)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from defenda_flower.arrays import model_arrays
    from defenda_flower.inprocess import task_identity

    with task_identity(run_id=0):
        msg = Message(RecordDict({"arrays": model_arrays(model), "config": ConfigRecord(dict(config))}),
                      dst_node_id=0, message_type=MessageType.TRAIN)
    reply = Message(RecordDict({"arrays": ArrayRecord({k: v.detach().cpu() for k, v in trained.state_dict().items()}),
                                "metrics": MetricRecord({"num-examples": num_examples})}), reply_to=msg)
    return msg, reply


def through_mod(mod: Callable[..., Any] | None, msg: Any, reply: Any, seed: int | None) -> Any:
    """``reply`` after ``mod`` (called as a ClientApp would call it, the ClientApp returning ``reply``)."""
    if mod is None:
        return reply
    from flwr.app import Context, RecordDict

    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with numpy_seeded(seed):
        out = mod(msg, context, lambda m, c: reply)
    if out.has_error():
        raise RuntimeError(f"Flower's {getattr(mod, '__name__', type(mod).__name__)} refused the update: "
                           f"{out.error.reason}")
    return out


class FlowerClientDefense(Defense):
    """Shared code: train like a Flower client, pass the reply through one of Flower's client mods."""

    #: what the curious server receives (recorded in the update's meta)
    observes: ClassVar[str] = ""

    def mod(self) -> Callable[..., Any] | None:
        """The Flower mod applied to the client's reply (None: the raw reply)."""
        return None

    def config(self) -> dict[str, Any]:
        """The train config the Flower server-side wrapper would send (e.g. the clipping norm)."""
        return {}

    def meta(self) -> dict[str, Any]:
        return {}

    def client_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RoundSettings,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        from defenda_flower.arrays import delta_arrays

        names = [n for n, _ in model.named_parameters()]
        batches = batches_for(x, y, settings)
        trained = train_copy(model, batches, settings.lr)
        msg, reply = flower_messages(model, trained, self.config(), len(x))
        out = through_mod(self.mod(), msg, reply, noise_seed(generator))
        sent = next(iter(msg.content.array_records.values()))
        delta = delta_arrays(next(iter(out.content.array_records.values())), sent)
        self.remember(delta, names)
        meta = {**self.meta(), "observes": self.observes, "framework": "flower"}
        if settings.kind == "gradient":
            tensors = [torch.from_numpy(-delta[n] / np.float32(settings.lr)).to(x.device) for n in names]
            return SharedUpdate(tensors=tensors, names=names, kind="gradient", batch_size=len(x), lr=settings.lr,
                                meta=meta)
        tensors = [torch.from_numpy(np.array(delta[n], copy=True)).to(x.device) for n in names]
        return SharedUpdate(tensors=tensors, names=names, kind="delta", batch_size=len(x), local_steps=len(batches),
                            lr=settings.lr, local_epochs=settings.local_epochs,
                            local_batch_size=settings.local_batch_size, meta=meta)

    def remember(self, delta: dict[str, np.ndarray], names: list[str]) -> None:
        """Hook for server-side processing of this round's updates (the server-clipping defense)."""
        return None


class FlowerLocalDp(FlowerClientDefense):
    """Flower's LocalDpMod: each client clips its update and adds Gaussian noise before sending it.

    Paper: D. J. Beutel et al., "Flower: A Friendly Federated Learning Research Framework",
    arXiv 2007.14390 (the framework); calibration s = Δ₂·√(2 ln(1.25/δ))/ε of the Gaussian
    mechanism, C. Dwork, A. Roth, "The Algorithmic Foundations of Differential Privacy", 2014,
    Thm. A.1. <https://arxiv.org/abs/2007.14390>

    Acts on: the client's reply, through Flower's own ``flwr.clientapp.mod.LocalDpMod``: the
    update Δ = reply − θ_r is flat-clipped to L2 norm ``clipping_norm``, then N(0, s²) with
    s = sensitivity·√(2 ln(1.25/δ))/ε is added to every entry of the returned parameters.
    The server observes the noisy update (noise before observation). ε is per release (one
    round's update); Flower composes nothing across rounds. The server is told nothing in
    ``meta`` beyond what Flower's mod logs: ``local_dp_std``, ``clipping_norm``, ``epsilon``,
    ``delta``, ``sensitivity`` (defense-internal, hidden from attacks by the harness).

    Arguments:
        epsilon (float, 10.0): ε of one release; the strength, smaller is stronger.
        clipping_norm (float, 1.0): C, the L2 bound of the update (Flower's flat clipping).
        sensitivity (float, 0.0): Δ₂ passed to Flower; 0 = 2·clipping_norm (replace-one of a clipped update).
        delta (float, 1e-05): δ of one release.

    Example::

        [[defenses]]
        name = "flower-local-dp"
        epsilon = [100.0, 10.0, 1.0]
        clipping_norm = 1.0
    """

    name = "flower-local-dp"
    default_sweep = (1000.0, 100.0, 10.0, 1.0)
    observes = "θ_r + clip(Δ) + N(0, s²): the noise is in every reply the server receives"

    @dataclass(frozen=True)
    class Params:
        epsilon: float = param(10.0, "ε of one release (one round's update); smaller is stronger", strength="down")
        clipping_norm: float = param(1.0, "C: L2 bound of the client's update before the noise (Flower's flat clip)")
        sensitivity: float = param(0.0, "Δ₂ given to Flower's LocalDpMod; 0 = 2·clipping_norm (replace-one)")
        delta: float = param(1e-5, "δ of one release")

        def __post_init__(self) -> None:
            if not (math.isfinite(self.epsilon) and self.epsilon > 0):
                raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon}")
            if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
                raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")
            if not (self.sensitivity >= 0 and 0 < self.delta < 1):
                raise ValueError(f"sensitivity must be >= 0 and delta in (0, 1), got {self.sensitivity}, {self.delta}")

    @property
    def sensitivity(self) -> float:
        return self.params.sensitivity or 2.0 * self.params.clipping_norm

    @property
    def std(self) -> float:
        """Flower's noise std s = sensitivity·√(2 ln(1.25/δ))/ε."""
        p = self.params
        return float(self.sensitivity * np.sqrt(2 * np.log(1.25 / p.delta)) / p.epsilon)

    def mod(self) -> Callable[..., Any]:
        from flwr.clientapp.mod import LocalDpMod

        p = self.params
        return LocalDpMod(p.clipping_norm, self.sensitivity, p.epsilon, p.delta)

    def meta(self) -> dict[str, Any]:
        p = self.params
        return {"local_dp_std": self.std, "clipping_norm": p.clipping_norm, "epsilon": p.epsilon, "delta": p.delta,
                "sensitivity": self.sensitivity, "dp_level": "client"}

    def noise_position(self) -> str | None:
        return "before"


class FlowerFixedClipping(FlowerClientDefense):
    """Flower's fixedclipping_mod alone: each client flat-clips its update; no noise.

    Paper: H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018 (flat clipping). <https://arxiv.org/abs/1710.06963>

    Acts on: the client's reply, through Flower's own ``flwr.clientapp.mod.fixedclipping_mod``
    (the clipping norm travels in the train config, as Flower's
    ``DifferentialPrivacyClientSideFixedClipping`` sends it): Δ = reply − θ_r is scaled to L2
    norm at most ``clipping_norm``. Clipping bounds a client's influence but gives no DP; the
    server observes the clipped update. The server is told ``clipping_norm`` in ``meta``.

    Arguments:
        clipping_norm (float, 1.0): C, the L2 bound of the update; the strength, smaller is stronger.

    Example::

        [[defenses]]
        name = "flower-fixed-clipping"
        clipping_norm = [1.0, 0.1, 0.01]
    """

    name = "flower-fixed-clipping"
    default_sweep = (1.0, 0.3, 0.1, 0.03)
    observes = "θ_r + clip(Δ): the clipped update, no noise"

    @dataclass(frozen=True)
    class Params:
        clipping_norm: float = param(1.0, "C: L2 bound of the client's update (Flower's flat clip); smaller is "
                                          "stronger", strength="down")

        def __post_init__(self) -> None:
            if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
                raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")

    def mod(self) -> Callable[..., Any]:
        from flwr.clientapp.mod import fixedclipping_mod

        return fixedclipping_mod

    def config(self) -> dict[str, Any]:
        return {KEY_CLIPPING_NORM: float(self.params.clipping_norm)}

    def meta(self) -> dict[str, Any]:
        return {"clipping_norm": self.params.clipping_norm}


class FlowerCentralDp(FlowerClientDefense):
    """Flower's central-DP strategy wrappers: clipped updates, Gaussian noise on the aggregate.

    Paper: H. B. McMahan, D. Ramage, K. Talwar, L. Zhang, "Learning Differentially Private Recurrent
    Language Models", ICLR 2018; R. C. Geyer, T. Klein, M. Nabi, "Differentially Private Federated
    Learning: A Client Level Perspective", arXiv 1712.07557. <https://arxiv.org/abs/1710.06963>

    Acts on: the round's updates and their aggregate, as Flower's
    ``DifferentialPrivacyClientSideFixedClipping`` (``clipping = "client"``: clients clip
    with Flower's ``fixedclipping_mod``; the server observes clipped updates) or
    ``DifferentialPrivacyServerSideFixedClipping`` (``clipping = "server"``: the server
    receives raw updates and clips them itself with Flower's ``compute_clip_model_update``
    before aggregating). Either way the server adds N(0, std²) to the aggregate with
    Flower's ``add_gaussian_noise_inplace`` at ``compute_stdv`` = z·C/K (K: the
    federation's clients per round, 1 outside one) — after the point where the curious
    server observes, so it gives no protection against the server itself. Aggregation
    keeps Flower FedAvg's weights n_k/Σn (under-noised unless equal, see the federation
    reference). The server is told ``clipping_norm``, ``noise_multiplier``, ``clipping``
    and ``num_sampled_clients`` in ``meta``.

    Arguments:
        noise_multiplier (float, 1.0): z, noise std on the aggregate in units of clipping_norm/K; the strength,
            larger is stronger.
        clipping_norm (float, 1.0): C, the L2 bound of each client's update.
        clipping (str, "client"): ``client`` (fixedclipping_mod on the client) or ``server`` (the server clips).

    Example::

        [federation]
        clients = 10
        clients_per_round = 5

        [[defenses]]
        name = "flower-central-dp"
        noise_multiplier = [0.5, 1.0]
        clipping = "server"
    """

    name = "flower-central-dp"
    default_sweep = (0.1, 0.3, 1.0, 3.0)

    @dataclass(frozen=True)
    class Params:
        noise_multiplier: float = param(1.0, "z: std of the noise on the aggregate in units of clipping_norm/K",
                                        strength="up")
        clipping_norm: float = param(1.0, "C: L2 bound of each client's update")
        clipping: str = param("client", "where the update is clipped: 'client' (fixedclipping_mod) or 'server'",
                              choices=("client", "server"))

        def __post_init__(self) -> None:
            if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
                raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
            if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
                raise ValueError(f"clipping_norm must be > 0, got {self.clipping_norm}")
            if self.clipping not in ("client", "server"):
                raise ValueError(f"clipping must be 'client' or 'server', got {self.clipping!r}")

    def __init__(self, params: object = None, **kwargs: object) -> None:
        super().__init__(params, **kwargs)
        self.plan: FederationPlan | None = None
        self._round: list[tuple[dict[str, np.ndarray], list[str]]] = []
        self._weights: list[float] | None = None

    @property
    def observes(self) -> str:  # type: ignore[override]
        if self.params.clipping == "server":
            return "θ_r + Δ: the raw update (the server clips it after receiving it); noise only on the aggregate"
        return "θ_r + clip(Δ): the clipped update before the noise, which goes on the aggregate only"

    @property
    def num_sampled_clients(self) -> int:
        return self.plan.clients_per_round if self.plan is not None else 1

    def join_federation(self, plan: FederationPlan) -> None:
        self.plan = plan

    def mod(self) -> Callable[..., Any] | None:
        if self.params.clipping == "server":
            return None
        from flwr.clientapp.mod import fixedclipping_mod

        return fixedclipping_mod

    def config(self) -> dict[str, Any]:
        return {KEY_CLIPPING_NORM: float(self.params.clipping_norm)} if self.params.clipping == "client" else {}

    def meta(self) -> dict[str, Any]:
        p = self.params
        return {"clipping_norm": p.clipping_norm, "noise_multiplier": p.noise_multiplier, "clipping": p.clipping,
                "num_sampled_clients": self.num_sampled_clients, "dp_level": "client"}

    @property
    def std(self) -> float:
        from flwr.supercore.differential_privacy import compute_stdv

        p = self.params
        return compute_stdv(p.noise_multiplier, p.clipping_norm, self.num_sampled_clients)

    def remember(self, delta: dict[str, np.ndarray], names: list[str]) -> None:
        if self.params.clipping == "server":
            self._round.append((delta, names))

    def aggregation_weights(self, sizes: list[int]) -> list[float]:
        weights = super().aggregation_weights(sizes)
        self._weights = weights
        return weights

    def server_update(self, aggregate: SharedUpdate, clients: int,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, clip_inputs_inplace

        tensors = [t.detach().cpu() for t in aggregate.tensors]
        scale = 1.0
        if aggregate.kind == "gradient":  # Flower's units are parameters: the step is −η·g
            scale = -float(aggregate.lr or 0.1)
        if self.params.clipping == "server" and len(self._round) >= clients and self._weights is not None \
                and len(self._weights) == clients:
            # the server clips each received update itself (Flower's flat clip), then aggregates
            summed = None
            for (delta, names), w in zip(self._round[-clients:], self._weights):
                arrays = [np.array(delta[n], copy=True) for n in names]
                clip_inputs_inplace(arrays, self.params.clipping_norm)
                part = [torch.from_numpy(a) * w for a in arrays]
                summed = part if summed is None else [s + q for s, q in zip(summed, part)]
            assert summed is not None
            tensors = [s / scale if aggregate.kind == "gradient" else s for s in summed]
        self._round, self._weights = [], None
        noise = [np.zeros(tuple(t.shape), dtype=np.float32) for t in tensors]
        with numpy_seeded(noise_seed(generator)):
            add_gaussian_noise_inplace(noise, self.std)
        noisy = [t + torch.from_numpy(n).to(t.dtype) / scale for t, n in zip(tensors, noise)]
        device = aggregate.tensors[0].device if aggregate.tensors else torch.device("cpu")
        return aggregate.replace([t.to(device) for t in noisy], server_noise_std=self.std,
                                 noise_denominator=self.num_sampled_clients)

    def client_noise_multiplier(self) -> float | None:
        return self.params.noise_multiplier

    def noise_position(self) -> str | None:
        return "after" if self.params.noise_multiplier > 0 else None


DEFENSES = (FlowerLocalDp, FlowerFixedClipping, FlowerCentralDp)
