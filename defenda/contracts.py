"""The contract checks of what plugins return, shared by the harness and the plugin authors' test helper.

One validator each, so a defense that passes ``defenda.testing.check_defense`` is
accepted by a study, and a study rejects exactly what the helper reports.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from defenda.records import Reconstruction, SharedUpdate


def update_problems(update: Any, model: nn.Module, *, kind: str | None = None) -> list[str]:
    """Why ``update`` is not a valid :class:`SharedUpdate` for ``model`` (empty when it is).

    :param kind: the update kind the round asked for, when it must match.
    """
    misfit = update_alignment_problem(update, model)
    if misfit is not None:
        return [misfit]
    named = list(model.named_parameters())
    problems = []
    if list(update.names) != [n for n, _ in named]:
        problems.append("update.names are not model.named_parameters() in order")
    if not all(t.is_floating_point() for t in update.tensors):
        problems.append("every update tensor must be a floating-point torch.Tensor")
    elif not all(bool(torch.isfinite(t).all()) for t in update.tensors):
        problems.append("the update has non-finite values (NaN or inf)")
    if any(t.requires_grad for t in update.tensors):
        problems.append("update tensors still require grad (detach them)")
    if kind is not None and update.kind != kind:
        problems.append(f"update.kind is {update.kind!r}, expected {kind!r}")
    problems.extend(_mask_problems(update))
    if not isinstance(update.meta, dict):
        problems.append("update.meta must be a dict")
    else:
        try:
            json.dumps(update.meta, default=str)
        except (TypeError, ValueError) as exc:
            problems.append(f"update.meta is not JSON-friendly: {exc}")
    return problems


def update_alignment_problem(update: Any, model: nn.Module) -> str | None:
    """Why ``update`` cannot be read against ``model`` at all, or None.

    It is not a :class:`SharedUpdate`, or its tensors are not one tensor per parameter of
    the parameter's shape. :func:`update_problems` reports this problem alone; callers
    that go on to use the update (compare runs, apply it) stop here.
    """
    if not isinstance(update, SharedUpdate):
        return f"returned {type(update).__name__}, not a SharedUpdate"
    shapes = [tuple(p.shape) for p in model.parameters()]
    got = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in update.tensors]
    if got != shapes:
        return (f"update tensors do not match the model's parameters ({len(got)} tensors for {len(shapes)} "
                f"parameters; shapes {got} != {shapes})")
    return None


def _mask_problems(update: SharedUpdate) -> list[str]:
    if update.masks is None:
        return []
    if len(update.masks) != len(update.tensors):
        return [f"update.masks has {len(update.masks)} entries for {len(update.tensors)} tensors"]
    for i, (m, t) in enumerate(zip(update.masks, update.tensors)):
        if m is not None and (not isinstance(m, torch.Tensor) or m.shape != t.shape):
            return [f"update.masks[{i}] must be None or a 0/1 tensor shaped like update tensor {i}"]
    return []


def reconstruction_problems(recon: Any, input_shape: tuple[int, ...]) -> list[str]:
    """Why ``recon`` is not a scorable :class:`Reconstruction` of samples shaped ``input_shape``."""
    if not isinstance(recon, Reconstruction) or not isinstance(recon.inputs, torch.Tensor):
        return [f"reconstruct() returned {type(recon).__name__}, not a Reconstruction"]
    shape = tuple(recon.inputs.shape[1:])
    if shape != tuple(input_shape):
        return [f"reconstruction has sample shape {shape}, expected {tuple(input_shape)}"]
    problems = []
    if not torch.isfinite(recon.inputs).all():
        problems.append("reconstruction contains NaN or inf")
    if recon.labels is not None and (not isinstance(recon.labels, torch.Tensor)
                                     or tuple(recon.labels.shape) != (len(recon.inputs),)):
        problems.append(f"reconstruction labels must be a ({len(recon.inputs)},) tensor or None")
    return problems
