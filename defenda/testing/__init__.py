"""Test helpers for plugin authors: an opt-in pytest plugin plus plain functions.

Enable it in your plugin's ``conftest.py`` (nothing is auto-loaded into
unrelated pytest runs)::

    pytest_plugins = ["defenda.testing"]

Fixtures
    ``defenda_plugins``  a fresh :class:`~defenda.plugins.Plugins` holding only
                         defenda's built-ins (no installed third-party plugin).
    ``defenda_pm``       its pluggy ``PluginManager``.
    ``register_plugin``  ``register_plugin(obj, name=None) -> Plugins``: built-ins plus
                         ``obj`` (a module with hookimpls, or Attack/Defense/Metric/Task
                         classes), loaded in strict mode and made the process-wide
                         plugin set for this test only (so studies and the in-process
                         CLI use it); undone after the test.
    ``tiny_case``        :func:`make_tiny_case` (2 images 3×8×8, a 2-conv CNN, CPU, seed 0).
    ``defenda_cli``      :func:`run_cli`.

Contract checks (each raises ``AssertionError`` listing every problem found)
    :func:`check_attack`, :func:`check_defense`, :func:`check_metric`: the class is
    well declared (slug, ``Params`` with defaults and help, a defense's strength),
    constructs with defaults, runs on a tiny CPU case within a time budget, returns
    the right types and shapes, leaves the caller's model untouched, and gives the
    same result twice under the same seed.

End to end
    :func:`run_cli` runs ``defenda …`` in-process (sees ``register_plugin``) or in a
    subprocess (sees what is installed); :func:`assert_installed` checks that an
    installed distribution's plugin loads and provides what it should.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.metadata as md
import io
import json
import math
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from defenda.plugins import Plugins, load_plugins, set_plugins

if TYPE_CHECKING:
    import torch
    from torch import nn

    from defenda.interfaces import Attack, Defense, Knowledge, Metric, Reconstruction, SharedUpdate, TaskData

__all__ = [
    "CliOutcome",
    "TinyCase",
    "assert_installed",
    "builtin_entry_points",
    "builtin_plugins",
    "check_attack",
    "check_defense",
    "check_metric",
    "make_tiny_case",
    "plugin_module",
    "registered",
    "run_cli",
]

_ENV_SWITCHES = ("DEFENDA_STRICT_PLUGINS", "DEFENDA_DISABLE_PLUGINS", "DEFENDA_LOAD_PLUGINS", "DEFENDA_QUIET_PLUGINS")
_HOOK_BY_KIND = {"attack": "defenda_register_attacks", "defense": "defenda_register_defenses",
                 "metric": "defenda_register_metrics", "task": "defenda_register_tasks"}


# --------------------------------------------------------------------------- plugin sets


def builtin_entry_points() -> list[md.EntryPoint]:
    """The ``defenda`` entry points of defenda's own distribution (its built-in plugins)."""
    out = []
    for ep in md.entry_points(group="defenda"):
        dist = getattr(ep, "dist", None)
        if dist is not None and (dist.metadata["Name"] or "").lower() == "defenda":
            out.append(ep)
    return out


def _kind_of(cls: type) -> str | None:
    from defenda import interfaces

    for kind, base in (("attack", interfaces.Attack), ("defense", interfaces.Defense),
                       ("metric", interfaces.Metric), ("task", interfaces.Task)):
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    return None


def plugin_module(*classes: type, name: str = "test-plugin") -> types.ModuleType:
    """A plugin module whose registration hooks register ``classes`` (attacks, defenses, metrics, tasks)."""
    mod = types.ModuleType(name)
    by_kind: dict[str, list[type]] = {}
    for cls in classes:
        kind = _kind_of(cls)
        if kind is None:
            raise TypeError(f"{cls!r} is not a subclass of defenda's Attack, Defense, Metric or Task")
        by_kind.setdefault(kind, []).append(cls)
    for kind, members in by_kind.items():
        setattr(mod, _HOOK_BY_KIND[kind], _registration_hook(_HOOK_BY_KIND[kind], members))
    return mod


def _registration_hook(hook_name: str, members: list[type]) -> Any:
    from defenda import hookimpl

    def hook(register: Any) -> None:  # pluggy passes arguments by name: exactly ``register``
        for cls in members:
            register(cls)

    hook.__name__ = hook.__qualname__ = hook_name
    return hookimpl(hook)


def _as_plugin(obj: Any, name: str | None) -> tuple[str, Any]:
    if isinstance(obj, type):
        mod = plugin_module(obj, name=name or getattr(obj, "name", "") or obj.__name__)
        return name or mod.__name__, mod
    return name or getattr(obj, "__name__", None) or type(obj).__name__, obj


@contextlib.contextmanager
def _strict_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _ENV_SWITCHES}
    for k in _ENV_SWITCHES:
        os.environ.pop(k, None)
    os.environ["DEFENDA_STRICT_PLUGINS"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def builtin_plugins(*extra: Any, strict: bool = True) -> Plugins:
    """Built-ins plus ``extra`` plugins, ignoring installed third-party packages and the
    ``DEFENDA_*`` switches of the environment. ``extra`` items are modules with hookimpls,
    plugin classes, or ``(name, module)`` pairs. Strict: a broken plugin raises."""
    pairs = [item if isinstance(item, tuple) else _as_plugin(item, None) for item in extra]
    with _strict_env():
        if not strict:
            os.environ.pop("DEFENDA_STRICT_PLUGINS")
        return load_plugins(entry_points=builtin_entry_points(), extra=pairs)


@contextlib.contextmanager
def registered(*objs: Any, name: str | None = None) -> Iterator[Plugins]:
    """Make built-ins plus ``objs`` the process-wide plugin set inside the ``with`` block.

    ``name`` names the plugin when a single object is given (default: its module name
    or, for a class, its slug).
    """
    pairs = [_as_plugin(o, name if len(objs) == 1 else None) for o in objs]
    plugins = builtin_plugins(*pairs)
    previous = set_plugins(plugins)
    try:
        yield plugins
    finally:
        set_plugins(previous)


# --------------------------------------------------------------------------- the tiny case


@dataclasses.dataclass
class TinyCase:
    """A tiny, deterministic CPU setting to run a plugin once.

    :ivar data: a :class:`~defenda.interfaces.TaskData` (image: 3×8×8 in [0, 1],
        4 classes; tabular: 10 features, 3 classes), 16 train / 8 test / 8 public samples.
    :ivar model: a fresh model in train mode (image: ``SmallCNN`` with 2 convs
        of 4/8 channels and 2 linear layers; ``model="mlp"``: one hidden layer of 16).
    :ivar x, y: the client's batch (the first ``batch_size`` train samples).
    """

    data: TaskData
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    seed: int = 0

    def fresh_model(self) -> nn.Module:
        """A copy of the case's model, in train mode."""
        return copy.deepcopy(self.model).train()

    def knowledge(self, granted: Sequence[str] = ("batch_size",)) -> Knowledge:
        """The attacker's knowledge with the given flags granted."""
        import torch

        from defenda.federation import GradientHistory
        from defenda.interfaces import Knowledge

        g = frozenset(granted)
        d = self.data
        return Knowledge(input_shape=d.input_shape, num_classes=d.num_classes, task_kind=d.kind, mean=d.mean,
                         std=d.std, granted=g, batch_size=len(self.y) if "batch_size" in g else None,
                         labels=self.y.clone() if "labels" in g else None,
                         public=d.public if "public_data" in g else None,
                         lr=0.1 if "lr" in g else None,
                         history=GradientHistory(*d.public, lr=0.1) if "gradient_history" in g else None,
                         device=torch.device("cpu"), seed=self.seed)


def make_tiny_case(kind: str = "image", *, model: str | None = None, batch_size: int = 2, seed: int = 0) -> TinyCase:
    """The tiny case: ``kind`` ``"image"`` (``model`` ``"cnn"`` or ``"mlp"``) or ``"tabular"`` (``"mlp"``)."""
    import torch

    from defenda.data import image_task_data, tabular_task_data
    from defenda.models import MLP, SmallCNN

    g = torch.Generator().manual_seed(seed)
    n = 32
    if kind == "image":
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        x = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
        y = torch.arange(n) % 4
        build = image_task_data
        classes = 4
    elif kind == "tabular":
        x = torch.randn(n, 10, generator=g) * 2 + 1
        y = torch.arange(n) % 3
        build = tabular_task_data
        classes = 3
    else:
        raise ValueError(f"kind must be 'image' or 'tabular', got {kind!r}")
    data = build("tiny", classes, (x[:16], y[:16]), (x[16:24], y[16:24]), (x[24:], y[24:]))
    arch = model or ("cnn" if kind == "image" else "mlp")
    torch.manual_seed(seed)
    if arch == "cnn":
        if kind != "image":
            raise ValueError("model 'cnn' needs kind='image'")
        net: nn.Module = SmallCNN(3, 8, classes, channels=4, hidden=16)
    elif arch == "mlp":
        net = MLP(math.prod(data.input_shape), classes, (16,))
    else:
        raise ValueError(f"model must be 'cnn' or 'mlp', got {arch!r}")
    if not 1 <= batch_size <= 16:
        raise ValueError("batch_size must be in 1..16")
    return TinyCase(data=data, model=net.train(), x=data.train[0][:batch_size].clone(),
                    y=data.train[1][:batch_size].clone(), seed=seed)


# --------------------------------------------------------------------------- contract checks


class _Problems:
    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

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


def _check_update(update: Any, model: nn.Module, x: torch.Tensor, kind: str, problems: _Problems,
                  label: str) -> bool:
    import torch

    from defenda.interfaces import SharedUpdate

    if not problems.check(isinstance(update, SharedUpdate),
                          f"{label} returned {type(update).__name__}, not a SharedUpdate"):
        return False
    named = list(model.named_parameters())
    problems.check(list(update.names) == [n for n, _ in named],
                   f"{label}: update.names are not model.named_parameters() in order")
    shapes = [tuple(p.shape) for _, p in named]
    got = [tuple(t.shape) for t in update.tensors]
    if not problems.check(got == shapes, f"{label}: tensor shapes {got} != parameter shapes {shapes}"):
        return False
    problems.check(all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in update.tensors),
                   f"{label}: every tensor must be a floating-point torch.Tensor")
    problems.check(all(bool(torch.isfinite(t).all()) for t in update.tensors), f"{label}: non-finite values")
    problems.check(not any(t.requires_grad for t in update.tensors),
                   f"{label}: tensors still require grad (detach them)")
    problems.check(update.kind == kind, f"{label}: update.kind is {update.kind!r}, expected {kind!r}")
    problems.check(isinstance(update.meta, dict), f"{label}: update.meta must be a dict")
    try:
        json.dumps(update.meta, default=str)
    except (TypeError, ValueError) as exc:
        problems.add(f"{label}: update.meta is not JSON-friendly: {exc}")
    return True


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


def check_defense(
    cls: type[Defense],
    params: Mapping[str, Any] | None = None,
    *,
    case: TinyCase | None = None,
    kinds: Sequence[str] = ("gradient", "delta"),
    budget_s: float = 60.0,
) -> SharedUpdate:
    """Check a defense class against the contract; return its update on the tiny case.

    Checks: the class registers (slug, ``Params`` with defaults and help, one strength
    field, a docstring); it constructs with defaults and with ``params``; every value of
    ``default_sweep`` is a valid strength; after ``calibrate`` (as the harness does),
    ``client_update`` on the tiny case (FedSGD
    gradient and FedAvg delta, at ``params`` and at the strongest swept strength)
    returns a :class:`SharedUpdate` aligned with ``model.named_parameters()``, finite,
    detached, of the requested kind; leaves the model untouched; gives identical tensors
    for the same seed; runs within ``budget_s`` each; ``client_batch_size`` and
    ``epsilon`` return sensible values.
    """
    import torch

    from defenda.params import strength_param

    problems = _Problems(f"defense {getattr(cls, '__name__', cls)!r}")
    _class_problems("defense", cls, problems)
    problems.raise_if_any()
    defense = _construct(cls, params, problems)
    strength = strength_param(cls.Params)
    variants = [defense]
    if strength is not None:
        for value in cls.default_sweep:
            try:
                cls(**{**dict(params or {}), strength.name: value})
            except Exception as exc:
                problems.add(f"default_sweep value {value!r} is not a valid {strength.name}: {exc}")
        if cls.default_sweep:
            strongest = (max if strength.strength == "up" else min)(cls.default_sweep)
            with contextlib.suppress(Exception):
                variants.append(cls(**{**dict(params or {}), strength.name: strongest}))
    case = case or make_tiny_case()
    first = None
    for variant in variants:
        for kind in kinds:
            label = f"{variant!r}.client_update(kind={kind!r})"
            results = []
            for _ in range(2):
                model = case.fresh_model()
                before = _snapshot(model)
                # the harness calibrates before the first update (DP target-ε mode needs it)
                _timed(problems, budget_s, f"{variant!r}.calibrate()", variant.calibrate, steps=10,
                       sample_rate=len(case.x) / len(case.data.train[0]), delta=1e-5,
                       local_steps=2 if kind == "delta" else 1)
                torch.manual_seed(case.seed)
                gen = torch.Generator().manual_seed(case.seed)
                update = _timed(problems, budget_s, label, variant.client_update, model, case.x.clone(),
                                case.y.clone(), kind=kind, local_steps=2, lr=0.1, generator=gen)
                for change in _model_changes(model, before):
                    problems.add(f"{label} {change}; a defense must leave the caller's model unchanged")
                if not _check_update(update, model, case.x, kind, problems, label):
                    problems.raise_if_any()
                results.append(update)
            problems.check(_same(results[0].tensors, results[1].tensors),
                           f"{label} is not deterministic: two runs with the same seed and generator differ")
            first = first or results[0]
    size = defense.client_batch_size(4)
    problems.check(isinstance(size, int) and size >= 1, f"client_batch_size(4) returned {size!r}")
    try:
        eps = defense.epsilon(steps=10, sample_rate=0.05, delta=1e-5)
        problems.check(eps is None or (isinstance(eps, (int, float)) and eps >= 0),
                       f"epsilon() returned {eps!r}; expected None or a non-negative number")
    except Exception as exc:
        problems.add(f"epsilon() raised {type(exc).__name__}: {exc}")
    problems.raise_if_any()
    assert first is not None
    return first


def _requirement_problems(cls: Any, problems: _Problems) -> None:
    from defenda.interfaces import KNOWLEDGE_FLAGS, Requirements

    req = cls.requires
    if not problems.check(isinstance(req, Requirements), "requires must be a defenda.interfaces.Requirements"):
        return
    problems.check(req.server in ("honest", "malicious"), f"requires.server {req.server!r} is not honest/malicious")
    problems.check(bool(req.updates) and set(req.updates) <= {"gradient", "delta"},
                   f"requires.updates {sorted(req.updates)} must be a non-empty subset of gradient, delta")
    unknown = set(req.knowledge) - set(KNOWLEDGE_FLAGS)
    problems.check(not unknown, f"requires.knowledge has unknown flags {sorted(unknown)}; "
                                f"known: {list(KNOWLEDGE_FLAGS)}")
    problems.check(bool(req.task_kinds) and set(req.task_kinds) <= {"image", "tabular"},
                   f"requires.task_kinds {sorted(req.task_kinds)} must be a non-empty subset of image, tabular")


def check_attack(
    cls: type[Attack],
    params: Mapping[str, Any] | None = None,
    *,
    case: TinyCase | None = None,
    budget_s: float = 120.0,
) -> Reconstruction:
    """Check an attack class against the contract; return its reconstruction on the tiny case.

    Checks: the class registers (slug, ``Params``, ``reconstruct`` implemented, a
    docstring) and declares valid :class:`Requirements`; it constructs with defaults and
    with ``params`` (pass a small budget, e.g. ``{"iterations": 5}``); on the tiny case
    (the attack's first update kind, its required knowledge plus the batch size,
    ``prepare_model`` first for a malicious-server attack) ``check`` accepts the model
    and ``reconstruct`` returns a :class:`Reconstruction` with inputs ``(B̂, *input_shape)``,
    finite, labels ``(B̂,)`` in range or None, a dict ``info``; the model is untouched;
    the same seed gives the same inputs; each run fits in ``budget_s``. Use ``case=``
    (e.g. ``make_tiny_case("tabular")``) for an attack that needs another model family.
    """
    import torch

    from defenda.client import compute_update
    from defenda.interfaces import Reconstruction

    problems = _Problems(f"attack {getattr(cls, '__name__', cls)!r}")
    _class_problems("attack", cls, problems)
    if isinstance(cls, type):
        _requirement_problems(cls, problems)
    problems.raise_if_any()
    attack = _construct(cls, params, problems)
    req = cls.requires
    if case is None:
        case = make_tiny_case("image" if "image" in req.task_kinds else "tabular")
    problems.check(case.data.kind in req.task_kinds, f"the case is a {case.data.kind} task; the attack "
                                                     f"declares task_kinds {sorted(req.task_kinds)}")
    kind = "gradient" if "gradient" in req.updates else "delta"
    knowledge = case.knowledge(sorted({"batch_size", *req.knowledge}))
    outputs = []
    for _ in range(2):
        torch.manual_seed(case.seed)
        model = case.fresh_model()
        if req.server == "malicious":
            model = _timed(problems, budget_s, "prepare_model()", attack.prepare_model, model, case.data)
            if not problems.check(isinstance(model, torch.nn.Module), "prepare_model() must return the nn.Module"):
                problems.raise_if_any()
        update = compute_update(model, case.x, case.y, kind=kind, local_steps=2, lr=0.1)  # type: ignore[arg-type]
        why = _timed(problems, budget_s, "check()", attack.check, model, case.data, knowledge)
        if why is not None:
            problems.check(isinstance(why, str), f"check() returned {why!r}; expected None or a reason string")
            problems.add(f"check() declined the tiny {case.data.kind} case: {why!r}; pass case=make_tiny_case(...) "
                         "with a model the attack handles")
            problems.raise_if_any()
        model.eval()
        before = _snapshot(model)
        torch.manual_seed(case.seed + 1)
        rec = _timed(problems, budget_s, "reconstruct()", attack.reconstruct, update, model, knowledge)
        for change in _model_changes(model, before):
            problems.add(f"reconstruct() {change}; an attack must leave the model unchanged")
        if not problems.check(isinstance(rec, Reconstruction),
                              f"reconstruct() returned {type(rec).__name__}, not a Reconstruction"):
            problems.raise_if_any()
        outputs.append(rec)
    rec = outputs[0]
    shape = tuple(rec.inputs.shape)
    problems.check(isinstance(rec.inputs, torch.Tensor) and rec.inputs.ndim == 1 + len(case.data.input_shape)
                   and shape[1:] == tuple(case.data.input_shape) and shape[0] >= 1,
                   f"inputs have shape {shape}; expected (B̂, {', '.join(map(str, case.data.input_shape))})")
    problems.check(bool(torch.isfinite(rec.inputs).all()), "inputs contain NaN or inf")
    if rec.labels is not None:
        labels = rec.labels
        problems.check(tuple(labels.shape) == shape[:1] and not labels.is_floating_point(),
                       f"labels must be integer class indices of shape ({shape[0]},), got "
                       f"{labels.dtype} {tuple(labels.shape)}")
        problems.check(bool(((labels >= 0) & (labels < case.data.num_classes)).all()), "labels out of range")
    problems.check(isinstance(rec.info, dict), "info must be a dict")
    problems.check(torch.equal(outputs[0].inputs, outputs[1].inputs),
                   "reconstruct() is not deterministic: two runs with the same torch seed differ")
    problems.raise_if_any()
    return rec


def check_metric(
    cls: type[Metric],
    params: Mapping[str, Any] | None = None,
    *,
    case: TinyCase | None = None,
    budget_s: float = 60.0,
) -> dict[str, float | None]:
    """Check a metric class against the contract; return its values on a noisy reconstruction.

    Checks: the class registers (slug, ``Params``, ``compute`` implemented, non-empty
    ``columns``, a docstring); it constructs with defaults; on the tiny case of each
    declared task kind ``compute`` returns exactly ``columns``, each a finite number
    or None, for a perfect and a noisy reconstruction, the same values twice, in time.
    """
    import torch

    from defenda.interfaces import Reconstruction

    problems = _Problems(f"metric {getattr(cls, '__name__', cls)!r}")
    _class_problems("metric", cls, problems)
    if isinstance(cls, type):
        kinds = set(getattr(cls, "task_kinds", ()))
        problems.check(bool(kinds) and kinds <= {"image", "tabular"},
                       f"task_kinds {sorted(kinds)} must be a non-empty subset of image, tabular")
    problems.raise_if_any()
    metric = _construct(cls, params, problems)
    cases = [case] if case is not None else [make_tiny_case(k) for k in sorted(cls.task_kinds)]
    result: dict[str, float | None] = {}
    for c in cases:
        g = torch.Generator().manual_seed(c.seed)
        noisy = Reconstruction(c.x + 0.3 * torch.randn(c.x.shape, generator=g), c.y.clone())
        perfect = Reconstruction(c.x.clone(), c.y.clone())
        for label, rec in (("perfect", perfect), ("noisy", noisy)):
            runs = [_timed(problems, budget_s, f"compute() on a {label} {c.data.kind} reconstruction",
                           metric.compute, c.x.clone(), c.y.clone(), rec, c.data) for _ in range(2)]
            out = runs[0]
            if not problems.check(isinstance(out, dict), f"compute() returned {type(out).__name__}, not a dict"):
                continue
            problems.check(set(out) == set(cls.columns),
                           f"compute() returned {sorted(out)}; declared columns are {sorted(cls.columns)}")
            for col, val in out.items():
                ok = val is None or (isinstance(val, (int, float)) and not isinstance(val, bool)
                                     and math.isfinite(float(val)))
                problems.check(ok, f"compute()[{col!r}] = {val!r}; expected a finite number or None")
            problems.check(repr(runs[0]) == repr(runs[1]),
                           f"compute() is not deterministic on a {label} reconstruction")
            if label == "noisy":
                result = out
    problems.raise_if_any()
    return result


# --------------------------------------------------------------------------- CLI


@dataclasses.dataclass
class CliOutcome:
    """The result of one ``defenda`` command: exit code, stdout, stderr."""

    args: list[str]
    rc: int
    out: str
    err: str

    def _describe(self) -> str:
        return f"`defenda {' '.join(self.args)}` exited {self.rc}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"

    def assert_success(self) -> CliOutcome:
        assert self.rc == 0, self._describe()
        return self

    def assert_failure(self, rc: int | None = None) -> CliOutcome:
        assert self.rc != 0 and (rc is None or self.rc == rc), self._describe()
        return self

    def assert_output_contains(self, *texts: str, stream: str = "out") -> CliOutcome:
        """Each text appears in ``stream``: ``"out"``, ``"err"`` or ``"any"``."""
        hay = {"out": self.out, "err": self.err, "any": self.out + self.err}[stream]
        for text in texts:
            assert text in hay, f"{text!r} not in {stream}\n{self._describe()}"
        return self

    def json(self) -> Any:
        """stdout parsed as JSON (for ``--json`` commands)."""
        return json.loads(self.out)


def run_cli(*args: str, env: Mapping[str, str] | None = None, subprocess_: bool = False,
            cwd: str | os.PathLike[str] | None = None, timeout: float = 600) -> CliOutcome:
    """Run ``defenda ARGS``.

    In-process by default: the command sees the process-wide plugins (those of
    :func:`registered` / the ``register_plugin`` fixture). With ``subprocess_=True``
    it runs ``python -m defenda.cli`` in a fresh interpreter that sees what is installed
    (``env`` is added to the environment, e.g. ``{"PYTHONPATH": target_dir}``).
    """
    argv = [str(a) for a in args]
    if subprocess_:
        full_env = {**os.environ, **(env or {})}
        if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
            full_env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.environ["PYTHONPATH"]])
        proc = subprocess.run([sys.executable, "-m", "defenda.cli", *argv], capture_output=True, text=True,
                              env=full_env, cwd=cwd, timeout=timeout)
        return CliOutcome(argv, proc.returncode, proc.stdout, proc.stderr)
    from defenda.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    old_cwd = os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse usage errors and --version
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(old_cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return CliOutcome(argv, int(rc), out.getvalue(), err.getvalue())


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def assert_installed(dist_name: str, provides: Mapping[str, Sequence[str]] | None = None, *,
                     path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Check that distribution ``dist_name`` is installed as a working defenda plugin.

    Its metadata declares entry points in the ``defenda`` group that resolve; a fresh
    ``defenda plugins --json`` lists each of them as ``loaded`` with this distribution and
    version; and they provide at least ``provides`` (e.g. ``{"defenses": ["soteria"]}``).
    ``path``: a directory the distribution was installed into with ``pip install --target``
    (added to the subprocess's ``PYTHONPATH``). Returns the plugins' ``--json`` entries.
    """
    if path is not None:
        dists = [d for d in md.distributions(path=[os.fspath(path)])
                 if _canonical(d.metadata["Name"] or "") == _canonical(dist_name)]
        assert dists, f"no distribution {dist_name!r} in {path}"
        dist = dists[0]
    else:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise AssertionError(f"distribution {dist_name!r} is not installed") from None
    eps = [ep for ep in dist.entry_points if ep.group == "defenda"]
    assert eps, f"{dist_name} declares no entry point in the 'defenda' group ([project.entry-points.defenda])"
    env = {"PYTHONPATH": os.fspath(path)} if path is not None else {}
    outcome = run_cli("plugins", "--json", env=env, subprocess_=True).assert_success()
    listed = {p["name"]: p for p in outcome.json()}
    found = []
    for ep in eps:
        entry = listed.get(ep.name)
        assert entry is not None, f"plugin {ep.name!r} of {dist_name} is not listed by `defenda plugins`\n{outcome.err}"
        assert _canonical(entry["dist"]) == _canonical(dist_name) and entry["version"] == dist.version, entry
        assert entry["status"] == "loaded", f"plugin {ep.name!r} is {entry['status']}: {entry['error']}"
        found.append(entry)
    for kind, names in (provides or {}).items():
        have = {n for e in found for n in e["provides"].get(kind, [])}
        missing = set(names) - have
        assert not missing, f"{dist_name} does not provide {kind} {sorted(missing)} (it provides {sorted(have)})"
    return found


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture
def defenda_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Plugins]:
    """A fresh plugin set with only defenda's built-ins (no third-party plugin, no env switches)."""
    for var in _ENV_SWITCHES:
        monkeypatch.delenv(var, raising=False)
    yield builtin_plugins()


@pytest.fixture
def defenda_pm(defenda_plugins: Plugins) -> Any:
    """The pluggy ``PluginManager`` of :func:`defenda_plugins`."""
    return defenda_plugins.pm


@pytest.fixture
def register_plugin() -> Iterator[Any]:
    """``register_plugin(obj, name=None) -> Plugins``: built-ins plus ``obj`` (and whatever this
    test registered before), strict, process-wide for this test; restored afterwards."""
    added: list[tuple[str, Any]] = []
    previous = set_plugins(None)

    def register(obj: Any, name: str | None = None) -> Plugins:
        added.append(_as_plugin(obj, name))
        plugins = builtin_plugins(*added)
        set_plugins(plugins)
        return plugins

    try:
        yield register
    finally:
        set_plugins(previous)


@pytest.fixture
def tiny_case() -> TinyCase:
    """:func:`make_tiny_case` with its defaults (image, CNN, batch of 2, seed 0)."""
    return make_tiny_case()


@pytest.fixture
def defenda_cli() -> Any:
    """:func:`run_cli`."""
    return run_cli
