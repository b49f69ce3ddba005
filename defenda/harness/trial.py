"""One trial: task → defended client update → attack → matched metrics → one result row.

Runs in a worker process; returns a plain row (and numpy arrays of the
reconstruction) so any executor can ship them back to the single writer.
The steps, each a function below: :func:`prepare` (task, model, defense,
victim batch, knowledge), :func:`observe` (the defended update the server
sees), :func:`attack` (the reconstruction), :func:`score` (matching and metrics).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from defenda.compose import make_defense
from defenda.contracts import reconstruction_problems, update_problems
from defenda.errors import UnsupportedError
from defenda.federation.settings import FederationSettings
from defenda.grants import grant_knowledge, visible_update
from defenda.harness.jobs import Federation, Trial
from defenda.harness.services import StageError, defense_plugin, in_plugin, load_task, resolve_device
from defenda.harness.store import METRIC_COLUMNS
from defenda.harness.utility import accounting_for, now
from defenda.interfaces import Attack, Defense
from defenda.plugins import Plugins, get_plugins
from defenda.records import Knowledge, Reconstruction, SharedUpdate, TaskData


@dataclass
class Victim:
    """Everything a trial sets up before the client computes its update."""

    data: TaskData
    attack: Attack
    attack_plugin: str
    defense: Defense
    defense_plugin: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    knowledge: Knowledge
    #: in a federation: the update the server observed (read, not recomputed) and the row's facts
    observed: SharedUpdate | None = None
    facts: dict[str, Any] | None = None


def _sample_batch(data: TaskData, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    x, y = data.train
    if size > len(x):
        raise UnsupportedError(f"batch size {size} is larger than the task's train split ({len(x)} samples)")
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(x), generator=gen)[:size]
    return x[idx], y[idx], gen


def skip_reason(attack: Attack, trial: Trial, data: TaskData, defense: Defense | None = None) -> str | None:
    """Why the declared requirements of ``attack`` cannot be met in this cell, or None."""
    req = attack.requires
    if defense is not None and defense.hides_client_updates and trial.round is not None \
            and "aggregate" not in req.observations:
        return "needs one client's update; under secure aggregation the server observes only the aggregate"
    if req.server == "malicious" and trial.server != "malicious":
        return "needs a malicious server (set server = \"malicious\" in [study])"
    if trial.federation.update not in req.updates:
        return f"needs a {' or '.join(sorted(req.updates))} update; the study shares a {trial.federation.update}"
    missing = sorted(req.knowledge - set(trial.knowledge))
    if missing:
        return f"needs attacker knowledge {missing} (add to [study] knowledge)"
    if data.kind not in req.task_kinds:
        return f"does not handle {data.kind} tasks"
    return None


def prepare(plugins: Plugins, trial: Trial, device: torch.device) -> Victim:
    """Load the task, build the (possibly malicious) model, calibrate the defense, draw the victim batch
    — or, in a federation, load the observed round (:func:`defenda.harness.federated.prepare_federated`)."""
    reg = plugins.registry
    task_plugin = reg.get("task", trial.task).origin.plugin
    task, data = in_plugin(task_plugin, load_task, reg, trial.task, trial.task_params)
    a_entry = reg.get("attack", trial.attack)
    attack: Attack = a_entry.cls(trial.attack_params)
    defense = make_defense(reg, trial.defense, trial.defense_params)
    d_plugin = defense_plugin(reg, trial.defense)
    reason = skip_reason(attack, trial, data, defense)
    if reason:
        raise UnsupportedError(f"{trial.attack}: {reason}")
    torch.manual_seed(trial.seed)
    model = in_plugin(task_plugin, task.build_model, data)
    malicious = attack.requires.server == "malicious"
    observed, facts = None, None
    if trial.round is not None:
        from defenda.harness.federated import calibrate_for, prepare_federated

        fs = trial.federation
        assert isinstance(fs, FederationSettings)
        in_plugin(d_plugin, calibrate_for, defense, fs, len(data.train[0]))
        model, case = prepare_federated(trial, data, model.to(device), defense, a_entry.origin.plugin, malicious,
                                        attack.prepare_model)
        x, y, gen, observed, facts = case.x, case.y, torch.Generator(), case.update, case.facts
    else:
        if malicious:
            model = in_plugin(a_entry.origin.plugin, attack.prepare_model, model, data)
        model = model.to(device)
        size = in_plugin(d_plugin, defense.client_batch_size, trial.batch_size)
        accounting = accounting_for(trial.federation, defense, len(data.train[0]))  # type: ignore[arg-type]
        in_plugin(d_plugin, defense.calibrate, **accounting.calibrate_args())
        x, y, gen = _sample_batch(data, size, trial.seed)
        x, y = x.to(device), y.to(device)
    knowledge = grant_knowledge(trial.knowledge, data, model, y, lr=trial.federation.lr, device=device,
                                seed=trial.seed, cache_dir=trial.cache_dir)
    why = in_plugin(a_entry.origin.plugin, attack.check, model, data, knowledge)
    if why:
        raise UnsupportedError(f"{trial.attack}: {why}")
    return Victim(data, attack, a_entry.origin.plugin, defense, d_plugin, model, x, y, gen, knowledge,
                  observed, facts)


def observe(trial: Trial, v: Victim) -> SharedUpdate:
    """The defended update the client shares, checked against the update contract."""
    if v.observed is not None:  # a federation: what the server received in that round
        update = v.observed
    else:
        v.model.train()
        fed = trial.federation
        assert isinstance(fed, Federation)
        update = in_plugin(v.defense_plugin, v.defense.client_update, v.model, v.x, v.y, fed.round_settings,
                           v.generator)
    problems = update_problems(update, v.model)
    if problems:
        raise StageError(v.defense_plugin, ValueError(f"client_update() {problems[0]}"))
    return update


def attack(trial: Trial, v: Victim, update: SharedUpdate) -> tuple[Reconstruction, float]:
    """The attack's reconstruction (checked against the reconstruction contract) and its time."""
    v.model.eval()
    torch.manual_seed(trial.seed + 1)
    t0 = time.perf_counter()
    # the attacker sees only what its knowledge grants (batch size, lr, no defense-internal metadata)
    recon = in_plugin(v.attack_plugin, v.attack.reconstruct, visible_update(update, v.knowledge), v.model,
                      v.knowledge)
    seconds = time.perf_counter() - t0
    problems = reconstruction_problems(recon, v.data.input_shape)
    if problems:
        raise StageError(v.attack_plugin, (TypeError if "returned" in problems[0] else ValueError)(problems[0]))
    return recon, seconds


def _metrics(plugins: Plugins, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction,
             data: TaskData) -> tuple[dict[str, Any], dict[str, Any], Reconstruction, torch.Tensor, torch.Tensor]:
    """Match ``recon`` one-to-one to the truth, then run every applicable metric plugin on it."""
    from defenda.metrics import apply_matching

    xm, ym, rm = apply_matching(x.cpu(), y.cpu(), recon, data=data)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for entry in plugins.registry.entries("metric"):
        if data.kind not in entry.cls.task_kinds:
            continue
        metric = entry.cls()
        out = in_plugin(entry.origin.plugin, metric.compute, xm, ym, rm, data)
        for col, val in out.items():
            (values if col in METRIC_COLUMNS else extra)[col] = None if val is None else float(val)
    return values, extra, rm, xm, ym


def score(plugins: Plugins, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction,
          data: TaskData) -> tuple[dict[str, Any], dict[str, Any], Reconstruction, torch.Tensor, torch.Tensor]:
    """Clip the reconstruction into the task's valid domain, match it to the truth, run every metric;
    score the prior-only guesses (:mod:`defenda.metrics.baseline`) on the same batch the same way."""
    from defenda.metrics import IDENTIFICATION_CANDIDATES, clip_to_domain, prior_guesses

    inputs, clipped = clip_to_domain(recon.inputs.detach().cpu(), data)
    labels = None if recon.labels is None else recon.labels.detach().cpu()
    values, extra, rm, xm, ym = _metrics(plugins, x, y, Reconstruction(inputs, labels, recon.info), data)
    extra["matched_fraction"] = rm.info.get("matched_fraction")
    extra["num_reconstructed"] = rm.info.get("num_reconstructed")
    extra["clipped_fraction"] = clipped
    extra["identification"] = {"candidates": IDENTIFICATION_CANDIDATES, "kappa": 1.0 / IDENTIFICATION_CANDIDATES}
    extra["baseline"] = {name: _metrics(plugins, x, y, guess, data)[0]
                         for name, guess in prior_guesses(x.cpu(), data).items()}
    return values, extra, rm, xm, ym


def _attack_trial(plugins: Plugins, trial: Trial,
                  device: torch.device) -> tuple[dict[str, Any], dict[str, Any], float, dict[str, np.ndarray] | None]:
    v = prepare(plugins, trial, device)
    update = observe(trial, v)
    recon, attack_seconds = attack(trial, v, update)
    values, extra, matched, xm, _ = score(plugins, v.x, v.y, recon, v.data)
    values["batch_size"] = len(v.x)  # what the client really used (large-batch defenses change it)
    if v.facts:  # a federation: under Poisson sampling the expected size; num_samples is what was drawn
        values.update({k: v.facts[k] for k in ("round", "client", "num_samples", "aggregation_size", "batch_size")})
        extra["observation"] = {"local_steps": v.facts["local_steps"], "clients": v.facts["clients"]}
    extra["attack_info"] = jsonable_info(recon.info)
    arrays = image_arrays(v.data, xm, matched) if trial.save_reconstructions else None
    return values, extra, attack_seconds, arrays


def image_arrays(data: TaskData, x: torch.Tensor, matched: Reconstruction) -> dict[str, np.ndarray] | None:
    """The store's ``recon/<key>.npz`` arrays of an image trial: truth and matched reconstruction in unit
    space, clamped to [0, 1], float32 (None for other tasks)."""
    if data.kind != "image":
        return None
    return {"truth": data.to_unit(x).clamp(0, 1).numpy().astype(np.float32),
            "recon": data.to_unit(matched.inputs).clamp(0, 1).numpy().astype(np.float32)}


def run_trial(trial: Trial, device: str = "cpu") -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Run one trial; never raises: failures become ``error`` rows, unmet requirements ``skipped`` rows."""
    t0 = time.perf_counter()
    plugins = get_plugins()
    row = base_row(trial, plugins)
    arrays = None
    try:
        values, extra, attack_seconds, arrays = _attack_trial(plugins, trial, resolve_device(device))
        row.update(status="ok", reason="", attack_seconds=attack_seconds, extra=extra, **values)
    except UnsupportedError as exc:
        row.update(status="skipped", reason=str(exc))
    except StageError as exc:
        row.update(status="error", reason=f"{exc.plugin}: {exc}".splitlines()[0][:500],
                   error_type=type(exc.original).__name__, plugin=exc.plugin,
                   extra={"traceback": traceback.format_exc()[-4000:]})
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                   error_type=type(exc).__name__, plugin="defenda", extra={"traceback": traceback.format_exc()[-4000:]})
    row["trial_seconds"] = time.perf_counter() - t0
    row["finished_at"] = now()
    return row, arrays


def base_row(trial: Trial, plugins: Plugins) -> dict[str, Any]:
    """The row's identifying columns (the store's schema, see :mod:`defenda.harness.store`)."""
    fed = trial.federation
    params: dict[str, Any] = {"task": trial.task_params, "attack": trial.attack_params,
                              "defense": trial.defense_params, "update": fed.update, "lr": fed.lr}
    if isinstance(fed, FederationSettings):
        params["federation"] = fed.to_dict()
        params["target"] = trial.target
    else:
        params["local_steps"] = fed.local_steps
    return {
        "key": trial.key, "study": trial.study, "task": trial.task, "attack": trial.attack,
        "defense": trial.defense, "strength": trial.strength, "batch_size": trial.batch_size, "seed": trial.seed,
        "server": trial.server, "knowledge": list(trial.knowledge), "utility_key": trial.utility_key,
        "params": params, "versions": plugins.versions(), "round": trial.round,
    }


def failed_trial(trial: Trial, reason: str, plugin: str) -> tuple[dict[str, Any], None]:
    """The row of a trial whose worker was stopped (time limit) or died (memory, crash)."""
    row = base_row(trial, get_plugins())
    row.update(status="error", reason=f"{plugin}: {reason}", error_type="WorkerStopped", plugin=plugin,
               finished_at=now())
    return row, None


def jsonable_info(info: dict[str, Any]) -> dict[str, Any]:
    """The scalar, JSON-friendly entries of a reconstruction's ``info`` (one-element tensors as numbers,
    non-finite floats as None; everything else dropped) — the row's ``extra["attack_info"]``."""
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else None
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
    return out
