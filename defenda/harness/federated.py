"""The harness side of a real federation: the training-run job, and the trial that reads its observations.

A training run (:func:`run_training`) simulates the study's federation under one
defense (:func:`defenda.federation.run.run_federation`), writes the observations
of its attack rounds under ``DIR/runs/<run key>/`` and returns its utility row:
test accuracy per round and at the end, and the DP accounting of that same run.
A trial (:func:`prepare_federated`) loads one observation: the global model θ_r,
the update the server observed (or, for a malicious server, the update the same
clients compute on the attacker's model), and the ground truth to score against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from defenda.compose import make_defense
from defenda.errors import UnsupportedError
from defenda.federation.accounting import client_level_epsilon, ledger_epsilon
from defenda.federation.run import Observation, RunResult, plan_of, replay_unit, run_federation
from defenda.federation.settings import FederationSettings
from defenda.harness.observations import load_observation, observation_path, save_observation
from defenda.harness.services import in_plugin, load_task
from defenda.plugins import Plugins

if TYPE_CHECKING:
    from defenda.harness.jobs import Trial, UtilityJob
    from defenda.interfaces import Defense
    from defenda.records import SharedUpdate


def _settings(job: UtilityJob | Trial) -> FederationSettings:
    fs = job.federation
    assert isinstance(fs, FederationSettings)
    return fs


def calibrate_for(defense: Defense, fs: FederationSettings, n_train: int) -> None:
    """Target-ε calibration for the expected ledger of a client: ``rounds·K/N`` participations of
    ``steps_for(n̄)`` local steps at rate b/n̄ (n̄ = mean client size). An approximation, documented:
    the realised participations vary by client."""
    n_mean = max(1, n_train // fs.clients)
    b = min(defense.client_batch_size(fs.local_batch_size), n_mean)
    participations = max(1, math.ceil(fs.rounds * fs.clients_per_round / fs.clients))
    steps_per = 1 if fs.update == "gradient" else fs.local_epochs * math.ceil(n_mean / b)
    defense.calibrate(steps=participations * steps_per, sample_rate=b / n_mean, delta=fs.delta, local_steps=1)


def epsilon_at(result: RunResult, fs: FederationSettings, obs: Observation, accountant: str = "rdp", *,
               release: bool = False) -> dict[str, float]:
    """ε of each observed client of ``obs`` after that round, keyed ``"<round>:<client>"``
    (sample level: the client's ledger so far; client level: the rounds so far); under secure
    aggregation also ``"<round>:-1"``, the worst client of the aggregate.

    ``release=True``: the ε of the single attacked release instead (that round's mechanism alone,
    not composed with earlier rounds: the ledger's last entry, or one client-level round).
    """
    out = {}
    z = result.client_epsilon_noise
    for k, c in obs.clients.items():
        if z is not None:
            eps = client_level_epsilon(z, fs.clients_per_round / fs.clients, 1 if release else obs.round + 1,
                                       fs.delta)
        elif result.ledger.entries(k) and (c.ledger_entries or not release):
            first = c.ledger_entries - 1 if release else 0
            eps = ledger_epsilon(result.ledger.entries(k)[first:c.ledger_entries], fs.delta, accountant)
        else:
            continue
        out[f"{obs.round}:{k}"] = eps
    if obs.hidden and out:  # an aggregate (client -1): the worst of its clients
        out[f"{obs.round}:-1"] = max(out.values())
    return out


def _participations(fs: FederationSettings, seed: int, client: int, upto_round: int) -> int:
    from defenda.federation.sampling import sample_clients

    return sum(client in sample_clients(fs.clients, fs.clients_per_round, r, seed=seed, mode=fs.sampling)
               for r in range(upto_round + 1))


def _client_bound(result: RunResult, fs: FederationSettings, defense: Defense, obs: Observation, client: int,
                  seed: int, kappa: float) -> dict[str, Any]:
    """The ReRo bound on identifying one record of ``client`` from what the server held after ``obs``'s
    round (reference ``bounds.md`` §2.5), or why no bound covers the server."""
    from defenda.federation import bounds

    z = result.client_epsilon_noise
    if z is not None and defense.noise_position() == "after":
        return {"kappa": kappa, "bound": None, "covered": False, "method": None,
                "reason": "central DP-FedAvg: the server sees each clipped update before the noise"}
    if z is not None:  # distributed DP-FedAvg: each client noises its clipped update, N(0, (zS)²/K)
        std = z / math.sqrt(fs.clients_per_round)
        segments = bounds.local_dp_segments(std, 1.0, _participations(fs, seed, client, obs.round))
    else:
        segments = bounds.sample_level_segments(result.ledger.entries(client)[:obs.clients[client].ledger_entries])
    any_record = bounds.rero_accounting(segments, kappa)
    in_batch = _in_attacked_batch(segments, obs.clients[client].settings)
    got = bounds.rero_accounting(in_batch, kappa)
    return {"kappa": kappa, "bound": got.value, "covered": True, "method": got.method, "reason": "",
            "bound_any_record": any_record.value,
            "gdp_estimate": bounds.rero_gdp_estimate(in_batch, kappa) if in_batch else None}


def _in_attacked_batch(segments: list[tuple[float, float, int]], settings: Any) -> list[tuple[float, float, int]]:
    """The ledger as it bounds a record *known to be in* the attacked FedSGD batch.

    The attacks are scored on the samples the client actually drew, i.e. conditioned on the
    target's inclusion in that round: the subsampling of that one release amplifies nothing
    for them, so its entry counts at q = 1 (earlier rounds keep their rate). Comparing the
    measured identification rate with the amplified bound (``bound_any_record``, the protection
    of a record chosen before sampling) would be comparing two different experiments. FedAvg's
    truth is the client's whole data, whose per-step Poisson sampling the bound keeps.
    """
    if not segments or settings.kind != "gradient":
        return segments
    sigma, _, steps = segments[-1]
    return [*segments[:-1], (sigma, 1.0, steps)]


def rero_at(result: RunResult, fs: FederationSettings, defense: Defense, obs: Observation, seed: int,
            kappa: float) -> dict[str, dict[str, Any]]:
    """The reconstruction-robustness bound for each observed client of ``obs`` (and ``"<round>:-1"``, the
    worst client of an aggregate), keyed like :func:`epsilon_at`; empty without a DP defense."""
    if result.client_epsilon_noise is None and not any(result.ledger.entries(k) for k in obs.clients):
        return {}
    out = {f"{obs.round}:{k}": _client_bound(result, fs, defense, obs, k, seed, kappa) for k in obs.clients}
    if obs.hidden and out:
        covered = [b for b in out.values() if b["covered"]]
        out[f"{obs.round}:-1"] = max(covered, key=lambda b: b["bound"]) if len(covered) == len(out) \
            else next(b for b in out.values() if not b["covered"])
    return out


def measure_federation(plugins: Plugins, job: UtilityJob, device: torch.device,
                       out_dir: str) -> tuple[float, float | None, dict[str, Any]]:
    """Run the job's federation; store its observations; test accuracy, ε and the run's record."""
    from defenda.federation.run import run_epsilon

    fs = _settings(job)
    task, data = load_task(plugins.registry, job.task, job.task_params)
    defense = make_defense(plugins.registry, job.defense, job.defense_params)
    calibrate_for(defense, fs, len(data.train[0]))
    result = run_federation(data, lambda: task.build_model(data), defense, fs, seed=job.seed, device=device)
    from defenda.metrics import IDENTIFICATION_CANDIDATES

    eps_at: dict[str, float] = {}
    release_at: dict[str, float] = {}
    bounds_at: dict[str, dict[str, Any]] = {}
    for obs in result.observations:
        save_observation(observation_path(out_dir, job.key, obs.round), obs)
        eps_at.update(epsilon_at(result, fs, obs, defense.ledger_accountant()))
        release_at.update(epsilon_at(result, fs, obs, defense.ledger_accountant(), release=True))
        bounds_at.update(rero_at(result, fs, defense, obs, job.seed, 1.0 / IDENTIFICATION_CANDIDATES))
    dp = run_epsilon(result, defense, fs)
    extra = {"accuracy": [[r, a] for r, a in result.accuracy], "partition_hash": result.partition_hash,
             "client_sizes": result.client_sizes, "skipped_rounds": result.skipped_rounds,
             "dp": dp, "epsilon_at": eps_at,
             "epsilon_release_at": release_at, "rero_at": bounds_at, "noise_position": defense.noise_position(),
             "hides_client_updates": defense.hides_client_updates, "federation": fs.to_dict(),
             "participations": {str(k): result.ledger.participations(k) for k in range(fs.clients)
                                if result.ledger.participations(k)}}
    return result.test_acc, (dp or {}).get("epsilon"), extra


@dataclass
class ObservedCase:
    """What one federated trial attacks and is scored against."""

    update: SharedUpdate
    x: torch.Tensor
    y: torch.Tensor
    facts: dict[str, Any]


def _nominal_batch(obs: Observation, unit: Any, defense: Defense, realised: int) -> int:
    """The batch size a row is grouped by: under Poisson-sampled FedSGD (DP-SGD) the expected size of the
    unit's batches, which the realised ``num_samples`` varies around; otherwise the samples behind it."""
    if not defense.poisson_sampling or unit.update.kind != "gradient":
        return realised
    return sum(obs.clients[k].settings.local_batch_size for k in unit.clients)


def prepare_federated(trial: Trial, data: Any, model: torch.nn.Module, defense: Defense,
                      attack_plugin: str, malicious: bool, prepare_model: Any) -> tuple[torch.nn.Module, ObservedCase]:
    """Load the trial's observation: θ_r into ``model``, the observed (or replayed) update, the truth."""
    fs = _settings(trial)
    assert trial.out_dir is not None and trial.round is not None
    obs = load_observation(observation_path(trial.out_dir, trial.utility_key, trial.round))
    if trial.target >= len(obs.units):
        what = "one aggregate (the defense hides client updates)" if obs.hidden else f"{len(obs.units)} client(s)"
        raise UnsupportedError(f"round {trial.round}: the server observed {what}; no target #{trial.target}")
    unit = obs.units[trial.target]
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in obs.model_state.items()})
    update = unit.update
    if malicious:
        model = in_plugin(attack_plugin, prepare_model, model, data).to(device)
        defense.join_federation(plan_of(fs))
        update = replay_unit(obs, unit, model, defense, fs)
    x, y = obs.truth(unit)
    if len(x) == 0:
        raise UnsupportedError(f"round {obs.round}: the Poisson-sampled batch behind this update was empty "
                               "(DP-SGD): it is noise only, there is nothing to reconstruct")
    facts = {"round": obs.round, "client": unit.clients[0] if len(unit.clients) == 1 else -1,
             "num_samples": len(x), "aggregation_size": len(unit.clients),
             "batch_size": _nominal_batch(obs, unit, defense, len(x)),
             "local_steps": update.local_steps, "clients": unit.clients}
    return model, ObservedCase(update, x.to(device), y.to(device), facts)
