"""What the contract checks share: a problem list, constructing a class, a timed call, and model snapshots."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class _Problems:
    """The problems one check found; :meth:`raise_if_any` turns them into one ``AssertionError``."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def extend(self, msgs: Iterable[str], prefix: str = "") -> None:
        self.items.extend(f"{prefix}{m}" for m in msgs)

    def check(self, ok: bool, msg: str) -> bool:
        if not ok:
            self.add(msg)
        return ok

    def raise_if_any(self) -> None:
        if self.items:
            lines = "\n".join(f"  - {m}" for m in self.items)
            raise AssertionError(f"{self.what} breaks the defenda plugin contract:\n{lines}")


def _class_problems(kind: str, cls: Any, problems: _Problems) -> None:
    from defenda.registry import _validate

    for msg in _validate(kind, cls):
        problems.add(msg)
    if isinstance(cls, type) and not (cls.__doc__ or "").strip():
        problems.add("has no docstring; its first line is the summary `defenda "
                     f"{kind}s` shows")


def _construct(cls: Any, params: Mapping[str, Any] | None, problems: _Problems) -> Any:
    try:
        default = cls()
    except Exception as exc:
        problems.add(f"cannot be constructed with defaults: {type(exc).__name__}: {exc}")
        problems.raise_if_any()
    text = repr(default)
    problems.check(type(default).__name__ in text, f"repr() {text!r} does not name the class")
    if not params:
        return default
    try:
        return cls(**dict(params))
    except Exception as exc:
        problems.add(f"cannot be constructed with {dict(params)!r}: {type(exc).__name__}: {exc}")
        problems.raise_if_any()


def _timed(problems: _Problems, budget_s: float, label: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:
        problems.add(f"{label} raised {type(exc).__name__}: {exc}")
        problems.raise_if_any()
    elapsed = time.perf_counter() - t0
    problems.check(elapsed <= budget_s, f"{label} took {elapsed:.1f} s on the tiny case (budget {budget_s:g} s)")
    return out


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, type(m), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                    for n, m in model.named_modules()],
        "training": model.training,
    }


def _model_changes(model: nn.Module, before: dict[str, Any]) -> list[str]:
    import torch

    now = _snapshot(model)
    out = []
    if now["params"] != before["params"]:
        out.append("replaced or re-flagged the model's parameters")
    if now["modules"] != before["modules"]:
        out.append("changed the model's modules or left hooks attached")
    if now["training"] != before["training"]:
        out.append("left the model in a different train/eval mode")
    changed = [k for k, v in before["state"].items() if not torch.equal(now["state"][k], v)]
    if changed:
        out.append(f"modified the model's weights or buffers ({', '.join(changed[:3])})")
    if any(p.grad is not None for p in model.parameters()):
        out.append("left .grad set on the model's parameters")
    if any(hasattr(p, "grad_sample") for p in model.parameters()):
        out.append("left grad_sample attributes on the model's parameters")
    return out
