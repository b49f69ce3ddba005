"""Composed defenses: ``name = "prune+gaussian-noise"`` in a study is one defense cell.

The first defense computes the update (it may be DP-SGD, which computes its
own); each later one post-processes it with ``transform``. ε comes from the
component that has one (post-processing does not change a DP guarantee).
A study gives each component's parameters as an inline table::

    [[defenses]]
    name = "prune+gaussian-noise"
    prune = { fraction = 0.9 }
    gaussian-noise = { std = [0.01, 0.1] }     # a list is a sweep, as anywhere
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defenda.errors import ParamError
from defenda.interfaces import Defense
from defenda.records import FederationPlan, RoundSettings, SharedUpdate
from defenda.registry import Registry

SEPARATOR = "+"


def is_composed(name: str) -> bool:
    return SEPARATOR in name


def component_names(name: str) -> list[str]:
    parts = [p.strip() for p in name.split(SEPARATOR)]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise ParamError(f"defense '{name}': a composition names distinct defenses joined by '+', "
                         f"e.g. 'prune+gaussian-noise'")
    return parts


class ComposedDefense(Defense):
    """A chain of defenses applied in order (built by the harness, not registered)."""

    name = "composed"

    def __init__(self, parts: list[Defense]) -> None:
        self.parts = parts
        self.params = {p.name: p.params for p in parts}
        for later in parts[1:]:
            if type(later).client_update is not Defense.client_update:
                raise ParamError(f"defense '{later.name}' computes its own update, so it must come first "
                                 f"in a composition")

    def client_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RoundSettings,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        update = self.parts[0].client_update(model, x, y, settings, generator)
        for part in self.parts[1:]:
            update = part.transform(update, generator)
        return update

    def client_batch_size(self, requested: int) -> int:
        for part in self.parts:
            requested = part.client_batch_size(requested)
        return requested

    def calibrate(self, *, steps: int, sample_rate: float, delta: float, local_steps: int = 1) -> Any:
        for part in self.parts:
            part.calibrate(steps=steps, sample_rate=sample_rate, delta=delta, local_steps=local_steps)
        return None

    def epsilon(self, *, steps: int, sample_rate: float, delta: float) -> float | None:
        for part in self.parts:
            eps = part.epsilon(steps=steps, sample_rate=sample_rate, delta=delta)
            if eps is not None:
                return eps
        return None


    # ---- in a federation: each hook forwards to the components (first answer wins where one is needed)

    @property
    def hides_client_updates(self) -> bool:  # type: ignore[override]
        return any(p.hides_client_updates for p in self.parts)

    @property
    def poisson_sampling(self) -> bool:  # type: ignore[override]
        # one member whose accounting assumes Poisson batches is enough: its ε must match the draw
        return any(p.poisson_sampling for p in self.parts)

    def join_federation(self, plan: FederationPlan) -> None:
        for part in self.parts:
            part.join_federation(plan)

    def aggregation_weights(self, sizes: list[int]) -> list[float]:
        for part in self.parts:
            if type(part).aggregation_weights is not Defense.aggregation_weights:
                return part.aggregation_weights(sizes)
        return super().aggregation_weights(sizes)

    def secure_aggregate(self, updates: list[SharedUpdate], weights: list[float],
                         generator: torch.Generator | None = None) -> SharedUpdate:
        for part in self.parts:
            if part.hides_client_updates:
                return part.secure_aggregate(updates, weights, generator)
        return super().secure_aggregate(updates, weights, generator)

    def server_update(self, aggregate: SharedUpdate, clients: int,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        for part in self.parts:
            aggregate = part.server_update(aggregate, clients, generator)
        return aggregate

    def sample_ledger_entry(self, settings: RoundSettings, batch_size: int) -> tuple[float, float, int] | None:
        return _first(p.sample_ledger_entry(settings, batch_size) for p in self.parts)

    def client_noise_multiplier(self) -> float | None:
        return _first(p.client_noise_multiplier() for p in self.parts)

    def ledger_accountant(self) -> str:
        for part in self.parts:
            if part.sample_ledger_entry is not None and type(part).ledger_accountant is not Defense.ledger_accountant:
                return part.ledger_accountant()
        return "rdp"

    def noise_position(self) -> str | None:
        positions = {p.noise_position() for p in self.parts} - {None}
        # noise the server sees beats noise it does not: "before" if any component noises before it observes
        return "before" if "before" in positions else next(iter(positions), None)


def _first(values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def make_defense(registry: Registry, name: str, params: dict[str, Any]) -> Defense:
    """The defense for a trial: a registered one, or a composition of registered ones."""
    if not is_composed(name):
        return registry.get("defense", name).cls(params)
    parts = [registry.get("defense", n).cls(params.get(n, {})) for n in component_names(name)]
    return ComposedDefense(parts)
