"""The data records that flow between the steps of a trial (a leaf: it imports nothing of defenda).

Data flow (``docs/architecture.md`` maps each step to its module)::

    Task.load() ──► TaskData (splits, and the InputSpace they live in)
    Defense.client_update(model, x, y, RoundSettings) ──► SharedUpdate   (what the server sees)
    Attack.reconstruct(SharedUpdate, model, Knowledge) ──► Reconstruction
    Metric.compute(truth, matched Reconstruction, TaskData) ──► {column: value}

Conventions every plugin relies on:

* Tensors ``x`` are in *model space*: what the model consumes (images
  normalised with the task's mean/std, tabular features standardised).
  :meth:`InputSpace.to_unit` maps them back to the unit space in which metrics
  are computed (images in [0, 1]).
* A ``SharedUpdate`` holds one tensor per ``model.named_parameters()`` entry,
  in that order: a gradient (FedSGD) or a weight delta θ_after − θ_before
  (FedAvg).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from defenda.federation.history import GradientHistory

UpdateKind = Literal["gradient", "delta"]
ServerKind = Literal["honest", "malicious"]
TaskKind = Literal["image", "tabular"]

UPDATE_KINDS: tuple[str, ...] = ("gradient", "delta")
SERVER_KINDS: tuple[str, ...] = ("honest", "malicious")
TASK_KINDS: tuple[str, ...] = ("image", "tabular")
OBSERVATION_KINDS: tuple[str, ...] = ("client", "aggregate")
#: Knowledge flags an attacker may be granted (each a column of the trial's row).
KNOWLEDGE_FLAGS: tuple[str, ...] = ("labels", "batch_size", "bn_stats", "public_data", "lr", "gradient_history")


@dataclass(frozen=True)
class InputSpace:
    """Where one task's inputs live: shape, classes and the model-space transform.

    The one definition of the valid input box, shared by :class:`TaskData` (what
    the harness holds) and :class:`Knowledge` (what the attacker is told).

    :ivar mean, std: ``x_model = (x_unit - mean) / std``, broadcastable to one sample
        (per channel ``(C, 1, 1)`` for images, per feature ``(F,)`` for tabular data).
    """

    kind: TaskKind
    input_shape: tuple[int, ...]
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Model space → unit space (images in [0, 1]; raw feature values for tabular)."""
        return x * self.std.to(x) + self.mean.to(x)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Unit space → model space."""
        return (x - self.mean.to(x)) / self.std.to(x)

    @property
    def box(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Lower/upper bound of valid inputs in model space (images only: the [0, 1] box)."""
        if self.kind != "image":
            return None
        return self.to_model(torch.zeros(self.input_shape)), self.to_model(torch.ones(self.input_shape))


@dataclass
class TaskData:
    """A task's data, already split and transformed to model space.

    :ivar train: ``(x, y)`` the federated clients' data (victim batches are drawn here).
    :ivar test: ``(x, y)`` held out, for utility (test accuracy).
    :ivar public: ``(x, y)`` the attacker's public sample from the same distribution
        (for generative priors); disjoint from ``train`` and ``test``.
    :ivar mean, std: model-space transform (see :class:`InputSpace`).
    :ivar discrete_features: tabular columns that take few values (scored by accuracy).
    """

    name: str
    kind: TaskKind
    input_shape: tuple[int, ...]
    num_classes: int
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    public: tuple[torch.Tensor, torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor
    discrete_features: tuple[int, ...] = ()

    @property
    def space(self) -> InputSpace:
        """The input space of this task (what an attacker is told about the inputs)."""
        return InputSpace(self.kind, tuple(self.input_shape), self.num_classes, self.mean, self.std)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Model space → unit space (images in [0, 1]; raw feature values for tabular)."""
        return self.space.to_unit(x)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Unit space → model space."""
        return self.space.to_model(x)

    @property
    def box(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Lower/upper bound of valid inputs in model space (images only: the [0, 1] box)."""
        return self.space.box


@dataclass(frozen=True)
class RoundSettings:
    """How a client computes its update in one round (the federation's local-training settings).

    :ivar kind: ``"gradient"`` (FedSGD: one gradient of the mean loss on the batch) or
        ``"delta"`` (FedAvg: ``θ_after − θ_before`` after the client's local SGD steps).
    :ivar local_steps: FedAvg without ``local_epochs``: full-batch SGD steps on the batch.
    :ivar lr: the client's learning rate.
    :ivar local_epochs: FedAvg over the client's data: E epochs of shuffled mini-batches of
        ``local_batch_size`` (drop_last off, so ⌈n/b⌉ steps per epoch); 0 = ``local_steps``
        full-batch steps instead.
    :ivar local_batch_size: the mini-batch size b of those epochs; for FedSGD in a federation
        the size of the client's batch, min(b, n_k) — its expected size when the batch is
        Poisson-sampled (:attr:`defenda.Defense.poisson_sampling`); 0 = the batch's own size.
    :ivar order_seed: seeds the order of the mini-batches; kept apart from the defense's
        randomness so that every defense trains on the same batches.
    :ivar client_samples: n_k, the size of the client's local data (0 = the batch is all of
        it); sample-level DP accounts the batch as drawn at rate b/n_k.
    """

    kind: UpdateKind = "gradient"
    local_steps: int = 1
    lr: float = 0.1
    local_epochs: int = 0
    local_batch_size: int = 0
    order_seed: int = 0
    client_samples: int = 0

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"unknown update kind {self.kind!r}; use 'gradient' or 'delta'")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.local_epochs < 0 or (self.local_epochs > 0 and self.local_batch_size < 1):
            raise ValueError(f"local_epochs must be >= 0 and needs local_batch_size >= 1, got "
                             f"{self.local_epochs} epochs of batch {self.local_batch_size}")

    def steps_for(self, n: int) -> int:
        """Local SGD steps of a client with ``n`` samples (1 for FedSGD)."""
        if self.kind == "gradient":
            return 1
        if self.local_epochs > 0:
            return self.local_epochs * -(-n // self.local_batch_size)
        return self.local_steps


@dataclass(frozen=True)
class FederationPlan:
    """What a defense is told about the federation before training (:meth:`Defense.join_federation`).

    :ivar clients: N, the population.
    :ivar clients_per_round: K, clients sampled per round (the expected number under Poisson sampling).
    :ivar rounds: R.
    :ivar sampling: ``"uniform"`` (K of N without replacement) or ``"poisson"`` (each client at rate K/N).
    :ivar delta: the DP δ of the study.
    """

    clients: int
    clients_per_round: int
    rounds: int
    sampling: str = "uniform"
    delta: float = 1e-5

    @property
    def client_rate(self) -> float:
        """q_c = K/N, the client sampling rate."""
        return self.clients_per_round / self.clients


@dataclass
class SharedUpdate:
    """What the server observes from one client in one round.

    :ivar tensors: one tensor per ``model.named_parameters()`` entry (same order and shapes).
    :ivar names: the parameter names, for attacks that look up a layer.
    :ivar kind: ``"gradient"`` (FedSGD, gradient of the mean loss on the batch) or
        ``"delta"`` (FedAvg, ``θ_after − θ_before`` after ``local_steps`` SGD steps).
    :ivar masks: which coordinates carry the client's values: per tensor a 0/1 tensor of
        the same shape, 0 where the defense zeroed or dropped the coordinate (pruning,
        Soteria), or None for a tensor left whole; ``None`` when the defense dropped
        nothing. Attacks that match updates compare only the kept coordinates.
    :ivar meta: defense metadata the server is told or can infer (σ, C, bits, …).
    """

    tensors: list[torch.Tensor]
    names: list[str]
    kind: UpdateKind = "gradient"
    batch_size: int = 1
    local_steps: int = 1
    lr: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    masks: list[torch.Tensor | None] | None = None
    #: FedAvg over the client's data: epochs and mini-batch size (0 = ``local_steps`` full-batch steps)
    local_epochs: int = 0
    local_batch_size: int = 0


    def replace(self, tensors: list[torch.Tensor], *, masks: list[torch.Tensor | None] | None = None,
                **meta: Any) -> SharedUpdate:
        """A copy with new tensors and extra metadata (defenses chain through this).

        ``masks`` replaces the kept-coordinate masks when given; otherwise the
        earlier defense's masks stay (a later transform does not restore dropped values).
        """
        return dataclasses.replace(self, tensors=tensors, meta={**self.meta, **meta},
                                   masks=self.masks if masks is None else masks)

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))


@dataclass
class Knowledge:
    """What the attacker knows besides the update and the model.

    One source of truth: a knowledge flag is granted exactly when its field is set
    (:attr:`granted` derives the flags). ``public`` is the attacker's own sample
    (flag ``public_data``); ``history`` replays earlier rounds of other clients'
    gradients (flag ``gradient_history``, see :mod:`defenda.federation.history`) —
    gradients only, no images; ``bn_stats`` maps BatchNorm layer names to their
    ``(running_mean, running_var)``.
    """

    space: InputSpace
    batch_size: int | None = None
    labels: torch.Tensor | None = None
    public: tuple[torch.Tensor, torch.Tensor] | None = None
    lr: float | None = None
    history: GradientHistory | None = None
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache_dir: str | None = None

    @property
    def granted(self) -> frozenset[str]:
        """The knowledge flags this attacker holds (those whose field is set)."""
        fields = {"labels": self.labels, "batch_size": self.batch_size, "bn_stats": self.bn_stats,
                  "public_data": self.public, "lr": self.lr, "gradient_history": self.history}
        return frozenset(flag for flag, value in fields.items() if value is not None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.space.input_shape

    @property
    def num_classes(self) -> int:
        return self.space.num_classes

    @property
    def task_kind(self) -> TaskKind:
        return self.space.kind

    @property
    def mean(self) -> torch.Tensor:
        return self.space.mean

    @property
    def std(self) -> torch.Tensor:
        return self.space.std

    @property
    def box(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Valid input range in model space on the attack's device (images: the [0, 1] box), or None."""
        box = self.space.box
        return None if box is None else (box[0].to(self.device), box[1].to(self.device))


@dataclass
class Reconstruction:
    """An attack's answer: inputs in model space, optional labels, diagnostics.

    :ivar inputs: ``(B̂, *input_shape)``; B̂ may differ from the true batch size
        (unmatched samples count as failures).
    :ivar labels: ``(B̂,)`` class indices, or None when the attack does not recover labels.
    :ivar info: JSON-friendly diagnostics stored with the row (loss, exact count, …).
    """

    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _declaring_class() -> str:
    """The class whose body is constructing a record (``requires = Requirements(...)``), if any."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals is globals():  # skip this module's frames (and __init__)
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    qualname, module = frame.f_locals.get("__qualname__"), frame.f_locals.get("__module__")
    return f" in {module}.{qualname}" if isinstance(qualname, str) and isinstance(module, str) else ""


@dataclass(frozen=True)
class Requirements:
    """What an attack needs; a cell that cannot meet it becomes a ``skipped`` row.

    Checked at construction: an unknown value raises ``ValueError`` naming the
    declaring class and the allowed values (a typo would otherwise skip every cell).

    :ivar server: ``"malicious"`` when the attack must choose the model's weights
        (then :meth:`Attack.prepare_model` is called and the study must allow it).
    :ivar updates: update kinds the attack understands (from :data:`UPDATE_KINDS`).
    :ivar knowledge: flags from :data:`KNOWLEDGE_FLAGS` the study must grant.
    :ivar task_kinds: task kinds the attack handles (from :data:`TASK_KINDS`).
    :ivar observations: what the server may have observed: ``"client"`` (one client's
        update) and/or ``"aggregate"`` (only the sum over a round's clients, secure
        aggregation: the attack then faces the union of their samples).
    """

    server: ServerKind = "honest"
    updates: frozenset[str] = frozenset({"gradient"})
    knowledge: frozenset[str] = frozenset()
    task_kinds: frozenset[str] = frozenset({"image", "tabular"})
    observations: frozenset[str] = frozenset({"client", "aggregate"})

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.server not in SERVER_KINDS:
            raise ValueError(f"Requirements{_declaring_class()}: server {self.server!r} is not one of "
                             f"{list(SERVER_KINDS)}")
        for name, allowed in (("updates", UPDATE_KINDS), ("knowledge", KNOWLEDGE_FLAGS),
                              ("task_kinds", TASK_KINDS), ("observations", OBSERVATION_KINDS)):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (set, frozenset, list, tuple)):
                raise ValueError(f"Requirements{_declaring_class()}: {name} must be a set of strings, "
                                 f"got {value!r}")
            unknown = sorted(set(value) - set(allowed))
            if unknown:
                raise ValueError(f"Requirements{_declaring_class()}: unknown {name} {unknown}; "
                                 f"allowed: {list(allowed)}")
            object.__setattr__(self, name, frozenset(value))
