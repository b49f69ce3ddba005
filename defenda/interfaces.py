"""The base classes plugins subclass: Task, Defense, Attack, Metric (their records: :mod:`defenda.records`).

Plugin authors import everything from the package root::

    from defenda import Attack, Defense, Reconstruction, Requirements, SharedUpdate, hookimpl, param

Plugins never import each other; they use only ``defenda``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from defenda import records
from defenda.federation.client import compute_update
from defenda.params import build_params

if TYPE_CHECKING:
    from torch import nn

    # records are only annotations here; at runtime the names are served (with a deprecation
    # warning) by __getattr__ below, for plugins that still import them from this module
    from defenda.records import (
        FederationPlan,
        Knowledge,
        Reconstruction,
        Requirements,
        RoundSettings,
        SharedUpdate,
        TaskData,
    )


@dataclass(frozen=True)
class EmptyParams:
    """A plugin without parameters."""


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

    def client_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RoundSettings,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        """The update the server sees for the batch ``(x, y)``; ``model`` is left unchanged.

        :param settings: the round's local-training settings (update kind, local steps, lr).
        :param generator: the defense's source of randomness (noise, sampling).
        """
        return self.transform(compute_update(model, x, y, settings), generator)

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

    # ---- in a federation (``[federation]`` in the study): the server side and the accounting ----

    #: the server observes only the aggregate of a round's clients, never one client's update
    #: (secure aggregation); then :meth:`secure_aggregate` produces what it sees
    hides_client_updates: ClassVar[bool] = False

    #: the defense's sample-level accounting (:meth:`sample_ledger_entry`) assumes that a FedSGD
    #: client's batch is Poisson-sampled, as Opacus' accountants do (DP-SGD). The federation then
    #: draws each of the client's n_k samples independently with probability q = min(1, b/n_k),
    #: the rate the ledger accounts, instead of min(b, n_k) samples without replacement: the batch
    #: may be empty or larger than b. ``settings.local_batch_size`` carries its expected size
    #: n_k·q = min(b, n_k), and :meth:`client_update` must accept an empty batch. Default False
    #: (fixed-size batches); FedAvg and the single-client protocol are not affected.
    poisson_sampling: ClassVar[bool] = False

    def join_federation(self, plan: FederationPlan) -> None:
        """Told the federation's shape (N, K, R, sampling, δ) before the first round. Default: nothing."""
        return None

    def aggregation_weights(self, sizes: list[int]) -> list[float]:
        """The weights p_k of the round's clients from their data sizes n_k (default n_k / Σ n_j)."""
        total = float(sum(sizes))
        return [n / total for n in sizes]

    def secure_aggregate(self, updates: list[SharedUpdate], weights: list[float],
                         generator: torch.Generator | None = None) -> SharedUpdate:
        """What a server that sees only the aggregate decodes: Σ p_k Δ_k (only called when
        :attr:`hides_client_updates`). Default: the exact weighted sum."""
        from defenda.federation.aggregation import weighted_sum

        return weighted_sum(updates, weights)

    def server_update(self, aggregate: SharedUpdate, clients: int,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        """Post-process the aggregate after the point where the server observes (central DP noise).
        Default: unchanged."""
        return aggregate

    def sample_ledger_entry(self, settings: RoundSettings, batch_size: int) -> tuple[float, float, int] | None:
        """Sample-level DP: the ``(noise multiplier, sample rate, steps)`` one participation adds to the
        client's ledger, or None (no sample-level guarantee)."""
        return None

    def client_noise_multiplier(self) -> float | None:
        """Client-level DP (DP-FedAvg): the noise multiplier z of each round's aggregate, or None."""
        return None

    def ledger_accountant(self) -> str:
        """The Opacus accountant a DP defense's ledger is composed with (``"rdp"`` or ``"prv"``)."""
        return "rdp"

    def noise_position(self) -> str | None:
        """Where the defense's noise enters relative to what a curious server observes: ``"before"``
        (it sees noisy updates), ``"after"`` (central DP: it sees them clean), None (no noise)."""
        return None


class Attack(Plugin):
    """Reconstructs a client's batch from its shared update."""

    kind: ClassVar[str] = "attack"
    requires: ClassVar[Requirements] = records.Requirements()

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


_MOVED = ("TaskData", "SharedUpdate", "Knowledge", "Reconstruction", "Requirements", "KNOWLEDGE_FLAGS",
          "UpdateKind", "ServerKind", "TaskKind")


def __getattr__(name: str) -> Any:
    # The records moved to defenda.records (import them from defenda); kept here for one release.
    if name in _MOVED:
        warnings.warn(f"defenda.interfaces.{name} moved: use `from defenda import {name}` "
                      "(the old path goes away in defenda 0.3)", DeprecationWarning, stacklevel=2)
        return getattr(records, name)
    raise AttributeError(f"module 'defenda.interfaces' has no attribute {name!r}")
