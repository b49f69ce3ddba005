"""The units of work a study expands into: a :class:`UtilityJob` per training run, a :class:`Trial` per attack.

Both are frozen records: built once from the study file, shipped to worker
processes (any executor pickles them), and keyed by a stable hash of what
determines their result, so a re-run finds what the store already has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from defenda.federation.settings import FederationSettings
from defenda.records import RoundSettings


def stable_hash(obj: Any) -> str:
    """A short, stable hex digest of a JSON-friendly object (the key of a trial or job)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Federation:
    """The federation settings shared by a study's training runs and attacked rounds.

    :ivar rounds: FedSGD/FedAvg rounds of utility training.
    :ivar client_batch_size: the client's batch size during utility training.
    :ivar lr: client learning rate = server step size.
    :ivar update: ``"gradient"`` (FedSGD) or ``"delta"`` (FedAvg).
    :ivar local_steps: FedAvg local steps.
    :ivar delta: the DP δ (0 = 1/len(train split)).
    """

    rounds: int
    client_batch_size: int
    lr: float
    update: str
    local_steps: int
    delta: float

    @property
    def round_settings(self) -> RoundSettings:
        """How a client computes its update in this federation."""
        return RoundSettings(kind=self.update, local_steps=self.local_steps, lr=self.lr)  # type: ignore[arg-type]


@dataclass(frozen=True)
class UtilityJob:
    """One training run: train the task's model under a defense; measure test accuracy and ε.

    :ivar key: stable hash of everything below except ``strength`` (stored rows are found by it).
    """

    key: str
    task: str
    task_params: dict[str, Any]
    defense: str
    defense_params: dict[str, Any]
    strength: float | None
    seed: int
    #: the single-client protocol's settings, or a real federation (``[federation]`` in the study)
    federation: Federation | FederationSettings

    @property
    def federated(self) -> bool:
        """A real federation (clients, rounds, observations), not the single-client protocol."""
        return isinstance(self.federation, FederationSettings)

    def ident(self) -> dict[str, Any]:
        """What determines the job's result (hashed into ``key``)."""
        fed = self.federation
        settings = ({"protocol": "federation", **fed.to_dict()} if isinstance(fed, FederationSettings)
                    else dataclasses.asdict(fed))
        return {"task": self.task, "task_params": self.task_params, "defense": self.defense,
                "defense_params": self.defense_params, "seed": self.seed, **settings}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for trackers and logs)."""
        return {**self.ident(), "key": self.key, "strength": self.strength}


@dataclass(frozen=True)
class Trial:
    """One attack on one defended update: a cell of the study's grid.

    The task, defense, seed and federation are those of the trial's training run
    (:attr:`utility`), read through properties, so the two can never disagree.

    :ivar key: stable hash of the trial's specification (not of study name, timeout or
        saving options), so renaming a study or changing its timeout resumes it.
    :ivar knowledge: the knowledge flags granted to the attacker (sorted).
    :ivar utility: the training run whose test accuracy and ε the trial's row carries.
    :ivar cache_dir: where attacks may cache what they learn (priors); set by the runner.
    """

    key: str
    study: str
    attack: str
    attack_params: dict[str, Any]
    batch_size: int
    server: str
    knowledge: tuple[str, ...]
    utility: UtilityJob
    timeout: float = 0
    save_reconstructions: bool = True
    cache_dir: str | None = None
    #: in a federation: the attacked round and which of its observed updates (0 = the first target)
    round: int | None = None
    target: int = 0
    #: the output directory whose ``runs/`` holds the observations; set by the runner
    out_dir: str | None = None

    @property
    def task(self) -> str:
        """The task's registered name (of the training run)."""
        return self.utility.task

    @property
    def task_params(self) -> dict[str, Any]:
        """The task's parameters (of the training run)."""
        return self.utility.task_params

    @property
    def defense(self) -> str:
        """The (possibly composed) defense's name (of the training run)."""
        return self.utility.defense

    @property
    def defense_params(self) -> dict[str, Any]:
        """The defense's parameters (of the training run)."""
        return self.utility.defense_params

    @property
    def strength(self) -> float | None:
        """The defense's strength (None without one) (of the training run)."""
        return self.utility.strength

    @property
    def seed(self) -> int:
        """The seed of the model, the batch and the defense (of the training run)."""
        return self.utility.seed

    @property
    def federation(self) -> Federation | FederationSettings:
        """The federation settings (of the training run)."""
        return self.utility.federation

    @property
    def utility_key(self) -> str:
        """The key of the training run (of the training run)."""
        return self.utility.key

    def ident(self) -> dict[str, Any]:
        """What determines a trial's result (hashed into ``key``)."""
        return {**self.utility.ident(), "attack": self.attack, "attack_params": self.attack_params,
                "strength": self.strength, "batch_size": self.batch_size, "server": self.server,
                "knowledge": list(self.knowledge),
                **({} if self.round is None else {"round": self.round, "target": self.target})}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, as ``defenda_trial_finished`` observers receive it."""
        return {**self.ident(), "key": self.key, "study": self.study, "timeout": self.timeout,
                "save_reconstructions": self.save_reconstructions, "utility_key": self.utility_key,
                "utility": self.utility.to_dict(), "cache_dir": self.cache_dir}
