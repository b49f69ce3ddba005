"""The registry of attacks, defenses, metrics and tasks that plugins registered.

Each class is validated as it is registered, so an error names the plugin that
registered it. A name registered twice is an error naming both plugins; never
a silent override, since results would then depend on what else is installed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from defenda.errors import RegistrationError
from defenda.params import strength_param, validate_params_class

KINDS = ("attack", "defense", "metric", "task")
_SLUG = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclasses.dataclass(frozen=True)
class Origin:
    """Which plugin registered something: entry-point name, distribution, version."""

    plugin: str
    dist: str
    version: str

    def describe(self) -> str:
        if self.dist:
            return f"plugin '{self.plugin}' ({self.dist} {self.version})"
        return f"plugin '{self.plugin}'"


@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    cls: Any
    origin: Origin


class Registry:
    """Classes by kind and slug, with the plugin that registered each."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}

    def register(self, kind: str, cls: Any, origin: Origin) -> None:
        """Validate and record ``cls``; raise RegistrationError naming the plugin on any problem."""
        problems = _validate(kind, cls)
        label = getattr(cls, "__name__", repr(cls))
        if problems:
            raise RegistrationError(f"{origin.describe()}: {kind} class {label}: {problems[0]}")
        existing = self._entries[kind].get(cls.name)
        if existing is not None and existing.cls is not cls:
            raise RegistrationError(
                f"{origin.describe()} registered {kind} '{cls.name}', which is already registered by "
                f"{existing.origin.describe()}. Disable one of them (DEFENDA_DISABLE_PLUGINS={origin.plugin})."
            )
        # Record the origin on the class so result rows can carry the plugin version.
        cls.plugin_name, cls.plugin_dist, cls.plugin_version = origin.plugin, origin.dist, origin.version
        self._entries[kind][cls.name] = Entry(kind, cls.name, cls, origin)

    def get(self, kind: str, name: str) -> Entry:
        """The entry for ``name``; the error lists the registered names and a close match."""
        try:
            return self._entries[kind][name]
        except KeyError:
            import difflib

            names = sorted(self._entries[kind])
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RegistrationError(
                f"unknown {kind} '{name}'.{hint} Registered {kind}s: {', '.join(names) or '(none)'}"
                f" (see `defenda plugins`)"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in self.names(kind)]

    def by_plugin(self, plugin: str) -> dict[str, list[str]]:
        """What one plugin provides: {'attacks': [...], ...} (only non-empty kinds)."""
        out: dict[str, list[str]] = {}
        for kind in KINDS:
            names = [e.name for e in self.entries(kind) if e.origin.plugin == plugin]
            if names:
                out[kind + "s"] = names
        return out

    def drop_plugin(self, plugin: str) -> None:
        """Forget everything a plugin registered (used when its registration fails half-way)."""
        for kind in KINDS:
            for name in [n for n, e in self._entries[kind].items() if e.origin.plugin == plugin]:
                del self._entries[kind][name]


def _validate(kind: str, cls: Any) -> list[str]:
    from defenda import interfaces

    base = {"attack": interfaces.Attack, "defense": interfaces.Defense,
            "metric": interfaces.Metric, "task": interfaces.Task}[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return [f"must be a subclass of defenda.{base.__name__}"]
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _SLUG.match(name):
        return [f"name {name!r} must be a lowercase kebab-case slug such as 'my-attack'"]
    problems = [f"Params {p}" for p in validate_params_class(cls.Params)]
    if kind == "defense" and not problems and strength_param(cls.Params) is None and cls.name != "none":
        problems.append("Params declares no strength field; mark one with defenda.param(..., strength='up'|'down')")
    required = {"attack": "reconstruct", "defense": None, "metric": "compute", "task": "load"}[kind]
    if required and getattr(cls, required) is getattr(base, required):
        problems.append(f"does not implement {required}()")
    if kind == "metric" and not getattr(cls, "columns", ()):
        problems.append("declares no columns")
    return problems
