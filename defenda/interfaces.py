"""The objects that flow through one trial, and the base classes plugins subclass.

Data flow (see DESIGN.md)::

    Task ──► TaskData, model θ, private batch (x, y)
    Defense.client_update(model, x, y) ──► SharedUpdate          (what the server sees)
    Attack.reconstruct(update, model, knowledge) ──► Reconstruction
    Metric.compute(truth, matched reconstruction, data) ──► {column: value}

Conventions every plugin relies on:

* Tensors ``x`` are in *model space*: what the model consumes (images
  normalised with the task's mean/std, tabular features standardised).
  ``TaskData.to_unit`` maps them back to the unit space in which metrics
  are computed (images in [0, 1]).
* A ``SharedUpdate`` holds one tensor per ``model.named_parameters()`` entry,
  in that order: a gradient (FedSGD) or a weight delta θ_after − θ_before
  (FedAvg).
* Plugins never import each other; they use only ``defenda``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from defenda.params import build_params

if TYPE_CHECKING:
    from torch import nn

    from defenda.federation import GradientHistory

UpdateKind = Literal["gradient", "delta"]
ServerKind = Literal["honest", "malicious"]
TaskKind = Literal["image", "tabular"]

#: Knowledge flags an attacker may be granted (each a column of the trial's row).
KNOWLEDGE_FLAGS = ("labels", "batch_size", "bn_stats", "public_data", "lr", "gradient_history")


@dataclass(frozen=True)
class EmptyParams:
    """A plugin without parameters."""


@dataclass
class TaskData:
    """A task's data, already split and transformed to model space.

    :ivar train: ``(x, y)`` the federated clients' data (victim batches are drawn here).
    :ivar test: ``(x, y)`` held out, for utility (test accuracy).
    :ivar public: ``(x, y)`` the attacker's public sample from the same distribution
        (for generative priors); disjoint from ``train`` and ``test``.
    :ivar mean, std: model-space transform, ``x_model = (x_unit - mean) / std``,
        broadcastable to one sample (per channel ``(C, 1, 1)`` for images,
        per feature ``(F,)`` for tabular data).
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
class SharedUpdate:
    """What the server observes from one client in one round.

    :ivar tensors: one tensor per ``model.named_parameters()`` entry (same order and shapes).
    :ivar names: the parameter names, for attacks that look up a layer.
    :ivar kind: ``"gradient"`` (FedSGD, gradient of the mean loss on the batch) or
        ``"delta"`` (FedAvg, ``θ_after − θ_before`` after ``local_steps`` SGD steps).
    :ivar meta: defense metadata the server is told or can infer (σ, C, bits, …).
    """

    tensors: list[torch.Tensor]
    names: list[str]
    kind: UpdateKind = "gradient"
    batch_size: int = 1
    local_steps: int = 1
    lr: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def replace(self, tensors: list[torch.Tensor], **meta: Any) -> SharedUpdate:
        """A copy with new tensors and extra metadata (defenses chain through this)."""
        return dataclasses.replace(self, tensors=tensors, meta={**self.meta, **meta})

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))


@dataclass
class Knowledge:
    """What the attacker knows besides the update and the model.

    Fields the study did not grant are ``None`` (``granted`` lists the flags).
    ``public`` is the attacker's own image sample (flag ``public_data``);
    ``history`` replays earlier rounds of other clients' gradients (flag
    ``gradient_history``, see :mod:`defenda.federation`) — gradients only, no images.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    task_kind: TaskKind
    mean: torch.Tensor
    std: torch.Tensor
    granted: frozenset[str] = frozenset()
    batch_size: int | None = None
    labels: torch.Tensor | None = None
    public: tuple[torch.Tensor, torch.Tensor] | None = None
    lr: float | None = None
    history: GradientHistory | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache_dir: str | None = None

    @property
    def box(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Valid input range in model space (images: the [0, 1] box), or None for tabular data."""
        if self.task_kind != "image":
            return None
        lo = (torch.zeros(self.input_shape) - self.mean) / self.std
        hi = (torch.ones(self.input_shape) - self.mean) / self.std
        return lo.to(self.device), hi.to(self.device)


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


@dataclass(frozen=True)
class Requirements:
    """What an attack needs; a cell that cannot meet it becomes a ``skipped`` row.

    :ivar server: ``"malicious"`` when the attack must choose the model's weights
        (then :meth:`Attack.prepare_model` is called and the study must allow it).
    :ivar updates: update kinds the attack understands.
    :ivar knowledge: flags from :data:`KNOWLEDGE_FLAGS` the study must grant.
    :ivar task_kinds: task kinds the attack handles.
    """

    server: ServerKind = "honest"
    updates: frozenset[str] = frozenset({"gradient"})
    knowledge: frozenset[str] = frozenset()
    task_kinds: frozenset[str] = frozenset({"image", "tabular"})


class Plugin:
    """Common base: a slug ``name``, a nested ``Params`` dataclass, the owning plugin.

    Construct with keyword arguments (``Geiping(iterations=100)``) or a
    ``Params`` instance (``Geiping(params)``). Unknown names raise
    :class:`defenda.errors.ParamError` listing the valid ones.
    """

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    Params: ClassVar[type] = EmptyParams
    #: filled in by the registry: the plugin (entry point) that registered the class
    plugin_name: ClassVar[str] = ""
    plugin_dist: ClassVar[str] = ""
    plugin_version: ClassVar[str] = ""

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("pass either a Params instance or keyword arguments, not both")
        if params is None:
            params = build_params(self.Params, kwargs, f"{self.kind} '{self.name}'")
        elif isinstance(params, dict):
            params = build_params(self.Params, params, f"{self.kind} '{self.name}'")
        self.params = params

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


class Task(Plugin):
    """A data set plus a model family. Subclasses implement :meth:`load` and :meth:`build_model`."""

    kind: ClassVar[str] = "task"

    def load(self) -> TaskData:
        """Load and split the data deterministically (same result on every call)."""
        raise NotImplementedError

    def build_model(self, data: TaskData) -> nn.Module:
        """A freshly initialised model (the caller seeds torch first). No in-place ops."""
        raise NotImplementedError


class Defense(Plugin):
    """Changes how the client computes or shares its update.

    Subclasses override :meth:`transform` (post-process the honest update:
    noise, pruning, quantization) or :meth:`client_update` (compute it
    differently: DP-SGD). ``Params`` must mark one field as strength.
    """

    kind: ClassVar[str] = "defense"
    #: strengths swept by the default study when the study file gives none
    default_sweep: ClassVar[tuple[Any, ...]] = ()

    def client_update(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        kind: UpdateKind = "gradient",
        local_steps: int = 1,
        lr: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> SharedUpdate:
        """The update the server sees for the batch ``(x, y)``; ``model`` is left unchanged."""
        from defenda.client import compute_update  # core helper; lazy to keep import light

        update = compute_update(model, x, y, kind=kind, local_steps=local_steps, lr=lr)
        return self.transform(update, generator)

    def transform(self, update: SharedUpdate, generator: torch.Generator | None) -> SharedUpdate:
        """Post-process an honest update. Default: unchanged."""
        return update

    def client_batch_size(self, requested: int) -> int:
        """The batch size the client actually uses (the large-batch defense enlarges it)."""
        return requested

    def calibrate(self, *, steps: int, sample_rate: float, delta: float, local_steps: int = 1) -> Any:
        """Learn the federation's accounting before any update (DP target-ε mode). Default: nothing.

        Called by the harness before utility training and before the attacked update,
        so the attacker faces the same noise whose ε is reported.
        """
        return None

    def epsilon(self, *, steps: int, sample_rate: float, delta: float) -> float | None:
        """Privacy ε after ``steps`` of utility training (None for defenses without a DP guarantee)."""
        return None


class Attack(Plugin):
    """Reconstructs a client's batch from its shared update."""

    kind: ClassVar[str] = "attack"
    requires: ClassVar[Requirements] = Requirements()

    def check(self, model: nn.Module, data: TaskData, knowledge: Knowledge) -> str | None:
        """Why this attack cannot run on this model/task (a skip reason), or None when it can.

        The declared :attr:`requires` is checked by the harness before this is
        called; override to check the model's architecture.
        """
        return None

    def prepare_model(self, model: nn.Module, data: TaskData) -> nn.Module:
        """Malicious server only: choose the weights the client will use. Default: unchanged."""
        return model

    def reconstruct(self, update: SharedUpdate, model: nn.Module, knowledge: Knowledge) -> Reconstruction:
        """Reconstruct the batch. ``model`` is the model the client used (in eval mode)."""
        raise NotImplementedError


class Metric(Plugin):
    """Scores a matched reconstruction against the ground truth.

    ``columns`` names the values it returns; the standard ones (psnr, ssim,
    lpips, label_acc, mse, mae, feature_acc) are columns of the results
    table, others go to the row's ``extra`` JSON.
    """

    kind: ClassVar[str] = "metric"
    columns: ClassVar[tuple[str, ...]] = ()
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        """Values for ``columns``. ``x``, ``y`` and ``recon`` are matched row by row, in model space."""
        raise NotImplementedError
