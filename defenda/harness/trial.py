"""One trial: task → defended client update → attack → matched metrics → one result row.

Also the utility job: train the task's model under a defense and measure test
accuracy (and ε), computed once per (task, defense, strength, seed).

Both functions run in worker processes; they return plain dicts (and numpy
arrays) so any executor can ship them back to the single writer.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from defenda.compose import component_names, make_defense
from defenda.errors import UnsupportedError
from defenda.federation import GradientHistory
from defenda.interfaces import Attack, Defense, Knowledge, Reconstruction, Task, TaskData
from defenda.plugins import Plugins, get_plugins
from defenda.registry import Registry
from defenda.store import METRIC_COLUMNS
from defenda.utility import accounting_for

_TASKS: dict[str, tuple[Task, TaskData]] = {}
#: set by an isolated worker: a shared buffer naming the plugin now running, so a trial
#: stopped for its time limit can name the plugin that hung
STAGE: Any = None


class StageError(Exception):
    """An exception raised inside a plugin, tagged with the plugin that raised it."""

    def __init__(self, plugin: str, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.plugin = plugin
        self.original = exc


def resolve_device(device: str) -> torch.device:
    """'auto' → the GPU when one is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_task(registry: Registry, name: str, params: dict[str, Any]) -> tuple[Task, TaskData]:
    """The task and its data, loaded once per process."""
    key = json.dumps([name, params], sort_keys=True)
    if key not in _TASKS:
        task = registry.get("task", name).cls(params)
        _TASKS[key] = (task, task.load())
    return _TASKS[key]


def defense_plugin(registry: Any, name: str) -> str:
    """The plugin(s) behind a (possibly composed) defense, for error rows."""
    return "+".join(sorted({registry.get("defense", n).origin.plugin for n in component_names(name)}))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sample_batch(data: TaskData, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    x, y = data.train
    if size > len(x):
        raise UnsupportedError(f"batch size {size} is larger than the task's train split ({len(x)} samples)")
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(x), generator=gen)[:size]
    return x[idx], y[idx], gen


def _knowledge(trial: dict[str, Any], data: TaskData, y: torch.Tensor, device: torch.device) -> Knowledge:
    granted = frozenset(trial["knowledge"])
    return Knowledge(
        input_shape=data.input_shape, num_classes=data.num_classes, task_kind=data.kind,
        mean=data.mean, std=data.std, granted=granted,
        batch_size=len(y) if "batch_size" in granted else None,
        labels=y.to(device) if "labels" in granted else None,
        public=data.public if "public_data" in granted else None,
        lr=trial["lr"] if "lr" in granted else None,
        history=GradientHistory(*data.public, lr=trial["lr"]) if "gradient_history" in granted else None,
        device=device, seed=trial["seed"], cache_dir=trial.get("cache_dir"),
    )


def skip_reason(attack: Attack, trial: dict[str, Any], data: TaskData) -> str | None:
    """Why the declared requirements of ``attack`` cannot be met in this cell, or None."""
    req = attack.requires
    if req.server == "malicious" and trial["server"] != "malicious":
        return "needs a malicious server (set server = \"malicious\" in [study])"
    if trial["update"] not in req.updates:
        return f"needs a {' or '.join(sorted(req.updates))} update; the study shares a {trial['update']}"
    missing = sorted(req.knowledge - set(trial["knowledge"]))
    if missing:
        return f"needs attacker knowledge {missing} (add to [study] knowledge)"
    if data.kind not in req.task_kinds:
        return f"does not handle {data.kind} tasks"
    return None


def _check_reconstruction(recon: Any, data: TaskData, plugin: str) -> Reconstruction:
    """A reconstruction the metrics can score, or a StageError naming the attack's plugin."""
    if not isinstance(recon, Reconstruction) or not isinstance(recon.inputs, torch.Tensor):
        raise StageError(plugin, TypeError(f"reconstruct() returned {type(recon).__name__}, not a Reconstruction"))
    shape = tuple(recon.inputs.shape[1:])
    if shape != tuple(data.input_shape):
        raise StageError(plugin, ValueError(f"reconstruction has sample shape {shape}, expected {data.input_shape}"))
    if not torch.isfinite(recon.inputs).all():
        raise StageError(plugin, ValueError("reconstruction contains NaN or inf"))
    return recon


def _in_plugin(plugin: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    if STAGE is not None:
        STAGE.value = plugin.encode()[:150]
    try:
        return fn(*args, **kwargs)
    except (UnsupportedError, StageError):
        raise
    except Exception as exc:
        raise StageError(plugin, exc) from exc


def score(plugins: Plugins, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction,
          data: TaskData) -> tuple[dict[str, Any], dict[str, Any], Reconstruction, torch.Tensor, torch.Tensor]:
    """Match reconstructions one-to-one to the truth, then run every applicable metric."""
    from defenda.metrics import apply_matching

    xm, ym, rm = apply_matching(x.cpu(), y.cpu(), Reconstruction(recon.inputs.detach().cpu(),
                                None if recon.labels is None else recon.labels.detach().cpu(), recon.info),
                                data=data)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for entry in plugins.registry.entries("metric"):
        if data.kind not in entry.cls.task_kinds:
            continue
        metric = entry.cls()
        out = _in_plugin(entry.origin.plugin, metric.compute, xm, ym, rm, data)
        for col, val in out.items():
            (values if col in METRIC_COLUMNS else extra)[col] = None if val is None else float(val)
    extra["matched_fraction"] = rm.info.get("matched_fraction")
    extra["num_reconstructed"] = rm.info.get("num_reconstructed")
    return values, extra, rm, xm, ym


def run_trial(trial: dict[str, Any], device: str = "cpu") -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Run one trial; never raises: failures become ``error`` rows, unmet requirements ``skipped`` rows."""
    t0 = time.perf_counter()
    plugins = get_plugins()
    row = _base_row(trial, plugins)
    arrays = None
    try:
        values, extra, attack_seconds, arrays = _attack_trial(plugins, trial, resolve_device(device))
        row.update(status="ok", reason="", attack_seconds=attack_seconds, extra=extra, **values)
    except UnsupportedError as exc:
        row.update(status="skipped", reason=str(exc))
    except StageError as exc:
        row.update(status="error", reason=f"{exc.plugin}: {exc}".splitlines()[0][:500], error_type=type(exc.original).__name__,
                   plugin=exc.plugin, extra={"traceback": traceback.format_exc()[-4000:]})
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                   error_type=type(exc).__name__, plugin="defenda", extra={"traceback": traceback.format_exc()[-4000:]})
    row["trial_seconds"] = time.perf_counter() - t0
    row["finished_at"] = _now()
    return row, arrays


def _base_row(trial: dict[str, Any], plugins: Plugins) -> dict[str, Any]:
    row: dict[str, Any] = {
        k: trial[k] for k in ("key", "study", "task", "attack", "defense", "strength", "batch_size", "seed",
                              "server", "knowledge", "utility_key")
    }
    row["params"] = {"task": trial["task_params"], "attack": trial["attack_params"],
                     "defense": trial["defense_params"], "update": trial["update"],
                     "local_steps": trial["local_steps"], "lr": trial["lr"]}
    row["versions"] = plugins.versions()
    return row


def failed_trial(trial: dict[str, Any], reason: str, plugin: str) -> tuple[dict[str, Any], None]:
    """The row of a trial whose worker was stopped (time limit) or died (memory, crash)."""
    row = _base_row(trial, get_plugins())
    row.update(status="error", reason=f"{plugin}: {reason}", error_type="WorkerStopped", plugin=plugin,
               finished_at=_now())
    return row, None


def failed_utility(job: dict[str, Any], reason: str, plugin: str) -> dict[str, Any]:
    """The utility row of a job whose worker was stopped or died."""
    return {"key": job["key"], "task": job["task"], "defense": job["defense"], "strength": job.get("strength"),
            "params": job["defense_params"], "seed": job["seed"], "status": "error",
            "reason": f"{plugin}: {reason}", "finished_at": _now()}


def _attack_trial(plugins: Plugins, trial: dict[str, Any],
                  device: torch.device) -> tuple[dict[str, Any], dict[str, Any], float, dict[str, np.ndarray] | None]:
    reg = plugins.registry
    task_entry = reg.get("task", trial["task"])
    task, data = _in_plugin(task_entry.origin.plugin, load_task, reg, trial["task"], trial["task_params"])
    a_entry = reg.get("attack", trial["attack"])
    attack: Attack = a_entry.cls(trial["attack_params"])
    defense: Defense = make_defense(reg, trial["defense"], trial["defense_params"])
    d_plugin = defense_plugin(reg, trial["defense"])
    reason = skip_reason(attack, trial, data)
    if reason:
        raise UnsupportedError(f"{trial['attack']}: {reason}")

    torch.manual_seed(trial["seed"])
    model = _in_plugin(task_entry.origin.plugin, task.build_model, data)
    if attack.requires.server == "malicious":
        model = _in_plugin(a_entry.origin.plugin, attack.prepare_model, model, data)
    model = model.to(device)
    size = _in_plugin(d_plugin, defense.client_batch_size, trial["batch_size"])
    utility_size = min(defense.client_batch_size(trial["client_batch_size"]), len(data.train[0]))
    _in_plugin(d_plugin, defense.calibrate, **accounting_for(trial, utility_size, len(data.train[0])))
    x, y, gen = _sample_batch(data, size, trial["seed"])
    x, y = x.to(device), y.to(device)
    knowledge = _knowledge(trial, data, y, device)
    why = _in_plugin(a_entry.origin.plugin, attack.check, model, data, knowledge)
    if why:
        raise UnsupportedError(f"{trial['attack']}: {why}")

    model.train()
    update = _in_plugin(d_plugin, defense.client_update, model, x, y, kind=trial["update"],
                        local_steps=trial["local_steps"], lr=trial["lr"], generator=gen)
    _check_update(update, model, d_plugin)
    model.eval()
    torch.manual_seed(trial["seed"] + 1)
    t_attack = time.perf_counter()
    recon = _in_plugin(a_entry.origin.plugin, attack.reconstruct, update, model, knowledge)
    attack_seconds = time.perf_counter() - t_attack
    recon = _check_reconstruction(recon, data, a_entry.origin.plugin)
    values, extra, matched, xm, _ = score(plugins, x, y, recon, data)
    values["batch_size"] = len(x)  # what the client really used (large-batch defenses change it)
    extra["attack_info"] = _jsonable(recon.info)
    arrays = None
    if data.kind == "image" and trial.get("save_reconstructions", True):
        arrays = {"truth": data.to_unit(xm).clamp(0, 1).numpy().astype(np.float32),
                  "recon": data.to_unit(matched.inputs).clamp(0, 1).numpy().astype(np.float32)}
    return values, extra, attack_seconds, arrays


def _check_update(update: Any, model: torch.nn.Module, plugin: str) -> None:
    from defenda.interfaces import SharedUpdate

    if not isinstance(update, SharedUpdate):
        raise StageError(plugin, TypeError(f"client_update() returned {type(update).__name__}, not a SharedUpdate"))
    shapes = [tuple(p.shape) for p in model.parameters()]
    got = [tuple(t.shape) for t in update.tensors]
    if got != shapes:
        raise StageError(plugin, ValueError("update tensors do not match the model's parameters "
                                             f"({len(got)} tensors for {len(shapes)} parameters)"))


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else None
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
    return out


def run_utility(job: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Train under the defense for ``rounds`` FedSGD/FedAvg rounds; return test accuracy and ε."""
    from defenda.utility import measure_utility

    t0 = time.perf_counter()
    row: dict[str, Any] = {"key": job["key"], "task": job["task"], "defense": job["defense"],
                           "strength": job.get("strength"), "params": job["defense_params"], "seed": job["seed"]}
    try:
        acc, eps = measure_utility(get_plugins(), job, resolve_device(device))
        row.update(status="ok", reason="", test_acc=acc, epsilon=eps)
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    row["seconds"] = time.perf_counter() - t0
    row["finished_at"] = _now()
    return row
