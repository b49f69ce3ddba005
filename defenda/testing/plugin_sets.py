"""Plugin sets for tests: defenda's built-ins plus the plugins under test, isolated from the environment."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import types
from collections.abc import Iterator
from typing import Any

from defenda.plugins import Plugins, load_plugins, set_plugins

#: the environment switches of plugin loading, ignored (and restored) by these helpers
_ENV_SWITCHES = ("DEFENDA_STRICT_PLUGINS", "DEFENDA_DISABLE_PLUGINS", "DEFENDA_LOAD_PLUGINS", "DEFENDA_QUIET_PLUGINS")
_HOOK_BY_KIND = {"attack": "defenda_register_attacks", "defense": "defenda_register_defenses",
                 "metric": "defenda_register_metrics", "task": "defenda_register_tasks"}


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
        _restore_env(saved)


def _restore_env(saved: dict[str, str | None]) -> None:
    """Put back environment variables as ``saved`` recorded them (None: unset)."""
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
