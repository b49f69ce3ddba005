"""A training run's observations on disk: ``DIR/runs/<run key>/round_<r>.pt``, written once, read by every attack.

Each file holds plain data only (tensors, numbers, strings, lists, dicts), so it
is read back with ``torch.load(..., weights_only=True)``: θ_r, what the server
observed, and the contributing clients' ground truth and random states. Files
are written to a temporary name and renamed, so a file exists whole or not at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from defenda.errors import StoreError
from defenda.federation.run import ClientRound, Observation, ObservedUnit
from defenda.records import RoundSettings, SharedUpdate

_UPDATE_FIELDS = ("names", "kind", "batch_size", "local_steps", "lr", "local_epochs", "local_batch_size")


def run_dir(out_dir: str | Path, run_key: str) -> Path:
    """Where the observations of training run ``run_key`` live."""
    if not run_key.isalnum():  # keys are hex digests; never let a name escape the directory
        raise StoreError(f"invalid run key {run_key!r}")
    return Path(out_dir) / "runs" / run_key


def observation_path(out_dir: str | Path, run_key: str, round_: int) -> Path:
    return run_dir(out_dir, run_key) / f"round_{int(round_)}.pt"


def _plain(value: Any) -> Any:
    """JSON-friendly copy of defense metadata (numpy scalars, tuples … become plain values)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _update_to_data(u: SharedUpdate) -> dict[str, Any]:
    d: dict[str, Any] = {f: getattr(u, f) for f in _UPDATE_FIELDS}
    d["names"] = list(u.names)
    d["tensors"] = [t.detach().cpu() for t in u.tensors]
    d["masks"] = None if u.masks is None else [None if m is None else m.detach().cpu() for m in u.masks]
    d["meta"] = _plain(u.meta)
    return d


def _update_from_data(d: dict[str, Any]) -> SharedUpdate:
    return SharedUpdate(tensors=list(d["tensors"]), masks=d["masks"], meta=d["meta"],
                        **{f: d[f] for f in _UPDATE_FIELDS})


def save_observation(path: Path, obs: Observation) -> None:
    """Write one observation atomically."""
    data = {
        "round": obs.round, "model_state": obs.model_state, "sampled": obs.sampled, "weights": obs.weights,
        "aggregate_state": obs.aggregate_state, "hidden": obs.hidden,
        "clients": [{**{k: v for k, v in asdict(c).items() if k != "settings"}, "settings": asdict(c.settings)}
                    for c in obs.clients.values()],
        "units": [{"clients": u.clients, "update": _update_to_data(u.update)} for u in obs.units],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_observation(path: Path) -> Observation:
    """Read one observation (plain data only: ``weights_only=True``)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: observation missing (was the run directory moved or cleaned?); "
                                "re-run the study with --retry-errors after deleting the run's utility row")
    d = torch.load(path, map_location="cpu", weights_only=True)
    clients = {}
    for c in d["clients"]:
        settings = RoundSettings(**c["settings"])
        clients[int(c["client"])] = ClientRound(c["client"], c["samples"], c["x"], c["y"], settings,
                                                c["noise_state"], c["ledger_entries"])
    units = [ObservedUnit(list(u["clients"]), _update_from_data(u["update"])) for u in d["units"]]
    return Observation(d["round"], d["model_state"], list(d["sampled"]), list(d["weights"]), clients, units,
                       d["aggregate_state"], bool(d["hidden"]))
